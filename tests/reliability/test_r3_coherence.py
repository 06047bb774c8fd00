"""R3: the coherence checker, in-process (library), sync and async tracking.

``remote``: writer *processes* stamp their own mapping of a memfd, tracked through the fds they hand over
(``SyncTracker.remote``/``AsyncTracker.remote``, what the service does for a client). ``local``: a writer
thread of this process stamps ``region.array`` (``create_region(tracking=...)``; sync mode handles its faults
in a helper process). Acquirer threads check every acquire (see ``_coherence``); a syncer thread keeps
syncing and leases are held for a while, so replicas flip between their two buffers. Short versions run in
``make test``; ``make soak`` runs >= 10^6 writes per mode (times ``DEVREP_SOAK_SCALE``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _support import soak_scale

import devrep
import devrep.tracking
from devrep._pages import PAGE_SIZE, PageArray
from devrep.memory import HostMemory
from devrep.tracking import Notify

from ._coherence import STAMP_SHIFT, Tally, WriterProcess, local_writer, run_checker, summary
from .conftest import require_tracking

DEVICES = ["cpu:0", "cpu:1", "cpu:2"]


def run_remote(mode: str, *, writers: int, writes: int, npages: int, acquirers: int, seconds: float,
               budget: float) -> Tally:
    require_tracking(mode)
    tally = Tally()
    start = time.monotonic()
    with devrep.Replicator(cpu_devices=len(DEVICES)) as rep:
        procs: list[WriterProcess] = []
        try:
            regions = []
            for wid in range(1, writers + 1):
                proc = WriterProcess(f"w{wid}", npages, mode, wid, writes, seed=wid, seconds=seconds)
                procs.append(proc)
                region = rep.register_fd(f"w{wid}", os.dup(proc.memfd), tracking=proc.tracker())
                rep.replicate(region.name, DEVICES)
                regions.append((region, wid))
            done = threading.Event()

            def wait_writers() -> None:
                try:
                    for proc in procs:
                        proc.go()
                    for proc in procs:
                        written = proc.wait_done(budget)
                        with tally.lock:
                            tally.writes += written
                except Exception as exc:
                    tally.errors.append(f"writer: {type(exc).__name__}: {exc}")
                finally:
                    done.set()

            threading.Thread(target=wait_writers, daemon=True).start()
            run_checker(rep, regions, DEVICES, done, acquirers=acquirers, seed=writers, tally=tally,
                        deadline=time.monotonic() + budget)
        finally:
            for proc in procs:
                proc.stop()
    print(json.dumps(summary(mode, "remote", tally, time.monotonic() - start)))
    return tally


def run_local(mode: str, *, writes: int, npages: int, acquirers: int, seconds: float, budget: float) -> Tally:
    require_tracking(mode)
    tally = Tally()
    start = time.monotonic()
    with devrep.Replicator(cpu_devices=len(DEVICES)) as rep:
        region = rep.create_region("local", npages * PAGE_SIZE, tracking=mode)
        rep.replicate("local", DEVICES)
        done = threading.Event()

        def write() -> None:
            try:
                local_writer(region, 1, writes, seed=7, seconds=seconds, tally=tally)
            finally:
                done.set()

        threading.Thread(target=write, daemon=True).start()
        run_checker(rep, [(region, 1)], DEVICES, done, acquirers=acquirers, seed=1, tally=tally,
                    deadline=time.monotonic() + budget)
    print(json.dumps(summary(mode, "local", tally, time.monotonic() - start)))
    return tally


def assert_clean(tally: Tally, writes: int) -> None:
    assert not tally.errors, tally.errors
    assert not tally.violations, "\n".join(map(str, tally.violations[:20]))
    assert tally.writes == writes
    assert tally.acquires > 0 and tally.pages_checked > 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_r3_remote_writers(mode: str) -> None:
    writers, writes = 2, 20_000
    tally = run_remote(mode, writers=writers, writes=writes, npages=256, acquirers=3, seconds=5,
                       budget=90)
    assert_clean(tally, writers * writes)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="the staged rearm needs a second CPU to overlap on; this process has one")
def test_r3_remote_writers_staged_rearm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same checker with the staged rearm of remote sync trackers forced onto every sync of two runs or more
    (normally it starts at 512 runs): the copy of each stage overlaps the rearm of the next."""
    from devrep.region import _plan

    monkeypatch.setattr(_plan, "STAGE_MIN_RUNS", 2)
    stages = [0]
    within = _plan._pages_within

    def counted(pages: PageArray, lo: int, hi: int) -> PageArray:  # called only by staged syncs
        stages[0] += 1
        return within(pages, lo, hi)

    monkeypatch.setattr(_plan, "_pages_within", counted)
    writers, writes = 2, 20_000
    tally = run_remote("sync", writers=writers, writes=writes, npages=256, acquirers=3, seconds=5, budget=90)
    assert_clean(tally, writers * writes)
    assert stages[0] > 0, "no sync was staged"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_r3_local_writer(mode: str) -> None:
    writes = 20_000
    tally = run_local(mode, writes=writes, npages=256, acquirers=3, seconds=4, budget=90)
    assert_clean(tally, writes)


