"""Fan-out of region events to Watch streams, coalesced so gRPC never carries one message per page.

The hub is a ``Replicator`` listener: it only appends to per-watcher queues (cheap, never blocks a sync).
Each Watch stream waits for the first event, lets more arrive for ``coalesce`` seconds, then merges
consecutive events of the same kind/region/device into one (runs unioned, latest generation) and sends the
whole batch as one message.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np

from .._pages import RunArray
from ..model import Event, EventKind

MAX_QUEUE = 100_000
MAX_RUNS_PER_MESSAGE = 131_072


def merge_runs(runs: list[RunArray]) -> RunArray:
    """Union of run lists, coalesced (sorted, overlapping/adjacent runs merged)."""
    arrays = [np.asarray(r, dtype=np.int64).reshape(-1, 2) for r in runs]
    allr = np.concatenate(arrays) if arrays else np.empty((0, 2), np.int64)
    if len(allr) <= 1:
        return allr
    allr = allr[np.argsort(allr[:, 0], kind="stable")]
    starts, ends = allr[:, 0], allr[:, 0] + allr[:, 1]
    reach = np.maximum.accumulate(ends)
    new = np.concatenate(([True], starts[1:] > reach[:-1]))
    idx = np.flatnonzero(new)
    out_starts = starts[idx]
    out_ends = np.maximum.reduceat(ends, idx)
    return np.stack([out_starts, out_ends - out_starts], axis=1)


def coalesce(events: list[Event]) -> list[Event]:
    """Merge consecutive events that differ only in runs and generation."""
    out: list[Event] = []
    pending: list[RunArray] = []
    for event in events:
        if out and (out[-1].kind, out[-1].region, out[-1].device) == (event.kind, event.region, event.device) \
                and event.kind in (EventKind.INVALIDATE, EventKind.SYNC, EventKind.VERIFY):
            pending.append(event.runs)
            last = out[-1]
            out[-1] = Event(last.kind, last.region, max(last.generation, event.generation), last.runs,
                            last.device, last.nbytes + event.nbytes, last.seconds + event.seconds, last.message)
            continue
        if pending and out:
            out[-1] = _with_runs(out[-1], merge_runs(pending))
        out.append(event)
        pending = [event.runs]
    if pending and out:
        out[-1] = _with_runs(out[-1], merge_runs(pending))
    return out


def _with_runs(event: Event, runs: RunArray) -> Event:
    return Event(event.kind, event.region, event.generation, runs, event.device, event.nbytes, event.seconds,
                 event.message)


class Watcher:
    def __init__(self, accept: Callable[[Event], bool]) -> None:
        self.accept = accept
        self.queue: deque[Event] = deque()
        self.dropped = 0
        self.closed = False
        self.cond = threading.Condition()

    def push(self, event: Event) -> None:
        with self.cond:
            if len(self.queue) >= MAX_QUEUE:
                self.queue.popleft()
                self.dropped += 1
            self.queue.append(event)
            if len(self.queue) == 1:
                self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def batches(self, coalesce_s: float, poll_s: float = 0.25) -> Iterator[tuple[list[Event], int]]:
        """Yield ``(events, dropped_since_last)``; an empty batch every ``poll_s`` lets the caller check liveness.
        Ends when closed."""
        while True:
            with self.cond:
                if not self.queue and not self.closed:
                    self.cond.wait(poll_s)
                if self.closed and not self.queue:
                    return
                have = bool(self.queue)
            if have and coalesce_s > 0:
                with self.cond:
                    self.cond.wait_for(lambda: self.closed, coalesce_s)
            with self.cond:
                events = list(self.queue)
                self.queue.clear()
                dropped, self.dropped = self.dropped, 0
            yield coalesce(events), dropped


class WatchHub:
    """Register with ``Replicator.add_listener(hub)``."""

    def __init__(self) -> None:
        self._watchers: list[Watcher] = []
        self._lock = threading.Lock()
        self.closed = False

    def __call__(self, event: Event) -> None:
        for watcher in self._watchers:  # a copy-on-write list: no lock on the event path
            if watcher.accept(event):
                watcher.push(event)

    def add(self, accept: Callable[[Event], bool]) -> Watcher:
        watcher = Watcher(accept)
        with self._lock:
            if self.closed:
                watcher.close()
            self._watchers = [*self._watchers, watcher]
        return watcher

    def remove(self, watcher: Watcher) -> None:
        watcher.close()
        with self._lock:
            self._watchers = [w for w in self._watchers if w is not watcher]

    def close(self) -> None:
        with self._lock:
            self.closed = True
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.close()
