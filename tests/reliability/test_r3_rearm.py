"""R3's coherence checker is not blind to the rearm (issue 13 item 5): the same in-process sync-mode run as
``test_r3_local_writer``, but with ``SyncTracker.rearm`` replaced by a no-op (syncs copy without re-protecting
the pages), must report violations. Passing ``test_r3_local_writer`` with the rearm off the region lock, and
failing here, is what shows the move kept the rule it relies on (see ``devrep.tracking``)."""

from __future__ import annotations

import pytest

from devrep._pages import RunArray
from devrep.tracking._sync import SyncTracker

from .test_r3_coherence import run_local


def test_r3_checker_catches_a_rearm_that_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rearm(self: SyncTracker, runs: RunArray) -> None:
        pass

    monkeypatch.setattr(SyncTracker, "rearm", no_rearm)
    tally = run_local("sync", writes=5_000, npages=64, acquirers=2, seconds=1.0, budget=60)
    # Besides violations, the final quiescent comparison may find replicas that differ: detections too.
    assert all("differs from the quiescent host" in e for e in tally.errors), tally.errors
    print(f"violations with the rearm skipped: {len(tally.violations)} (expected > 0)")
    assert tally.violations, "the checker missed writes after a sync that never re-protected its pages"

