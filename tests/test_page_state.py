"""``devrep.region.PageState`` on its own: the per-page transitions (invalidate, plan, mark synced, flip, verify
mismatches) against a plain-Python model of the same rules, with no region, lock, tracker or backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from devrep._pages import runs_from_mask
from devrep.region import PageState
from devrep.region._state import MAX_SLOTS, slot_bit


def pages(*indices: int) -> np.ndarray:
    return np.array(sorted(set(indices)), dtype=np.int64)


def sync_everything(state: PageState, slot: int) -> None:
    """A whole, undisturbed sync of ``slot``'s readable buffer: snapshot, then commit every page."""
    everything = np.arange(state.npages, dtype=np.int64)
    snap = state.snapshot(everything)
    state.mark_synced(slot, everything, state.unchanged(everything, snap), state.stale_among(slot, everything),
                      flipped=False, has_other=False)


def test_new_state_is_all_stale_and_eight_bytes_a_page() -> None:
    state = PageState(10)
    assert state.generation == 0
    assert state.metadata_bytes == 10 * 8
    for slot in (0, 15):
        assert state.valid_pages(slot) == 0 and not state.fully_valid(slot)
        assert state.invalid_runs(slot).tolist() == [[0, 10]]
        assert state.pages_to_write(slot, into_spare=False).tolist() == list(range(10))


def test_invalidate_bumps_the_generation_once_per_call_and_clears_every_slot() -> None:
    state = PageState(8)
    for slot in (0, 3):
        sync_everything(state, slot)
    assert state.fully_valid(0) and state.fully_valid(3)
    assert state.invalidate(pages()) == 0  # nothing: no new generation
    assert state.invalidate(pages(2, 5)) == 1
    assert state.invalidate(pages(5)) == 2
    assert state.gen.tolist() == [0, 0, 1, 0, 0, 2, 0, 0]
    for slot in (0, 3):
        assert state.valid_pages(slot) == 6
        assert state.invalid_runs(slot).tolist() == [[2, 1], [5, 1]]
        assert state.pages_to_write(slot, into_spare=False).tolist() == [2, 5]


def test_a_page_invalidated_during_the_copy_stays_stale() -> None:
    state = PageState(4)
    todo = state.pages_to_write(0, into_spare=False)
    snap = state.snapshot(todo)
    state.invalidate(pages(1))  # written while the copy ran
    fresh = state.mark_synced(0, todo, state.unchanged(todo, snap), state.stale_among(0, todo), flipped=False,
                              has_other=False)
    assert fresh.tolist() == [0, 2, 3]
    assert state.valid_pages(0) == 3
    assert state.invalid_runs(0).tolist() == [[1, 1]]


def test_flip_to_the_spare_tracks_what_the_old_buffer_lags_on() -> None:
    state = PageState(6)
    sync_everything(state, 0)
    state.spare_added(0)  # a reader holds the readable buffer: a new, empty spare
    assert state.pages_to_write(0, into_spare=True).tolist() == list(range(6))  # the spare has nothing yet
    state.invalidate(pages(4))
    todo = state.pages_to_write(0, into_spare=True)
    snap, stale_in_front = state.snapshot(todo), state.stale_among(0, todo)
    state.mark_synced(0, todo, state.unchanged(todo, snap), stale_in_front, flipped=True, has_other=True)
    assert state.fully_valid(0)
    # The new spare (the old readable buffer) misses exactly page 4, the only page stale in it at the snapshot.
    assert state.pages_to_write(0, into_spare=True).tolist() == [4]
    assert state.pages_to_write(0, into_spare=False).tolist() == []


def test_mismatches_go_stale_in_the_readable_buffer_and_the_spare() -> None:
    state = PageState(5)
    sync_everything(state, 1)
    state.mark_mismatched(1, pages(0, 3), has_spare=True)
    assert state.valid_pages(1) == 3
    assert state.pages_to_write(1, into_spare=False).tolist() == [0, 3]
    assert state.pages_to_write(1, into_spare=True).tolist() == [0, 3]
    state.mark_mismatched(1, pages(0), has_spare=False)  # already stale: counted once
    assert state.valid_pages(1) == 3


def test_reset_slot_and_reset_all() -> None:
    state = PageState(3)
    for slot in (0, 1):
        sync_everything(state, slot)
    state.reset_slot(0)
    assert state.valid_pages(0) == 0 and state.fully_valid(1)
    state.reset_all()
    assert state.valid_pages(1) == 0 and not state.lag.any() and not state.valid.any()


def test_slots_are_bounded() -> None:
    assert slot_bit(MAX_SLOTS - 1) == np.uint16(1 << 15)
    with pytest.raises(ValueError):
        slot_bit(MAX_SLOTS)


