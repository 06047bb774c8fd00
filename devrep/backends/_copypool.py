"""``CopyPool``: a few threads that copy scattered page runs alongside the calling thread.

Why threads of our own and not numba's ``prange``: a scattered page copy is bound by memory latency (each 4 KiB
page is a fresh TLB miss and a cold line stream on both sides; here, under KVM, ~0.75 us per page), not by
bandwidth, so a second thread nearly doubles it. numba's OpenMP ``prange`` over the same runs measured no faster
than one thread on this 2-vCPU VM (1.92 against 1.94 ms for 1 % random pages of 1 GiB), while two Python threads
each running the serial nogil kernel on half of them took 1.38 ms (a bare two-thread C scatter: 1.32-1.45 ms).

How the work is shared, and why a busy machine does not stall it: the runs are cut into chunks, and every thread,
the caller included, claims the next unclaimed chunk until none is left. A helper that is not scheduled in time
(the other core busy) simply claims nothing: the caller then copies every chunk itself and waits only for chunks
a helper did claim, never for a helper to wake up. A helper that wakes after the job ended finds it closed and
goes back to sleep. After ``fork`` the child has no helper threads; the pool starts new ones there on first use
(and until then the caller would copy everything itself anyway). A job drops its arrays once the caller is done
with it, so a helper that wakes late never keeps a replica's mapping alive.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import weakref
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Kernel = Callable[[npt.NDArray[np.uint8], npt.NDArray[np.uint8], npt.NDArray[np.int64]], None]
"""``kernel(src, dst, runs)``: copies page runs ``[first, count]`` of ``src`` to the same offsets of ``dst``; must
release the GIL (a nogil numba kernel) or the helpers only take turns."""

MAX_THREADS = 4
"""Copy threads at most, the caller included: past a few the page walks contend rather than overlap."""
MIN_PARALLEL_PAGES = 512
"""Fewer pages are copied by the caller alone: waking a helper (~20-40 us) would cost more than it saves."""
MIN_CHUNK_PAGES = 64
"""Pages per claimed chunk at least (one kernel call each, ~1 us of dispatch)."""
CHUNKS_PER_THREAD = 4
"""Chunks per copying thread: enough that one thread slowed by the machine leaves work for the others."""


class _Job:
    """One ``CopyPool.copy`` call: the runs, their chunk bounds, and who is still copying."""

    __slots__ = ("active", "bounds", "claims", "closed", "cond", "dst", "error", "kernel", "runs", "src")

    def __init__(self, kernel: Kernel, src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8],
                 runs: npt.NDArray[np.int64], bounds: list[int]) -> None:
        self.kernel, self.bounds = kernel, bounds
        self.src: npt.NDArray[np.uint8] | None = src
        self.dst: npt.NDArray[np.uint8] | None = dst
        self.runs: npt.NDArray[np.int64] | None = runs
        self.claims = itertools.count()  # ``next`` is one C call: atomic under the GIL
        self.cond = threading.Condition(threading.Lock())
        self.active = 0  # helpers inside ``work``
        self.closed = False  # the caller is done claiming: late helpers must not start
        self.error: BaseException | None = None

    def work(self) -> None:
        src, dst, runs = self.src, self.dst, self.runs
        assert src is not None and dst is not None and runs is not None  # dropped only once nobody works
        last = len(self.bounds) - 1
        while (k := next(self.claims)) < last:
            self.kernel(src, dst, runs[self.bounds[k]:self.bounds[k + 1]])

    def help(self) -> None:
        """A helper's share: nothing if the caller already closed the job."""
        with self.cond:
            if self.closed:
                return
            self.active += 1
        try:
            self.work()
        except BaseException as exc:  # handed to the caller, which raises it
            self.error = self.error or exc
        finally:
            with self.cond:
                self.active -= 1
                if not self.active:
                    self.cond.notify_all()

    def finish(self, *, raise_error: bool = True) -> None:
        """The caller's end: no new helper may start; wait for those copying a chunk they claimed (even through a
        KeyboardInterrupt: the caller's caller may free ``dst`` as soon as this returns), then drop the arrays
        (a late helper still holding this job must not keep a replica's mapping alive). Raises a helper's error
        unless ``raise_error`` is false (the caller is already raising its own)."""
        interrupted: BaseException | None = None
        with self.cond:
            self.closed = True
            while self.active:
                try:
                    self.cond.wait()
                except BaseException as exc:  # Ctrl-C in the main thread: keep waiting, then raise it
                    interrupted = interrupted or exc
        self.src = self.dst = self.runs = None
        error, self.error = self.error, None  # no traceback -> frame -> job cycle left behind
        if interrupted is not None:
            raise interrupted
        if error is not None and raise_error:
            raise error


class CopyPool:
    """``copy(kernel, src, dst, runs)`` on up to ``threads`` threads (the caller and ``threads - 1`` daemon
    helpers, started on first use). ``threads=None``: the CPUs this process may run on, at most ``MAX_THREADS``."""

    def __init__(self, threads: int | None = None) -> None:
        if threads is None:
            threads = min(len(os.sched_getaffinity(0)), MAX_THREADS)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Job | None] | None = None
        self._pid = -1
        _POOLS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the helpers are gone, and the lock may have been held at the fork."""
        self._lock = threading.Lock()
        self._jobs, self._pid = None, -1

    def close(self) -> None:
        """Stop the helper threads (a later ``copy`` starts new ones)."""
        with self._lock:
            jobs, self._jobs = self._jobs, None
        if jobs is not None and self._pid == os.getpid():
            for _ in range(self.threads - 1):
                jobs.put(None)

    def _queue(self) -> queue.SimpleQueue[_Job | None]:
        """The helpers' queue, with the helpers started in this process (again after a fork or ``close``)."""
        with self._lock:
            if self._jobs is None or self._pid != os.getpid():
                jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
                for n in range(self.threads - 1):
                    threading.Thread(target=self._serve, args=(jobs,), name=f"devrep-copy-{n}", daemon=True).start()
                self._jobs, self._pid = jobs, os.getpid()
            return self._jobs

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[_Job | None]) -> None:
        while (job := jobs.get()) is not None:
            job.help()

    def copy(self, kernel: Kernel, src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8],
             runs: npt.NDArray[np.int64]) -> None:
        """Copy ``runs`` (a C-contiguous ``(n, 2)`` int64 array, checked by the caller) with ``kernel``, sharing
        the chunks with the helpers when there are enough pages; returns when every run is copied."""
        counts = np.cumsum(runs[:, 1])
        total = int(counts[-1]) if len(counts) else 0
        if self.threads == 1 or total < MIN_PARALLEL_PAGES:
            kernel(src, dst, runs)
            return
        chunk = max(MIN_CHUNK_PAGES, total // (self.threads * CHUNKS_PER_THREAD))
        # A chunk ends after the run that reaches each multiple of ``chunk`` pages (a long run stays whole).
        cuts = np.searchsorted(counts, np.arange(chunk, total, chunk), side="left") + 1
        bounds = sorted({0, len(runs), *cuts.tolist()})
        job = _Job(kernel, src, dst, runs, bounds)
        jobs = self._queue()
        for _ in range(min(self.threads - 1, len(bounds) - 2)):
            jobs.put(job)
        try:
            job.work()
        except BaseException:
            job.finish(raise_error=False)  # the caller's own error wins
            raise
        job.finish()


_POOLS: weakref.WeakSet[CopyPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
