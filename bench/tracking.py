"""P4 (sync fault round trip), P5 (async epoch) and the numpy-fill slowdown per tracking mode.

Every figure is a ratio against a baseline measured in the same run (lower is better here):

* P4: per-store latency of a write to a write-protected page (store -> recorded stale -> writer resumed),
  devrep's sync handler vs a bare handler process that only un-protects; both are the same helper process
  and poll loop, so the ratio is what tracking adds to the fault round trip. Targets p50 <= 1.3x, p99 <= 2x.
* P5: one async epoch on 1 GiB with 1 % of pages written (PAGEMAP_SCAN with WP_MATCHING, page conversion
  and the region's invalidation) vs the raw PAGEMAP_SCAN ioctl on the same dirty pattern. Target <= 2.5x.
* W1: ``region.array[:] = v`` on a 64 MiB sync region (``create_region``: private memory) whose pages are all
  protected, default settings (block-granular un-protect + fault-around), vs the same fill on an untracked
  (explicit) region, the modes interleaved round by round; target <= 8x. FILL-async, FILL-sync-shared,
  FILL-sync-shared-nopop and W1-floor (sync vs async) are informational: async mode pays one in-kernel fault per
  page; so does sync mode on shared memory (a buffer over a shared mapping, as a memfd), whose un-protected pages
  stay read-only until their next write, a cost its populate thread takes partly off the writer (``-nopop``:
  without it). W1-amp: pages invalidated per page written by random writes, <= 2.
* P3s: a sync of 1 % random pages of 1 GiB written in sync mode vs the same sync in explicit mode (the
  extra is collect + rearm, i.e. re-protecting the pages about to be copied). Target <= 2x.
* P3s-remote: the same for a client's memory in the service (``SyncTracker.remote``: another process writes, this
  one syncs from its own mapping of the memfd, the rearm staged so that it overlaps the copy) vs a client memfd in
  explicit mode. P3s-remote-seq (informational): the same remote region with the staged rearm turned off.
* A1: CPU time (percent of one CPU) of a process holding 1,000 idle async regions with the default epoch
  interval, vs the same process holding 1,000 idle explicit regions. Target: <= 5 % of one CPU (absolute;
  the baseline shows what the process costs without epochs).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import devrep
from devrep import PAGE_SIZE
from devrep.linux._libc import ioctl
from devrep.linux.pagemap import PAGEMAP_SCAN, PageCategory, PageRegion, PmScanArg, ScanFlag
from devrep.linux.uffd import Feature, RegisterMode, Userfaultfd
from devrep.memory import create_private, memfd_create
from devrep.tracking._async import AsyncTracker
from devrep.tracking._sync import SyncTracker

MiB = 1 << 20
GiB = 1 << 30


def _lower_is_better(value: float, baseline: float, target: float, unit: str, note: str) -> dict[str, Any]:
    ratio = value / baseline
    return {"value": round(value, 6), "baseline": round(baseline, 6), "ratio": round(ratio, 3),
            "target": target, "unit": unit, "meets": bool(ratio <= target),
            "note": note + f" (ratio = devrep / baseline, lower is better; target <= {target}x)"}


def _fault_latencies(tracker: SyncTracker, faults: int) -> np.ndarray:
    """Microseconds per store, each to a distinct write-protected page, in random order (a sequential order
    would let fault-around un-protect the next pages before they are stored to)."""
    with devrep.Replicator() as rep:
        region = rep.create_region("p4", faults * PAGE_SIZE, tracking=tracker)
        array = region.array
        clock = time.perf_counter_ns
        out = np.empty(faults, dtype=np.int64)
        for i, page in enumerate(np.random.default_rng(4).permutation(faults).tolist()):
            offset = page * PAGE_SIZE
            start = clock()
            array[offset] = 1
            out[i] = clock() - start
        if not tracker._bare:  # every measured store really was recorded (a page of a widened window may count
            region.collect()  # twice: invalidated with its neighbour, then again when stored to)
            assert faults <= region.stats.pages_invalidated <= 2 * faults, (region.stats.pages_invalidated, faults)
    return out / 1000.0


def p4_sync_fault(results: dict[str, Any], faults: int = 8192, rounds: int = 3) -> None:
    ours50, ours99, bare50, bare99 = [], [], [], []
    for _ in range(rounds):  # interleaved, so drift on this shared machine hits both alike
        bare = _fault_latencies(SyncTracker(_bare=True), faults)
        ours = _fault_latencies(SyncTracker(), faults)
        bare50.append(np.percentile(bare, 50))
        bare99.append(np.percentile(bare, 99))
        ours50.append(np.percentile(ours, 50))
        ours99.append(np.percentile(ours, 99))
    note = f"sync WP fault round trip, {faults} faults x {rounds} rounds, medians of per-round percentiles"
    results["P4-p50"] = _lower_is_better(statistics.median(ours50), statistics.median(bare50), 1.3, "us",
                                         note + ", p50; baseline = bare handler process that only un-protects")
    results["P4-p99"] = _lower_is_better(statistics.median(ours99), statistics.median(bare99), 2.0, "us",
                                         note + ", p99; baseline = bare handler process that only un-protects")


def _dirty(array: np.ndarray, pages: np.ndarray) -> None:
    for page in pages:
        array[int(page) * PAGE_SIZE] ^= 1


def _raw_scan_seconds(pages: np.ndarray, repeat: int) -> float:
    """The bare PAGEMAP_SCAN ioctl (WP_MATCHING) on its own 1 GiB of async-WP private memory (the region's kind)
    with the same dirty pages."""
    host = create_private("p5-raw", GiB)
    host.array[::PAGE_SIZE] = 0  # populate, like the region (written once before tracking starts)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    uffd = Userfaultfd()
    try:
        uffd.api(Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM | Feature.WP_UNPOPULATED)
        uffd.register(host.address, GiB, RegisterMode.WP)
        uffd.writeprotect(host.address, GiB, True)
        vec = (PageRegion * 4096)()
        arg = PmScanArg()
        times = []
        for _ in range(repeat):
            _dirty(host.array, pages)
            arg.size, arg.flags = ctypes.sizeof(PmScanArg), int(ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC)
            arg.start, arg.end, arg.walk_end = host.address, host.address + GiB, 0
            arg.vec, arg.vec_len, arg.max_pages = ctypes.addressof(vec), len(vec), 0
            arg.category_inverted, arg.category_anyof_mask = 0, 0
            arg.category_mask = arg.return_mask = int(PageCategory.WRITTEN)
            start = time.perf_counter()
            n = ioctl(pagemap, PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
            times.append(time.perf_counter() - start)
            found = sum(int(vec[i].end - vec[i].start) for i in range(n)) // PAGE_SIZE
            assert found == len(pages), (found, len(pages))
        return statistics.median(times)
    finally:
        uffd.close()
        os.close(pagemap)
        host.close()


def p5_async_epoch(results: dict[str, Any], repeat: int = 9) -> None:
    npages = GiB // PAGE_SIZE
    pages = np.sort(np.random.default_rng(5).choice(npages, npages // 100, replace=False))
    raw = _raw_scan_seconds(pages, repeat)
    with devrep.Replicator() as rep:
        region = rep.create_region("p5", GiB, tracking=AsyncTracker(interval=None))
        region.array[::PAGE_SIZE] = 0
        rep.replicate("p5", ["cpu:0"])
        times = []
        for _ in range(repeat):
            _dirty(region.array, pages)
            generation = region.generation
            start = time.perf_counter()
            region.collect()  # what an epoch does: scan + re-protect, then invalidate in the region
            times.append(time.perf_counter() - start)
            assert region.generation == generation + 1
            assert region.describe().replicas[0].valid_pages == npages - len(pages)
            region.sync()
        ours = statistics.median(times)
    results["P5"] = _lower_is_better(ours * 1e3, raw * 1e3, 2.5, "ms",
                                     "async epoch on 1 GiB, 1 % of pages written (scan + re-protect + invalidate) "
                                     "vs the raw PAGEMAP_SCAN ioctl, same dirty pattern")


def _fill_seconds(tracking: str | devrep.tracking.Tracker, nbytes: int, repeat: int, block_size: int = PAGE_SIZE
                  ) -> float:
    with devrep.Replicator() as rep:
        region = rep.create_region("fill", nbytes, tracking=tracking, block_size=block_size)
        region.array[:] = 1  # populate the mapping
        rep.replicate("fill", ["cpu:0"])  # sync re-protects every page (sync mode) / scan re-protects (async)
        times = []
        for i in range(repeat):
            start = time.perf_counter()
            region.array[:] = i + 2
            times.append(time.perf_counter() - start)
            rep.sync("fill")
        return statistics.median(times)


SHARED = "shared:"  # a ``_interleaved_fill_seconds`` mode named so fills a buffer over a shared mapping


def _interleaved_fill_seconds(trackers: dict[str, str | devrep.tracking.Tracker], nbytes: int, rounds: int
                              ) -> dict[str, float]:
    """Median fill time per mode, the modes' regions side by side and their fills alternating round by round,
    so drift on this shared machine hits every mode alike (as ``_fill_seconds``, otherwise). A mode whose name
    starts with ``SHARED`` tracks a buffer over a shared anonymous mapping (shmem, as a memfd) instead of
    ``create_region``'s private memory."""
    times: dict[str, list[float]] = {mode: [] for mode in trackers}
    with devrep.Replicator() as rep:
        regions, arrays = {}, {}
        for mode, tracker in trackers.items():
            if mode.startswith(SHARED):
                shared = mmap.mmap(-1, nbytes)  # MAP_SHARED
                regions[mode] = rep.register_buffer(f"fill-{mode}", shared, tracking=tracker)
                arrays[mode] = np.frombuffer(shared, dtype=np.uint8)
            else:
                regions[mode] = rep.create_region(f"fill-{mode}", nbytes, tracking=tracker)
                arrays[mode] = regions[mode].array
        for mode, region in regions.items():
            arrays[mode][:] = 1  # populate the mapping
            rep.replicate(region.name, ["cpu:0"])  # sync re-protects every page / the scan re-protects (async)
        for i in range(rounds):
            for mode, region in regions.items():
                start = time.perf_counter()
                arrays[mode][:] = i + 2
                times[mode].append(time.perf_counter() - start)
                region.sync()
    return {mode: statistics.median(t) for mode, t in times.items()}


def fill_slowdown(results: dict[str, Any], nbytes: int = 64 * MiB, rounds: int = 7) -> None:
    """W1 (sync, default settings: target <= 8x untracked), FILL-async, FILL-sync-shared(-nopop), and W1-floor:
    sync vs async, i.e. how far sync mode is from the kernel's own per-page minor-fault cost, which async mode
    pays on every page and sync mode on shared memory (see ``_handler`` and docs/tracking.md, "Writer cost")."""
    t = _interleaved_fill_seconds({"explicit": "explicit", "sync": "sync", "async": AsyncTracker(interval=None),
                                   SHARED + "sync": "sync", SHARED + "nopop": SyncTracker(populate=False)},
                                  nbytes, rounds)
    base, sync, async_ = t["explicit"], t["sync"], t["async"]
    note = f"numpy fill of a fully protected {nbytes >> 20} MiB region, median of {rounds} interleaved rounds"

    def info(value: float, baseline: float, what: str) -> dict[str, Any]:
        return {"value": round(value * 1e3, 3), "baseline": round(baseline * 1e3, 3),
                "ratio": round(value / baseline, 2), "target": "info", "unit": "ms", "meets": True,
                "note": f"{note}, {what}"}

    results["W1"] = _lower_is_better(sync * 1e3, base * 1e3, 8.0, "ms",
                                     note + ", sync mode (create_region: private memory, default fault-around) "
                                            "vs untracked")
    results["FILL-async"] = info(async_, base, "async mode vs untracked (informational: one in-kernel fault per "
                                               "page)")
    results["FILL-sync-shared"] = info(t[SHARED + "sync"], base,
                                       "sync mode over shared memory (a buffer over a MAP_SHARED mapping, as a "
                                       "memfd; populate thread on) vs untracked (informational)")
    results["FILL-sync-shared-nopop"] = info(t[SHARED + "nopop"], base,
                                             "sync mode over shared memory with SyncTracker(populate=False) vs "
                                             "untracked (informational: the writer takes the kernel's minor fault "
                                             "on every page of a window itself)")
    results["W1-floor"] = info(sync, async_, "sync vs async mode (informational: below 1, sync mode pays less "
                                             "than the kernel's per-page cost)")


WRITER_PLOT = Path(__file__).with_name("writer_cost.png")


def writer_cost_plot(results: dict[str, Any], nbytes: int = 64 * MiB, repeat: int = 3) -> None:
    """``writer_cost.png``: slowdown of a sequential fill vs untracked, per mode and invalidation block size."""
    blocks = [PAGE_SIZE, 64 << 10, 2 << 20]
    modes: dict[str, Any] = {
        "sync, one block per fault (fault_around=4 KiB)": lambda: SyncTracker(fault_around=PAGE_SIZE),
        "sync, default (fault-around up to 2 MiB, populate ahead)": lambda: SyncTracker(),
        "sync, fault-around, no populate": lambda: SyncTracker(populate=False),
        "async": lambda: AsyncTracker(interval=None),
    }
    curves: dict[str, list[float]] = {label: [] for label in modes}
    for block in blocks:
        base = _fill_seconds("explicit", nbytes, repeat, block)
        for label, make in modes.items():
            curves[label].append(_fill_seconds(make(), nbytes, repeat, block) / base)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    xs = [b / 1024 for b in blocks]
    for label, ys in curves.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(8.0, color="gray", linestyle="--", linewidth=1, label="W1 target (8x)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{x:g} KiB" for x in xs])
    ax.set_xlabel("invalidation block size (block_size)")
    ax.set_ylabel("sequential fill time / untracked fill")
    ax.set_title(f"writer cost of a {nbytes >> 20} MiB numpy fill per tracking mode")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(WRITER_PLOT)
    plt.close(fig)
    results["_writer_cost"] = {label: [round(v, 2) for v in ys] for label, ys in curves.items()}
    results["_writer_cost"]["block_sizes"] = blocks


