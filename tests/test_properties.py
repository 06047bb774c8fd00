"""Property: random interleavings of writes, invalidations, syncs, acquires and releases on 1-4 replicas never let
a replica serve a byte that differs from the host as of the acquire, and never change a leased buffer.

``Coherence`` reports its writes (explicit mode); ``SyncCoherence`` runs the same rules on a sync-mode region whose
writes only the userfaultfd tracker sees, and must fail when the tracker's rearm is skipped (the mutant test below).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import devrep
from devrep import PAGE_SIZE
from devrep._pages import RunArray, pages_from_runs

PAGES = 12


class Coherence(RuleBasedStateMachine):
    TRACKING = "explicit"

    def __init__(self) -> None:
        super().__init__()
        self.rep = devrep.Replicator()
        self.leases: list[tuple[devrep.Lease, np.ndarray]] = []

    @initialize(replicas=st.integers(1, 4), block_pages=st.sampled_from([1, 2, 4]))
    def setup(self, replicas: int, block_pages: int) -> None:
        self.region = self.rep.create_region("p", PAGES * PAGE_SIZE, block_size=block_pages * PAGE_SIZE,
                                             tracking=self.TRACKING)
        self.devices = [f"cpu:{i}" for i in range(replicas)]
        self.rep.replicate("p", self.devices)

    def _both_buffers_leased(self, device: str | None = None) -> bool:
        return any(all(n > 0 for n in r.leases) for d, r in self.region._replicas.items() if device in (None, d))

    def _timeout(self, device: str | None = None) -> float:
        """Short where readers hold both buffers (the call must time out), else long enough for any load: a
        timeout then is a bug, not a slow machine."""
        return 0.01 if self._both_buffers_leased(device) else 60.0

    @rule(page=st.integers(0, PAGES - 1), offset=st.integers(0, PAGE_SIZE - 1), value=st.integers(0, 255))
    def write(self, page: int, offset: int, value: int) -> None:
        at = page * PAGE_SIZE + offset
        self.region.array[at] = value
        if self.TRACKING == "explicit":
            self.region.invalidate(at, 1)

    @rule(first=st.integers(0, PAGES - 1), count=st.integers(1, 4))
    def invalidate_only(self, first: int, count: int) -> None:
        self.region.invalidate(first * PAGE_SIZE, count * PAGE_SIZE)

    @rule()
    def sync(self) -> None:
        try:
            self.region.sync(timeout=self._timeout())
        except devrep.LeaseTimeoutError:
            assert self._both_buffers_leased()

    @rule(device=st.integers(0, 3), fresh=st.booleans())
    def acquire(self, device: int, fresh: bool) -> None:
        name = self.devices[device % len(self.devices)]
        try:
            lease = self.region.acquire(name, fresh=fresh, timeout=self._timeout(name))
        except devrep.LeaseTimeoutError:
            assert fresh and self._both_buffers_leased(name)
            return
        host = np.array(self.region.array)
        got = lease.read()
        stale = pages_from_runs(lease.invalid_runs)
        if fresh:
            assert stale.size == 0
        ok = np.ones(PAGES, dtype=bool)
        ok[stale] = False
        mask = np.repeat(ok, PAGE_SIZE)
        assert np.array_equal(got[mask], host[mask]), "a valid page differs from the host"
        self.leases.append((lease, got))

    @precondition(lambda self: bool(self.leases))
    @rule(index=st.integers(0, 7))
    def release(self, index: int) -> None:
        lease, _ = self.leases.pop(index % len(self.leases))
        lease.release()

    @precondition(lambda self: not self.leases)
    @rule()
    def verify(self) -> None:
        assert all(r.mismatched_pages == 0 for r in self.region.verify(resync=False)), \
            "verify: a valid page differs from the host"

    @invariant()
    def leased_buffers_never_change(self) -> None:
        for lease, snapshot in self.leases:
            assert np.array_equal(lease.read(), snapshot), "a leased buffer changed under its reader"

    def teardown(self) -> None:
        for lease, _ in self.leases:
            lease.release()
        self.rep.close()


TestCoherence = Coherence.TestCase
TestCoherence.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


class SyncCoherence(Coherence):
    TRACKING = "sync"


TestSyncCoherence = SyncCoherence.TestCase
TestSyncCoherence.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_sync_machine_catches_a_rearm_that_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mutant: syncs copy without re-protecting the pages, so a page written again after its sync is never seen
    (the fault that would report it is gone). The state machine must find a replica that serves such a page as
    valid (or a verify mismatch)."""
    from devrep.tracking._sync import SyncTracker

    def no_rearm(self: SyncTracker, runs: RunArray) -> None:
        pass

    monkeypatch.setattr(SyncTracker, "rearm", no_rearm)
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(SyncCoherence, settings=settings(
            max_examples=200, stateful_step_count=30, deadline=None, phases=[Phase.generate],
            report_multiple_bugs=False, database=None, suppress_health_check=list(HealthCheck)))
    print(f"caught: {caught.value}")
    assert "differs from the host" in str(caught.value)
