"""Sync planning and copying: what one sync writes where (``Plan``), the union of the pages to read from the host,
the copy itself (one backend call per group of replicas that need the same pages, host read once) and the commit
that marks copied pages valid. Planning and the commit run under the region's lock; the copy does not."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE, PageArray, RunArray, runs_from_pages
from ..errors import FailedPreconditionError
from ..linux.cgroup import cpu_limit
from ..linux.numa import getcpu
from ..model import Event, EventKind, ProgressCallback
from ._replicas import Replica
from ._state import PageState

if TYPE_CHECKING:
    from ..backends import Progress as CopyProgress


@dataclass(eq=False)
class Plan:
    """What one sync writes for one replica: ``pages`` into buffer ``target``."""

    replica: Replica
    target: int
    pages: PageArray
    stale_in_front: npt.NDArray[np.bool_] = field(default_factory=lambda: np.empty(0, bool))
    """Per entry of ``pages``: stale in the readable buffer when the generations were snapshot."""


def plan_replica(state: PageState, rep: Replica, target: int) -> Plan:
    """The plan for writing ``rep``'s buffer ``target`` (marked busy: no lease or other sync touches it)."""
    rep.busy[target] = True
    return Plan(rep, target, state.pages_to_write(rep.slot, into_spare=target != rep.front))


@dataclass(eq=False)
class Snapshot:
    """Every plan's view of the page state, taken in one lock hold: what the copy is later judged against."""

    union: PageArray
    """The pages any plan copies (read once from the host)."""
    gen: npt.NDArray[np.uint32]
    """``union``'s generations."""
    generation: int
    runs: RunArray = field(init=False)
    """``union`` as runs (computed once: the rearm, the copy and the sync events all use them)."""

    def __post_init__(self) -> None:
        self.runs = runs_from_pages(self.union)
        self.runs.flags.writeable = False  # shared by the rearm, the copy and every replica's sync event

    def runs_of(self, pages: PageArray) -> RunArray:
        """``pages`` as runs, read-only like ``runs`` (every sync event's runs then behave alike); the union's own
        without recomputing them (one replica, or several in step)."""
        if pages is self.union:
            return self.runs
        runs = runs_from_pages(pages)
        runs.flags.writeable = False
        return runs


def take_snapshot(state: PageState, plans: list[Plan]) -> Snapshot:
    for plan in plans:
        plan.stale_in_front = state.stale_among(plan.replica.slot, plan.pages)
    union = union_pages([p.pages for p in plans], state.npages)
    return Snapshot(union, state.snapshot(union), state.generation)


def union_pages(page_sets: list[PageArray], npages: int) -> PageArray:
    """Sorted unique union of sorted unique page sets (the common single or identical set is returned as is)."""
    if not page_sets:
        return np.empty(0, np.int64)
    if all(p is page_sets[0] or np.array_equal(p, page_sets[0]) for p in page_sets):
        return page_sets[0]
    mask = np.zeros(npages, dtype=bool)
    for pages in page_sets:
        mask[pages] = True
    return np.flatnonzero(mask)


def copy_plans(plans: list[Plan], snap: Snapshot, source: Callable[[RunArray], npt.NDArray[np.uint8]], region: str,
               progress: ProgressCallback | None) -> int:
    """Run the copies, one backend call per group of replicas that need the same pages (fan-out); returns the host
    bytes read (each page once per group, however many replicas it lands in). ``source(runs)`` gives the host
    pages to copy from."""
    groups: dict[tuple[int, bytes], list[Plan]] = {}
    for plan in plans:
        if plan.pages.size:
            groups.setdefault((id(plan.replica.backend), plan.pages.tobytes()), []).append(plan)
    total = sum(int(plan.pages.size) for plan in plans) * PAGE_SIZE
    done = 0
    if progress:
        progress(0, total)
    host_read = 0
    for members in groups.values():
        first = members[0]
        buffers = [plan.replica.buffers[plan.target] for plan in members]
        if any(b is None for b in buffers):
            raise FailedPreconditionError(f"region {region!r}: a replica buffer vanished during sync")
        runs = snap.runs_of(first.pages)
        group_end = done + len(members) * int(first.pages.size) * PAGE_SIZE
        report: CopyProgress | None = None
        if progress:
            # Backends report host bytes read (once per fan-out call); each such byte landed in every member.
            def report(nbytes: int, _k: int = len(members), _end: int = group_end) -> None:
                nonlocal done
                done = min(done + nbytes * _k, _end)
                progress(done, total)
        first.replica.backend.copy_runs(source(runs), runs, [b for b in buffers if b is not None], report)
        host_read += int(first.pages.size) * PAGE_SIZE
        if progress and done != group_end:
            done = group_end
            progress(done, total)
    return host_read


# Staged rearm (trackers whose ``rearm_overlaps_copy`` is set): at least this many runs per stage, at most this many
# stages. A stage's rearm (~1.2-1.6 us a run here) should outlast a thread hand-off (~50 us) by far; more stages
# shorten the tail (the last stage's copy, which nothing overlaps) but add a hand-off each.
STAGE_MIN_RUNS = 256
MAX_STAGES = 8


