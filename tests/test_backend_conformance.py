"""One conformance suite for every device backend: CPU, NUMA, OpenCL (PoCL in CI, zero-copy and staged data paths)
and CUDA where a GPU and CuPy exist; ``cuda-fake`` runs the CUDA backend's host logic on ``devrep.testing.fake_cuda``
(host memory for GPU memory, numpy kernels) everywhere, ``cuda-fake-ipc`` the same without VMM. Also the OpenCL
backend's bad-input handling, end to end through ``Replicator``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import xxhash
from _support import child_argv

from devrep import Replicator
from devrep._pages import PAGE_SIZE, pages_from_runs
from devrep.backends import Backend, DeviceBuffer, load_backend
from devrep.backends._staging import aligned_empty
from devrep.errors import BackendError, InvalidArgumentError, ResourceExhaustedError, UnknownDeviceError
from devrep.testing import random_host
from devrep.testing.fake_cuda import FakeCupy, FakeGpu, FakeVmmDriver

pytestmark = pytest.mark.timeout(120)

KINDS = ["cpu", "numa", "opencl", "opencl-staged", "cuda", "cuda-fake", "cuda-fake-ipc"]


def _cuda_missing() -> str | None:
    """Why the CUDA variant cannot run here, or None."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install devrep[cuda12] or devrep[cuda13])"
    backend = load_backend("cuda")
    if backend.device_count() == 0:
        return "CuPy is installed but no NVIDIA GPU / CUDA driver is visible"
    return None


def make_backend(kind: str, **options: object) -> Backend:
    if kind == "cpu":
        return load_backend("cpu", devices=2, **options)
    if kind == "numa":  # one device per NUMA node with memory: numa:0 everywhere
        return load_backend("numa", **options)
    if kind == "opencl":
        return load_backend("opencl", **options)
    if kind == "opencl-staged":  # the discrete-GPU path (pack, one transfer, scatter kernel), run on PoCL
        return load_backend("opencl", zero_copy=False, batch_bytes=1 << 20, **options)
    if kind.startswith("cuda-fake"):
        gpu = FakeGpu(total=1 << 30, fd_sharing=kind == "cuda-fake")
        return load_backend("cuda", batch_bytes=1 << 20, cupy_module=FakeCupy(gpu), vmm=FakeVmmDriver(gpu),
                            **options)
    missing = _cuda_missing()
    if missing:
        pytest.skip(f"CUDA backend not tested here: {missing}")
    return load_backend("cuda", batch_bytes=1 << 20, **options)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(kind: str) -> Iterator[Backend]:
    b = make_backend(kind)
    try:
        yield b
    finally:
        b.close()


def page(buf: np.ndarray, p: int) -> np.ndarray:
    return buf[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]


def test_allocate_zeroed_and_free(backend: Backend) -> None:
    before = backend.bytes_in_use(0)
    buf = backend.allocate(0, 8 * PAGE_SIZE)
    assert backend.bytes_in_use(0) == before + 8 * PAGE_SIZE
    assert buf.device.endswith(":0") and buf.nbytes == 8 * PAGE_SIZE
    assert not backend.read(buf).any()
    backend.free(buf)
    backend.free(buf)  # idempotent
    assert buf.freed and backend.bytes_in_use(0) == before


def test_copy_runs_fan_out_and_read_back(backend: Backend) -> None:
    host = random_host(64)
    targets = [backend.allocate(0, host.nbytes), backend.allocate(0, host.nbytes)]
    runs = np.array([[0, 3], [10, 1], [20, 30], [63, 1]], dtype=np.int64)
    reported: list[int] = []
    backend.copy_runs(host, runs, targets, reported.append)
    copied = pages_from_runs(runs)
    assert sum(reported) == copied.size * PAGE_SIZE
    for t in targets:
        back = backend.read(t)
        for p in range(64):
            expected = page(host, p) if p in copied else np.zeros(PAGE_SIZE, np.uint8)
            assert np.array_equal(page(back, p), expected), f"page {p} on {t.device}"
        assert np.array_equal(backend.read(t, 20 * PAGE_SIZE + 5, 100), host[20 * PAGE_SIZE + 5:20 * PAGE_SIZE + 105])
        native = backend.device_array(t)  # numpy (CPU view, OpenCL copy) or CuPy
        assert np.array_equal(native.get() if hasattr(native, "get") else np.asarray(native), back)
        del native
    # a second sync overwrites in place and leaves the other pages alone
    host[:] = 0xA5
    backend.copy_runs(host, np.array([[10, 1]]), targets)
    for t in targets:
        back = backend.read(t)
        assert (page(back, 10) == 0xA5).all() and not (page(back, 0) == 0xA5).all()
    for t in targets:
        backend.free(t)


