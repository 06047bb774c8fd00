"""The ctypes kernel layer on the real kernel: userfaultfd WP faults and PAGEMAP_SCAN (incl. stale walk_end)."""

from __future__ import annotations

import mmap
import os
import select
import threading

import numpy as np
import pytest
from _support import HOST_KINDS, host_memory

from devrep.linux import (
    Feature,
    PageCategory,
    PagemapScanner,
    RegisterMode,
    ScanFlag,
    Userfaultfd,
)
from devrep.linux.uffd import Event
from devrep.memory import HostMemory

pytestmark = pytest.mark.usefixtures("hang_guard")

PAGE = mmap.PAGESIZE


def _uffd_or_skip() -> Userfaultfd:
    try:
        return Userfaultfd()
    except OSError as exc:
        pytest.skip(f"userfaultfd unavailable on this machine: {exc} (needs root/CAP_SYS_PTRACE)")


def test_api_reports_wp_features() -> None:
    with _uffd_or_skip() as uffd:
        supported = uffd.api(Feature.NONE)
    assert Feature.WP_HUGETLBFS_SHMEM in supported
    assert Feature.WP_ASYNC in supported, "Linux 6.7+ has WP_ASYNC"


def test_api_twice_is_an_error() -> None:
    with _uffd_or_skip() as uffd:
        uffd.api(Feature.NONE)
        with pytest.raises(OSError):
            uffd.api(Feature.NONE)


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_sync_wp_fault_round_trip_kernel_mode_write(kind: str) -> None:
    """A readv() into a write-protected page faults to the handler, which un-protects and wakes it."""
    host = host_memory(kind, "kernel-test", 4 * PAGE)
    uffd = _uffd_or_skip()
    uffd.api(Feature.WP_HUGETLBFS_SHMEM)
    uffd.register(host.address, 4 * PAGE, RegisterMode.WP)
    uffd.writeprotect(host.address, 4 * PAGE, True)
    r, w = os.pipe()
    os.write(w, b"hello")
    result: list[int] = []
    target = memoryview(host.array.data)[2 * PAGE + 10: 2 * PAGE + 15]
    reader = threading.Thread(target=lambda: result.append(os.readv(r, [target])))
    reader.start()
    assert select.select([uffd], [], [], 10)[0], "no fault event within 10 s"
    events = uffd.read_events()
    assert len(events) == 1 and events[0].event == Event.PAGEFAULT and events[0].is_wp
    assert events[0].address & ~(PAGE - 1) == host.address + 2 * PAGE
    uffd.writeprotect(events[0].address & ~(PAGE - 1), PAGE, False)
    reader.join(10)
    assert result == [5]
    assert bytes(host.array[2 * PAGE + 10: 2 * PAGE + 15]) == b"hello"
    assert uffd.read_events() == []
    uffd.close()
    os.close(r)
    os.close(w)
    host.close()


def _async_region(npages: int, kind: str = "memfd") -> tuple[Userfaultfd, int, HostMemory]:
    host = host_memory(kind, "kernel-async", npages * PAGE)
    uffd = _uffd_or_skip()
    uffd.api(Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM | Feature.WP_UNPOPULATED)
    uffd.register(host.address, npages * PAGE, RegisterMode.WP)
    uffd.writeprotect(host.address, npages * PAGE, True)
    return uffd, os.open("/proc/self/pagemap", os.O_RDONLY), host


