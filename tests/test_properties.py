"""Property: random interleavings of writes, invalidations, syncs, acquires and releases on 1-4 replicas never let
a replica serve a byte that differs from the host as of the acquire, and never change a leased buffer."""

from __future__ import annotations

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import devrep
from devrep import PAGE_SIZE
from devrep._pages import pages_from_runs

PAGES = 12


class Coherence(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rep = devrep.Replicator()
        self.leases: list[tuple[devrep.Lease, np.ndarray]] = []

    @initialize(replicas=st.integers(1, 4), block_pages=st.sampled_from([1, 2, 4]))
    def setup(self, replicas: int, block_pages: int) -> None:
        self.region = self.rep.create_region("p", PAGES * PAGE_SIZE, block_size=block_pages * PAGE_SIZE)
        self.devices = [f"cpu:{i}" for i in range(replicas)]
        self.rep.replicate("p", self.devices)

    def _both_buffers_leased(self) -> bool:
        return any(all(n > 0 for n in r.leases) for r in self.region._replicas.values())

    @rule(page=st.integers(0, PAGES - 1), offset=st.integers(0, PAGE_SIZE - 1), value=st.integers(0, 255))
    def write(self, page: int, offset: int, value: int) -> None:
        at = page * PAGE_SIZE + offset
        self.region.array[at] = value
        self.region.invalidate(at, 1)

    @rule(first=st.integers(0, PAGES - 1), count=st.integers(1, 4))
    def invalidate_only(self, first: int, count: int) -> None:
        self.region.invalidate(first * PAGE_SIZE, count * PAGE_SIZE)

    @rule()
    def sync(self) -> None:
        try:
            self.region.sync(timeout=0.01)
        except devrep.LeaseTimeoutError:
            assert self._both_buffers_leased()

    @rule(device=st.integers(0, 3), fresh=st.booleans())
    def acquire(self, device: int, fresh: bool) -> None:
        name = self.devices[device % len(self.devices)]
        try:
            lease = self.region.acquire(name, fresh=fresh, timeout=0.01)
        except devrep.LeaseTimeoutError:
            assert fresh and self._both_buffers_leased()
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
        assert all(r.mismatched_pages == 0 for r in self.region.verify(resync=False))

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
