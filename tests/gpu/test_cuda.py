"""CUDA backend on a real GPU: the export (VMM fd, read-only; or CUDA IPC) mapped by another process, in-process
release waiting for kernels, DLPack, large scattered copies, errors.

Runs only where CuPy and an NVIDIA GPU exist (``bench/gpu_check.sh`` runs it); the skip says which is missing.
The backend-independent checks run for CUDA in ``tests/test_backend_conformance.py``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import numpy as np
import pytest
from _support import SPIN_KERNEL, child_argv, cuda_missing

from devrep import Replicator
from devrep._pages import PAGE_SIZE, runs_from_pages
from devrep.backends import Backend, ExportHandle, load_backend
from devrep.errors import BackendError, ResourceExhaustedError, UnknownDeviceError
from devrep.hashing import hash_pages
from devrep.testing import random_host

if (_missing := cuda_missing()) is not None:
    pytest.skip(f"CUDA suite not run: {_missing}", allow_module_level=True)
cupy = pytest.importorskip("cupy")

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


@pytest.fixture
def cuda() -> Iterator[Backend]:
    b = load_backend("cuda")
    try:
        yield b
    finally:
        b.close()


def _map_in_child(handle: ExportHandle, write: bool) -> subprocess.CompletedProcess[str]:
    payload = str(handle.payload) if isinstance(handle.payload, int) else handle.payload.hex()
    fds = (handle.payload,) if isinstance(handle.payload, int) else ()
    return subprocess.run(child_argv("cuda_map", handle.kind, payload, str(handle.nbytes),
                                     str(handle.granularity), handle.gpu_uuid, "write" if write else "read"),
                          capture_output=True, text=True, timeout=120, pass_fds=fds)


def test_export_is_mapped_by_another_process(cuda: Backend) -> None:
    host = random_host(64)
    buf = cuda.allocate(0, host.nbytes)
    cuda.copy_runs(host, np.array([[0, 64]]), [buf])
    handle = cuda.export(buf)
    assert handle.gpu_uuid.startswith("GPU-")
    if handle.kind == "cuda_ipc":
        assert isinstance(handle.payload, bytes) and len(handle.payload) == 64
    else:
        assert handle.kind == "cuda_fd" and isinstance(handle.payload, int)
    out = _map_in_child(handle, write=False)
    assert out.returncode == 0, out.stderr
    assert bytes.fromhex(out.stdout)[:host.nbytes] == host.tobytes()
    cuda.free(buf)


def test_vmm_mapping_is_read_only(cuda: Backend) -> None:
    kind, why = cuda.sharing(0)  # type: ignore[attr-defined]
    if kind != "cuda_fd":
        pytest.skip(f"replicas are shared by classic CUDA IPC here (read-write): {why}")
    buf = cuda.allocate(0, 4 * PAGE_SIZE)
    out = _map_in_child(cuda.export(buf), write=True)
    assert out.returncode != 0 and "wrote" not in out.stdout, "a reader wrote through its read-only mapping"
    assert not cuda.read(buf).any()
    cuda.free(buf)


def test_inprocess_release_waits_for_kernels_reading_the_replica() -> None:
    with Replicator() as rep:
        region = rep.create_region("spin", 1 << 20)
        region.array[:] = 1
        rep.replicate("spin", ["cuda:0"])
        lease = region.acquire("cuda:0")
        out = cupy.zeros(32, dtype=cupy.uint32)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            cupy.RawKernel(SPIN_KERNEL, "spin")((1,), (32,), (lease.array, cupy.int64(1_000_000_000), out))
        lease.release()
        assert stream.done, "Lease.release() returned while a kernel still read the replica"
        rep.unregister("spin")


def test_device_array_is_cupy_and_dlpack_exports(cuda: Backend) -> None:
    host = random_host(8, seed=1)
    buf = cuda.allocate(0, host.nbytes)
    cuda.copy_runs(host, np.array([[0, 8]]), [buf])
    arr = cuda.device_array(buf)
    assert isinstance(arr, cupy.ndarray) and arr.dtype == cupy.uint8 and arr.size == host.nbytes
    again = cupy.from_dlpack(arr)
    assert again.data.ptr == arr.data.ptr
    assert np.array_equal(again.get(), host)
    del arr, again
    cuda.free(buf)


def test_large_scattered_copy_and_hash(cuda: Backend) -> None:
    npages = (256 << 20) // PAGE_SIZE
    host = random_host(npages, seed=2)
    targets = [cuda.allocate(0, host.nbytes), cuda.allocate(0, host.nbytes)]
    pages = np.sort(np.random.default_rng(3).choice(npages, npages // 7, replace=False))
    wanted = np.unique(np.concatenate([pages, np.arange(npages - 5000, npages)]))  # scattered plus one long run
    seen: list[int] = []
    cuda.copy_runs(host, runs_from_pages(wanted), targets, seen.append)
    copied = np.zeros(npages, bool)
    copied[wanted] = True
    assert sum(seen) == int(copied.sum()) * PAGE_SIZE
    expected = hash_pages(host)
    zero = hash_pages(np.zeros(PAGE_SIZE, np.uint8))[0]
    for t in targets:
        got = cuda.hash_pages(t)
        assert np.array_equal(got[copied], expected[copied])
        assert (got[~copied] == zero).all()
        cuda.free(t)


def test_out_of_memory_and_unknown_device(cuda: Backend) -> None:
    with pytest.raises(ResourceExhaustedError, match="cuda:0"):
        cuda.allocate(0, 1 << 50)  # refused against the device's size
    driver = load_backend("cuda", capacity=1 << 52)
    try:
        with pytest.raises(ResourceExhaustedError, match="cuda:0"):
            driver.allocate(0, 1 << 48)  # refused by cudaMalloc
        assert driver.bytes_in_use(0) == 0
    finally:
        driver.close()
    with pytest.raises(UnknownDeviceError, match="cuda:64"):
        cuda.allocate(64, PAGE_SIZE)
    assert cuda.bytes_in_use(0) == 0


def test_kernel_build_failure_names_device_and_log() -> None:
    broken = load_backend("cuda", kernel_source='extern "C" __global__ void hash_all() { not c++; }')
    try:
        buf = broken.allocate(0, PAGE_SIZE)
        with pytest.raises(BackendError, match=r"cuda:0 \(") as info:
            broken.hash_pages(buf)
        assert "build log" in str(info.value)
        broken.free(buf)
        assert broken.bytes_in_use(0) == 0
    finally:
        broken.close()


def test_replicator_end_to_end_on_gpu() -> None:
    with Replicator() as rep:
        region = rep.create_region("gpu", 1 << 20)
        region.array[:] = np.random.default_rng(4).integers(0, 256, region.nbytes, dtype=np.uint8)
        rep.replicate("gpu", ["cuda:0"])
        with region.acquire("cuda:0") as lease:
            assert isinstance(lease.array, cupy.ndarray)
            assert np.array_equal(lease.array.get(), region.array)
        region.array[4096] ^= 1
        region.invalidate(4096, 1)
        assert rep.sync("gpu")[0].pages_copied == 1
        assert all(r.mismatched_pages == 0 for r in region.verify())
        backend = rep.backend("cuda")
        rep.unregister("gpu")
        assert backend.bytes_in_use(0) == 0
