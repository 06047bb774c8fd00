"""CUDA replicas through the service: the client maps them (VMM fd read-only, or CUDA IPC) with ``to_cupy`` and
DLPack.

Runs only where CuPy and an NVIDIA GPU exist; the skip says which is missing. The server is its own process
(a CUDA IPC handle cannot be opened in the process that exported it)."""

from __future__ import annotations

import numpy as np
import pytest
from _devrep_service import server_process
from _support import SPIN_KERNEL, cuda_missing

from devrep.client import connect

if (_missing := cuda_missing()) is not None:
    pytest.skip(f"CUDA client test not run: {_missing}", allow_module_level=True)
cupy = pytest.importorskip("cupy")

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]


def test_cuda_replica_via_ipc_and_dlpack() -> None:
    with server_process() as (address, _), connect(address) as client:
        region = client.create_region("g", 4 << 20)
        region.array[:] = np.arange(region.array.size, dtype=np.uint64).astype(np.uint8)
        region.invalidate()
        client.replicate("g", ["cuda:0"])
        with client.acquire("g", "cuda:0") as lease:
            assert lease.export_kind in ("cuda_fd", "cuda_ipc") and lease.gpu_uuid.startswith("GPU-")
            if lease.export_kind == "cuda_ipc":
                assert len(lease.cuda_ipc_handle) == 64
            gpu = lease.to_cupy()
            assert gpu.size == region.array.size
            assert np.array_equal(cupy.asnumpy(gpu), region.array)
            assert np.array_equal(cupy.asnumpy(cupy.from_dlpack(lease)), region.array)
            assert [e[2] for e in client._ipc.values()] == [1], "one mapping reference per lease"
            del gpu
        assert client._ipc == {}, "the mapping stayed open after release()"
        region.array[4096:8192] = 3
        region.invalidate(4096, 4096)
        with client.acquire("g", "cuda:0") as lease:  # fresh: the stale page was copied first
            assert int(cupy.asnumpy(lease.to_cupy()[4096])) == 3


def test_release_waits_for_kernels_still_reading_the_replica() -> None:
    with server_process() as (address, _), connect(address) as client:
        region = client.create_region("k", 1 << 20)
        region.array[:] = 1
        region.invalidate()
        client.replicate("k", ["cuda:0"])
        keep = client.acquire("k", "cuda:0")  # a second lease on the same buffer keeps the IPC mapping open
        lease = client.acquire("k", "cuda:0")
        spin = cupy.RawKernel(SPIN_KERNEL, "spin")
        out = cupy.zeros(32, dtype=cupy.uint32)
        stream = cupy.cuda.Stream(non_blocking=True)  # not the stream release() would sync if it synced only one
        with stream:
            spin((1,), (32,), (lease.to_cupy(), cupy.int64(2_000_000_000), out))  # about a second of reading
        assert not stream.done
        lease.release()
        assert stream.done, "release() returned while a kernel still read the replica"
        assert int(out[0]) > 0
        keep.release()