def w1_amplification(results: dict[str, Any], pages: int = 16384, writes: int = 1000, rounds: int = 5) -> None:
    """Pages invalidated per page written, for random single-byte writes to distinct pages of a sync region
    (fault-around must not widen random writes). Target <= 2."""
    rng = np.random.default_rng(17)
    written = invalidated = 0
    with devrep.Replicator() as rep:
        region = rep.create_region("amp", pages * PAGE_SIZE, tracking="sync")
        region.array[:] = 1
        rep.replicate("amp", ["cpu:0"])
        for _ in range(rounds):
            chosen = rng.choice(pages, writes, replace=False)
            before = region.stats.pages_invalidated
            for page in chosen.tolist():
                region.array[page * PAGE_SIZE] = 2
            region.collect()
            written += writes
            invalidated += region.stats.pages_invalidated - before
            rep.sync("amp")
    results["W1-amp"] = _lower_is_better(invalidated / written, 1.0, 2.0, "pages/page",
                                         f"invalidation amplification of {writes} random single-page writes x "
                                         f"{rounds} in a {pages}-page sync region")


def _idle_cpu_percent(tracking: str, regions: int, seconds: float) -> float:
    with devrep.Replicator(cpu_devices=1) as rep:
        for i in range(regions):
            rep.create_region(f"idle{i}", 16 * PAGE_SIZE, tracking=tracking)
        time.sleep(1.0)  # let the epochs back off to their idle interval
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(seconds)
        return 100 * (time.process_time() - cpu) / (time.monotonic() - wall)


