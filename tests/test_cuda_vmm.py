"""The VMM sharing sequences (devrep/linux/cuda_vmm.py) on the fake driver: allocate / export / import / map
read-only / unmap / free, each driver error as a clear devrep error with what was done undone, UUID lookup, and
the fallback to classic CUDA IPC where VMM fd handles are unsupported. The real driver runs in tests/gpu."""

from __future__ import annotations

import os

import numpy as np
import pytest

from devrep._pages import PAGE_SIZE
from devrep.backends import load_backend
from devrep.errors import BackendError, FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from devrep.linux import cuda_vmm as cvmm
from devrep.testing.fake_cuda import FakeCupy, FakeGpu, FakeVmmDriver

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


def calls(gpu: FakeGpu) -> list[str]:
    return [n for n in gpu.names() if n.startswith("cuMem")]


def test_allocate_export_map_readonly_unmap_free() -> None:
    gpu = FakeGpu(total=1 << 30)
    drv = FakeVmmDriver(gpu)
    alloc = cvmm.allocate(drv, 0, 3 * MiB)
    assert alloc.size == 4 * MiB and alloc.granularity == 2 * MiB  # whole granules
    assert calls(gpu) == ["cuMemCreate", "cuMemAddressReserve", "cuMemMap", "cuMemSetAccess"]
    assert drv.access[alloc.ptr] == "readwrite"
    fd = cvmm.export(drv, alloc)
    assert cvmm.export(drv, alloc) == fd and calls(gpu).count("cuMemExportToShareableHandle") == 1  # once
    gpu.view(alloc.ptr, 16)[:] = 7  # the server writes through its mapping
    gpu.log.clear()
    reader = os.dup(fd)  # what the side channel delivers
    mapping = cvmm.map_readonly(drv, reader, alloc.size, alloc.granularity, 0)
    os.close(reader)
    assert calls(gpu) == ["cuMemImportFromShareableHandle", "cuMemAddressReserve", "cuMemMap", "cuMemSetAccess"]
    assert drv.access[mapping.ptr] == "read" and mapping.ptr != alloc.ptr
    assert (gpu.view(mapping.ptr, 16) == 7).all()  # the same memory
    gpu.log.clear()
    cvmm.unmap(drv, mapping)
    assert calls(gpu) == ["cuMemUnmap", "cuMemAddressFree", "cuMemRelease"]
    gpu.log.clear()
    cvmm.free(drv, alloc)
    assert calls(gpu) == ["cuMemUnmap", "cuMemAddressFree", "cuMemRelease"] and alloc.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)  # the exported fd was closed with the allocation
    assert not drv.mapped and not drv.reserved and gpu.used == 0


@pytest.mark.parametrize(("call", "code", "error"), [
    ("cuMemCreate", cvmm.CUDA_ERROR_OUT_OF_MEMORY, ResourceExhaustedError),
    ("cuMemAddressReserve", cvmm.CUDA_ERROR_OUT_OF_MEMORY, ResourceExhaustedError),
    ("cuMemMap", cvmm.CUDA_ERROR_NOT_SUPPORTED, FailedPreconditionError),
    ("cuMemSetAccess", cvmm.CUDA_ERROR_INVALID_VALUE, InvalidArgumentError),
    ("cuMemSetAccess", 999, BackendError),
])
def test_allocate_errors_are_clear_and_undone(call: str, code: int, error: type[Exception]) -> None:
    gpu = FakeGpu(total=1 << 30)
    drv = FakeVmmDriver(gpu)
    drv.fail[call] = code
    with pytest.raises(error, match=f"cuda:0: allocating {MiB} bytes.*{call} failed"):
        cvmm.allocate(drv, 0, MiB)
    assert not drv.mapped and not drv.reserved and not drv.handles and gpu.used == 0, calls(gpu)


