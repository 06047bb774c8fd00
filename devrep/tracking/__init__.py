"""Write tracking: how devrep learns that host pages changed. One tracker per region, one class per mode.

The engine talks to a tracker through four calls only:

* ``attach(host, notify)`` -> start tracking. ``notify()`` (no arguments) tells the region "writes are
  waiting, call ``collect()`` soon"; it takes the region lock, so never call it while holding a lock
  that ``collect``/``rearm`` also take.
* ``collect()`` -> pages written since the last call (the engine invalidates them). Called, under the
  region lock, before every decision that depends on validity: sync, acquire, verify, describe. It must
  be cheap when nothing was written.
* ``rearm(runs)`` -> called by ``sync()`` *before* copying ``runs``, so a write during the copy is seen (sync
  mode re-protects the pages; async mode needs nothing because PAGEMAP_SCAN re-protects atomically). Called
  *without* the region lock (see "Rearm off the region lock" below): it may run while other threads call
  ``collect()``, never alongside another ``rearm``/``settle`` of the same region (one sync at a time). A tracker
  that sets ``rearm_overlaps_copy`` gets one call per stage of the runs instead, in order, the later ones from a
  worker thread, and each stage is copied once its call returned (the rule below then holds page by page).
* ``settle()`` -> called by ``sync()`` under the region lock after its post-copy ``collect()``.
* ``on_failure(reason)`` -> an attribute the region sets before ``attach``: the tracker calls it when it
  can no longer track (never from inside ``collect``, which runs under the region lock, nor ``rearm``).
* ``close()`` -> stop tracking and release every protection (no writer may stay blocked).

Ordering rule that makes sync mode correct: a fault handler records the page as written (so the next
``collect()`` returns it) *before* it un-protects the page and wakes the writer, and fault handling and
``rearm`` are serialized with each other. Then a page is never reported valid while a write to it has
landed undetected. ``explicit`` mode relies on the owner calling ``Region.invalidate`` itself.

Rearm off the region lock. A sync (``devrep.region``) runs in three steps: (1) under the region lock it
collects, plans and snapshots the generations of the pages to copy; (2) without the lock it calls
``rearm(runs)``, waits for it to return (sync mode: the helper process acknowledges after its ioctls), then
copies; (3) under the lock again it collects and marks a copied page valid only if its generation still
equals the snapshot. Readers acquire and release during step 2, so a reader's ``release()`` never waits for
the rearm round trip. Coherence still holds, for any write W to a copied page p:

* W landed before rearm re-protected p: the copy starts after ``rearm`` returned, so it reads p after W
  and carries W.
* W comes after rearm re-protected p: W faults, and by the rule above the handler records p before W lands.
  If W lands before the copy reads p, the copy carries it. If it lands after the copy read p but before
  step 3's ``collect()``, its record precedes it, so that collect (or an earlier one: a reader's acquire, a
  notify) invalidates p, which moves p's generation off the snapshot, and step 3 leaves p stale. If it lands
  after step 3's collect, the replica was current at the commit and W is an ordinary later write, invalidated
  by the next collect, which every acquire makes first. Stale-marking always wins: every invalidation moves
  the generation away from the snapshot and nothing moves it back.
* A collect between steps 1 and 3 by another thread (the lock is free) is such an invalidation: same result.

So the rule the rearm must keep is only: it has re-protected every page of ``runs`` when it returns, and the
copy starts after that. Holding the region lock across it added nothing but readers waiting (up to the
rearm timeout). A mutant that skips the rearm is caught by the coherence checker and the sync-mode
hypothesis state machine (tests/test_region_rules.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from .._lazy import lazy_getattr
from ..model import TrackingMode  # stdlib only at import, as the fault helper needs

if TYPE_CHECKING:  # kept out of the import: the sync fault helper process loads this package (see _handler)
    from .._pages import PageArray, RunArray
    from ..memory import HostMemory

Notify = Callable[[], None]


class Tracker(ABC):
    mode: ClassVar[str]
    """A ``TrackingMode`` for devrep's trackers; a tracker of your own (passed to ``Replicator`` as an object) may
    name its own mode."""
    on_failure: Callable[[str], None] | None = None
    """Set by the region before ``attach``: call it with the reason when tracking can no longer work (the
    tracked file was replaced, the handler died), so readers and syncs get that reason."""
    rearm_overlaps_copy: bool = False
    """True when a sync may copy pages while later pages are still being re-armed: the copy then reads a different
    address space than the one ``rearm`` protects (a client's memory, copied from the service's own mapping), so
    the rearm's TLB flushes do not interrupt it. The region then calls ``rearm`` once per stage of the runs, from a
    worker thread, and copies each stage once its ``rearm`` returned (``devrep.region._plan.rearm_and_copy``)."""
    block_pages: int = 1
    """Set by the region before ``attach``: pages per invalidation block. The region invalidates whole blocks,
    so a tracker may report (and, in sync mode, un-protect) a whole block for a write to one of its pages."""

    @abstractmethod
    def attach(self, host: HostMemory, notify: Notify) -> None:
        """Start tracking ``host``; raise ``UnsupportedModeError`` (naming the modes that would work) if this
        mode cannot protect that memory."""

    def collect(self) -> PageArray:
        import numpy as np

        return np.empty(0, dtype=np.int64)

    def rearm(self, runs: RunArray) -> None:  # noqa: B027 - optional hook
        """Re-arm write detection for pages about to be copied."""

    def settle(self) -> None:  # noqa: B027 - optional hook
        """Called by ``sync()`` under the region lock after its post-copy ``collect()``: the copy of the runs
        last passed to ``rearm`` is complete and judged."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop tracking; release every protection."""


