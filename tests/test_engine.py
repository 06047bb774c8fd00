"""The coherence rules (README, "Coherence rules"), run on every backend available here."""

from __future__ import annotations

import mmap
import os
import subprocess
import threading
import time

import numpy as np
import pytest
from _support import child_argv

import devrep
from devrep import PAGE_SIZE
from devrep.backends._staging import aligned_empty
from devrep.memory import private_anonymous

MiB = 1 << 20


def _fill(region: devrep.Region, seed: int = 0) -> None:
    region.array[:] = np.random.default_rng(seed).integers(0, 256, region.nbytes, dtype=np.uint8)


def _write_page(region: devrep.Region, page: int, value: int) -> None:
    region.array[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = value
    region.invalidate(page * PAGE_SIZE, PAGE_SIZE)


def _host(region: devrep.Region) -> np.ndarray:
    return np.array(region.array)


def test_replicate_copies_every_byte(replicator: devrep.Replicator, devices: list[str]) -> None:
    region = replicator.create_region("r", 2 * MiB)
    _fill(region)
    seen: list[tuple[int, int]] = []
    report = replicator.replicate("r", devices, progress=lambda done, total: seen.append((done, total)))
    assert report.pages_copied == len(devices) * region.npages
    # One signature everywhere: (done, total) in replica bytes, total covering every replica, done never above it.
    totals = {total for _, total in seen}
    assert totals == {report.bytes_copied}, f"expected total {report.bytes_copied} in every call, got {totals}"
    dones = [done for done, _ in seen]
    assert dones == sorted(dones) and dones[-1] == report.bytes_copied, f"done not monotonic up to total: {dones}"
    for device in devices:
        with region.acquire(device) as lease:
            assert lease.invalid_runs.size == 0
            assert np.array_equal(lease.read(), _host(region))


def test_invalidate_marks_every_replica_bumps_generation_and_is_idempotent(
    replicator: devrep.Replicator, devices: list[str]
) -> None:
    region = replicator.create_region("r", 64 * PAGE_SIZE)
    replicator.replicate("r", devices)
    g0 = region.generation
    g1 = region.invalidate(3 * PAGE_SIZE + 7, 1)
    assert g1 == g0 + 1
    for device in devices:
        assert region.invalid_runs(device).tolist() == [[3, 1]]
    g2 = region.invalidate(3 * PAGE_SIZE, PAGE_SIZE)
    assert g2 > g1
    for device in devices:
        assert region.invalid_runs(device).tolist() == [[3, 1]]
        assert region.describe().replicas[devices.index(device)].valid_pages == 63
    assert region.stats.pages_invalidated == 2


def test_sync_copies_only_invalid_pages_coalesced(replicator: devrep.Replicator, devices: list[str]) -> None:
    region = replicator.create_region("r", 64 * PAGE_SIZE)
    _fill(region)
    replicator.replicate("r", devices)
    for page in (5, 6, 7, 20):
        _write_page(region, page, page)
    report = region.sync()
    assert report.runs == 2                       # [5..7] and [20]
    assert report.pages_copied == 4 * len(devices)
    for device in devices:
        with region.acquire(device, fresh=False) as lease:
            assert lease.invalid_runs.size == 0
            assert np.array_equal(lease.read(), _host(region))
    assert region.sync().pages_copied == 0        # nothing stale: nothing copied


def test_page_invalidated_during_its_copy_stays_invalid(replicator: devrep.Replicator, devices: list[str]) -> None:
    region = replicator.create_region("r", 16 * PAGE_SIZE)
    replicator.replicate("r", devices)
    _write_page(region, 4, 1)

    def write_again_mid_copy(done: int, _total: int) -> None:
        if done:                    # lands after the copy read page 4, before the sync commits
            _write_page(region, 4, 2)

    region.sync(progress=write_again_mid_copy)
    for device in devices:
        assert region.invalid_runs(device).tolist() == [[4, 1]]
    with region.acquire(devices[0]) as lease:      # fresh: syncs the page again
        assert int(lease.read(4 * PAGE_SIZE, 1)[0]) == 2


def test_acquire_fresh_and_not_fresh(replicator: devrep.Replicator, devices: list[str]) -> None:
    region = replicator.create_region("r", 32 * PAGE_SIZE)
    replicator.replicate("r", devices)
    _write_page(region, 9, 9)
    _write_page(region, 10, 10)
    stale = region.acquire(devices[0], fresh=False)
    assert stale.invalid_runs.tolist() == [[9, 2]]
    assert stale.generation < region.generation
    stale.release()
    with region.acquire(devices[0]) as fresh:
        assert fresh.invalid_runs.size == 0
        assert fresh.generation == region.generation
        assert np.array_equal(fresh.read(), _host(region))


def test_sync_never_writes_a_leased_buffer(replicator: devrep.Replicator, devices: list[str]) -> None:
    region = replicator.create_region("r", 16 * PAGE_SIZE)
    region.array[:] = 1
    replicator.replicate("r", devices[:1])
    old = region.acquire(devices[0])
    before = old.read()
    _write_page(region, 2, 7)
    region.sync()
    assert np.array_equal(old.read(), before)            # the reader's snapshot is untouched
    with region.acquire(devices[0]) as new:               # new readers get the new pages
        assert int(new.read(2 * PAGE_SIZE, 1)[0]) == 7
        assert np.array_equal(new.read(), _host(region))
    old.release()
    _write_page(region, 3, 8)                             # the spare catches up on the pages it missed
    region.sync()
    with region.acquire(devices[0]) as newest:
        assert np.array_equal(newest.read(), _host(region))


def test_sync_waits_for_readers_of_both_buffers_with_timeout(replicator: devrep.Replicator, devices: list[str]) -> None:
    region = replicator.create_region("r", 8 * PAGE_SIZE)
    replicator.replicate("r", devices[:1])
    first = region.acquire(devices[0])
    _write_page(region, 1, 1)
    region.sync()                                         # goes to the spare
    second = region.acquire(devices[0])
    _write_page(region, 2, 2)
    with pytest.raises(devrep.LeaseTimeoutError, match="every replica buffer is held by readers"):
        region.sync(timeout=0.2)
    threading.Timer(0.2, first.release).start()
    region.sync(timeout=5)                                # proceeds once the old reader is gone
    assert region.stats.lease_waits >= 1
    second.release()
    with region.acquire(devices[0]) as lease:
        assert np.array_equal(lease.read(), _host(region))


def test_verify_finds_unreported_writes_and_resync_repairs(replicator: devrep.Replicator, devices: list[str]) -> None:
    region = replicator.create_region("r", 32 * PAGE_SIZE)
    _fill(region)
    replicator.replicate("r", devices)
    region.array[5 * PAGE_SIZE] ^= 0xFF                   # written without telling devrep
    region.array[17 * PAGE_SIZE + 100] ^= 0x01
    reports = region.verify(resync=True)
    assert [r.mismatched.tolist() for r in reports] == [[[5, 1], [17, 1]]] * len(devices)
    assert all(r.resynced for r in reports)
    assert region.stats.verify_mismatches == 2 * len(devices)
    assert region.stats.resyncs == 1
    assert all(r.mismatched_pages == 0 for r in region.verify())
    for device in devices:
        with region.acquire(device) as lease:
            assert np.array_equal(lease.read(), _host(region))


def test_fan_out_reads_each_host_page_once(replicator: devrep.Replicator, devices: list[str]) -> None:
    kind = devices[0].partition(":")[0]
    if replicator.backend(kind).device_count() < 2:
        devices = ["cpu:0", "cpu:1"]                       # fan-out is within one backend
    region = replicator.create_region("r", 64 * PAGE_SIZE)
    replicator.replicate("r", devices)
    assert region.stats.host_bytes_read == region.nbytes
    for page in range(0, 64, 4):
        _write_page(region, page, 3)
    report = region.sync()
    assert report.host_bytes_read == 16 * PAGE_SIZE
    assert report.bytes_copied == 2 * 16 * PAGE_SIZE


def test_block_size_is_the_unit_of_invalidation(replicator: devrep.Replicator, devices: list[str]) -> None:
    region = replicator.create_region("r", 64 * PAGE_SIZE, block_size=4 * PAGE_SIZE)
    replicator.replicate("r", devices[:1])
    region.invalidate(9 * PAGE_SIZE + 5, 1)
    assert region.invalid_runs(devices[0]).tolist() == [[8, 4]]
    region.invalidate_pages([63])
    assert region.invalid_runs(devices[0]).tolist() == [[8, 4], [60, 4]]


def test_events_reach_listeners(replicator: devrep.Replicator, devices: list[str]) -> None:
    events: list[devrep.Event] = []
    replicator.add_listener(events.append)
    region = replicator.create_region("r", 8 * PAGE_SIZE)
    replicator.replicate("r", devices[:1])
    _write_page(region, 2, 1)
    region.sync()
    kinds = [e.kind for e in events]
    assert kinds == ["replica_added", "sync", "invalidate", "sync"]
    assert events[2].runs.tolist() == [[2, 1]] and events[3].runs.tolist() == [[2, 1]]
    assert events[3].generation == events[2].generation
    replicator.unregister("r")
    assert events[-1].kind == "region_removed"


def test_metadata_is_at_most_16_bytes_per_page() -> None:
    """Measured with tracemalloc (numpy reports its allocations there; host and device pages are mmaps)."""
    import tracemalloc

    with devrep.Replicator() as rep:
        def exercise(name: str, nbytes: int) -> devrep.Region:
            region = rep.create_region(name, nbytes)
            rep.replicate(name, ["cpu:0", "cpu:1", "cpu:2", "cpu:3"])
            with region.acquire("cpu:0"):                 # a second buffer on cpu:0: lag bits in use
                region.invalidate_pages(np.arange(0, region.npages, 3))
                region.sync()
            region.verify()
            return region

        exercise("warmup", 64 * PAGE_SIZE)               # imports and JIT caches are not metadata
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            region = exercise("r", 64 * MiB)
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        per_page = (after - before) / region.npages
        assert per_page <= 16, f"{per_page:.1f} bytes of metadata per page"
        assert region.metadata_bytes / region.npages == 8


def test_unregister_frees_device_memory(replicator: devrep.Replicator, devices: list[str]) -> None:
    region = replicator.create_region("r", 16 * PAGE_SIZE)
    replicator.replicate("r", devices)
    backends = [replicator.resolve(d) for d in devices]
    assert all(b.bytes_in_use(i) >= region.nbytes for b, i in backends)
    lease = region.acquire(devices[0])
    replicator.unregister("r")
    lease.release()                                       # freed once the last reader lets go
    assert all(b.bytes_in_use(i) == 0 for b, i in backends)
    with pytest.raises(devrep.NotFoundError):
        replicator.region("r")


# ---------------------------------------------------------------------- sources and bad input (CPU only)


def test_file_region_pads_last_page_and_replicates(tmp_path) -> None:
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(3).integers(0, 256, 3 * PAGE_SIZE + 123, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    with devrep.Replicator() as rep:
        region = rep.register_file("w", path)
        assert region.nbytes == data.size and region.npages == 4
        assert not region.array.flags.writeable
        rep.replicate("w", ["cpu:0"])
        with region.acquire("cpu:0") as lease:
            assert np.array_equal(lease.array, data)
            assert lease.array.size == data.size


def test_buffer_region_from_mmap() -> None:
    buf = mmap.mmap(-1, 4 * PAGE_SIZE)
    buf[:5] = b"hello"
    with devrep.Replicator() as rep:
        region = rep.register_buffer("b", buf)
        rep.replicate("b", ["cpu:2"])
        with region.acquire("cpu:2") as lease:
            assert bytes(lease.array[:5]) == b"hello"


def _maps_line(address: int) -> list[str]:
    """The fields of this process's ``/proc/self/maps`` line that covers ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low <= address < high:
                return line.split()
    raise AssertionError(f"{address:#x} is not mapped")


def _present_pages(address: int, npages: int) -> int:
    with open("/proc/self/pagemap", "rb") as pagemap:
        entries = np.frombuffer(os.pread(pagemap.fileno(), 8 * npages, 8 * (address // PAGE_SIZE)), np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum())


def test_create_region_memory_is_private_and_allocated_up_front() -> None:
    """``create_region``'s pages are private anonymous memory (why: docs/tracking.md, "Writer cost"), all present
    before the owner writes any, and the region says which kind it is."""
    with devrep.Replicator(cpu_devices=1) as rep:
        region = rep.create_region("r", 64 * PAGE_SIZE + 1)
        address = region.array.ctypes.data
        fields = _maps_line(address)
        assert fields[1] == "rw-p" and fields[4] == "0" and len(fields) == 5, fields  # private, no file behind it
        assert _present_pages(address, 65) == 65
        assert region.describe().kind == "anonymous" and region.nbytes == 64 * PAGE_SIZE + 1
        assert not region.array.any()


MAPS = """\
7f0000000000-7f0000002000 rw-p 00000000 00:00 0
7f0000002000-7f0000004000 rw-p 00000000 00:00 0                          [anon:x]
7f0000004000-7f0000006000 rw-s 00000000 00:01 1223                       /memfd:r (deleted)
7f0000006000-7f0000008000 rw-p 00001000 fd:01 4242                       /usr/lib/x.so
7f000000a000-7f000000c000 rw-p 00000000 00:00 0
"""


@pytest.mark.parametrize(("address", "length", "private"), [
    (0x7f0000000000, 0x4000, True),   # two private anonymous mappings side by side
    (0x7f0000001000, 0x1000, True),   # inside one
    (0x7f0000003000, 0x2000, False),  # runs into a shared mapping
    (0x7f0000006000, 0x1000, False),  # a private mapping of a file
    (0x7f0000008000, 0x1000, False),  # a hole
    (0x7f000000b000, 0x2000, False),  # runs past the last mapping
    (0x7e0000000000, 0x1000, False),  # before every mapping
])
def test_private_anonymous_reads_proc_maps(address: int, length: int, private: bool) -> None:
    assert private_anonymous(MAPS, address, length) is private
    assert private_anonymous("", address, length) is False


def test_a_private_buffer_gets_no_populate_thread_and_a_shared_one_does(rep: devrep.Replicator) -> None:
    """Only shared memory needs sync mode's populate thread (docs/tracking.md, "Writer cost")."""
    private = mmap.mmap(-1, 64 * PAGE_SIZE, flags=mmap.MAP_PRIVATE)
    shared = mmap.mmap(-1, 64 * PAGE_SIZE)
    for name, buffer, expected in (("private", private, True), ("shared", shared, False)):
        region = rep.register_buffer(name, buffer, tracking="sync")
        assert region.host.private is expected
        assert (region.tracker._populator is None) is expected  # type: ignore[attr-defined]


@pytest.mark.parametrize("tracking", ["explicit", "sync", "async"])
def test_a_forked_childs_writes_never_reach_the_region(tracking: str) -> None:
    """A child forked by the owner (a data-loader worker, say) writes its own copy of the region's pages: the
    region, its replica and its generation stay as they were. (Over shared memory, the child's writes would land
    in the region unseen by a tracker, which guards only the parent's mapping: a stale replica.)"""
    with devrep.Replicator(cpu_devices=1) as rep:
        region = rep.create_region("r", 64 * PAGE_SIZE, tracking=tracking)
        region.array[:] = 7
        rep.replicate("r", ["cpu:0"])
        region.sync()
        generation = region.generation
        pid = os.fork()
        if pid == 0:  # the child: write every page, report by exit status only
            code = 1
            try:
                region.array[:] = 9
                code = 0 if int(region.array.min()) == 9 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert int(region.array.min()) == int(region.array.max()) == 7
        region.sync()
        with region.acquire("cpu:0", fresh=True) as lease:
            assert int(lease.read().min()) == int(lease.read().max()) == 7
        assert region.generation == generation, "the child's writes were seen as the region's"


def test_cpu_replica_fd_maps_read_only_in_another_process() -> None:
    with devrep.Replicator() as rep:
        region = rep.create_region("r", 4 * PAGE_SIZE)
        region.array[:] = 42
        rep.replicate("r", ["cpu:0"])
        with region.acquire("cpu:0") as lease:
            handle = lease.export()
            assert handle.kind == "fd"
            assert not lease.array.flags.writeable
            fd = os.dup(int(handle.payload))
            out = subprocess.run(child_argv("readonly_fd", str(fd)), pass_fds=[fd], capture_output=True,
                                 text=True, timeout=30)
            os.close(fd)
            assert out.stdout.strip() == "read-only ok", out.stderr


def test_bad_input_gives_clear_errors_and_leaves_nothing_behind(tmp_path) -> None:
    with devrep.Replicator() as rep:
        with pytest.raises(devrep.NotFoundError, match="no such file"):
            rep.register_file("f", tmp_path / "missing")
        (tmp_path / "empty").write_bytes(b"")
        with pytest.raises(devrep.InvalidArgumentError, match="empty"):
            rep.register_file("f", tmp_path / "empty")
        with pytest.raises(devrep.InvalidArgumentError, match="positive"):
            rep.create_region("r", 0)
        odd = rep.create_region("odd", PAGE_SIZE + 1)     # rounded up to whole pages, as through the service
        assert (odd.nbytes, odd.npages, odd.array.nbytes) == (PAGE_SIZE + 1, 2, PAGE_SIZE + 1)
        rep.unregister("odd")
        with pytest.raises(devrep.AlignmentError, match="page-aligned"):
            # 16 bytes into a page-aligned mapping: never aligned (np.zeros' own address is the allocator's choice)
            rep.register_buffer("b", aligned_empty(3 * PAGE_SIZE)[16:2 * PAGE_SIZE + 16])
        with pytest.raises(devrep.InvalidArgumentError, match="bad region name"):
            rep.create_region("../etc", PAGE_SIZE)
        with pytest.raises(devrep.NotFoundError, match="no region named 'nope'"):
            rep.region("nope")
        assert rep.regions() == []
        region = rep.create_region("r", 4 * PAGE_SIZE)
        with pytest.raises(devrep.AlreadyExistsError):
            rep.create_region("r", 4 * PAGE_SIZE)
        for bad in ("cpu:9", "tpu:0", "cpu", "cpu:-1"):
            with pytest.raises(devrep.UnknownDeviceError):
                rep.replicate("r", ["cpu:0", bad])
        assert region.devices == []                       # all-or-nothing: cpu:0 was not created
        assert rep.backend("cpu").bytes_in_use(0) == 0
        with pytest.raises(devrep.NotFoundError, match="no replica on 'cpu:1'"):
            region.acquire("cpu:1")
        with pytest.raises(devrep.InvalidArgumentError):
            region.invalidate(-1, 10)
        with pytest.raises(devrep.InvalidArgumentError):
            region.invalidate_pages([4])
        with pytest.raises(devrep.InvalidArgumentError, match="unknown tracking mode"):
            rep.create_region("t", PAGE_SIZE, tracking="telepathy")
        assert [r.name for r in rep.regions()] == ["r"]


def test_device_memory_exhaustion_is_resource_exhausted() -> None:
    backend = devrep.backends.CpuBackend(devices=1, capacity=8 * PAGE_SIZE)
    with devrep.Replicator(backends={"cpu": backend}) as rep:
        rep.create_region("small", 8 * PAGE_SIZE)
        rep.create_region("big", 16 * PAGE_SIZE)
        rep.replicate("small", ["cpu:0"])
        with pytest.raises(devrep.ResourceExhaustedError, match="cpu:0 is full"):
            rep.replicate("big", ["cpu:0"])
        assert rep.region("big").devices == []
        assert backend.bytes_in_use(0) == 8 * PAGE_SIZE


def test_concurrent_writers_readers_never_see_stale_or_changing_pages() -> None:
    """Two writers stamp their own pages with increasing numbers and report each write; a fresh acquire must
    show every page at least as new as the last stamp reported before the acquire, and a held lease never
    changes while syncs run. Readers go on for at least 1.5 s and until more than 10 syncs ran (a bound of 60 s
    for a loaded machine, where two Python writers can starve the readers of the GIL)."""
    pages = 64
    start = time.monotonic()
    readers_done = threading.Event()
    errors: list[str] = []
    with devrep.Replicator() as rep:
        region = rep.create_region("r", pages * PAGE_SIZE)
        rep.replicate("r", ["cpu:0", "cpu:1"])
        words = region.array.view(np.uint64).reshape(pages, -1)
        reported = np.zeros(pages, dtype=np.uint64)       # stamp of the last write the owner reported

        def writer(parity: int) -> None:
            rng = np.random.default_rng(parity)
            stamp = 0
            while not readers_done.is_set():
                page = int(rng.integers(pages // 2)) * 2 + parity
                stamp += 1
                words[page, :] = stamp
                region.invalidate_pages([page])
                reported[page] = stamp

        def enough() -> bool:
            now = time.monotonic()
            return now - start > 60 or (now - start > 1.5 and region.stats.syncs > 10)

        def reader(device: str) -> None:
            while not enough():
                before = reported.copy()
                with region.acquire(device, timeout=10) as lease:
                    got = lease.read().view(np.uint64).reshape(pages, -1)
                    if (got[:, 0] < before).any():
                        errors.append(f"stale page on {device}")
                    snapshot = got.copy()
                    region.sync()
                    if not np.array_equal(lease.read().view(np.uint64).reshape(pages, -1), snapshot):
                        errors.append(f"lease on {device} changed under its reader")

        threads = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
        threads += [threading.Thread(target=reader, args=(d,)) for d in ("cpu:0", "cpu:1")]
        for t in threads:
            t.start()
        for t in threads[2:]:
            t.join(90)
        readers_done.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert region.stats.syncs > 10
    assert errors == []


def test_no_room_for_a_spare_waits_for_readers_then_is_resource_exhausted() -> None:
    backend = devrep.backends.CpuBackend(devices=1, capacity=8 * PAGE_SIZE)
    with devrep.Replicator(backends={"cpu": backend}) as rep:
        region = rep.create_region("r", 8 * PAGE_SIZE)
        region.array[:] = 1
        rep.replicate("r", ["cpu:0"])
        lease = region.acquire("cpu:0")
        _write_page(region, 0, 2)
        with pytest.raises(devrep.ResourceExhaustedError, match="no room for a second buffer"):
            region.sync(timeout=0.2)
        assert int(lease.read(0, 1)[0]) == 1              # the leased buffer was not touched
        threading.Timer(0.2, lease.release).start()
        region.sync(timeout=5)                            # waits for the reader, then updates in place
        with region.acquire("cpu:0") as fresh:
            assert int(fresh.read(0, 1)[0]) == 2
        assert backend.bytes_in_use(0) == 8 * PAGE_SIZE