def test_import_errors_and_bad_sizes() -> None:
    gpu = FakeGpu(total=1 << 30)
    drv = FakeVmmDriver(gpu)
    stranger = os.memfd_create("not-cuda")
    try:
        with pytest.raises(InvalidArgumentError, match="cuMemImportFromShareableHandle failed: CUDA_ERROR_INVALID_HAN"):
            cvmm.map_readonly(drv, stranger, 2 * MiB, 2 * MiB, 0)
        with pytest.raises(InvalidArgumentError, match="granularity"):
            cvmm.map_readonly(drv, stranger, 3 * MiB, 2 * MiB, 0)
    finally:
        os.close(stranger)
    alloc = cvmm.allocate(drv, 0, MiB)
    fd = cvmm.export(drv, alloc)
    drv.fail["cuMemMap"] = cvmm.CUDA_ERROR_OUT_OF_MEMORY
    gpu.log.clear()
    with pytest.raises(ResourceExhaustedError, match=r"read-only.*cuMemMap"):
        cvmm.map_readonly(drv, fd, alloc.size, alloc.granularity, 0)
    assert calls(gpu)[-2:] == ["cuMemAddressFree", "cuMemRelease"]  # undone in reverse
    cvmm.free(drv, alloc)


def test_uuid_picks_the_ordinal_whatever_the_visible_order() -> None:
    gpu = FakeGpu(total=1 << 30, devices=3)
    drv = FakeVmmDriver(gpu)
    assert [cvmm.ordinal_for_uuid(drv, u) for u in gpu.uuids] == [0, 1, 2]
    gpu.uuids.reverse()  # another CUDA_VISIBLE_DEVICES: the same GPU has another ordinal
    assert cvmm.ordinal_for_uuid(drv, gpu.uuids[0].upper()) == 0
    with pytest.raises(FailedPreconditionError, match=r"GPU-ffffffff.*does not see.*CUDA_VISIBLE_DEVICES"):
        cvmm.ordinal_for_uuid(drv, cvmm.format_uuid(b"\xff" * 16))


def test_backend_falls_back_to_ipc_where_fd_handles_are_unsupported() -> None:
    gpu = FakeGpu(total=1 << 30, fd_sharing=False)
    b = load_backend("cuda", cupy_module=FakeCupy(gpu), vmm=FakeVmmDriver(gpu))
    assert b.sharing(0)[0] == "cuda_ipc" and "POSIX file descriptors" in b.sharing(0)[1]  # type: ignore[attr-defined]
    buf = b.allocate(0, 4 * PAGE_SIZE)
    handle = b.export(buf)
    assert handle.kind == "cuda_ipc" and handle.gpu_uuid == gpu.uuids[0] and not calls(gpu)
    b.free(buf)
    with pytest.raises(FailedPreconditionError, match=r"sharing=.vmm.*POSIX file descriptors"):
        load_backend("cuda", cupy_module=FakeCupy(gpu), vmm=FakeVmmDriver(gpu), sharing="vmm")
    ipc = load_backend("cuda", cupy_module=FakeCupy(FakeGpu()), sharing="ipc")
    assert ipc.sharing(0) == ("cuda_ipc", "sharing='ipc' was asked for")  # type: ignore[attr-defined]


def test_backend_vmm_replica_is_exported_as_an_fd_and_freed() -> None:
    gpu = FakeGpu(total=1 << 30)
    drv = FakeVmmDriver(gpu)
    b = load_backend("cuda", cupy_module=FakeCupy(gpu), vmm=drv)
    host = np.arange(8 * PAGE_SIZE, dtype=np.uint64).astype(np.uint8)
    buf = b.allocate(0, host.nbytes)
    b.copy_runs(host, np.array([[0, 8]]), [buf])
    handle = b.export(buf)
    assert handle.kind == "cuda_fd" and isinstance(handle.payload, int) and handle.nbytes == 2 * MiB
    mapping = cvmm.map_readonly(drv, handle.payload, handle.nbytes, handle.granularity, 0)
    assert np.array_equal(gpu.view(mapping.ptr, host.nbytes), host)
    cvmm.unmap(drv, mapping)
    b.free(buf)
    assert not drv.mapped and not drv.handles and not drv.reserved
    b.close()
    assert gpu.used == 0  # staging buffers too


def test_real_driver_absent_is_reported_with_the_extras() -> None:
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        driver, why = cvmm.load_driver()
        assert driver is None and "devrep[cuda12]" in why and "devrep[cuda13]" in why
    else:
        pytest.skip("cuda-bindings is installed: the real driver is tested on a GPU (tests/gpu)")