@pytest.mark.soak
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_r3_soak_million_writes(mode: str) -> None:
    writers = 4
    writes = int(250_000 * soak_scale())  # 4 x 250 000 = 10^6 writes at scale 1
    tally = run_remote(mode, writers=writers, writes=writes, npages=1024, acquirers=4,
                       seconds=300 * soak_scale(), budget=3000 * max(1.0, soak_scale()))
    assert_clean(tally, writers * writes)


class LossyTracker(devrep.tracking.Tracker):
    """A real async tracker that forgets every 7th written page it reports: the bug the checker must catch."""

    mode = "async"

    def __init__(self) -> None:
        from devrep.tracking._async import AsyncTracker

        self.inner = AsyncTracker()
        self.calls = 0

    def attach(self, host: HostMemory, notify: Notify) -> None:
        self.inner.attach(host, notify)

    def collect(self) -> PageArray:
        pages = self.inner.collect()
        self.calls += 1
        return pages[np.arange(len(pages)) % 7 != self.calls % 7]

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("tracking", ["explicit", "lossy"])
def test_r3_checker_catches_lost_writes(tracking: str) -> None:
    """The checker is not vacuous: with writes nobody reports (explicit mode, no invalidate) or a tracker that
    drops some, it reports violations."""
    if tracking == "lossy":
        require_tracking("async")
    tally = Tally()
    with devrep.Replicator(cpu_devices=len(DEVICES)) as rep:
        region = rep.create_region("lossy", 64 * PAGE_SIZE,
                                   tracking=LossyTracker() if tracking == "lossy" else tracking)
        rep.replicate("lossy", DEVICES)
        done = threading.Event()

        def write() -> None:
            try:
                local_writer(region, 1, 5_000, seed=3, seconds=1.0, tally=tally)
            finally:
                done.set()

        threading.Thread(target=write, daemon=True).start()
        run_checker(rep, [(region, 1)], DEVICES, done, acquirers=2, seed=2, tally=tally,
                    deadline=time.monotonic() + 60)
    assert tally.violations, "the checker missed writes that were never reported"


def test_r3_file_mode_pwrite_writer(tmp_path: Path) -> None:
    """file mode with a writer using pwrite(2) (inotify sees each write before it returns): the same check."""
    require_tracking("file")
    npages, writes = 256, 5_000
    path = tmp_path / "stamps.bin"
    path.write_bytes(bytes(npages * PAGE_SIZE))
    tally = Tally()
    began = time.monotonic()
    with devrep.Replicator(cpu_devices=len(DEVICES)) as rep:
        region = rep.register_file("file", path, tracking="file")
        rep.replicate("file", DEVICES)
        done = threading.Event()

        def write() -> None:
            fd = os.open(path, os.O_WRONLY)
            try:
                rng = np.random.default_rng(5)
                start = time.monotonic()
                for seq in range(1, writes + 1):
                    if seq % 64 == 0:  # bursts and pauses, as in the other modes
                        ahead = start + 4.0 * seq / writes - time.monotonic()
                        if ahead > 0:
                            time.sleep(ahead)
                    stamp = np.uint64((1 << STAMP_SHIFT) | seq).tobytes()
                    os.pwrite(fd, stamp, int(rng.integers(npages)) * PAGE_SIZE)
                with tally.lock:
                    tally.writes += writes
            finally:
                os.close(fd)
                done.set()

        threading.Thread(target=write, daemon=True).start()
        run_checker(rep, [(region, 1)], DEVICES, done, acquirers=2, seed=4, tally=tally,
                    deadline=time.monotonic() + 90)
    print(json.dumps(summary("file", "pwrite", tally, time.monotonic() - began)))
    assert_clean(tally, writes)
