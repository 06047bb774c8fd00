"""``async`` mode: ``UFFD_FEATURE_WP_ASYNC`` + ``PAGEMAP_SCAN``. Writers never stall: the kernel clears a
page's write protection itself on the first write and marks it written; every epoch (and on every
``collect()``: sync, acquire, verify) one PAGEMAP_SCAN with ``PM_SCAN_WP_MATCHING`` returns the written pages
and re-protects them in the same walk, so a write after the scan is seen by the next one.

Needs Linux 6.7+ (WP_ASYNC and PAGEMAP_SCAN). Service use: ``AsyncTracker.remote(uffd_fd, pagemap_fd, ...)``
with the client's userfaultfd and its own ``/proc/self/pagemap`` fd (``prepare_async_client``).

Epochs exist only to publish invalidation events early (Watch); correctness never depends on them, because
sync, acquire and verify call ``collect()`` first. So one thread (``_EpochLoop``) runs the epochs of every
async region of the process, and an idle region backs off: a region written since its last epoch is scanned
again after ``interval``, an idle one after twice its previous delay, up to ``IDLE_INTERVAL_MAX`` -- or, with more
than 500 async regions in the process, up to one second per ``IDLE_SCANS_PER_SECOND`` regions, so idle regions
cost a bounded CPU however many there are. A thread per region waking every 50 ms cost 26% of a CPU for 300 idle
regions; see ``bench/tracking.py`` (A1).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
from typing import Any

import numpy as np

from .._pages import PAGE_SHIFT, PAGE_SIZE, PageArray, RunArray
from ..errors import DevrepError, FailedPreconditionError, InvalidArgumentError
from ..linux.pagemap import PageCategory, PagemapScanner, ScanFlag
from ..linux.uffd import Feature, Userfaultfd
from ..memory import HostMemory
from ..protect import check_pagemap_scan
from . import TRACKERS, Notify, Tracker, TrackingMode
from ._setup import WP_FEATURES, address_and_length, check_host, open_uffd, register_wp

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.05
IDLE_INTERVAL_MAX = 0.5
"""Longest delay between epochs of a region nobody writes, with up to 500 async regions in the process: bounds how
late its first invalidation event is."""
IDLE_SCANS_PER_SECOND = 1000
"""Past 500 async regions the longest idle delay grows with their number to keep idle scans at this rate: an idle
epoch costs 10-25 us of CPU here (a cold Python path and one PAGEMAP_SCAN), and 2,000 a second of them came
to 5-6 % of a CPU on a slow day (bench A1)."""
_SCAN_FLAGS = ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC


def ranges_to_pages(ranges: np.ndarray[Any, np.dtype[np.uint64]], base: int, npages: int) -> PageArray:
    """``[start, end)`` byte ranges (as PAGEMAP_SCAN returns them) to sorted page indices of the region."""
    if len(ranges) == 0:
        return np.empty(0, dtype=np.int64)
    first = ((ranges[:, 0].astype(np.int64) - base) >> PAGE_SHIFT).clip(0, npages)
    last = ((ranges[:, 1].astype(np.int64) - base) >> PAGE_SHIFT).clip(0, npages)
    counts = last - first
    if len(ranges) == 1 or (counts == 1).all():
        return first if (counts == 1).all() else np.arange(first[0], last[0], dtype=np.int64)
    offsets = np.repeat(first - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return np.arange(int(counts.sum()), dtype=np.int64) + offsets


_SLACK = 0.01  # epochs due this close together run on one wake-up


class _EpochLoop:
    """One thread running the epochs of every async tracker of this process, earliest due first.

    The loop only calls ``tracker._epoch()``, outside its own lock; the tracker scans under its lock and then,
    when pages were written, calls the region's ``notify`` (region lock, then tracker lock: the same order as
    ``collect``), so the loop never holds a lock the region needs.

    A heap entry is a group of trackers due at the same time: the trackers of one wake-up that get the same next
    delay go back as one entry (a thousand idle regions stay one entry, instead of a heap push and pop each per
    epoch, which cost about a fifth of the loop's CPU; bench A1).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, list[AsyncTracker]]] = []
        self._order = itertools.count()  # ties on the due time never compare groups
        self._thread: threading.Thread | None = None
        self._members: set[AsyncTracker] = set()  # every tracker with epochs, for ``idle_ceiling``
        os.register_at_fork(after_in_child=self._after_fork)

    def idle_ceiling(self) -> float:
        """The longest delay between an idle region's epochs: ``IDLE_INTERVAL_MAX``, or longer with so many
        regions that idle scans would pass ``IDLE_SCANS_PER_SECOND``."""
        return max(IDLE_INTERVAL_MAX, len(self._members) / IDLE_SCANS_PER_SECOND)

    def _after_fork(self) -> None:
        # The loop thread does not exist in a forked child; its lock may have been held at the fork.
        self._cond = threading.Condition()
        self._heap = []
        self._thread = None
        self._members = set()

    def add(self, tracker: AsyncTracker, delay: float) -> None:
        with self._cond:
            self._members.add(tracker)
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._order), [tracker]))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="devrep-async-epochs", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, tracker: AsyncTracker) -> None:
        with self._cond:
            self._members.discard(tracker)
            kept = []
            for due, order, group in self._heap:
                if tracker in group:
                    group = [t for t in group if t is not tracker]
                if group:
                    kept.append((due, order, group))
            heapq.heapify(kept)
            self._heap = kept

    def _next_due(self) -> list[AsyncTracker]:
        """Every tracker due within ``_SLACK`` from now: one wake-up serves them all (a wake-up per region
        costs more than its scan)."""
        with self._cond:
            while True:
                if not self._heap:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                due = self._heap[0][0] - now
                if due > 0:
                    self._cond.wait(due)
                    continue
                batch: list[AsyncTracker] = []
                while self._heap and self._heap[0][0] <= now + _SLACK:
                    batch.extend(heapq.heappop(self._heap)[2])
                return batch

    def _run(self) -> None:
        while True:
            again: dict[float, list[AsyncTracker]] = {}
            ended: list[AsyncTracker] = []
            for tracker in self._next_due():
                try:
                    delay = tracker._epoch()
                except Exception:  # a bug in one region's epoch must not stop every other region's
                    log.exception("async epoch failed")
                    delay = None
                if delay is not None:
                    again.setdefault(delay, []).append(tracker)
                else:
                    ended.append(tracker)
            # The batch back in one lock hold, one entry per delay, and no notify: this thread is the one that waits.
            now = time.monotonic()
            with self._cond:
                self._members.difference_update(ended)
                for delay, group in again.items():
                    heapq.heappush(self._heap, (now + delay, next(self._order), group))


