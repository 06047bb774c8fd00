"""Sync mode on the real kernel: the writer's store returns only after its page is recorded stale."""

from __future__ import annotations

import mmap
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _support import child_argv, remote_writer

import devrep
from devrep._pages import PAGE_SIZE, pages_from_runs
from devrep.errors import UnsupportedModeError
from devrep.linux.uffd import Feature, RegisterMode, Userfaultfd
from devrep.memory import create_private, memfd_create
from devrep.protect import prepare_sync_client
from devrep.tracking._handler import HINT, FaultHandler, Populator, populate_write
from devrep.tracking._sync import SyncTracker, merge_close_runs

pytestmark = pytest.mark.usefixtures("hang_guard")

DEV = "cpu:0"


def test_store_is_invalid_when_it_returns(rep: devrep.Replicator) -> None:
    region = rep.create_region("s", 256 * PAGE_SIZE, tracking="sync")
    region.array[:] = 1
    rep.replicate("s", [DEV, "cpu:1"])
    assert len(region.invalid_runs(DEV)) == 0
    for page in (0, 17, 255):
        region.array[page * PAGE_SIZE + 3] = 9
        # No sleep, no notify: the fault was recorded before the store could complete.
        assert pages_from_runs(region.invalid_runs(DEV)).tolist() == [page]
        assert pages_from_runs(region.invalid_runs("cpu:1")).tolist() == [page]
        with region.acquire(DEV, fresh=False) as lease:
            assert pages_from_runs(lease.invalid_runs).tolist() == [page]
        rep.sync("s")
    # Second write to a page: after the sync re-protected it, it faults again.
    region.array[17 * PAGE_SIZE] = 5
    assert pages_from_runs(region.invalid_runs(DEV)).tolist() == [17]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_end_to_end_random_writes(rep: devrep.Replicator, mode: str) -> None:
    region = rep.create_region("e2e", 2048 * PAGE_SIZE, tracking=mode)
    rng = np.random.default_rng(7)
    region.array[:] = rng.integers(0, 256, region.nbytes, dtype=np.uint8)
    rep.replicate("e2e", [DEV])
    for _ in range(3):
        pages = rng.choice(region.npages, 100, replace=False)
        for page in pages:
            offset = int(page) * PAGE_SIZE + int(rng.integers(0, PAGE_SIZE - 8))
            region.array[offset: offset + 8] = rng.integers(0, 256, 8, dtype=np.uint8)
        invalid = set(pages_from_runs(region.invalid_runs(DEV)).tolist())
        assert set(pages.tolist()) <= invalid, "a written page was not invalidated"
        # Sync-mode fault-around widens a window only for a write exactly where an earlier one ended.
        assert len(invalid) <= 2 * len(pages), f"invalidated {len(invalid)} pages for {len(pages)} written"
        with region.acquire(DEV, fresh=True) as lease:
            assert np.array_equal(lease.read(), region.array)
    # A bulk numpy write across everything.
    region.array[:] = 3
    with region.acquire(DEV) as lease:
        assert np.array_equal(lease.read(), region.array)


def test_kernel_mode_writes_succeed_and_invalidate(rep: devrep.Replicator) -> None:
    """read(2)/readv/recv_into into a protected page must not fail with EFAULT."""
    region = rep.create_region("k", 16 * PAGE_SIZE, tracking="sync")
    rep.replicate("k", [DEV])
    view = memoryview(region.array.data)  # the ndarray's buffer (a memoryview already)
    r, w = os.pipe()
    try:
        os.write(w, b"abcdef")
        assert os.readv(r, [view[2 * PAGE_SIZE: 2 * PAGE_SIZE + 6]]) == 6
        assert pages_from_runs(region.invalid_runs(DEV)).tolist() == [2]
        rep.sync("k")
        a, b = socket.socketpair()
        with a, b:
            a.sendall(b"0123456789")
            assert b.recv_into(view[5 * PAGE_SIZE: 5 * PAGE_SIZE + 10]) == 10
        assert pages_from_runs(region.invalid_runs(DEV)).tolist() == [5]
        assert bytes(region.array[2 * PAGE_SIZE: 2 * PAGE_SIZE + 6]) == b"abcdef"
        assert bytes(region.array[5 * PAGE_SIZE: 5 * PAGE_SIZE + 10]) == b"0123456789"
        with region.acquire(DEV) as lease:
            assert np.array_equal(lease.read(), region.array)
    finally:
        os.close(r)
        os.close(w)


