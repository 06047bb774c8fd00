"""``PageState``: a region's per-page coherence state and its pure transitions (numpy only: no locks, no backends).

Three arrays, whole-array numpy:

* ``gen``   uint32 per page: the region generation at which the page was last invalidated;
* ``valid`` uint16 per page: bit ``s`` set when replica slot ``s``'s readable buffer holds the page as the host had
  it at that generation (so at most 16 replicas per region);
* ``lag``   uint16 per page: bit ``s`` set when slot ``s``'s spare buffer differs from its readable one.

That is 8 bytes per 4 KiB page whatever the number of replicas (``metadata_bytes``). The owner (``Region``) holds
its lock around every call; nothing here blocks or allocates device memory, so it is tested on its own
(tests/test_page_state.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .._pages import PageArray, RunArray, runs_from_mask

MAX_SLOTS = 16
"""Replica slots per region: one bit each in ``valid`` and ``lag``."""

_GEN_MASK = 0xFFFFFFFF


def slot_bit(slot: int) -> np.uint16:
    """The bit of replica slot ``slot`` in ``valid`` and ``lag``."""
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"replica slot {slot} outside [0, {MAX_SLOTS})")
    return np.uint16(1 << slot)


class PageState:
    """The per-page state of a region of ``npages`` pages (see the module doc), plus each slot's count of valid
    pages (kept in step with ``valid``, so "is this replica fully valid" costs nothing)."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.generation = 0
        self.gen = np.zeros(npages, dtype=np.uint32)
        self.valid = np.zeros(npages, dtype=np.uint16)
        self.lag = np.zeros(npages, dtype=np.uint16)
        self._valid_count = np.zeros(MAX_SLOTS, dtype=np.int64)

    @property
    def metadata_bytes(self) -> int:
        """Persistent per-page state, all replicas included."""
        return self.gen.nbytes + self.valid.nbytes + self.lag.nbytes

    def _at(self, pages: PageArray) -> PageArray | slice:
        """An index for ``pages`` (sorted, unique, in range): all ``npages`` of them is every page, indexed with a
        slice (a view and a plain loop, not a gather and a scatter: ~8 ms less for a full sync of 1 GiB)."""
        return slice(None) if pages.size == self.npages else pages

    # ------------------------------------------------------------------ queries
    def valid_pages(self, slot: int) -> int:
        """How many pages slot ``slot``'s readable buffer holds valid."""
        return int(self._valid_count[slot])

    def fully_valid(self, slot: int) -> bool:
        return self.valid_pages(slot) == self.npages

    def stale_mask(self, slot: int) -> npt.NDArray[np.bool_]:
        """Per page: stale in slot ``slot``'s readable buffer."""
        return (self.valid & slot_bit(slot)) == 0

    def stale_among(self, slot: int, pages: PageArray) -> npt.NDArray[np.bool_]:
        """Per entry of ``pages``: stale in slot ``slot``'s readable buffer."""
        return (self.valid[self._at(pages)] & slot_bit(slot)) == 0

    def valid_mask(self, slot: int) -> npt.NDArray[np.bool_]:
        return (self.valid & slot_bit(slot)) != 0

    def invalid_runs(self, slot: int) -> RunArray:
        """The runs of pages stale in slot ``slot``'s readable buffer (empty when it is fully valid)."""
        if self.fully_valid(slot):
            return np.empty((0, 2), np.int64)
        return runs_from_mask(self.stale_mask(slot))

    def pages_to_write(self, slot: int, *, into_spare: bool) -> PageArray:
        """The pages a sync must copy into slot ``slot``'s readable buffer, or with ``into_spare`` into its spare
        (which also misses the pages it lags behind on)."""
        if not into_spare and not self._valid_count[slot]:
            return np.arange(self.npages, dtype=np.int64)  # nothing valid (a new replica): no scan
        stale = self.stale_mask(slot)
        if into_spare:
            stale |= (self.lag & slot_bit(slot)) != 0
        return np.flatnonzero(stale).astype(np.int64)

    def snapshot(self, pages: PageArray) -> npt.NDArray[np.uint32]:
        """The generations of ``pages`` now: a copy of them is judged against this (``unchanged``)."""
        return self.gen[self._at(pages)].copy()

    def unchanged(self, pages: PageArray, snapshot: npt.NDArray[np.uint32]) -> npt.NDArray[np.bool_]:
        """Per entry of ``pages``: not invalidated since ``snapshot`` was taken."""
        return self.gen[self._at(pages)] == snapshot

    # ------------------------------------------------------------------ transitions
    def invalidate(self, pages: PageArray) -> int:
        """Mark ``pages`` stale in every slot and stamp them with a new generation, which is returned (the current
        one, unchanged, for no pages). ``pages``: sorted, unique, in range."""
        if pages.size == 0:
            return self.generation
        self.generation += 1
        at = self._at(pages)
        self.gen[at] = np.uint32(self.generation & _GEN_MASK)
        before = self.valid[at]  # a view when ``at`` is a slice: read before the line below clears it
        for slot in np.flatnonzero(self._valid_count).tolist():
            self._valid_count[slot] -= int(np.count_nonzero(before & slot_bit(slot)))
        self.valid[at] = 0
        return self.generation

    def reset_slot(self, slot: int) -> None:
        """Slot ``slot`` holds nothing (a replica added, with one fresh buffer, or removed)."""
        bit = slot_bit(slot)
        self.valid &= ~bit
        self.lag &= ~bit
        self._valid_count[slot] = 0

    def reset_all(self) -> None:
        """Nothing is valid anywhere (the region failed)."""
        self.valid[:] = 0
        self.lag[:] = 0
        self._valid_count[:] = 0

    def spare_added(self, slot: int) -> None:
        """Slot ``slot`` got a new (empty) spare buffer: it lags on every page."""
        self.lag |= slot_bit(slot)

    def mark_synced(self, slot: int, pages: PageArray, kept: npt.NDArray[np.bool_],
                    stale_in_front: npt.NDArray[np.bool_], *, flipped: bool, has_other: bool) -> PageArray:
        """Record a finished copy of ``pages`` into one of slot ``slot``'s buffers; returns the pages now valid.

        ``kept`` (per entry of ``pages``): not invalidated during the copy (``unchanged``); only those become valid.
        ``flipped``: the copy went into the spare, which becomes the readable buffer; ``stale_in_front`` (per entry
        of ``pages``) says which were stale in the old readable buffer when the copy was planned. ``has_other``
        (not flipped): the slot has a second buffer, which did not get this copy.
        """
        bit = slot_bit(slot)
        if flipped:
            # The old buffer (now the spare) differs from the new one exactly where it was stale at the snapshot,
            # and where the host changed during the copy.
            self.lag &= ~bit
            self.lag[pages[stale_in_front | ~kept]] |= bit
        elif has_other:
            self.lag[self._at(pages)] |= bit
        fresh = pages if kept.all() else pages[kept]  # ``pages`` itself in the common case: its runs are known
        at = self._at(fresh)
        self._valid_count[slot] += int(np.count_nonzero((self.valid[at] & bit) == 0))
        self.valid[at] |= bit
        return fresh

    def mark_mismatched(self, slot: int, pages: PageArray, *, has_spare: bool) -> None:
        """``pages`` of slot ``slot``'s readable buffer were found to differ from the host (verify): stale there,
        and in the spare too when there is one (it may hold the same bad copy)."""
        bit = slot_bit(slot)
        self._valid_count[slot] -= int(np.count_nonzero(self.valid[pages] & bit))
        self.valid[pages] &= ~bit
        if has_spare:
            self.lag[pages] |= bit