class ExplicitTracker(Tracker):
    """The owner reports what it wrote (``Region.invalidate``): memory the kernel cannot protect, e.g. DMA."""

    mode = TrackingMode.EXPLICIT

    def attach(self, host: HostMemory, notify: Notify) -> None:
        pass


TRACKERS: dict[TrackingMode, type[Tracker]] = {TrackingMode.EXPLICIT: ExplicitTracker}
"""The modes this process can run (the kernel-backed ones register on import). ``TrackingMode`` is a ``str``, so a
plain string looks a mode up too."""

__all__ = ["TRACKERS", "AsyncTracker", "ExplicitTracker", "FileTracker", "Notify", "SyncTracker", "Tracker",
           "TrackingMode", "make_tracker", "prepare_async_client", "prepare_sync_client"]


# Lazy re-exports of the kernel-backed trackers (importing them needs nothing until used).
__getattr__ = lazy_getattr(__name__, {
    "SyncTracker": "devrep.tracking._sync",
    "AsyncTracker": "devrep.tracking._async",
    "FileTracker": "devrep.tracking._file",
    "prepare_sync_client": "devrep.protect",
    "prepare_async_client": "devrep.protect",
}, globals())


def make_tracker(mode: TrackingMode | str) -> Tracker:
    """A tracker for ``mode`` (a ``TrackingMode`` or its string); ``InvalidArgumentError`` naming the modes this
    process can run for anything else (``auto`` included: it is a request the service resolves, not a tracker)."""
    from ..errors import InvalidArgumentError

    if mode not in TRACKERS:
        _register_kernel_trackers()
    try:
        return TRACKERS[TrackingMode(mode)]()
    except (ValueError, KeyError):
        shown = str(mode) if isinstance(mode, TrackingMode) else mode  # 'sync', not <TrackingMode.SYNC: 'sync'>
        raise InvalidArgumentError(f"unknown tracking mode {shown!r}; known: {', '.join(sorted(TRACKERS))}") from None


def _register_kernel_trackers() -> None:
    """Kernel-backed modes (sync, async, file) register themselves in ``TRACKERS`` on import."""
    import importlib

    for module in ("devrep.tracking._sync", "devrep.tracking._async", "devrep.tracking._file"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
