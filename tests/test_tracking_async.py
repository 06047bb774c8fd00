"""Async mode on the real kernel: writers never block; each epoch finds exactly the written pages."""

from __future__ import annotations

import mmap
import os
import threading
import time

import numpy as np
import pytest
from _support import remote_writer

import devrep
from devrep._pages import PAGE_SIZE, pages_from_runs
from devrep.model import Event
from devrep.tracking._async import (
    _LOOP,
    IDLE_INTERVAL_MAX,
    IDLE_SCANS_PER_SECOND,
    AsyncTracker,
    _EpochLoop,
    ranges_to_pages,
)

pytestmark = pytest.mark.usefixtures("hang_guard")

DEV = "cpu:0"


def test_finds_exactly_the_written_pages(rep: devrep.Replicator) -> None:
    region = rep.create_region("a", 8192 * PAGE_SIZE, tracking=AsyncTracker(interval=None))
    rep.replicate("a", [DEV])
    rng = np.random.default_rng(3)
    for _ in range(3):
        written = np.sort(rng.choice(region.npages, 700, replace=False))
        for page in written:
            region.array[int(page) * PAGE_SIZE + int(rng.integers(PAGE_SIZE))] ^= 0x5A
        assert np.array_equal(pages_from_runs(region.invalid_runs(DEV)), written)
        rep.sync("a")
        assert len(region.invalid_runs(DEV)) == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("flags", [mmap.MAP_PRIVATE, mmap.MAP_SHARED], ids=["private", "shared"])
def test_never_touched_pages_of_a_buffer_are_tracked(rep: devrep.Replicator, mode: str, flags: int) -> None:
    buf = mmap.mmap(-1, 64 * PAGE_SIZE, flags=flags | mmap.MAP_ANONYMOUS)
    buf[0] = 1  # some pages populated, the rest never touched
    tracker = AsyncTracker(interval=None) if mode == "async" else mode
    region = rep.register_buffer(f"b-{mode}", buf, tracking=tracker)
    buf[40 * PAGE_SIZE] = 1  # first touch of this anonymous page, after protection, before any read
    rep.replicate(f"b-{mode}", [DEV])
    buf[0] = 2
    buf[50 * PAGE_SIZE] = 1
    assert pages_from_runs(region.invalid_runs(DEV)).tolist() == [0, 50]
    with region.acquire(DEV) as lease:
        assert lease.read().tobytes() == buf[:]


def test_epoch_thread_invalidates_without_anyone_asking(rep: devrep.Replicator) -> None:
    seen: list[Event] = []
    got = threading.Event()

    def listener(event: Event) -> None:
        if event.kind == "invalidate" and event.region == "ep":
            seen.append(event)
            got.set()

    rep.add_listener(listener)
    region = rep.create_region("ep", 64 * PAGE_SIZE, tracking=AsyncTracker(interval=0.01))
    rep.replicate("ep", [DEV])
    got.clear()
    seen.clear()
    region.array[9 * PAGE_SIZE] = 1
    assert got.wait(10), "no epoch reported the write"
    assert pages_from_runs(seen[0].runs).tolist() == [9]


def test_bad_interval() -> None:
    with pytest.raises(devrep.InvalidArgumentError):
        AsyncTracker(interval=0)


def test_ranges_to_pages() -> None:
    base = 1 << 30
    ranges = np.array([[base, base + PAGE_SIZE], [base + 3 * PAGE_SIZE, base + 6 * PAGE_SIZE]], dtype=np.uint64)
    assert ranges_to_pages(ranges, base, 10).tolist() == [0, 3, 4, 5]
    assert ranges_to_pages(ranges[1:], base, 10).tolist() == [3, 4, 5]
    assert ranges_to_pages(np.empty((0, 2), np.uint64), base, 10).tolist() == []


