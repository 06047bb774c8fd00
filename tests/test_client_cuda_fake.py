"""CUDA replicas through the service, on ``devrep.testing.fake_cuda`` (no GPU needed): the side channel carries
the VMM fd and the GPU UUID, the client maps the replica read-only on the GPU with that UUID, once per lease
however often ``to_cupy()`` / DLPack ask, and ``release()`` / ``Client.close()`` wait for the GPU and unmap
exactly once. A real server and client over real sockets; only CuPy and the driver are fakes (one process,
so the fake driver's fds resolve). The GPU run is tests/test_client_cuda.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from devrep.backends import load_backend
from devrep.client import Client, connect
from devrep.client._client import ClientLease
from devrep.client._transport import LeaseGrant
from devrep.engine import Replicator
from devrep.testing import serve_in_process
from devrep.testing.fake_cuda import FakeCupy, FakeGpu, FakeVmmDriver
from devrep.wire._gen import devrep_pb2 as pb

pytestmark = pytest.mark.timeout(120)


class ReorderedDriver(FakeVmmDriver):
    """The client's view of the same GPUs in another order (another CUDA_VISIBLE_DEVICES)."""

    def __init__(self, server: FakeVmmDriver) -> None:
        self.__dict__.update(server.__dict__)  # the same handles, mappings and fds as the server's driver

    def device_uuid(self, ordinal: int) -> str:
        return self.gpu.uuids[self.gpu.devices - 1 - ordinal]


@contextmanager
def served(gpu: FakeGpu, reorder: bool = False) -> Iterator[tuple[Client, FakeVmmDriver]]:
    driver = FakeVmmDriver(gpu)
    backend = load_backend("cuda", cupy_module=FakeCupy(gpu), vmm=driver, batch_bytes=1 << 20)
    with serve_in_process(replicator=Replicator({"cuda": backend})) as server, \
            connect(server.address, label="fake-gpu") as client:
        client._cupy_module = FakeCupy(gpu)
        client._vmm_driver = ReorderedDriver(driver) if reorder else driver
        yield client, driver


def fill(client: Client, name: str, device: str) -> np.ndarray:
    region = client.create_region(name, 64 * 4096)
    region.array[:] = np.random.default_rng(1).integers(0, 256, region.array.size, dtype=np.uint8)
    region.invalidate()
    client.replicate(name, [device])
    return region.array


def test_vmm_replica_mapped_readonly_once_per_lease_and_unmapped_once() -> None:
    gpu = FakeGpu(total=1 << 30)
    with served(gpu) as (client, driver):
        host = fill(client, "v", "cuda:0")
        lease = client.acquire("v", "cuda:0")
        assert lease.export_kind == "cuda_fd" and lease.gpu_uuid == gpu.uuids[0]
        arrays = [lease.to_cupy(), lease.to_cupy()]
        assert lease.__dlpack_device__() == (2, 0)
        assert lease.__dlpack__()[0] == "fake-dlpack"  # what cupy.from_dlpack / torch.from_dlpack call
        assert gpu.names().count("cuMemImportFromShareableHandle") == 1
        assert [e[2] for e in client._ipc.values()] == [1], "one reference per lease, however many opens"
        assert np.array_equal(arrays[0].get(), host) and np.array_equal(arrays[1].get(), host)
        (ptr,) = [e[0] for e in client._ipc.values()]
        assert driver.access[ptr] == "read", "readers must get a read-only mapping"
        second = client.acquire("v", "cuda:0")  # same buffer: the mapping is shared, referenced twice
        assert np.array_equal(second.to_cupy().get(), host)
        assert [e[2] for e in client._ipc.values()] == [2]
        gpu.log.clear()
        lease.release()
        assert "cuMemUnmap" not in gpu.names() and [e[2] for e in client._ipc.values()] == [1]
        second.release()
        names = gpu.names()
        assert names.count("cuMemUnmap") == 1 and names.index("device_sync") < names.index("cuMemUnmap")
        assert client._ipc == {}
        lease.release()  # idempotent
        assert gpu.names().count("cuMemUnmap") == 1