NPAGES = 10
SLOTS = 3


class PageStateModel(RuleBasedStateMachine):
    """Random transitions on ``PageState`` and on a model that keeps, per slot and buffer, the host generation
    each buffer holds for each page: a page is valid in a buffer exactly when that equals the page's current
    generation, and a spare lags exactly where its content differs from the readable buffer's."""

    @initialize()
    def setup(self) -> None:
        self.state = PageState(NPAGES)
        self.generation = 0
        self.gen = [0] * NPAGES
        # held[slot][buffer][page]: the generation that buffer holds for the page (None: never written)
        self.held: list[list[list[int | None]]] = [[[None] * NPAGES, [None] * NPAGES] for _ in range(SLOTS)]
        self.front = [0] * SLOTS
        self.has_spare = [False] * SLOTS
        self.pending: dict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}

    def _valid(self, slot: int, page: int) -> bool:
        return self.held[slot][self.front[slot]][page] == self.gen[page]

    @rule(chosen=st.sets(st.integers(0, NPAGES - 1)))
    def invalidate(self, chosen: set[int]) -> None:
        got = self.state.invalidate(pages(*chosen))
        if chosen:
            self.generation += 1
            for page in chosen:
                self.gen[page] = self.generation
        assert got == self.generation

    @rule(slot=st.integers(0, SLOTS - 1))
    def add_spare(self, slot: int) -> None:
        if not self.has_spare[slot]:
            self.has_spare[slot] = True
            self.held[slot][1 - self.front[slot]] = [None] * NPAGES
            self.state.spare_added(slot)

    @rule(slot=st.integers(0, SLOTS - 1), into_spare=st.booleans())
    def plan(self, slot: int, into_spare: bool) -> None:
        """A sync snapshots what it will copy (the copy itself happens at ``finish``)."""
        if slot in self.pending or (into_spare and not self.has_spare[slot]):
            return
        target = 1 - self.front[slot] if into_spare else self.front[slot]
        todo = self.state.pages_to_write(slot, into_spare=into_spare)
        expected = [p for p in range(NPAGES) if self.held[slot][target][p] != self.gen[p] or
                    (into_spare and self.held[slot][target][p] != self.held[slot][self.front[slot]][p])]
        # Planned pages cover every page the target buffer lacks (more is allowed: lag is conservative).
        assert set(expected) <= set(todo.tolist())
        self.pending[slot] = (target, todo, self.state.snapshot(todo), self.state.stale_among(slot, todo))

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """The copy lands (it read the host as of now) and is committed."""
        slot = data.draw(st.sampled_from(sorted(self.pending)))
        target, todo, snap, stale_in_front = self.pending.pop(slot)
        for page in todo.tolist():
            self.held[slot][target][page] = self.gen[page]
        flipped = target != self.front[slot]
        kept = self.state.unchanged(todo, snap)
        fresh = self.state.mark_synced(slot, todo, kept, stale_in_front, flipped=flipped,
                                       has_other=self.has_spare[slot])
        if flipped:
            self.front[slot] = target
        # Only pages not invalidated since the snapshot became valid.
        assert set(fresh.tolist()) == {p for p, k in zip(todo.tolist(), kept.tolist(), strict=True) if k}

    @rule(slot=st.integers(0, SLOTS - 1), chosen=st.sets(st.integers(0, NPAGES - 1)))
    def mismatch(self, slot: int, chosen: set[int]) -> None:
        """Verify found ``chosen`` corrupt in the readable buffer."""
        if slot in self.pending:
            return
        for page in chosen:
            self.held[slot][self.front[slot]][page] = -1
        self.state.mark_mismatched(slot, pages(*chosen), has_spare=self.has_spare[slot])

    @invariant()
    def matches_the_model(self) -> None:
        for slot in range(SLOTS):
            if slot in self.pending:
                continue
            valid = [self._valid(slot, p) for p in range(NPAGES)]
            # Never valid where the readable buffer does not hold the current host page.
            got = self.state.valid_mask(slot).tolist()
            assert all(v for v, g in zip(valid, got, strict=True) if g), (slot, valid, got)
            assert self.state.valid_pages(slot) == sum(got)
            assert self.state.invalid_runs(slot).tolist() == runs_from_mask(~np.array(got, bool)).tolist()
            if self.has_spare[slot]:
                spare, front = self.held[slot][1 - self.front[slot]], self.held[slot][self.front[slot]]
                lag = ((self.state.lag & slot_bit(slot)) != 0).tolist()
                # Wherever the spare differs from the readable buffer, it is marked lagging.
                assert all(lag[p] for p in range(NPAGES) if spare[p] != front[p]), (slot, spare, front, lag)


TestPageStateModel = PageStateModel.TestCase
TestPageStateModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
