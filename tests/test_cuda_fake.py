"""The CUDA backend's host-side logic on ``devrep.testing.fake_cuda`` (no GPU needed): what issue 15 found by
review. Each test fails on the code before the fix; the same behaviour on a real GPU is checked by
``tests/gpu`` and ``../shared/gpu/run_gpu.sh``."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from devrep import Replicator
from devrep._pages import PAGE_SIZE
from devrep.backends import load_backend
from devrep.backends._cuda import CudaBackend, default_margin
from devrep.errors import BackendError, FailedPreconditionError, ResourceExhaustedError
from devrep.hashing import hash_pages
from devrep.testing import random_host
from devrep.testing.fake_cuda import FakeCupy, FakeGpu, FakeVmmDriver

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def make(gpu: FakeGpu, **options: object) -> CudaBackend:
    backend = load_backend("cuda", cupy_module=FakeCupy(gpu), vmm=FakeVmmDriver(gpu), **options)
    assert isinstance(backend, CudaBackend)
    return backend


@pytest.fixture(params=["vmm", "ipc"])
def gpu(request: pytest.FixtureRequest) -> FakeGpu:
    return FakeGpu(total=1 << 30, fd_sharing=request.param == "vmm")


@pytest.fixture
def backend(gpu: FakeGpu) -> Iterator[CudaBackend]:
    b = make(gpu, batch_bytes=16 * PAGE_SIZE)
    try:
        yield b
    finally:
        b.close()


def scattered(npages: int) -> np.ndarray:
    return np.array([[p, 1] for p in range(0, npages, 2)], dtype=np.int64)


def test_missing_nvrtc_names_the_extras(gpu: FakeGpu) -> None:
    gpu.nvrtc_missing = True
    b = make(gpu)
    buf = b.allocate(0, PAGE_SIZE)
    with pytest.raises(FailedPreconditionError, match=r"NVRTC.*pip install devrep\[cuda12\].*devrep\[cuda13\]"):
        b.hash_pages(buf)
    gpu.nvrtc_missing, gpu.compile_error = False, "devrep.cu(3): error: expected a ';'"
    with pytest.raises(BackendError, match=r"build log:\n.*expected a ';'"):  # a real compile error stays one
        b.hash_pages(buf)
    b.free(buf)
    b.close()


def test_default_capacity_is_free_memory_minus_a_margin() -> None:
    gpu = FakeGpu(total=1 << 30)
    gpu.used = 600 * MiB  # another process holds 600 MiB of the card
    b = make(gpu)
    capacity = (1 << 30) - 600 * MiB - default_margin(1 << 30)
    with pytest.raises(ResourceExhaustedError, match=f"cuda:0 .*is full: 0 of {capacity} bytes"):
        b.allocate(0, capacity + PAGE_SIZE)  # would fit in the free memory, not with the margin left
    buf = b.allocate(0, 64 * MiB)
    assert b.bytes_in_use(0) == 64 * MiB
    b.free(buf)
    b.close()


def test_allocate_frees_cupys_cached_blocks_and_retries_once(gpu: FakeGpu) -> None:
    b = make(gpu, capacity=1 << 40)
    gpu.pool_cached = gpu.free - MiB  # CuPy's pool sits on nearly all free memory
    buf = b.allocate(0, 64 * MiB)
    names = gpu.names()
    assert names.count("oom") == 1 and "free_all_blocks" in names, names
    assert names.index("oom") < names.index("free_all_blocks")
    assert not b.read(buf).any()
    b.free(buf)
    gpu.used += 900 * MiB  # another process takes most of the card
    with pytest.raises(ResourceExhaustedError, match="cuda:0"):  # too big for what is free: two tries, then an error
        b.allocate(0, 200 * MiB)
    gpu.used -= 900 * MiB
    assert gpu.names().count("free_all_blocks") >= 2
    gpu.log.clear()
    with pytest.raises(ResourceExhaustedError, match=r"cuda:0 .*cannot hold"):  # bigger than the device: no driver call
        b.allocate(0, 1 << 48)
    assert not [n for n in gpu.names() if n in ("cuMemCreate", "malloc", "oom")]
    assert b.bytes_in_use(0) == 0
    b.close()


def test_oom_in_temporaries_is_resource_exhausted(backend: CudaBackend, gpu: FakeGpu) -> None:
    host = random_host(64, seed=1)
    buf = backend.allocate(0, host.nbytes)
    backend.copy_runs(host, np.array([[0, 64]]), [buf])  # contiguous: no pool temporaries
    gpu.pool_cached = gpu.free  # every pool block cached: the first try fails, the retry after freeing works
    assert np.array_equal(backend.hash_pages(buf, np.arange(64)), hash_pages(host))
    assert "free_all_blocks" in gpu.names()
    gpu.pool_limit = gpu.used  # nothing more fits in CuPy's pool, freed or not
    a = np.arange(1000, dtype=np.uint64)
    for call in (lambda: backend.hash_pages(buf, np.arange(64)), lambda: backend.hash_pages(buf),
                 lambda: backend.compare(a, a + np.uint64(1)),
                 lambda: backend.copy_runs(host, scattered(64), [buf])):
        with pytest.raises(ResourceExhaustedError, match="cuda:0"):
            call()
    gpu.pool_limit = None
    assert np.array_equal(backend.hash_pages(buf), hash_pages(host))  # and it recovers
    backend.free(buf)


def test_exception_mid_copy_drains_the_stream_before_returning(backend: CudaBackend, gpu: FakeGpu) -> None:
    host = random_host(256, seed=2)
    buf = backend.allocate(0, host.nbytes)
    backend.copy_runs(host, np.array([[0, 4]]), [buf])  # builds kernels and staging
    gpu.fail_launch = {"scatter_pages": 2}  # the second batch's scatter fails, the first batch's DMA was queued
    gpu.log.clear()
    with pytest.raises(BackendError, match=r"cuda:0.*copying page runs failed.*injected"):
        backend.copy_runs(host, scattered(256), [buf])
    names = gpu.names()
    failed = max(i for i, e in enumerate(gpu.log) if e[0] == "launch")
    assert "stream_sync" in names[failed:], f"no stream synchronize after the failed launch: {names[failed:]}"
    backend.copy_runs(host, np.array([[0, 256]]), [buf])  # the pinned buffers are usable again
    assert np.array_equal(backend.read(buf), host)
    backend.free(buf)


def test_launch_geometry_fills_the_device_and_covers_every_page(backend: CudaBackend, gpu: FakeGpu) -> None:
    for npages in (1, 9, 5000):
        host = random_host(npages, seed=npages)
        buf = backend.allocate(0, host.nbytes)
        backend.copy_runs(host, np.array([[0, npages]]), [buf])
        gpu.log.clear()
        assert np.array_equal(backend.hash_pages(buf), hash_pages(host))
        (launch,) = [e for e in gpu.log if e[0] == "launch"]
        (grid,), (threads,) = launch[2], launch[3]
        sms = 4  # FakeRuntime's multiProcessorCount
        pages_per_pass = grid * threads // 32 * 8  # 8 pages per warp, grid-stride beyond
        assert grid <= sms * 8 and (pages_per_pass >= npages or grid == sms * 8), (npages, grid, threads)
        backend.free(buf)


def test_fan_out_over_two_gpus_runs_one_host_thread_each() -> None:
    gpu = FakeGpu(total=1 << 30, devices=2)
    b = make(gpu, batch_bytes=16 * PAGE_SIZE)
    host = random_host(64, seed=3)
    targets = [b.allocate(0, host.nbytes), b.allocate(1, host.nbytes)]
    gpu.log.clear()
    seen: list[int] = []
    b.copy_runs(host, np.array([[0, 64]]), targets, seen.append)
    assert sum(seen) == host.nbytes  # reported once, not per device
    threads = {e[5] for e in gpu.log if e[0] == "memcpy_async"}
    assert len(threads) == 2, f"both devices' copies ran on {len(threads)} host thread(s)"
    for t in targets:
        assert np.array_equal(b.read(t), host)
    b.close()


@pytest.mark.parametrize("release_wait", ["device", "stream"])
def test_inprocess_release_orders_the_next_sync_after_queued_readers(release_wait: str) -> None:
    """Issue 15: ``Lease.release()`` returned at once and the next sync's non-blocking copy stream could
    overwrite the buffer a kernel queued before the release still read. Now release records an event on the
    current stream, the copy into that buffer waits for it on the GPU, and (default) release also waits for
    the whole device."""
    gpu = FakeGpu(total=1 << 30)
    b = make(gpu, batch_bytes=16 * PAGE_SIZE, release_wait=release_wait)
    cp = FakeCupy(gpu)
    with Replicator(backends={"cuda": b}) as rep:
        region = rep.create_region("r", 32 * PAGE_SIZE)
        region.array[:] = 1
        rep.replicate("r", ["cuda:0"])
        lease = region.acquire("cuda:0")
        buffer = lease.buffer
        user = cp.cuda.Stream(non_blocking=True)
        with user:  # a reader's kernel queued on its own stream, then released on that stream
            FakeCupy(gpu).RawModule().get_function("hash_all")((1,), (32,), (lease.array, cp.empty(32, np.uint64),
                                                                            np.int64(32)))
            gpu.log.clear()
            lease.release()
        records = [e for e in gpu.log if e[0] == "event_record"]
        assert records and records[0][2] == user.ptr, gpu.log
        assert (("device_sync", 0) in gpu.log) == (release_wait == "device")
        event = records[0][1]
        region.array[:PAGE_SIZE] = 2
        region.invalidate(0, PAGE_SIZE)
        rep.sync("r")  # no lease left: the sync writes the buffer the reader released
        with region.acquire("cuda:0") as again:
            assert np.array_equal(again.read(0, PAGE_SIZE), region.array[:PAGE_SIZE])
        writes = [i for i, e in enumerate(gpu.log) if e[0] == "memcpy_async"
                  and buffer.handle is not None and e[4] >= buffer.handle.ptr
                  and e[4] < buffer.handle.ptr + buffer.nbytes]
        waits = [i for i, e in enumerate(gpu.log) if e[0] == "wait_event" and e[2] == event]
        assert writes, "the sync did not write the released buffer: the test proves nothing"
        assert waits and waits[0] < writes[0], "the copy into the released buffer did not wait for its readers"
        rep.unregister("r")


def test_free_waits_for_released_readers_and_own_streams(gpu: FakeGpu) -> None:
    b = make(gpu)
    host = random_host(8)
    buf = b.allocate(0, host.nbytes)
    b.copy_runs(host, np.array([[0, 8]]), [buf])
    b.release_reader(buf)
    event = next(e[1] for e in reversed(gpu.log) if e[0] == "event_record")
    gpu.log.clear()
    b.free(buf)
    names = gpu.names()
    assert ("event_sync", event) in gpu.log and "stream_sync" in names
    drop = names.index("cuMemUnmap") if gpu.fd_sharing else len(names)
    assert names.index("stream_sync") < drop and gpu.log.index(("event_sync", event)) < drop
    b.close()


def test_doctor_reports_vmm_fd_sharing_or_why_not() -> None:
    from devrep.doctor import probe_cuda

    gpu = FakeGpu(total=1 << 30, devices=2)
    status = probe_cuda(FakeCupy(gpu), FakeVmmDriver(gpu))
    assert status.available and [d.device for d in status.devices] == ["cuda:0", "cuda:1"]
    assert all(d.sharing == "cuda_fd" for d in status.devices) and status.devices[1].uuid == gpu.uuids[1]
    gpu.fd_sharing = False
    (dev, _) = probe_cuda(FakeCupy(gpu), FakeVmmDriver(gpu)).devices
    assert dev.sharing == "cuda_ipc" and "POSIX file descriptors" in dev.reason
    try:
        import cupy  # noqa: F401
    except ImportError:
        missing = probe_cuda()
        assert not missing.available and "devrep[cuda12]" in missing.reason


def test_release_without_local_readers_does_not_wait() -> None:
    """What the service can use for a remote client's lease (the client waited for its own GPU work)."""
    gpu = FakeGpu(total=1 << 30)
    b = make(gpu)
    with Replicator(backends={"cuda": b}) as rep:
        region = rep.create_region("remote", 8 * PAGE_SIZE)
        rep.replicate("remote", ["cuda:0"])
        lease = region.acquire("cuda:0")
        gpu.log.clear()
        lease.release(local_readers=False)
        assert "event_record" not in gpu.names() and "device_sync" not in gpu.names()
        rep.unregister("remote")