def a1_idle_async(results: dict[str, Any], regions: int = 1000, seconds: float = 5.0) -> None:
    ours = _idle_cpu_percent("async", regions, seconds)
    base = _idle_cpu_percent("explicit", regions, seconds)
    results["A1"] = {"value": round(ours, 2), "baseline": round(base, 2), "ratio": round(ours / 5.0, 3),
                     "target": 5.0, "unit": "% of one CPU", "meets": bool(ours <= 5.0),
                     "note": f"{regions} idle async regions in one process (one epoch loop, idle back-off) vs the "
                             "same number of explicit regions; target <= 5 % of one CPU (ratio = value / 5 %)"}


def p3s_sync_mode_sync(results: dict[str, Any], rounds: int = 7) -> None:
    """Sync of 1 GiB after one store to each of 1 % random pages, sync mode vs explicit mode (after
    ``invalidate_pages`` of the same pages, as its owner would). Both regions live side by side and the rounds
    alternate, so drift on this shared machine hits both alike."""
    pages = np.sort(np.random.default_rng(3).choice(GiB // PAGE_SIZE, GiB // PAGE_SIZE // 100, replace=False))
    times: dict[str, list[float]] = {"explicit": [], "sync": []}
    with devrep.Replicator() as rep:
        regions = {mode: rep.create_region(f"p3s-{mode}", GiB, tracking=mode) for mode in times}
        for region in regions.values():
            region.array[:] = 1
            rep.replicate(region.name, ["cpu:0"])
        for i in range(rounds):
            for mode, region in regions.items():
                array = region.array
                for page in pages.tolist():  # sync mode: each store faults once and is recorded
                    array[page * PAGE_SIZE] = i + 2
                if mode == "explicit":
                    region.invalidate_pages(pages)
                start = time.perf_counter()
                region.sync()
                times[mode].append(time.perf_counter() - start)
    sync, explicit = statistics.median(times["sync"]), statistics.median(times["explicit"])
    results["P3s"] = _lower_is_better(sync * 1e3, explicit * 1e3, 2.0, "ms",
                                      "sync of 1% random pages of 1 GiB written in sync mode (collect, rearm of "
                                      "~2,600 runs, copy) vs the same pages invalidated in explicit mode")


# The client of P3s-remote: maps the two memfds it inherits, hands the service a sync-mode userfaultfd for the
# first (and its address), then stores to the given pages of the region the service names, round after round.
REMOTE_WRITER = """
import mmap, os, socket, sys
import numpy as np
from devrep.protect import prepare_sync_client
sock = socket.socket(fileno=int(sys.argv[1]))
size = int(sys.argv[2])
arrays = [np.frombuffer(mmap.mmap(int(fd), size), dtype=np.uint8) for fd in sys.argv[3:5]]
pages = np.frombuffer(sys.stdin.buffer.read(), dtype=np.int64) * 4096
address = arrays[0].__array_interface__["data"][0]
uffd = prepare_sync_client(arrays[0])
socket.send_fds(sock, [address.to_bytes(8, "little")], [uffd])
os.close(uffd)  # the service holds the last reference
while len(msg := sock.recv(2, socket.MSG_WAITALL)) == 2:
    arrays[msg[0]][pages] = msg[1]
    sock.sendall(b"k")
"""


def p3s_remote(results: dict[str, Any], rounds: int = 15) -> None:
    """P3s for a client's memory in the service: a writer process stores to 1 % random pages of its 1 GiB memfd,
    this process syncs. Three variants interleaved round by round: the sync-mode region (staged rearm), the same
    region with the staged rearm off (rearm, then copy), and a second memfd of the same writer in explicit mode
    (this process invalidates the pages, as the client's Invalidate call would)."""
    pages = np.sort(np.random.default_rng(3).choice(GiB // PAGE_SIZE, GiB // PAGE_SIZE // 100, replace=False))
    times: dict[str, list[float]] = {"sync": [], "sync-seq": [], "explicit": []}
    with contextlib.ExitStack() as stack:
        fds = [memfd_create(f"p3s-remote-{mode}", GiB) for mode in ("sync", "explicit")]
        owned = list(fds)  # closed on the way out unless a region took it (register_fd closes it on failure too)

        @stack.callback
        def close_owned() -> None:
            for fd in owned:
                os.close(fd)

        ours, theirs = socket.socketpair()
        stack.callback(ours.close)
        with theirs:
            writer = subprocess.Popen([sys.executable, "-c", REMOTE_WRITER, str(theirs.fileno()), str(GiB),
                                       *map(str, fds)], stdin=subprocess.PIPE, pass_fds=[theirs.fileno(), *fds])
        stack.callback(writer.wait)
        stack.callback(writer.kill)  # runs first: the writer may be blocked on a fault nobody handles any more
        assert writer.stdin is not None
        writer.stdin.write(pages.astype(np.int64).tobytes())
        writer.stdin.close()
        ours.settimeout(60)
        msg, uffd, _, _ = socket.recv_fds(ours, 8, 1)
        if not uffd:
            raise RuntimeError("the P3s-remote writer process sent no userfaultfd")
        tracker = SyncTracker.remote(uffd[0], int.from_bytes(msg, "little"), GiB)
        rep = stack.enter_context(devrep.Replicator())
        regions = {}
        for mode, fd in zip(("sync", "explicit"), fds, strict=True):
            owned.remove(fd)
            regions[mode] = rep.register_fd(f"p3s-remote-{mode}", fd, GiB, tracking=tracker if mode == "sync"
                                            else "explicit")
        for region in regions.values():
            rep.replicate(region.name, ["cpu:0"])
        for i in range(rounds):
            for variant in times:
                region = regions[variant.split("-")[0]]
                tracker.rearm_overlaps_copy = variant == "sync"
                ours.sendall(bytes([variant == "explicit", i % 200 + 2]))
                if ours.recv(1) != b"k":
                    raise RuntimeError("the P3s-remote writer process stopped")
                if variant == "explicit":
                    region.invalidate_pages(pages)
                start = time.perf_counter()
                region.sync()
                times[variant].append(time.perf_counter() - start)
                tracker.rearm_overlaps_copy = True
    sync, seq, explicit = (statistics.median(times[v]) for v in ("sync", "sync-seq", "explicit"))
    results["P3s-remote"] = _lower_is_better(
        sync * 1e3, explicit * 1e3, 2.0, "ms",
        f"sync of 1% random pages of a client's 1 GiB memfd written by the client in sync mode (staged rearm of "
        f"~2,600 runs overlapping the copy) vs a client memfd invalidated in explicit mode, median of {rounds} "
        f"interleaved rounds")
    results["P3s-remote-seq"] = {
        "value": round(seq * 1e3, 6), "baseline": round(sync * 1e3, 6), "ratio": round(seq / explicit, 3),
        "target": "info", "unit": "ms", "meets": True,
        "note": "the same remote sync with the staged rearm off (rearm, then copy); ratio against the explicit "
                f"baseline, baseline = the staged sync ({seq / sync:.2f}x of it)"}


def a1_sync_helper(results: dict[str, Any]) -> None:
    """The in-process sync helper's resident memory (target <= 40 MiB) and the first sync region's creation
    time (target < 0.5 s; baseline: creating an explicit region), each in a fresh interpreter."""
    code = ("import time, devrep; rep = devrep.Replicator(cpu_devices=1); "
            "t = time.perf_counter(); rep.create_region('x', 1 << 20, tracking=MODE); dt = time.perf_counter() - t; "
            "pid = rep.region('x').tracker.helper_pid if MODE == 'sync' else None; "
            "rss = [int(l.split()[1]) for l in open(f'/proc/{pid}/status') if l.startswith('VmRSS')][0] if pid else 0;"
            "print(dt, rss); rep.close()")
    measured = {}
    for mode in ("explicit", "sync"):
        out = subprocess.run([sys.executable, "-c", f"MODE = {mode!r}; " + code], capture_output=True, text=True,
                             check=True, timeout=120)
        seconds, rss_kib = out.stdout.split()
        measured[mode] = (float(seconds), int(rss_kib))
    rss = measured["sync"][1] / 1024
    results["A1-helper"] = {"value": round(rss, 1), "baseline": 40.0, "ratio": round(rss / 40.0, 3), "target": 40.0,
                            "unit": "MiB", "meets": bool(rss <= 40.0),
                            "note": "resident memory of the in-process sync-mode fault helper (target <= 40 MiB)"}
    first, base = measured["sync"][0], measured["explicit"][0]
    results["S0-sync-region"] = {"value": round(first, 4), "baseline": round(base, 4), "ratio": round(first / 0.5, 3),
                                 "target": 0.5, "unit": "s", "meets": bool(first < 0.5),
                                 "note": "first create_region(tracking='sync') in a fresh process (starts the "
                                         "helper) vs an explicit one; target < 0.5 s (ratio = value / 0.5 s)"}


def _store_seconds(tracking: str | devrep.tracking.Tracker, nbytes: int, repeat: int) -> float:
    """One byte stored into every page (the first write to each page after a sync), as scattered updates do."""
    with devrep.Replicator() as rep:
        region = rep.create_region("store", nbytes, tracking=tracking)
        region.array[:] = 1
        rep.replicate("store", ["cpu:0"])
        times = []
        for i in range(repeat):
            start = time.perf_counter()
            region.array[::PAGE_SIZE] = i + 2
            times.append(time.perf_counter() - start)
            rep.sync("store")
        return statistics.median(times)


def store_slowdown(results: dict[str, Any], nbytes: int = 64 * MiB, repeat: int = 3) -> None:
    base = _store_seconds("explicit", nbytes, repeat)
    for mode, tracker in (("sync", "sync"), ("async", AsyncTracker(interval=None))):
        ours = _store_seconds(tracker, nbytes, repeat)
        results[f"STORE-{mode}"] = {
            "value": round(ours * 1e3, 3), "baseline": round(base * 1e3, 3), "ratio": round(ours / base, 2),
            "target": "info", "unit": "ms",  "meets": True,
            "note": f"one byte stored into each 4 KiB page of a fully protected {nbytes >> 20} MiB region, {mode} "
                    "mode, vs untracked (informational: the first write to a page after a sync is what tracking "
                    "costs the writer)",
        }


def run(results: dict[str, Any]) -> None:
    a1_idle_async(results)
    a1_sync_helper(results)
    p4_sync_fault(results)
    p5_async_epoch(results)
    fill_slowdown(results)
    w1_amplification(results)
    p3s_sync_mode_sync(results)
    p3s_remote(results)
    writer_cost_plot(results)
    store_slowdown(results)


if __name__ == "__main__":
    import json

    out: dict[str, Any] = {}
    run(out)
    print(json.dumps(out, indent=2))