_LOOP = _EpochLoop()


class AsyncTracker(Tracker):
    """Asynchronous write tracking; ``interval`` seconds between epochs (``None``: only on collect)."""

    mode = TrackingMode.ASYNC

    def __init__(self, *, interval: float | None = DEFAULT_INTERVAL) -> None:
        if interval is not None and interval <= 0:
            raise InvalidArgumentError(f"epoch interval must be positive seconds or None, got {interval}")
        self.interval = interval
        self._remote: tuple[int, int, int, int] | None = None
        self._uffd: Userfaultfd | None = None
        self._pagemap = -1
        self._scanner: PagemapScanner | None = None
        self._base = 0
        self._end = 0
        self._npages = 0
        self._lock = threading.Lock()
        self._notify: Notify | None = None
        self._pending: list[PageArray] = []  # found by an epoch, not yet collected
        self._delay = interval or DEFAULT_INTERVAL
        self.epochs = 0
        self.closed = False

    def __del__(self) -> None:
        if getattr(self, "_remote", None) is not None:
            self.close()

    @classmethod
    def remote(cls, uffd_fd: int, pagemap_fd: int, writer_base: int, length: int, **options: Any) -> AsyncTracker:
        """Track another process's mapping: ``uffd_fd`` and ``pagemap_fd`` (its ``/proc/self/pagemap``) come
        from ``prepare_async_client`` in the writer; the tracker owns both fds from now on."""
        address_and_length(writer_base, length)
        tracker = cls(**options)
        tracker._remote = (uffd_fd, pagemap_fd, writer_base, length)
        return tracker

    def attach(self, host: HostMemory, notify: Notify) -> None:
        if self._scanner is not None:
            raise FailedPreconditionError("an AsyncTracker tracks one region; make a new one")
        self._npages = host.npages
        length = host.npages * PAGE_SIZE
        if self._remote is not None:
            uffd_fd, pagemap_fd, base, remote_length = self._remote
            self._remote = None
            self._uffd, self._pagemap, self._base = Userfaultfd(uffd_fd), pagemap_fd, base
            if remote_length != length:
                self.close()
                raise InvalidArgumentError(f"the writer registered {remote_length} bytes but the region maps {length}")
        else:
            check_host(self.mode, host)
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            try:
                check_pagemap_scan(self._pagemap)
                self._uffd = open_uffd(self.mode, WP_FEATURES, Feature.WP_ASYNC)
                register_wp(self._uffd, self.mode, host.address, length)
            except BaseException:
                self.close()
                raise
            self._base = host.address
        self._scanner = PagemapScanner(self._pagemap)
        self._scanner.configure(flags=_SCAN_FLAGS, category_mask=PageCategory.WRITTEN,
                                return_mask=PageCategory.WRITTEN)
        self._end = self._base + length
        if self.interval is not None:
            self._notify = notify
            _LOOP.add(self, self.interval)

    def _epoch(self) -> float | None:
        """Run by the epoch loop: scan, and tell the region when something was written. Returns the delay until
        this tracker's next epoch, or ``None`` to stop its epochs (closed, or tracking failed: then every
        ``collect()`` raises the reason, as before)."""
        if self.closed or self._notify is None or self.interval is None:
            return None
        try:
            with self._lock:
                pages = self._scan_locked()
                if len(pages):
                    self._pending.append(pages)
        except DevrepError as exc:
            log.debug("async epoch: %s", exc)
            return None
        if len(pages):
            self._delay = self.interval
            try:
                self._notify()
            except DevrepError as exc:  # the region failed or closed meanwhile; the next epoch finds out
                log.debug("async epoch: %s", exc)
        else:
            self._delay = min(self._delay * 2, max(_LOOP.idle_ceiling(), self.interval))
        return self._delay

    def _scan_locked(self) -> PageArray:
        if self._scanner is None or self.closed:
            return np.empty(0, dtype=np.int64)
        try:
            ranges = self._scanner.run(self._base, self._end)
        except OSError as exc:
            # The writer's mapping is gone (client exited) or the kernel refused: nothing is tracked now.
            raise FailedPreconditionError(f"async write tracking failed: PAGEMAP_SCAN: {exc}") from exc
        self.epochs += 1
        return ranges_to_pages(ranges, self._base, self._npages)

    def scan(self) -> PageArray:
        """Written pages since the last scan, re-protecting them (one PAGEMAP_SCAN walk), plus any an epoch
        found and nobody collected yet; sorted, unique."""
        with self._lock:
            fresh = self._scan_locked()  # first: if it raises, the pending pages stay for the next call
            pending, self._pending = self._pending, []
        if not pending:
            return fresh
        return np.union1d(np.concatenate(pending), fresh).astype(np.int64, copy=False)

    def collect(self) -> PageArray:
        return self.scan()

    def rearm(self, runs: RunArray) -> None:
        """Nothing to do: the scan in ``collect()`` (run by sync just before this) re-protected every page it
        reported, atomically with reporting it."""

    def close(self) -> None:
        """Stop tracking; also closes ``remote`` fds that were never attached."""
        self.closed = True
        if self._remote is not None:
            os.close(self._remote[0])
            os.close(self._remote[1])
            self._remote = None
        _LOOP.remove(self)
        self._notify = None  # drops the region: nothing here keeps it (or its memory) alive
        with self._lock:
            self._pending = []
            if self._uffd is not None:
                with contextlib.suppress(OSError):
                    self._uffd.unregister(self._base, self._npages * PAGE_SIZE)
                self._uffd.close()
                self._uffd = None
            if self._pagemap >= 0:
                os.close(self._pagemap)
                self._pagemap = -1
            self._scanner = None


TRACKERS[TrackingMode.ASYNC] = AsyncTracker