def rearm_and_copy(plans: list[Plan], snap: Snapshot, source: Callable[[RunArray], npt.NDArray[np.uint8]], region: str,
                   progress: ProgressCallback | None, rearm: Callable[[RunArray], None], overlap: bool) -> int:
    """``rearm(snap.runs)``, then ``copy_plans``; returns the host bytes read.

    With ``overlap`` (the copy reads another address space than the one the rearm re-protects, so the rearm's TLB
    flushes do not interrupt the copying CPUs), enough runs and a second CPU, the runs are cut into stages at run
    boundaries. This thread rearms the first stage; a worker thread, kept off this thread's CPU, then rearms the
    others in order while this thread copies each stage as soon as its rearm has returned.

    The rule a rearm must keep (see ``devrep.tracking``) holds page by page: no page is read before the rearm that
    covers it returned. ``rearm`` calls never overlap each other, and the worker is joined before this returns or
    raises (a failed copy stops it after its current stage), so no rearm outlives the sync. A rearm's error is
    raised here, as if the rearm had run on this thread.
    """
    runs = snap.runs
    nstages = min(MAX_STAGES, len(runs) // STAGE_MIN_RUNS)
    other_cpus = _other_cpus() if overlap and nstages >= 2 else set()
    if not other_cpus:
        rearm(runs)
        return copy_plans(plans, snap, source, region, progress)
    cuts = [len(runs) * k // nstages for k in range(nstages + 1)]
    stages = [runs[cuts[k]:cuts[k + 1]] for k in range(nstages)]
    bounds = [int(stage[0, 0]) for stage in stages] + [int(runs[-1, 0] + runs[-1, 1])]
    rearmed = threading.Semaphore(0)  # one release per stage rearmed, and the rest at once if the worker stops
    failure: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        done = 1
        try:
            with contextlib.suppress(OSError):  # a CPU gone from the set meanwhile: run where the scheduler likes
                os.sched_setaffinity(0, other_cpus)  # this thread only (it is ours, and gone after the sync)
            for stage in stages[1:]:
                if stop.is_set():
                    break
                rearm(stage)
                done += 1
                rearmed.release()
        except BaseException as exc:  # raised by the copying thread
            failure.append(exc)
        finally:
            if done < nstages:
                rearmed.release(nstages - done)

    # The first stage on this thread: the copy starts as soon as it is protected, not after a thread start.
    rearm(stages[0])
    thread = threading.Thread(target=worker, name=f"devrep-rearm:{region}", daemon=True)
    total = sum(int(plan.pages.size) for plan in plans) * PAGE_SIZE
    host_read = copied = 0
    try:
        thread.start()
        for k in range(nstages):
            if k:
                rearmed.acquire()
            if failure:
                raise failure[0]
            staged = [Plan(p.replica, p.target, _pages_within(p.pages, bounds[k], bounds[k + 1])) for p in plans]
            report: ProgressCallback | None = None
            if progress:
                def report(done: int, _total: int, _base: int = copied) -> None:
                    progress(_base + done, total)
            host_read += copy_plans(staged, snap, source, region, report)
            copied += sum(int(p.pages.size) for p in staged) * PAGE_SIZE
    finally:
        stop.set()
        if thread.ident is not None:  # started: wait for its current stage (a rearm takes milliseconds)
            thread.join()
    return host_read


def _other_cpus() -> set[int]:
    """The CPUs this thread may run on, less the one it runs on now: where the rearm worker goes.

    Pinned nowhere, the worker tends to land on the copying thread's CPU (the two hand off a semaphore and the GIL,
    and the scheduler wakes a thread near its waker), and then both time-share one CPU: on the 2-vCPU dev VM half of
    the staged syncs took twice as long as rearm-then-copy that way. Empty when there is no second CPU to overlap on:
    one allowed CPU, or a cgroup CPU limit under two CPUs (the affinity mask of a container run with ``--cpus=1``
    still lists every CPU; two threads there only spend the quota twice as fast, then wait out the period).
    """
    limit = cpu_limit()
    if limit is not None and limit < 2:
        return set()
    try:
        allowed = os.sched_getaffinity(0)
        allowed.discard(getcpu()[0])
    except OSError:  # refused (a seccomp profile): no staging, not a failed sync
        return set()
    return allowed


def _pages_within(pages: PageArray, lo: int, hi: int) -> PageArray:
    """The entries of sorted ``pages`` in ``[lo, hi)`` (a view)."""
    first, last = np.searchsorted(pages, (lo, hi))
    return pages[first:last]


def commit(state: PageState, plans: list[Plan], snap: Snapshot, region: str, seconds: float
           ) -> tuple[int, list[Event]]:
    """Mark what the copies wrote valid where the host did not change meanwhile (generation check), flip replicas
    whose spare was written, and free the busy flags. Returns the pages copied and the ``sync`` events."""
    unchanged = state.unchanged(snap.union, snap.gen)
    copied = 0
    events: list[Event] = []
    for plan in plans:
        rep, pages = plan.replica, plan.pages
        rep.busy[plan.target] = False
        if rep.closed:
            rep.free_unleased()
            continue
        kept = unchanged if pages is snap.union else unchanged[np.searchsorted(snap.union, pages)]
        flipped = plan.target != rep.front
        fresh = state.mark_synced(rep.slot, pages, kept, plan.stale_in_front, flipped=flipped,
                                  has_other=rep.buffers[1 - plan.target] is not None)
        if flipped:
            rep.front = plan.target
        rep.generation = snap.generation
        copied += int(pages.size)
        if fresh.size:
            events.append(Event(EventKind.SYNC, region, snap.generation, snap.runs_of(fresh), device=rep.device,
                                nbytes=int(pages.size) * PAGE_SIZE, seconds=seconds))
    return copied, events


def abandon(plans: list[Plan]) -> None:
    """A sync failed midway: no page was marked valid; free the busy flags (and a removed replica's buffers)."""
    for plan in plans:
        plan.replica.busy[plan.target] = False
        if plan.replica.closed:
            plan.replica.free_unleased()
