"""R3 and the sync-mode rearm (issue 13 item 5, issue 17 P3s).

* The checker is not blind to the rearm: the same in-process sync-mode run as ``test_r3_local_writer``, but with
  ``SyncTracker.rearm`` replaced by a no-op (syncs copy without re-protecting the pages), must report violations.
  Passing ``test_r3_local_writer`` with the rearm off the region lock, and failing here, is what shows the move
  kept the rule it relies on (see ``devrep.tracking``).
* The pipelined rearm (the helper re-protects batch i + 1 while the sync copies batch i) passes the checker, with
  the threshold lowered so that nearly every sync of the run is pipelined.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import pytest

import devrep.region._plan
from devrep._pages import RunArray
from devrep.tracking._sync import SyncTracker

from .test_r3_coherence import assert_clean, run_local


def test_r3_checker_catches_a_rearm_that_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rearm(self: SyncTracker, runs: RunArray) -> None:
        pass

    monkeypatch.setattr(SyncTracker, "rearm", no_rearm)
    tally = run_local("sync", writes=5_000, npages=64, acquirers=2, seconds=1.0, budget=60)
    # Besides violations, the final quiescent comparison may find replicas that differ: detections too.
    assert all("differs from the quiescent host" in e for e in tally.errors), tally.errors
    print(f"violations with the rearm skipped: {len(tally.violations)} (expected > 0)")
    assert tally.violations, "the checker missed writes after a sync that never re-protected its pages"


def test_r3_pipelined_rearm_is_coherent(monkeypatch: pytest.MonkeyPatch) -> None:
    pipelined = [0]
    real = SyncTracker.rearm_batches

    def counted(self: SyncTracker, batches: Sequence[RunArray]) -> Generator[int, None, None]:
        pipelined[0] += 1
        return real(self, batches)

    monkeypatch.setattr(devrep.region._plan, "PIPELINE_MIN_RUNS", 4)
    monkeypatch.setattr(SyncTracker, "rearm_batches", counted)
    writes = 20_000
    tally = run_local("sync", writes=writes, npages=256, acquirers=3, seconds=4, budget=90)
    assert_clean(tally, writes)
    print(f"pipelined syncs: {pipelined[0]} of {tally.syncs} (expected > 0)")
    assert pipelined[0] > 0