def test_client_maps_the_gpu_with_the_replicas_uuid() -> None:
    gpu = FakeGpu(total=1 << 30, devices=2)
    with served(gpu, reorder=True) as (client, _):
        host = fill(client, "u", "cuda:1")
        with client.acquire("u", "cuda:1") as lease:
            assert lease.gpu_uuid == gpu.uuids[1]
            gpu.log.clear()
            assert np.array_equal(lease.to_cupy().get(), host)
            (access,) = [e for e in gpu.log if e[0] == "cuMemSetAccess"]
            assert access[3] == 0 and access[4] == "read", f"mapped on the wrong ordinal: {access}"


def test_ipc_fallback_opens_once_and_closes_once() -> None:
    gpu = FakeGpu(total=1 << 30, fd_sharing=False)
    with served(gpu) as (client, _):
        host = fill(client, "i", "cuda:0")
        with client.acquire("i", "cuda:0") as lease:
            assert lease.export_kind == "cuda_ipc" and lease.gpu_uuid == gpu.uuids[0]
            assert np.array_equal(lease.to_cupy().get(), host)
            lease.to_cupy()
            lease.__dlpack_device__()
            assert gpu.names().count("ipc_open") == 1
        assert gpu.names().count("ipc_close") == 1 and client._ipc == {}


@pytest.mark.parametrize("fd_sharing", [True, False])
def test_client_close_waits_for_the_gpu_and_closes_mappings(fd_sharing: bool) -> None:
    gpu = FakeGpu(total=1 << 30, fd_sharing=fd_sharing)
    with served(gpu) as (client, _):
        fill(client, "c", "cuda:0")
        lease = client.acquire("c", "cuda:0")
        lease.to_cupy()
        (ptr,) = [e[0] for e in client._ipc.values()]
        gpu.log.clear()
        client.close()  # the server then frees the replica too (same process here): count the client's mapping
        closes = [i for i, e in enumerate(gpu.log) if e[0] in ("cuMemUnmap", "ipc_close") and e[1] == ptr]
        assert len(closes) == 1 and gpu.names().index("device_sync") < closes[0], gpu.log
        assert client._ipc == {}


@pytest.mark.parametrize("fd_sharing", [True, False])
def test_grpc_acquire_carries_the_gpu_uuid_and_granularity(fd_sharing: bool) -> None:
    """The gRPC Acquire (the path of clients without the side channel's acquire, e.g. over TCP or from C++)
    names the replica's GPU by UUID and, for VMM fds, the granularity, like the side channel's acquire; the
    client maps on the GPU with that UUID (reordered: another CUDA_VISIBLE_DEVICES) and reserves in multiples
    of that granularity."""
    gpu = FakeGpu(total=1 << 30, devices=2, fd_sharing=fd_sharing)
    with served(gpu, reorder=True) as (client, driver):
        host = fill(client, "g", "cuda:1")
        reply = client._call(client._stub.Acquire, pb.AcquireRequest(name="g", device="cuda:1", fresh=True))
        want_gran = driver.granularity(1) if fd_sharing else 0
        print(f"expected uuid {gpu.uuids[1]} granularity {want_gran}; got {reply.gpu_uuid!r} {reply.granularity}")
        assert reply.export_kind == ("cuda_fd" if fd_sharing else "cuda_ipc")
        assert reply.gpu_uuid == gpu.uuids[1] and reply.granularity == want_gran
        with ClientLease(client, "g", LeaseGrant.from_grpc(reply)) as lease:  # what Client.acquire builds over gRPC
            assert lease.gpu_uuid == gpu.uuids[1] and not lease.via_side_channel
            gpu.log.clear()
            assert np.array_equal(lease.to_cupy().get(), host)
            (entry,) = client._ipc.values()
            assert entry[1] == 0, f"opened on ordinal {entry[1]}, want 0 (the server's cuda:1 in this client's order)"
            if fd_sharing:
                (access,) = [e for e in gpu.log if e[0] == "cuMemSetAccess"]
                assert access[3] == 0 and access[4] == "read", f"mapped on the wrong ordinal: {access}"
                (reserve,) = [e for e in gpu.log if e[0] == "cuMemAddressReserve"]
                assert reserve[2] == want_gran, f"reserved with alignment {reserve[2]}, want {want_gran}"
        assert client._ipc == {}