def test_unregister_releases_protection(rep: devrep.Replicator) -> None:
    region = rep.create_region("u", 8 * PAGE_SIZE, tracking="sync")
    rep.replicate("u", [DEV])
    array = region.host.array
    pid = region.tracker.helper_pid  # type: ignore[attr-defined]
    rep.unregister("u")
    array[PAGE_SIZE] = 7  # would block forever if a protection outlived the tracker
    assert array[PAGE_SIZE] == 7
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_killed_handler_releases_blocked_writer_within_1s() -> None:
    child = subprocess.Popen(child_argv("sync_killed_helper"), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        helper = int(child.stdout.readline())
        time.sleep(0.5)
        assert child.poll() is None, "the writer should be blocked on its store"
        killed_at = time.monotonic()
        os.kill(helper, signal.SIGKILL)
        resumed_at = float(child.stdout.readline())
        assert resumed_at - killed_at < 1.0
        rest = child.stdout.read()
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    lines = rest.splitlines()
    assert lines[0] == "[[0, 64]]", "with the handler gone every page must be reported stale"
    assert lines[1].startswith("refused:") and "exited" in lines[1]
    assert lines[2].startswith("failed:") and "exited" in lines[2], "the region is marked failed with the reason"


def test_unsupported_memory_names_modes_that_work(rep: devrep.Replicator, tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10000)
    for mode in ("sync", "async"):
        with pytest.raises(UnsupportedModeError, match=r"use tracking='file' or 'explicit'"):
            rep.register_file(f"f-{mode}", path, tracking=mode)
        fd = memfd_create("other", 4 * PAGE_SIZE)
        with pytest.raises(UnsupportedModeError, match=r"remote.*or use 'explicit'"):
            rep.register_fd(f"m-{mode}", fd, tracking=mode)
    assert rep.regions() == []


def test_remote_writer_in_another_process(rep: devrep.Replicator) -> None:
    with remote_writer("sync", "--pages", "1,30,63", "--offset", "5") as (ours, address, (uffd, memfd), child):
        tracker = SyncTracker.remote(uffd, address, 64 * PAGE_SIZE)
        region = rep.register_fd("remote", memfd, tracking=tracker)
        rep.replicate("remote", [DEV])
        ours.sendall(b"g")
        assert ours.recv(1) == b"d"
        assert pages_from_runs(region.invalid_runs(DEV)).tolist() == [1, 30, 63]
        with region.acquire(DEV) as lease:
            data = lease.read()
            assert [int(data[p * PAGE_SIZE + 5]) for p in (1, 30, 63)] == [1, 30, 63]
        ours.sendall(b"q")
        assert child.wait(30) == 0


def test_prepare_client_rejects_bad_input() -> None:
    with pytest.raises(devrep.AlignmentError):
        prepare_sync_client(12345, PAGE_SIZE)
    with pytest.raises(devrep.InvalidArgumentError):
        prepare_sync_client(PAGE_SIZE)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_no_write_lost_while_syncing_concurrently(rep: devrep.Replicator, mode: str) -> None:
    """A writer thread keeps writing while the main thread syncs; at the end the replica must equal the host
    (a write that landed on a page reported valid without being seen would show as a difference)."""
    region = rep.create_region(f"c-{mode}", 512 * PAGE_SIZE, tracking=mode)
    rep.replicate(region.name, [DEV])
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        rng = np.random.default_rng(11)
        array = region.array
        while not stop.is_set():
            for page in rng.integers(0, region.npages, 64):
                writes[0] += 1
                array[int(page) * PAGE_SIZE + int(rng.integers(PAGE_SIZE))] = writes[0] & 0xFF
            time.sleep(0)  # an async-mode writer never blocks: let the syncing thread have the GIL too

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        syncs = 0
        while (syncs < 20 or writes[0] < 2000) and time.monotonic() < deadline:
            rep.sync(region.name)
            syncs += 1
    finally:
        stop.set()
        thread.join(30)
    assert syncs >= 20 and writes[0] >= 2000, f"only {syncs} syncs and {writes[0]} writes within 60 s"

    with region.acquire(DEV) as lease:
        assert np.array_equal(lease.read(), region.array)
    report = region.verify([DEV], resync=False)[0]
    assert report.mismatched_pages == 0


def test_rearm_of_many_runs_in_several_messages(rep: devrep.Replicator) -> None:
    """Re-protecting more runs than fit one control message: every one of them must fault again."""
    from devrep.tracking._handler import RUNS_PER_MESSAGE

    npages = 2 * RUNS_PER_MESSAGE + 100
    npages += npages % 2
    region = rep.create_region("many", npages * PAGE_SIZE, tracking="sync")
    rep.replicate("many", [DEV])
    every_other = np.arange(0, npages, 2)
    for round_ in range(2):
        for page in every_other:
            region.array[int(page) * PAGE_SIZE] = round_ + 1
        assert np.array_equal(pages_from_runs(region.invalid_runs(DEV)), every_other)
        rep.sync("many")  # rearms ~npages/2 single-page runs
    with region.acquire(DEV) as lease:
        assert np.array_equal(lease.read(), region.array)


def _uffd_wp_pages(pid: int, address: int, npages: int) -> np.ndarray:
    """The pages of ``[address, +npages)`` in process ``pid`` that userfaultfd write-protects (pagemap bit 57)."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        entries = np.frombuffer(os.pread(f.fileno(), 8 * npages, 8 * (address // PAGE_SIZE)), dtype=np.uint64)
    return np.flatnonzero((entries >> np.uint64(57)) & np.uint64(1))


def test_remote_sync_of_many_runs_rearms_every_stage(rep: devrep.Replicator) -> None:
    """A remote writer's sync with enough runs for the staged rearm (``rearm_overlaps_copy``: the service copies
    from its own mapping while later stages are re-protected in the writer's): every page arrives, and afterwards
    every page of the writer's mapping is write-protected again, the copied ones included."""
    from devrep.region import _plan

    npages = 4096
    written = list(range(0, npages, 2))  # npages / 2 single-page runs
    assert len(written) // _plan.STAGE_MIN_RUNS >= 2
    with remote_writer("sync", "--npages", str(npages), "--pages", ",".join(map(str, written)), "--offset", "9") as (
            ours, address, (uffd, memfd), child):
        tracker = SyncTracker.remote(uffd, address, npages * PAGE_SIZE)
        assert tracker.rearm_overlaps_copy
        calls: list[int] = []
        real_rearm = tracker.rearm

        def rearm(runs: np.ndarray) -> None:
            calls.append(len(runs))
            real_rearm(runs)

        tracker.rearm = rearm  # type: ignore[method-assign]
        region = rep.register_fd("remote-many", memfd, tracking=tracker)
        rep.replicate("remote-many", [DEV])
        assert len(_uffd_wp_pages(child.pid, address, npages)) == npages
        ours.sendall(b"g")
        assert ours.recv(1) == b"d"
        unprotected = npages - len(_uffd_wp_pages(child.pid, address, npages))
        assert unprotected >= len(written)  # the writer's faults un-protected at least the pages it wrote
        calls.clear()
        report = region.sync()
        assert report.runs == len(written) and sum(calls) == len(written)
        if len(os.sched_getaffinity(0)) >= 2:  # else nothing to overlap on: one rearm, then the copy
            assert len(calls) == min(_plan.MAX_STAGES, len(written) // _plan.STAGE_MIN_RUNS), calls
        assert len(_uffd_wp_pages(child.pid, address, npages)) == npages, "a stage was not re-protected"
        with region.acquire(DEV) as lease:
            data = lease.read()
            assert np.array_equal(data, region.array)
            assert [int(data[p * PAGE_SIZE + 9]) for p in written[-3:]] == [p & 0xFF for p in written[-3:]]
        ours.sendall(b"q")
        assert child.wait(30) == 0


def test_failed_remote_registration_releases_the_client(rep: devrep.Replicator) -> None:
    with remote_writer("sync", "--npages", "8", "--blocked") as (ours, address, (uffd, memfd), child):
        tracker = SyncTracker.remote(uffd, address, 4 * PAGE_SIZE)  # wrong length
        with pytest.raises(devrep.InvalidArgumentError, match="registered 16384 bytes"):
            rep.register_fd("bad", memfd, tracking=tracker)
        assert ours.recv(1) == b"w", "the client's write stayed blocked"
        assert child.wait(30) == 0


def test_hung_handler_is_killed_on_rearm_timeout() -> None:
    out = subprocess.run(child_argv("sync_hung_helper"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("timeout:") and "did not answer" in lines[0]
    assert lines[1] == "wrote"
    assert lines[2] == "[[0, 16]]"


def test_fault_around_window_logic() -> None:
    """Pure logic of the handler's windows: random faults get one block, a sequential writer doubles up to
    the cap, windows stay block-aligned and inside the region."""
    handler = FaultHandler.__new__(FaultHandler)
    FaultHandler.__init__(handler, None, 0, 1000, None, block_pages=4, max_window_pages=64)  # type: ignore[arg-type]
    assert handler.window(9) == (8, 4)  # the block around the page
    assert [handler.window(p)[1] for p in (12, 20, 36, 68)] == [8, 16, 32, 64]  # sequential: doubling
    assert handler.window(132) == (132, 64)  # capped
    assert handler.window(501) == (500, 4)  # elsewhere: one block again
    assert handler.window(998) == (996, 4)  # clipped at the end of the region
    assert handler.window(504) == (504, 8)  # the stream that ended at 504 goes on
    FaultHandler.__init__(handler, None, 0, 1000, None, block_pages=1, max_window_pages=1)  # type: ignore[arg-type]
    assert [handler.window(p) for p in (0, 1, 2)] == [(0, 1), (1, 1), (2, 1)]  # widening off


def _thread_minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def _faults_of_a_fill(rep: devrep.Replicator, region: devrep.Region, array: np.ndarray | None = None
                      ) -> tuple[int, int]:
    """Replicate ``region``, then fill it once more (through ``array``, the writer's view: ``region.array`` by
    default): the write faults the handler saw, and the minor faults the writing thread took, in that fill."""
    array = region.array if array is None else array
    array[:] = 1
    rep.replicate(region.name, [DEV])
    tracker = region.tracker
    assert isinstance(tracker, SyncTracker) and tracker._shared is not None
    before, minor = int(tracker._shared.counter[0]), _thread_minor_faults()
    array[:] = 2
    return int(tracker._shared.counter[0]) - before, _thread_minor_faults() - minor


def test_sequential_fill_costs_few_faults_and_stays_coherent(rep: devrep.Replicator) -> None:
    """W1: a fill of a protected region faults once per window, not once per page, and every page it wrote is
    invalidated before the write lands (a fresh acquire sees all of it). ``create_region``'s memory is private,
    so an un-protected window is writable at once: the writer takes no kernel minor fault per page either (a
    memfd's pages would take one each; see the next test)."""
    region = rep.create_region("fill", 4096 * PAGE_SIZE, tracking="sync")
    faults, minor = _faults_of_a_fill(rep, region)
    assert 0 < faults <= 4096 // 64, f"{faults} faults for a sequential fill of 4096 pages"
    assert minor <= 4096 // 64, f"the writer took {minor} minor faults filling 4096 private pages"
    assert pages_from_runs(region.invalid_runs(DEV)).tolist() == list(range(4096))
    with region.acquire(DEV, fresh=True) as lease:
        assert np.array_equal(lease.read(), region.array)
    narrow = rep.create_region("narrow", 256 * PAGE_SIZE, tracking=SyncTracker(fault_around=PAGE_SIZE))
    assert _faults_of_a_fill(rep, narrow)[0] == 256, "fault_around=PAGE_SIZE must fault once per page"


def test_unprotect_gives_private_pages_write_access_back() -> None:
    """Why ``create_region`` allocates private memory and runs no populate thread: un-protecting private anonymous
    pages (UFFDIO_WRITEPROTECT off) makes them writable again, so writing them takes no minor fault."""
    npages = 256
    host = create_private("unprotect-test", npages * PAGE_SIZE)
    with Userfaultfd() as uffd:
        uffd.api(Feature.WP_UNPOPULATED)
        uffd.register(host.address, npages * PAGE_SIZE, RegisterMode.WP)
        host.array[:] = 1
        uffd.writeprotect(host.address, npages * PAGE_SIZE, True)
        uffd.writeprotect(host.address, npages * PAGE_SIZE, False)
        before = _thread_minor_faults()
        host.array[::PAGE_SIZE] = 2
        faults = _thread_minor_faults() - before
        uffd.unregister(host.address, npages * PAGE_SIZE)
    host.close()
    assert faults <= npages // 16, f"writing {npages} un-protected private pages took {faults} minor faults"


def test_populate_write_makes_unprotected_shmem_pages_writable() -> None:
    """Why sync mode populates windows ahead of a writer of shared memory: un-protecting (UFFDIO_WRITEPROTECT off)
    leaves shmem PTEs read-only, so each page's next write still takes a minor fault; ``populate_write``
    (MADV_POPULATE_WRITE) makes them writable, and then writing the range takes none."""
    npages = 256
    fd = memfd_create("populate-test", npages * PAGE_SIZE)
    with mmap.mmap(fd, npages * PAGE_SIZE) as mapping, Userfaultfd() as uffd:
        array = np.frombuffer(mapping, dtype=np.uint8)
        address = array.ctypes.data
        uffd.api(Feature.WP_HUGETLBFS_SHMEM | Feature.WP_UNPOPULATED)
        uffd.register(address, npages * PAGE_SIZE, RegisterMode.WP)
        array[:] = 1  # present and dirty
        faults = []
        for populate in (False, True):
            uffd.writeprotect(address, npages * PAGE_SIZE, True)
            uffd.writeprotect(address, npages * PAGE_SIZE, False)
            if populate:
                assert populate_write(address, npages * PAGE_SIZE), "MADV_POPULATE_WRITE refused (Linux 5.14+)"
            before = _thread_minor_faults()
            array[::PAGE_SIZE] = 2
            faults.append(_thread_minor_faults() - before)
        del array
        uffd.unregister(address, npages * PAGE_SIZE)
    os.close(fd)
    print(f"minor faults writing {npages} un-protected pages: {faults[0]} as left, {faults[1]} after populate")
    assert faults[0] >= npages // 2, f"only {faults[0]} of {npages} shmem pages faulted: populating is pointless"
    assert faults[1] <= npages // 16, f"expected ~0 faults after populate_write, got {faults[1]} of {npages}"


def test_sequential_fill_is_populated_ahead_and_stays_coherent(rep: devrep.Replicator) -> None:
    """W1 for shared memory (a buffer over a shared mapping): the in-process tracker's populate thread faults in
    widened windows (its page count grows) while the fill runs, and every page the fill wrote is still invalidated
    before the write lands. ``create_region``'s private memory gets no populate thread."""
    shared = mmap.mmap(-1, 4096 * PAGE_SIZE)  # MAP_SHARED: shmem pages
    region = rep.register_buffer("populated", shared, tracking="sync")
    tracker = region.tracker
    assert isinstance(tracker, SyncTracker) and tracker._populator is not None
    _faults_of_a_fill(rep, region, np.frombuffer(shared, dtype=np.uint8))
    deadline = time.monotonic() + 30  # the thread may lag behind the writer on a loaded machine
    while tracker._populator.pages == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tracker._populator.pages > 0, "the populate thread populated nothing for a sequential fill"
    assert pages_from_runs(region.invalid_runs(DEV)).tolist() == list(range(4096))
    with region.acquire(DEV, fresh=True) as lease:
        assert np.array_equal(lease.read(), region.array)
    off = rep.register_buffer("unpopulated", mmap.mmap(-1, 256 * PAGE_SIZE), tracking=SyncTracker(populate=False))
    assert off.tracker._populator is None  # type: ignore[attr-defined]
    private = rep.create_region("private", 256 * PAGE_SIZE, tracking="sync")
    assert private.tracker._populator is None  # type: ignore[attr-defined]


def test_populate_threads_and_pipes_go_with_their_regions() -> None:
    """Each in-process sync region's populate thread and hint pipe end when the region is dropped (after a fill
    that used them), so creating and dropping regions leaks neither threads nor fds."""
    def populate_threads() -> int:
        return sum(t.name == "devrep-sync-populate" for t in threading.enumerate())

    with devrep.Replicator(cpu_devices=1) as rep:
        fds_before, threads_before = len(os.listdir("/proc/self/fd")), populate_threads()
        for i in range(5):
            shared = mmap.mmap(-1, 1024 * PAGE_SIZE)  # shared memory: a populate thread
            array = np.frombuffer(shared, dtype=np.uint8)
            region = rep.register_buffer(f"leak{i}", shared, tracking="sync")
            assert region.tracker._populator is not None  # type: ignore[attr-defined]
            array[:] = 1
            rep.replicate(region.name, [DEV])
            array[:] = 2  # a sequential fill: hints flow
            rep.unregister(region.name)
            del region, array
        deadline = time.monotonic() + 30
        while populate_threads() > threads_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert populate_threads() == threads_before, f"{populate_threads() - threads_before} populate threads left"
        assert len(os.listdir("/proc/self/fd")) <= fds_before, (fds_before, os.listdir("/proc/self/fd"))


def resident(base: int, first: int, count: int) -> int:
    """How many of the pages ``[first, first + count)`` at ``base`` are present (``/proc/self/pagemap`` bit 63)."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        entries = np.frombuffer(os.pread(fd, 8 * count, 8 * ((base >> 12) + first)), np.uint64)
    finally:
        os.close(fd)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


def test_a_rearm_drops_populate_hints_from_before_it() -> None:
    """``Populator.paused()`` (around every rearm): a hint queued before or during the rearm is dropped, so the
    thread never populates -- write-faults -- a window the rearm protected again, which the handler would record as
    a write nobody made (seen under load as a page stale right after ``replicate``). A hint after it is used."""
    npages = 256
    mapping = mmap.mmap(-1, npages * PAGE_SIZE)
    base = int(np.frombuffer(mapping, np.uint8).__array_interface__["data"][0])
    populator = Populator(base)
    write_fd = os.dup(populator.write_fd)
    populator.start()
    try:
        with populator.paused():
            os.write(write_fd, HINT.pack(0, 64))  # a fault's hint written before the rearm's acknowledgement
        os.write(write_fd, HINT.pack(64, 64))  # after the rearm: read (pipe order) after the first, had it survived
        deadline = time.monotonic() + 30
        while populator.pages < 64 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert populator.pages >= 64, f"the hint after the rearm was not used ({populator.pages} pages populated)"
        assert resident(base, 64, 64) == 64
        assert resident(base, 0, 64) == 0, "the window hinted before the rearm was populated"
    finally:
        os.close(write_fd)
        populator.close()
        mapping.close()


def test_rearm_merges_runs_across_small_gaps_only() -> None:
    runs = np.array([[0, 2], [5, 1], [6, 3], [100, 3], [133, 1], [170, 2]], dtype=np.int64)
    assert merge_close_runs(runs, gap=32).tolist() == [[0, 9], [100, 34], [170, 2]]
    assert merge_close_runs(runs, gap=0).tolist() == [[0, 2], [5, 4], [100, 3], [133, 1], [170, 2]]
    assert merge_close_runs(runs[:1]).tolist() == [[0, 2]]
    assert merge_close_runs(np.empty((0, 2), dtype=np.int64)).shape == (0, 2)


def test_fault_helper_imports_only_the_linux_layer_and_the_stdlib() -> None:
    """The in-process helper is a separate interpreter started for every sync region: it must not load numpy,
    numba or the engine (it was ~160 MB resident and 2.8 s to start when it did)."""
    code = ("import sys, devrep.tracking._handler; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('devrep', 'numpy', 'numba', 'grpc')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert set(out.stdout.split()) == {"devrep", "devrep._lazy", "devrep.errors", "devrep.linux", "devrep.linux._libc",
                                       "devrep.linux._wp", "devrep.linux.uffd", "devrep.model", "devrep.tracking",
                                       "devrep.tracking._handler"}, out.stdout  # _wp: the rearm loop in C


def test_lazy_package_still_resolves_every_public_name_and_submodule() -> None:
    code = ("import devrep, sys; assert 'devrep.engine' not in sys.modules; "
            "missing = [n for n in devrep.__all__ if getattr(devrep, n, None) is None]; "
            "assert not missing, missing; assert devrep.tracking.Tracker and devrep.region.Region; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