def test_remote_writer_in_another_process(rep: devrep.Replicator) -> None:
    with remote_writer("async", "--pages", "2,3,50") as (ours, address, (uffd, pagemap, memfd), child):
        tracker = AsyncTracker.remote(uffd, pagemap, address, 64 * PAGE_SIZE, interval=None)
        region = rep.register_fd("remote", memfd, tracking=tracker)
        rep.replicate("remote", [DEV])
        ours.sendall(b"g")
        assert ours.recv(1) == b"d"
        assert pages_from_runs(region.invalid_runs(DEV)).tolist() == [2, 3, 50]
        with region.acquire(DEV) as lease:
            data = lease.read()
            assert [int(data[p * PAGE_SIZE]) for p in (2, 3, 50)] == [2, 3, 50]
        ours.sendall(b"q")
        assert child.wait(30) == 0
    assert os.path.exists("/proc/self/pagemap")


def test_async_regions_share_one_epoch_thread_and_idle_ones_still_report(rep: devrep.Replicator) -> None:
    """A1: one epoch loop for every async region; a region idle long enough to back off fully still gets its
    write reported by an epoch (eventually: within the idle interval, bounded here generously)."""
    got = threading.Event()
    rep.add_listener(lambda event: got.set() if event.region == "idle37" and event.kind == "invalidate" else None)
    regions = [rep.create_region(f"idle{i}", 4 * PAGE_SIZE, tracking="async") for i in range(50)]
    rep.replicate("idle37", [DEV])
    epoch_threads = [t for t in threading.enumerate() if t.name.startswith("devrep-async-epoch")]
    assert len(epoch_threads) == 1, [t.name for t in epoch_threads]
    time.sleep(2 * IDLE_INTERVAL_MAX)  # every region backs off to the idle interval
    got.clear()
    regions[37].array[PAGE_SIZE] = 7
    assert got.wait(30), "no epoch reported a write to an idle region"


def test_idle_ceiling_grows_with_the_number_of_regions_past_500() -> None:
    """Idle epochs stay near ``IDLE_SCANS_PER_SECOND`` however many async regions there are (bench A1)."""
    loop = _EpochLoop()
    members = [object() for _ in range(1500)]
    loop._members.update(members[:500])  # type: ignore[arg-type]
    assert loop.idle_ceiling() == IDLE_INTERVAL_MAX
    loop._members.update(members)  # type: ignore[arg-type]
    assert loop.idle_ceiling() == 1500 / IDLE_SCANS_PER_SECOND == 1.5


def test_the_epoch_loop_forgets_trackers_that_end(rep: devrep.Replicator) -> None:
    before = len(_LOOP._members)
    regions = [rep.create_region(f"gone{i}", 4 * PAGE_SIZE, tracking="async") for i in range(20)]
    assert len(_LOOP._members) == before + 20
    for region in regions[:10]:
        rep.unregister(region.name)  # close: removed at once
    ended = regions[10].tracker
    assert isinstance(ended, AsyncTracker)
    ended.closed = True  # ended without close (its next epoch returns None): dropped then
    deadline = time.monotonic() + 30
    while len(_LOOP._members) > before + 9 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_LOOP._members) == before + 9


def test_epoch_pages_wait_for_collect_and_idle_epochs_back_off(rep: devrep.Replicator) -> None:
    tracker = AsyncTracker(interval=0.02)
    region = rep.create_region("bo", 8 * PAGE_SIZE, tracking=tracker)
    _LOOP.remove(tracker)  # drive its epochs by hand from here on
    region.collect()
    region.array[3 * PAGE_SIZE] = 1
    with tracker._lock:  # an epoch that finds the write but whose notify has not run yet
        tracker._pending.append(tracker._scan_locked())
    assert tracker.collect().tolist() == [3], "pages found by an epoch must reach the next collect()"
    assert tracker.collect().tolist() == []
    delays = [tracker._epoch() for _ in range(8)]
    assert delays[:3] == [0.04, 0.08, 0.16] and delays[-1] == IDLE_INTERVAL_MAX, delays
    generation = region.generation
    region.array[5 * PAGE_SIZE] = 1
    assert tracker._epoch() == 0.02, "a written region goes back to the short interval"
    assert region.generation == generation + 1, "the epoch's notify must invalidate the written page"
    assert tracker.collect().tolist() == [], "the region already collected what the epoch found"
    tracker.close()
    assert tracker._epoch() is None