@pytest.mark.parametrize("kind", HOST_KINDS)
@pytest.mark.parametrize("vec_len", [4096, 7, 1])
def test_pagemap_scan_finds_exactly_the_written_pages(vec_len: int, kind: str) -> None:
    """Small output vectors force the resume path, where a stale walk_end would double-count pages."""
    npages = 4096
    uffd, pagemap, host = _async_region(npages, kind)
    array = host.array
    base = host.address
    written = np.sort(np.random.default_rng(vec_len).choice(npages, 300, replace=False))
    written = np.union1d(written, np.arange(1000, 1040))  # one long run too
    for page in written:
        array[page * PAGE + 1] = 1
    scanner = PagemapScanner(pagemap, vec_len)
    flags = ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC
    ranges = scanner.scan(base, base + npages * PAGE, flags=flags,
                          category_mask=PageCategory.WRITTEN, return_mask=PageCategory.WRITTEN)
    pages = np.concatenate([np.arange((s - base) // PAGE, (e - base) // PAGE) for s, e in ranges.tolist()])
    assert np.array_equal(pages, written)
    again = scanner.scan(base, base + npages * PAGE, flags=flags,
                         category_mask=PageCategory.WRITTEN, return_mask=PageCategory.WRITTEN)
    assert len(again) == 0, "WP_MATCHING re-protects what it reports"
    array[5 * PAGE] = 2
    third = scanner.scan(base, base + npages * PAGE, flags=flags,
                         category_mask=PageCategory.WRITTEN, return_mask=PageCategory.WRITTEN)
    assert third.tolist() == [[base + 5 * PAGE, base + 6 * PAGE]]
    uffd.close()
    os.close(pagemap)
    host.close()


def test_pagemap_scanner_applies_changed_flags_and_masks() -> None:
    """``PagemapScanner`` keeps its argument block between scans and rewrites the flags and masks only when they
    change: a look without ``WP_MATCHING`` after a re-protecting scan must report without re-protecting, and a
    different category must select different pages."""
    npages = 64
    uffd, pagemap, host = _async_region(npages)
    array = host.array
    base = host.address
    end = base + npages * PAGE
    scanner = PagemapScanner(pagemap)
    wp = ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC
    assert len(scanner.scan(base, end, flags=wp)) == 0
    array[3 * PAGE] = 1
    look = scanner.scan(base, end, flags=ScanFlag.NONE)  # settings changed: no WP_MATCHING now
    assert look.tolist() == [[base + 3 * PAGE, base + 4 * PAGE]]
    assert scanner.scan(base, end, flags=ScanFlag.NONE).tolist() == look.tolist(), "a look re-protected the page"
    unwritten = scanner.scan(base, end, category_mask=PageCategory.WRITTEN,
                             category_inverted=PageCategory.WRITTEN, return_mask=PageCategory.WRITTEN)
    assert unwritten.tolist() == [[base, base + 3 * PAGE], [base + 4 * PAGE, end]]
    assert scanner.scan(base, end, flags=wp).tolist() == look.tolist()  # back to re-protecting: reported once
    assert len(scanner.scan(base, end, flags=wp)) == 0
    uffd.close()
    os.close(pagemap)
    host.close()


def _wp_bits(address: int, npages: int) -> list[bool]:
    """Per page of ``[address, +npages)`` of this process: write-protected by userfaultfd (pagemap bit 57)."""
    with open("/proc/self/pagemap", "rb") as f:
        entries = np.frombuffer(os.pread(f.fileno(), 8 * npages, 8 * (address // PAGE)), dtype=np.uint64)
    return ((entries >> np.uint64(57)) & np.uint64(1)).astype(bool).tolist()


def test_the_rearm_loop_is_compiled_here() -> None:
    """``make``/``pip install`` build ``devrep.linux._wp`` (gcc and the Python headers are on every machine we
    support); without it sync-mode syncs silently pay ~1.8x for their rearm (bench P3s)."""
    from devrep.linux import uffd

    assert uffd.REARM_LOOP == "c", "devrep.linux._wp was not built: reinstall with a C compiler (pip install -e .)"


@pytest.mark.parametrize("kind", HOST_KINDS)
@pytest.mark.parametrize("compiled", [True, False], ids=["c", "python"])
def test_protect_page_runs_protects_exactly_the_runs(compiled: bool, kind: str) -> None:
    """Both rearm loops, on a real registered shmem mapping, from every input form the callers pass (a list, an
    ``array("q")`` from a helper message, an int64 numpy array): exactly the runs' pages become write-protected.
    Bad runs are refused before any page is touched; a kernel refusal names the run."""
    import array

    npages = 512
    host = host_memory(kind, "wp-loop", npages * PAGE)
    host.array[:] = 1  # present pages: pagemap reports the bit on them
    uffd = _uffd_or_skip()
    try:
        uffd.api(Feature.WP_HUGETLBFS_SHMEM)
        uffd.register(host.address, npages * PAGE, RegisterMode.WP)
        rng = np.random.default_rng(7)
        pages = np.sort(rng.choice(npages - 8, 40, replace=False))
        counts = rng.integers(1, 8, size=pages.size)
        flat = np.stack([pages, counts], axis=1).reshape(-1)
        expected = [False] * npages
        for first, count in zip(pages.tolist(), counts.tolist(), strict=True):
            expected[first:first + count] = [True] * count
        forms: list[object] = [flat.tolist(), array.array("q", flat.astype("<i8").tobytes()), flat.astype(np.int64)]
        for runs in forms:
            uffd.writeprotect(host.address, npages * PAGE, False)
            assert not any(_wp_bits(host.address, npages))
            uffd.protect_page_runs(host.address, runs, PAGE.bit_length() - 1, npages,  # type: ignore[arg-type]
                                   compiled=compiled)
            assert _wp_bits(host.address, npages) == expected, type(runs)
        uffd.writeprotect(host.address, npages * PAGE, False)
        for bad in ([0, 1, 510, 3], [0, 1, -1, 2], [0, 1, 5, 0], [0, 1, 3], [0, 1, 2**62, 2**62]):
            with pytest.raises(ValueError):
                uffd.protect_page_runs(host.address, bad, PAGE.bit_length() - 1, npages, compiled=compiled)
            assert not any(_wp_bits(host.address, npages)), f"{bad} protected pages before it was refused"
        # In bounds for npages but past the registered range: the kernel's ENOENT, naming the run.
        with pytest.raises(OSError, match=r"pages \[512, \+1\)"):
            uffd.protect_page_runs(host.address, [0, 1, 512, 1], PAGE.bit_length() - 1, npages + 1,
                                   compiled=compiled)
    finally:
        uffd.close()
        host.close()
