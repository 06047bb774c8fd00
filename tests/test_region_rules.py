"""The region's acquire and rearm rules (issue 13 item 5) and ``EventKind``.

* A stale fresh acquire syncs only its own replica and calls ``collect()`` at most twice.
* The sync-mode rearm round trip runs off the region lock: a reader's ``release()`` (and a non-fresh acquire)
  returns while a sync's rearm is stuck in the helper process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from _support import HOST_KINDS, host_memory

import devrep
from devrep import PAGE_SIZE
from devrep._pages import PageArray, RunArray
from devrep.model import Event, EventKind
from devrep.region import _plan
from devrep.tracking import ExplicitTracker
from devrep.tracking._sync import SyncTracker

WAIT = 60.0  # generous bound for things that must happen (the machine may be loaded); never a timing assertion


def test_event_kind_values_and_string_comparisons() -> None:
    assert [k.value for k in EventKind] == ["invalidate", "sync", "verify", "replica_added", "replica_removed",
                                            "region_removed", "region_failed"]
    assert EventKind.SYNC == "sync" and f"{EventKind.REGION_FAILED}" == "region_failed"
    rebuilt = Event("verify", "r", 1)  # type: ignore[arg-type]  # what a client rebuilds from the wire
    assert rebuilt.kind is EventKind.VERIFY
    newer = Event("resized", "r", 1)  # type: ignore[arg-type]  # a newer server's kind: kept as the string
    assert newer.kind == "resized"


def test_region_emits_enum_kinds() -> None:
    seen: list[Event] = []
    with devrep.Replicator(cpu_devices=1) as rep:
        rep.add_listener(seen.append)
        region = rep.create_region("k", 4 * PAGE_SIZE)
        rep.replicate("k", ["cpu:0"])
        region.invalidate(0, 1)
        region.sync()
    kinds = [e.kind for e in seen]
    assert all(isinstance(k, EventKind) for k in kinds), kinds
    assert kinds[:3] == [EventKind.REPLICA_ADDED, EventKind.SYNC, EventKind.INVALIDATE], kinds
    assert kinds[-1] == "region_removed"


class _CountsCollects:
    """Mixin over a real tracker: counts ``collect()`` calls made by the thread that built it (a sync helper's
    notify thread collects too; those calls are not the acquire's)."""

    calls = 0
    thread = 0

    def _start_counting(self) -> None:
        self.calls = 0
        self.thread = threading.get_ident()

    def collect(self) -> PageArray:
        if threading.get_ident() == self.thread:
            self.calls += 1
        return super().collect()  # type: ignore[misc]


class CountingExplicit(_CountsCollects, ExplicitTracker):
    """The real explicit tracker, counting ``collect()`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self._start_counting()


class CountingSync(_CountsCollects, SyncTracker):
    """The real in-process sync tracker, counting ``collect()`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self._start_counting()


@pytest.mark.parametrize("mode", ["explicit", "sync"])
def test_stale_acquire_collects_at_most_twice_and_syncs_only_its_replica(mode: str) -> None:
    tracker: CountingExplicit | CountingSync = CountingExplicit() if mode == "explicit" else CountingSync()
    npages = 32
    with devrep.Replicator(cpu_devices=2) as rep:
        region = rep.create_region("c", npages * PAGE_SIZE, tracking=tracker)
        region.array[:] = 1
        if mode == "explicit":
            region.invalidate()
        rep.replicate("c", ["cpu:0", "cpu:1"])
        region.array[5 * PAGE_SIZE] = 9
        region.array[20 * PAGE_SIZE] = 9
        if mode == "explicit":
            region.invalidate_pages([5, 20])
        copied = region.stats.pages_copied
        tracker.calls = 0
        with region.acquire("cpu:0") as lease:
            calls = tracker.calls
            assert lease.read(5 * PAGE_SIZE, 1)[0] == 9 and lease.read(20 * PAGE_SIZE, 1)[0] == 9
            assert len(lease.invalid_runs) == 0
        print(f"collect() calls by the stale acquire: expected <= 2, got {calls}")
        assert 1 <= calls <= 2
        # Only its own replica was synced: cpu:1 still has both pages stale.
        assert region.stats.pages_copied - copied == 2
        assert region.invalid_runs("cpu:1").tolist() == [[5, 1], [20, 1]]
        # A fresh acquire of a fresh replica collects once.
        tracker.calls = 0
        region.acquire("cpu:0").release()
        assert tracker.calls == 1


def test_release_does_not_wait_for_a_rearm_in_flight() -> None:
    """A sync whose rearm is stuck in the (stopped) helper process holds no region lock: a reader releases its
    lease, and another acquires a stale view, while the rearm is still in flight."""
    tracker = SyncTracker(rearm_timeout=10 * WAIT)  # the stopped helper must not time the rearm out
    npages = 16
    with devrep.Replicator(cpu_devices=1) as rep:
        region = rep.create_region("r", npages * PAGE_SIZE, tracking=tracker)
        region.array[:] = 1
        rep.replicate("r", ["cpu:0"])
        held = region.acquire("cpu:0")  # the sync below must write the spare and flip
        region.array[3 * PAGE_SIZE] = 7  # faults; recorded by the helper
        region.collect()

        in_rearm = threading.Event()
        real_rearm: Callable[[RunArray], None] = tracker.rearm

        def rearm(runs: RunArray) -> None:  # the real rearm, announced first
            in_rearm.set()
            real_rearm(runs)

        tracker.rearm = rearm  # type: ignore[method-assign]
        pid = tracker.helper_pid
        assert pid is not None
        outcome: list[object] = []
        sync_done = threading.Event()

        def sync() -> None:
            try:
                outcome.append(region.sync())
            except BaseException as exc:
                outcome.append(exc)
            finally:
                sync_done.set()

        os.kill(pid, signal.SIGSTOP)
        try:
            syncer = threading.Thread(target=sync, daemon=True)
            syncer.start()
            assert in_rearm.wait(WAIT), "the sync never reached its rearm"
            released = threading.Event()
            stale_view: list[np.ndarray] = []

            def reader() -> None:
                held.release()
                with region.acquire("cpu:0", fresh=False) as lease:
                    stale_view.append(lease.invalid_runs.copy())
                released.set()

            threading.Thread(target=reader, daemon=True).start()
            got = released.wait(WAIT)
            # Ordering, not timing: the helper is stopped, so the rearm (and the sync) cannot have finished yet.
            print(f"release returned: {got}; sync finished meanwhile: {sync_done.is_set()} (expected True, False)")
            assert got, "release() waited for the rearm round trip (region lock held across it)"
            assert not sync_done.is_set()
            assert stale_view[0].tolist() == [[3, 1]]
        finally:
            os.kill(pid, signal.SIGCONT)
        assert sync_done.wait(WAIT), "the sync did not finish after the helper resumed"
        assert not isinstance(outcome[0], BaseException), outcome
        with region.acquire("cpu:0", timeout=WAIT) as lease:
            assert lease.read(3 * PAGE_SIZE, 1)[0] == 7
            assert np.array_equal(lease.read(), region.array)


def test_big_sync_mode_sync_is_complete_and_rearmed() -> None:
    """A sync-mode sync of many runs (the helper's flat-run rearm loop, merged gaps): every page arrives in every
    replica, progress stays monotone and ends at the total, and a later write to a copied page or to a page in a
    merged gap is still seen (both were re-protected)."""
    npages = 4096
    with devrep.Replicator(cpu_devices=2) as rep:
        region = rep.create_region("big", npages * PAGE_SIZE, tracking="sync")
        region.array[:] = 1
        rep.replicate("big", ["cpu:0", "cpu:1"])
        region.array.reshape(npages, PAGE_SIZE)[::2, 7] = 5  # every other page: npages / 2 runs
        seen: list[tuple[int, int]] = []
        report = region.sync(progress=lambda done, total: seen.append((done, total)))
        assert report.pages_copied == 2 * (npages // 2) and report.runs == npages // 2
        assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == seen[-1][1] == report.bytes_copied
        for device in ("cpu:0", "cpu:1"):
            with region.acquire(device, timeout=WAIT) as lease:
                assert np.array_equal(lease.read(), region.array)
        region.array[(npages - 2) * PAGE_SIZE] = 9  # a copied page
        region.array[(npages - 3) * PAGE_SIZE] = 8  # a gap page (never written, protected all along)
        with region.acquire("cpu:1", timeout=WAIT) as lease:
            assert lease.read((npages - 3) * PAGE_SIZE, PAGE_SIZE + 1).tolist()[::PAGE_SIZE] == [8, 9]


def _uffd_wp_bits(address: int, npages: int) -> list[bool]:
    """Per page of ``[address, +npages)`` of this process: write-protected by userfaultfd (pagemap bit 57)."""
    with open("/proc/self/pagemap", "rb") as f:
        entries = np.frombuffer(os.pread(f.fileno(), 8 * npages, 8 * (address // PAGE_SIZE)), dtype=np.uint64)
    return ((entries >> np.uint64(57)) & np.uint64(1)).astype(bool).tolist()


@pytest.mark.parametrize("kind", HOST_KINDS)
def test_helper_rearm_protects_exactly_the_runs_and_checks_bounds(kind: str) -> None:
    """``FaultHandler.rearm_flat`` (the helper's loop over flat runs) on a real registered mapping of this process:
    exactly the pages of the runs become write-protected; runs outside the region or malformed are refused."""
    import mmap

    from devrep.tracking._handler import FaultHandler
    from devrep.tracking._setup import WP_FEATURES, open_uffd, register_wp

    npages = 64
    host = host_memory(kind, "wp", npages * PAGE_SIZE)
    host.array[:] = 1  # populated: pagemap shows the bit on present pages
    uffd = open_uffd("sync", WP_FEATURES)
    try:
        register_wp(uffd, "sync", host.address, npages * PAGE_SIZE)
        uffd.writeprotect(host.address, npages * PAGE_SIZE, False)
        handler = FaultHandler(uffd, host.address, npages, mmap.mmap(-1, PAGE_SIZE))
        assert not any(_uffd_wp_bits(host.address, npages))
        handler.rearm_flat([1, 2, 10, 1, 60, 4])
        expected = [p in (1, 2, 10, 60, 61, 62, 63) for p in range(npages)]
        assert _uffd_wp_bits(host.address, npages) == expected
        handler.rearm([(20, 3)])  # the service thread's form
        assert _uffd_wp_bits(host.address, npages)[19:24] == [False, True, True, True, False]
        for bad in ([62, 3], [-1, 2], [5, 0], [1, 2, 3]):
            with pytest.raises(ValueError):
                handler.rearm_flat(bad)
    finally:
        with contextlib.suppress(OSError):
            uffd.writeprotect(host.address, npages * PAGE_SIZE, False)
        uffd.close()
        host.close()


@pytest.mark.parametrize("end", ["fail", "remove"])
def test_acquire_reports_why_its_replica_went_during_its_copy(end: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A region that fails (a file tracker's watcher thread found the file replaced) while a stale acquire is
    copying closes every replica: the acquire must report the region's failure, not "replica removed". A replica
    removed on its own still reports NOT_FOUND."""
    with devrep.Replicator(cpu_devices=1) as rep:
        region = rep.create_region("f", 8 * PAGE_SIZE)
        rep.replicate("f", ["cpu:0"])
        region.invalidate(0, PAGE_SIZE)
        backend = rep.backend("cpu")
        real_copy = backend.copy_runs

        def copy_then_end(*args: object, **kwargs: object) -> None:
            real_copy(*args, **kwargs)  # type: ignore[arg-type]
            threading.Thread(target=region.fail if end == "fail" else region.remove_replica,
                             args=("file replaced" if end == "fail" else "cpu:0",)).start()
            deadline = time.monotonic() + WAIT  # the ending thread takes the region lock once the copy commits
            while region.failed is None and "cpu:0" in region.devices and time.monotonic() < deadline:
                time.sleep(0.001)

        monkeypatch.setattr(backend, "copy_runs", copy_then_end)
        if end == "fail":
            with pytest.raises(devrep.FailedPreconditionError, match="failed: file replaced"):
                region.acquire("cpu:0", timeout=WAIT)
        else:
            with pytest.raises(devrep.NotFoundError, match="replica on cpu:0 was removed"):
                region.acquire("cpu:0", timeout=WAIT)


class StagedTracker(ExplicitTracker):
    """An explicit tracker that asks for the staged rearm and records each ``rearm``: what it covered (once it
    returned), and whether two ever ran at once. ``fail_at``: the call (0-based) that raises instead; ``hold(call)``
    runs before a call returns."""

    rearm_overlaps_copy = True

    def __init__(self, fail_at: int | None = None) -> None:
        self.rearmed: list[RunArray] = []
        self.busy = False
        self.overlapped = False
        self.fail_at = fail_at
        self.calls = 0
        self.hold: Callable[[int], None] | None = None
        self.worker_cpus: list[set[int]] = []  # the CPU set of each call made off the syncing (main) thread

    def rearm(self, runs: RunArray) -> None:
        if self.busy:
            self.overlapped = True
        self.busy = True
        try:
            call, self.calls = self.calls, self.calls + 1
            if threading.current_thread() is not threading.main_thread():
                self.worker_cpus.append(os.sched_getaffinity(0))
            time.sleep(0.002)  # long enough for the copying thread to run meanwhile
            if self.hold is not None:
                self.hold(call)
            if call == self.fail_at:
                raise devrep.FailedPreconditionError("cannot re-protect pages: the writing process exited")
            self.rearmed.append(np.array(runs))
        finally:
            self.busy = False

    def rearmed_pages(self) -> set[int]:
        return {p for runs in list(self.rearmed) for first, count in runs.tolist() for p in range(first, first + count)}


needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                    reason="the staged rearm needs a second CPU to overlap on; this process has one")


def _staged_region(rep: devrep.Replicator, tracker: StagedTracker, npages: int = 4096) -> devrep.Region:
    """A region of ``npages`` replicated on cpu:0 and cpu:1, then every other page invalidated (npages / 2 runs:
    8 stages of the staged rearm)."""
    region = rep.create_region("staged", npages * PAGE_SIZE, tracking=tracker)
    region.array[:] = 1
    rep.replicate("staged", ["cpu:0", "cpu:1"])
    region.array.reshape(npages, PAGE_SIZE)[::2, 9] = 4
    region.invalidate_pages(np.arange(0, npages, 2))
    return region


@needs_two_cpus
def test_staged_rearm_copies_no_page_before_its_rearm_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracker whose rearm may overlap the copy (``rearm_overlaps_copy``, remote sync mode) gets one rearm per
    stage, never two at once, covering every run exactly once, the later ones on a worker kept off one of this
    thread's CPUs; each copy reads only pages whose rearm has returned; both replicas end equal to the host and
    progress stays monotone up to the total."""

    tracker = StagedTracker()
    npages = 4096
    with devrep.Replicator(cpu_devices=2) as rep:
        region = _staged_region(rep, tracker, npages)
        tracker.rearmed.clear()
        tracker.calls = 0  # from here on, call k is stage k's
        backend = rep.backend("cpu")
        real_copy = backend.copy_runs
        early: list[int] = []
        copies = [0]

        def checked_copy(source: np.ndarray, runs: RunArray, *args: object, **kwargs: object) -> None:
            copies[0] += 1
            done = tracker.rearmed_pages()
            early.extend(p for first, count in runs.tolist() for p in range(first, first + count) if p not in done)
            real_copy(source, runs, *args, **kwargs)  # type: ignore[arg-type]

        def hold(call: int) -> None:
            # Give the copy of this stage every chance to start too early: wait (50 ms at most, which a correct sync
            # always takes: its copy waits for this call) for it before returning.
            deadline = time.monotonic() + 0.05
            while copies[0] <= call and time.monotonic() < deadline:
                time.sleep(0.001)

        tracker.hold = hold
        monkeypatch.setattr(backend, "copy_runs", checked_copy)
        seen: list[tuple[int, int]] = []
        report = region.sync(progress=lambda done, total: seen.append((done, total)))
        stages = min(_plan.MAX_STAGES, (npages // 2) // _plan.STAGE_MIN_RUNS)
        assert stages >= 2
        assert len(tracker.rearmed) == stages and copies[0] == stages  # one fan-out copy per stage
        assert not tracker.overlapped, "two rearms of one region ran at once"
        allowed = os.sched_getaffinity(0)
        assert len(tracker.worker_cpus) == stages - 1
        assert all(cpus < allowed and len(cpus) == len(allowed) - 1 for cpus in tracker.worker_cpus)
        assert not early, f"pages copied before their rearm returned: {early[:10]}"
        covered = np.concatenate(tracker.rearmed)
        assert covered.tolist() == [[p, 1] for p in range(0, npages, 2)]  # every run once, in order
        assert report.pages_copied == 2 * (npages // 2) and report.runs == npages // 2
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        assert seen[-1] == (report.bytes_copied, report.bytes_copied)
        assert not [t for t in threading.enumerate() if t.name.startswith("devrep-rearm")]
        for device in ("cpu:0", "cpu:1"):
            with region.acquire(device, fresh=False) as lease:
                assert len(lease.invalid_runs) == 0
                assert np.array_equal(lease.read(), region.array)


@pytest.mark.parametrize("case", ["few runs", "in-process", "one CPU", "CPU quota"])
def test_syncs_that_cannot_overlap_rearm_once_before_copying(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer runs than two stages' worth, a tracker that does not overlap (in-process sync mode: its rearm's TLB
    flushes would interrupt the copy), a thread allowed on one CPU only, or a cgroup CPU limit under two CPUs
    (nothing to overlap on) get one rearm of every run before any copy."""
    if case == "CPU quota":  # tests/test_cgroup.py reads a real limit; here the seam the sync asks
        monkeypatch.setattr(_plan, "cpu_limit", lambda: 1.5)
    tracker = StagedTracker()
    tracker.rearm_overlaps_copy = case != "in-process"
    npages = 64 if case == "few runs" else 4096
    allowed = os.sched_getaffinity(0)
    with devrep.Replicator(cpu_devices=2) as rep:
        region = _staged_region(rep, tracker, npages)
        tracker.rearmed.clear()
        if case == "one CPU":
            os.sched_setaffinity(0, {min(allowed)})  # this thread only
        try:
            region.sync()
        finally:
            os.sched_setaffinity(0, allowed)
        assert len(tracker.rearmed) == 1 and len(tracker.rearmed[0]) == npages // 2


@needs_two_cpus
@pytest.mark.parametrize("fail_at", [0, 3])
def test_staged_rearm_failure_fails_the_sync_and_marks_nothing_valid(fail_at: int) -> None:
    """A rearm that fails in any stage (the first, on the syncing thread, or a later one, on the worker) fails the
    sync with that error; no page of that sync is marked valid, no worker thread is left, and a later sync
    completes."""
    tracker = StagedTracker(fail_at=fail_at + 1)  # call 0 is the replicate's own rearm
    npages = 4096
    with devrep.Replicator(cpu_devices=2) as rep:
        region = _staged_region(rep, tracker, npages)
        with pytest.raises(devrep.FailedPreconditionError, match="writing process exited"):
            region.sync()
        assert not [t for t in threading.enumerate() if t.name.startswith("devrep-rearm")]
        assert not tracker.overlapped
        for device in ("cpu:0", "cpu:1"):
            with region.acquire(device, fresh=False) as lease:
                assert len(lease.invalid_runs) == npages // 2
        report = region.sync()
        assert report.pages_copied == 2 * (npages // 2)
        with region.acquire("cpu:1", timeout=WAIT) as lease:
            assert np.array_equal(lease.read(), region.array)


@needs_two_cpus
def test_staged_copy_failure_joins_the_rearm_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that fails in a middle stage fails the sync with its own error only after the rearm worker has
    stopped (no rearm outlives the sync, so the next sync's rearm cannot run alongside it), without rearming the
    stages left; nothing is marked valid."""
    tracker = StagedTracker()
    npages = 4096
    with devrep.Replicator(cpu_devices=1) as rep:
        region = rep.create_region("staged", npages * PAGE_SIZE, tracking=tracker)
        rep.replicate("staged", ["cpu:0"])
        region.invalidate_pages(np.arange(0, npages, 2))
        backend = rep.backend("cpu")
        real_copy = backend.copy_runs
        copies = [0]

        def failing_copy(*args: object, **kwargs: object) -> None:
            copies[0] += 1
            if copies[0] == 3:
                raise devrep.DevrepError("device lost")
            real_copy(*args, **kwargs)  # type: ignore[arg-type]

        def hold(call: int) -> None:  # call 0 was the replicate's: stage k is call k + 1
            # Keep the worker at most one stage ahead of the copy (up to 0.5 s), so it is still rearming when the
            # copy fails; a worker that ignored the failure would go on to rearm every stage.
            deadline = time.monotonic() + 0.5
            while call > 1 and copies[0] < call - 1 and time.monotonic() < deadline:
                time.sleep(0.001)

        tracker.hold = hold
        monkeypatch.setattr(backend, "copy_runs", failing_copy)
        with pytest.raises(devrep.DevrepError, match="device lost"):
            region.sync()
        assert not tracker.busy and not [t for t in threading.enumerate() if t.name.startswith("devrep-rearm")]
        stages = min(_plan.MAX_STAGES, (npages // 2) // _plan.STAGE_MIN_RUNS)
        assert tracker.calls - 1 < stages, "the rearm worker went on after the copy failed"
        tracker.hold = None
        with region.acquire("cpu:0", fresh=False) as lease:
            assert len(lease.invalid_runs) == npages // 2
        monkeypatch.setattr(backend, "copy_runs", real_copy)
        assert region.sync().pages_copied == npages // 2