def test_copy_long_runs_with_progress(backend: Backend, kind: str) -> None:
    npages = (12 << 20) // PAGE_SIZE  # one 12 MiB run takes the direct-transfer path
    host = random_host(npages + 16, seed=3)
    targets = [backend.allocate(0, host.nbytes), backend.allocate(0, host.nbytes)]
    runs = np.array([[0, npages], [npages + 2, 1], [npages + 5, 7]], dtype=np.int64)
    reported: list[int] = []
    backend.copy_runs(host, runs, targets, reported.append)
    assert sum(reported) == int(runs[:, 1].sum()) * PAGE_SIZE
    assert all(r > 0 for r in reported)
    if kind in ("opencl-staged", "cuda", "cuda-fake", "cuda-fake-ipc"):  # 1 MiB batches: progress moves

        assert len(reported) >= 12
    mask = np.zeros(npages + 16, bool)
    mask[pages_from_runs(runs)] = True
    for t in targets:
        hashes = backend.hash_pages(t)
        assert np.array_equal(hashes[mask], backend_independent_hashes(host)[mask])
        assert (hashes[~mask] == xxhash.xxh64_intdigest(bytes(PAGE_SIZE))).all()
        backend.free(t)


def backend_independent_hashes(host: np.ndarray) -> np.ndarray:
    return np.array([xxhash.xxh64_intdigest(page(host, p).tobytes()) for p in range(host.nbytes // PAGE_SIZE)],
                    dtype=np.uint64)


def test_hashes_bit_identical_to_xxhash(backend: Backend) -> None:
    rng = np.random.default_rng(7)
    host = aligned_empty(9 * PAGE_SIZE)
    page(host, 0)[:] = 0
    page(host, 1)[:] = 0xFF
    page(host, 2)[:] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    for p, src in ((3, 0), (4, 1), (5, 2)):  # one bit flipped in each, at different places
        page(host, p)[:] = page(host, src)
        bit = int(rng.integers(0, PAGE_SIZE * 8))
        page(host, p)[bit // 8] ^= np.uint8(1 << (bit % 8))
    page(host, 6)[:] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    page(host, 7)[:] = page(host, 6)
    page(host, 7)[-1] ^= 0x80  # last bit of the last stripe
    page(host, 8)[:] = page(host, 6)
    page(host, 8)[0] ^= 0x01  # first bit of the first stripe
    buf = backend.allocate(0, host.nbytes)
    backend.copy_runs(host, np.array([[0, 9]]), [buf])
    expected = backend_independent_hashes(host)
    assert len(set(expected.tolist())) == 9
    assert np.array_equal(backend.hash_pages(buf), expected)
    pick = np.array([8, 0, 0, 5, 3, 1, 7], dtype=np.int64)  # any order, repeats allowed, not a multiple of 4
    assert np.array_equal(backend.hash_pages(buf, pick), expected[pick])
    assert backend.hash_pages(buf, np.empty(0, np.int64)).size == 0
    with pytest.raises(ValueError, match="out of range"):  # InvalidArgumentError is a ValueError
        backend.hash_pages(buf, np.array([9]))
    backend.free(buf)


def test_hash_sizes_around_vector_width(backend: Backend) -> None:
    for npages in (1, 2, 3, 4, 5, 7, 8, 9, 255, 257):  # kernels do several pages per work-item
        host = random_host(npages, seed=npages)
        buf = backend.allocate(0, host.nbytes)
        backend.copy_runs(host, np.array([[0, npages]]), [buf])
        assert np.array_equal(backend.hash_pages(buf), backend_independent_hashes(host)), npages
        backend.free(buf)


def test_compare(backend: Backend) -> None:
    rng = np.random.default_rng(11)
    a = rng.integers(0, 2**63, 100_003, dtype=np.uint64)
    b = a.copy()
    diff = np.sort(rng.choice(a.size, 5_000, replace=False))
    b[diff] ^= np.uint64(1)
    got = backend.compare(a, b)
    assert got.dtype == np.int64 and np.array_equal(got, diff)
    assert backend.compare(a, a).size == 0
    assert backend.compare(a[:0], b[:0]).size == 0
    assert np.array_equal(backend.compare(a[:1], b[:1] + np.uint64(1)), [0])
    with pytest.raises(InvalidArgumentError):
        backend.compare(a, b[:-1])


def test_export(backend: Backend, kind: str) -> None:
    buf = backend.allocate(0, 2 * PAGE_SIZE)
    handle = backend.export(buf)
    assert handle.nbytes >= 2 * PAGE_SIZE and handle.device == buf.device
    cuda = load_backend("cuda").sharing(0)[0] if kind == "cuda" else ""  # type: ignore[attr-defined]
    expected = {"cpu": "fd", "numa": "fd", "opencl": "none", "opencl-staged": "none", "cuda": cuda,
                "cuda-fake": "cuda_fd", "cuda-fake-ipc": "cuda_ipc"}[kind]
    assert handle.kind == expected
    if handle.kind == "cuda_ipc":
        assert isinstance(handle.payload, bytes) and len(handle.payload) == 64
    if handle.kind == "cuda_fd":  # the size to map: whole granules
        assert isinstance(handle.payload, int) and handle.granularity > 0 and handle.nbytes % handle.granularity == 0
    if handle.kind.startswith("cuda"):
        assert handle.gpu_uuid.startswith("GPU-") and len(handle.gpu_uuid) == 40
    if kind in ("cpu", "numa"):
        assert isinstance(handle.payload, int) and os.fstat(handle.payload).st_size == 2 * PAGE_SIZE
    backend.free(buf)


def test_unknown_device(backend: Backend, kind: str) -> None:
    name = backend.name
    with pytest.raises(UnknownDeviceError, match=f"{name}:99"):
        backend.allocate(99, PAGE_SIZE)
    with pytest.raises(UnknownDeviceError, match=f"{name}:99"):
        backend.bytes_in_use(99)


def test_capacity_exhausted_names_device(kind: str) -> None:
    backend = make_backend(kind, capacity=4 * PAGE_SIZE)
    try:
        buf = backend.allocate(0, 4 * PAGE_SIZE)
        with pytest.raises(ResourceExhaustedError, match=f"{backend.name}:0"):
            backend.allocate(0, PAGE_SIZE)
        assert backend.bytes_in_use(0) == 4 * PAGE_SIZE
        backend.free(buf)
        assert backend.bytes_in_use(0) == 0
    finally:
        backend.close()


def test_bad_ranges(backend: Backend) -> None:
    buf = backend.allocate(0, 4 * PAGE_SIZE)
    host = random_host(4)
    with pytest.raises(InvalidArgumentError):
        backend.copy_runs(host, np.array([[3, 2]]), [buf])
    with pytest.raises(InvalidArgumentError):
        backend.read(buf, 3 * PAGE_SIZE, 2 * PAGE_SIZE)
    with pytest.raises(InvalidArgumentError):
        backend.allocate(0, 100)
    backend.free(buf)
    with pytest.raises(InvalidArgumentError, match="freed"):
        backend.hash_pages(buf)


@pytest.mark.parametrize("runs", [[[0, 1], [2, 1], [2, 1]], [[2, 2], [3, 1]], [[4, 1], [1, 1]], [[0, 3], [1, 1]]],
                         ids=["repeated", "overlapping", "unsorted", "nested"])
def test_overlapping_or_unsorted_runs_are_refused(backend: Backend, runs: list[list[int]]) -> None:
    """Issue 15: ``[[0,1],[2,1],[2,1]]`` passed validation and a staged copy would put page 2 into page 1. Every
    backend refuses such runs (one shared check), before anything is copied."""
    host = random_host(8, seed=9)
    buf = backend.allocate(0, host.nbytes)
    try:
        with pytest.raises(InvalidArgumentError, match="sorted"):
            backend.copy_runs(host, np.array(runs, dtype=np.int64), [buf])
        assert not backend.read(buf).any(), "a refused copy wrote into the buffer"
        backend.copy_runs(host, np.array([[0, 2], [2, 1], [5, 3]], dtype=np.int64), [buf])  # touching is fine
        back = backend.read(buf)
        assert np.array_equal(back[:3 * PAGE_SIZE], host[:3 * PAGE_SIZE])
        assert not back[3 * PAGE_SIZE:5 * PAGE_SIZE].any()
    finally:
        backend.free(buf)


# ---------------------------------------------------------------------------- bad input, every backend alike

@dataclass
class Setup:
    """What each bad call works on: an 8-page host, an 8-page buffer, a 4-page one, a freed one and one another
    instance of the same backend allocated (``foreign``)."""

    backend: Backend
    host: npt.NDArray[np.uint8]
    buf: DeviceBuffer
    small: DeviceBuffer
    freed: DeviceBuffer
    foreign: DeviceBuffer


Call = Callable[[Setup], object]


def _runs(*runs: tuple[int, int]) -> npt.NDArray[np.int64]:
    return np.array(runs, dtype=np.int64).reshape(-1, 2)


# (id, call, error class, message fragment): every backend must refuse each the same way, before touching a buffer.
BAD_CALLS: list[tuple[str, Call, type[Exception], str]] = [
    ("run-negative-first", lambda s: s.backend.copy_runs(s.host, _runs((-1, 1)), [s.buf]), InvalidArgumentError,
     "inside"),
    ("run-zero-count", lambda s: s.backend.copy_runs(s.host, _runs((0, 0)), [s.buf]), InvalidArgumentError, "inside"),
    ("run-past-host-end", lambda s: s.backend.copy_runs(s.host, _runs((6, 5)), [s.buf]), InvalidArgumentError,
     "inside"),
    ("run-huge-count", lambda s: s.backend.copy_runs(s.host, _runs((1, 2**63 - 1)), [s.buf]), InvalidArgumentError,
     "inside"),
    ("runs-overlapping", lambda s: s.backend.copy_runs(s.host, _runs((0, 3), (2, 1)), [s.buf]),
     InvalidArgumentError, "sorted"),
    ("runs-unsorted", lambda s: s.backend.copy_runs(s.host, _runs((4, 1), (1, 1)), [s.buf]), InvalidArgumentError,
     "sorted"),
    ("runs-bad-shape", lambda s: s.backend.copy_runs(s.host, np.array([1, 2, 3]), [s.buf]), InvalidArgumentError,
     "runs"),
    ("target-past-buffer-end", lambda s: s.backend.copy_runs(s.host, _runs((0, 1)), [s.buf, s.small]),
     InvalidArgumentError, "less than the host"),
    ("target-twice", lambda s: s.backend.copy_runs(s.host, _runs((0, 1)), [s.buf, s.buf]), InvalidArgumentError,
     "twice"),
    ("host-not-whole-pages", lambda s: s.backend.copy_runs(s.host[:100], _runs((0, 1)), [s.buf]),
     InvalidArgumentError, "whole pages"),
    ("host-not-bytes", lambda s: s.backend.copy_runs(s.host.view(np.uint64), _runs((0, 1)), [s.buf]),
     InvalidArgumentError, "uint8"),
    ("host-strided", lambda s: s.backend.copy_runs(np.lib.stride_tricks.as_strided(
        s.host, (s.host.size // 2,), (2,)), _runs((0, 1)), [s.buf]), InvalidArgumentError, "contiguous"),
    ("read-past-buffer-end", lambda s: s.backend.read(s.buf, 7 * PAGE_SIZE, 2 * PAGE_SIZE), InvalidArgumentError,
     "outside"),
    ("read-negative-offset", lambda s: s.backend.read(s.buf, -1, 1), InvalidArgumentError, "outside"),
    ("read-offset-past-end", lambda s: s.backend.read(s.buf, 9 * PAGE_SIZE), InvalidArgumentError, "outside"),
    ("hash-page-past-end", lambda s: s.backend.hash_pages(s.buf, np.array([8])), InvalidArgumentError,
     "out of range"),
    ("hash-negative-page", lambda s: s.backend.hash_pages(s.buf, np.array([-1])), InvalidArgumentError,
     "out of range"),
    ("compare-lengths", lambda s: s.backend.compare(np.zeros(3, np.uint64), np.zeros(2, np.uint64)),
     InvalidArgumentError, "compare"),
    ("allocate-not-page-multiple", lambda s: s.backend.allocate(0, 100), InvalidArgumentError, "multiple"),
    ("allocate-zero", lambda s: s.backend.allocate(0, 0), InvalidArgumentError, "positive"),
    ("allocate-negative", lambda s: s.backend.allocate(0, -PAGE_SIZE), InvalidArgumentError, "positive"),
    ("allocate-wrong-index", lambda s: s.backend.allocate(99, PAGE_SIZE), UnknownDeviceError, ":99"),
    ("allocate-negative-index", lambda s: s.backend.allocate(-1, PAGE_SIZE), UnknownDeviceError, ":-1"),
    ("bytes-in-use-wrong-index", lambda s: s.backend.bytes_in_use(99), UnknownDeviceError, ":99"),
    ("describe-wrong-index", lambda s: s.backend.describe(99), UnknownDeviceError, ":99"),
    ("copy-to-freed", lambda s: s.backend.copy_runs(s.host, _runs((0, 1)), [s.freed]), InvalidArgumentError,
     "freed"),
    ("read-freed", lambda s: s.backend.read(s.freed), InvalidArgumentError, "freed"),
    ("hash-freed", lambda s: s.backend.hash_pages(s.freed), InvalidArgumentError, "freed"),
    ("export-freed", lambda s: s.backend.export(s.freed), InvalidArgumentError, "freed"),
    ("host-view-freed", lambda s: s.backend.host_view(s.freed), InvalidArgumentError, "freed"),
    ("device-array-freed", lambda s: s.backend.device_array(s.freed), InvalidArgumentError, "freed"),
    ("copy-to-foreign", lambda s: s.backend.copy_runs(s.host, _runs((0, 1)), [s.buf, s.foreign]),
     InvalidArgumentError, "not allocated by this"),
    ("read-foreign", lambda s: s.backend.read(s.foreign), InvalidArgumentError, "not allocated by this"),
    ("hash-foreign", lambda s: s.backend.hash_pages(s.foreign), InvalidArgumentError, "not allocated by this"),
    ("export-foreign", lambda s: s.backend.export(s.foreign), InvalidArgumentError, "not allocated by this"),
    ("free-foreign", lambda s: s.backend.free(s.foreign), InvalidArgumentError, "not allocated by this"),
    ("read-forged", lambda s: s.backend.read(DeviceBuffer(s.buf.device, 0, s.buf.nbytes, s.buf.handle)),
     InvalidArgumentError, "not allocated by this"),
]


@pytest.fixture
def setup(kind: str, backend: Backend) -> Iterator[Setup]:
    other = make_backend(kind)
    try:
        freed = backend.allocate(0, 8 * PAGE_SIZE)
        backend.free(freed)
        yield Setup(backend, random_host(8, seed=21), backend.allocate(0, 8 * PAGE_SIZE),
                    backend.allocate(0, 4 * PAGE_SIZE), freed, other.allocate(0, 8 * PAGE_SIZE))
    finally:
        other.close()


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_refused_alike(setup: Setup, call: Call, error: type[Exception], match: str) -> None:
    """Issue 13: the checks live in ``Backend`` (the public layer), so the CPU and NUMA backends refuse what OpenCL
    and CUDA refuse, with the same error class, and nothing is written or accounted for a refused call."""
    before = setup.backend.bytes_in_use(0)
    with pytest.raises(error, match=match) as info:
        call(setup)
    print(f"{setup.backend.name}: {type(info.value).__name__}: {info.value}")
    assert setup.backend.bytes_in_use(0) == before, "a refused call changed the bytes in use"
    assert not setup.backend.read(setup.buf).any(), "a refused call wrote into the buffer"
    assert not setup.backend.read(setup.small).any(), "a refused call wrote into the buffer"


def test_free_is_idempotent_and_close_frees_everything(kind: str) -> None:
    """Double free does nothing; close() frees every live buffer and accounts it; afterwards every call but free,
    release_reader and close is a ``BackendError`` saying the backend was closed."""
    backend = make_backend(kind)
    host = random_host(2, seed=4)
    try:
        a, b = backend.allocate(0, 2 * PAGE_SIZE), backend.allocate(0, 2 * PAGE_SIZE)
        backend.free(a)
        backend.free(a)  # idempotent (documented)
        assert a.freed and not b.freed and backend.bytes_in_use(0) == 2 * PAGE_SIZE
    finally:
        backend.close()
    assert b.freed, "close() left a live buffer"
    backend.close()  # idempotent too
    backend.free(b)  # freed by close: nothing to do
    backend.release_reader(b)
    calls: list[Callable[[], object]] = [
        lambda: backend.allocate(0, PAGE_SIZE), lambda: backend.bytes_in_use(0), lambda: backend.describe(0),
        lambda: backend.copy_runs(host, _runs((0, 1)), [b]), lambda: backend.read(b), lambda: backend.hash_pages(b),
        lambda: backend.export(b), lambda: backend.host_view(b), lambda: backend.device_array(b),
        lambda: backend.compare(np.zeros(2, np.uint64), np.ones(2, np.uint64)),
    ]
    for call in calls:
        with pytest.raises(BackendError, match="closed"):
            call()


def test_accounting_is_per_device_and_survives_failures(kind: str) -> None:
    """Bytes in use are kept per device by the base class: a refused allocation reserves nothing, a free gives back
    exactly what the buffer held."""
    backend = make_backend(kind, capacity=8 * PAGE_SIZE)
    try:
        bufs = [backend.allocate(0, 3 * PAGE_SIZE), backend.allocate(0, 3 * PAGE_SIZE)]
        with pytest.raises(ResourceExhaustedError, match=f"{backend.name}:0.*is full: {6 * PAGE_SIZE} of"):
            backend.allocate(0, 3 * PAGE_SIZE)
        assert backend.bytes_in_use(0) == 6 * PAGE_SIZE
        last = backend.allocate(0, 2 * PAGE_SIZE)  # exactly full
        if backend.device_count() > 1:
            assert backend.bytes_in_use(1) == 0
            other = backend.allocate(1, 8 * PAGE_SIZE)  # the capacity is per device
            backend.free(other)
        for buf in [*bufs, last]:
            backend.free(buf)
        assert backend.bytes_in_use(0) == 0
    finally:
        backend.close()


# ---------------------------------------------------------------------------- OpenCL specifics

@pytest.fixture
def ocl() -> Iterator[Backend]:
    b = load_backend("opencl")
    try:
        yield b
    finally:
        b.close()


def test_opencl_real_huge_allocation_fails_cleanly(ocl: Backend) -> None:
    with pytest.raises(ResourceExhaustedError, match="opencl:0"):
        ocl.allocate(0, 1 << 44)  # refused against the device's memory size
    driver = load_backend("opencl", capacity=1 << 50)  # let the driver itself refuse it
    try:
        with pytest.raises(ResourceExhaustedError, match="opencl:0"):
            driver.allocate(0, 1 << 44)
        assert driver.bytes_in_use(0) == 0
    finally:
        driver.close()
    assert ocl.bytes_in_use(0) == 0


def test_opencl_kernel_build_failure_names_device_and_log() -> None:
    broken = load_backend("opencl", kernel_source="__kernel void hash_all(__global ulong *d) { this is not C; }")
    try:
        buf = broken.allocate(0, PAGE_SIZE)
        with pytest.raises(BackendError, match=r"opencl:0 \(") as info:
            broken.hash_pages(buf)
        message = str(info.value)
        assert "build log" in message and "error" in message.lower()
        broken.free(buf)
        assert broken.bytes_in_use(0) == 0
    finally:
        broken.close()


def test_opencl_platform_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnknownDeviceError, match="no OpenCL platform matches 'no-such-platform'"):
        load_backend("opencl", platform="no-such-platform")
    monkeypatch.setenv("DEVREP_OPENCL_PLATFORM", "portable")
    by_env = load_backend("opencl")
    assert by_env.device_count() >= 1 and "Portable Computing Language" in by_env.describe(0)
    assert load_backend("opencl", platform=0).device_count() >= 1
    assert load_backend("opencl", device_type="gpu", platform="portable").device_count() == 0
    with pytest.raises(InvalidArgumentError, match="device_type"):
        load_backend("opencl", device_type="fpga")


def test_opencl_close_frees_live_buffers() -> None:
    b = load_backend("opencl")
    bufs = [b.allocate(0, PAGE_SIZE) for _ in range(3)]
    b.close()
    assert all(buf.freed for buf in bufs)
    with pytest.raises(BackendError, match="closed"):
        b.allocate(0, PAGE_SIZE)


def test_opencl_through_replicator_verify_uses_device_hash() -> None:
    with Replicator() as rep:
        region = rep.create_region("conf", 40 * PAGE_SIZE + 0)
        region.array[:] = np.random.default_rng(5).integers(0, 256, region.nbytes, dtype=np.uint8)
        report = rep.replicate("conf", ["opencl:0", "cpu:0"])
        assert report.pages_copied == 80
        with region.acquire("opencl:0") as lease:
            assert np.array_equal(np.asarray(lease.array), region.array)
            assert np.array_equal(lease.read(PAGE_SIZE, 10), region.array[PAGE_SIZE:PAGE_SIZE + 10])
            assert lease.export().kind == "none"
        region.array[5 * PAGE_SIZE] ^= 0xFF
        region.invalidate(5 * PAGE_SIZE, 1)
        assert rep.sync("conf")[0].pages_copied == 2
        # corrupt the device copy behind devrep's back: verify must find it by device hash and resync it
        import pyopencl as cl

        backend = rep.backend("opencl")
        replica = region._replicas["opencl:0"]
        buf: DeviceBuffer = replica.buffers[replica.front]  # type: ignore[assignment]
        queue = backend._devices[0].queue  # type: ignore[attr-defined]
        cl.enqueue_copy(queue, buf.handle, np.full(16, 7, np.uint8), dst_offset=9 * PAGE_SIZE + 100).wait()
        reports = {r.device: r for r in region.verify()}
        assert reports["opencl:0"].mismatched.tolist() == [[9, 1]] and reports["opencl:0"].resynced
        assert reports["cpu:0"].mismatched_pages == 0
        with region.acquire("opencl:0") as lease:
            assert np.array_equal(lease.read(), region.array)
        assert backend.bytes_in_use(0) > 0
        rep.unregister("conf")
        assert backend.bytes_in_use(0) == 0


def test_opencl_missing_kernel_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEVREP_KERNELS_DIR", str(tmp_path))
    b = load_backend("opencl")
    try:
        buf = b.allocate(0, PAGE_SIZE)
        with pytest.raises(BackendError, match="cannot read the OpenCL kernels for opencl:0"):
            b.hash_pages(buf)
        b.free(buf)
    finally:
        b.close()


def test_cuda_backend_absent_is_a_clear_error() -> None:
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"install devrep\[cuda12\] or devrep\[cuda13\]"):
            load_backend("cuda")
        with Replicator() as rep, pytest.raises(BackendError, match=r"devrep\[cuda12\]"):
            rep.resolve("cuda:0")
    else:
        assert load_backend("cuda").device_count() >= 0  # imports and counts (0 without a GPU)


def test_opencl_fan_out_across_two_devices_of_one_context() -> None:
    """PoCL can expose two devices (POCL_DEVICES); they share a context, so the second replica is filled
    on the device from the first. Runs in a child process: PoCL reads POCL_DEVICES once per process."""
    env = dict(os.environ, POCL_DEVICES="pthread pthread")
    out = subprocess.run(child_argv("opencl_two_devices"), capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_cpu_copy_refuses_runs_outside_the_host() -> None:
    """The CPU copy loop is compiled memcpy: a run past the end must be refused before it runs (it would
    otherwise read and write outside both mappings)."""
    backend = load_backend("cpu", devices=1)
    host = np.zeros(8 * PAGE_SIZE, dtype=np.uint8)
    buffer = backend.allocate(0, 8 * PAGE_SIZE)
    try:
        for runs in ([[6, 5]], [[-1, 1]], [[0, 0]]):
            with pytest.raises(InvalidArgumentError):
                backend.copy_runs(host, np.array(runs, dtype=np.int64), [buffer])
        host[3 * PAGE_SIZE:5 * PAGE_SIZE] = 7
        backend.copy_runs(host, np.array([[3, 2]], dtype=np.int64), [buffer])
        assert np.array_equal(backend.read(buffer), host)
    finally:
        backend.free(buffer)
