"""The coherence checker (R3): writers stamp pages, acquirers check that replicas are never older than the host.

Every page's first 8 bytes hold a stamp ``writer_id << 48 | seq`` (0 = never written); one writer owns a
region, so on each page stamps only grow. An acquirer reads the host stamps, then acquires a replica and
checks every page the lease calls valid (all of them for ``fresh=True``): its stamp must be at least the host
stamp read *before* the acquire. A smaller one means a write that had completed before the acquire began was
missing from a replica served as current: a violation. Stamps from another writer or above anything written
are violations too (a copy from the wrong place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import devrep
from devrep._pages import PAGE_SIZE, pages_from_runs
from devrep.memory import memfd_create

WORDS_PER_PAGE = PAGE_SIZE // 8
STAMP_SHIFT = 48
WRITER = Path(__file__).with_name("stamp_writer.py")
STEP_TIMEOUT = 60.0


def stamps_of(array: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """The stamp word of every page (a strided view, no copy)."""
    return array.view(np.uint64)[::WORDS_PER_PAGE]


@dataclasses.dataclass
class Violation:
    region: str
    device: str
    page: int
    host_before: int
    replica: int
    fresh: bool
    generation: int

    def __str__(self) -> str:
        return (f"{self.region} on {self.device} page {self.page}: replica stamp {self.replica:#x} older than "
                f"host stamp {self.host_before:#x} seen before the acquire (fresh={self.fresh}, "
                f"generation {self.generation})")


@dataclasses.dataclass
class Tally:
    acquires: int = 0
    pages_checked: int = 0
    stale_pages_skipped: int = 0
    syncs: int = 0
    writes: int = 0
    violations: list[Violation] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)


def check_once(region: devrep.Region, device: str, writer_id: int, *, fresh: bool, hold: float,
               tally: Tally) -> None:
    """One acquire and check (see the module doc)."""
    host_before = stamps_of(region.array).copy()
    with region.acquire(device, fresh=fresh, timeout=STEP_TIMEOUT) as lease:
        replica = stamps_of(np.asarray(lease.array))
        checked = np.ones(region.npages, dtype=bool)
        if not fresh and len(lease.invalid_runs):
            checked[pages_from_runs(lease.invalid_runs)] = False
        got = replica.copy()
        if hold:
            time.sleep(hold)  # keep the buffer leased so syncs must write the spare and flip
    host_after = stamps_of(region.array).copy()
    foreign = (got != 0) & ((got >> np.uint64(STAMP_SHIFT)) != np.uint64(writer_id))
    # Older than the host before: a lost write. Newer than the host after, or another writer's: garbage.
    bad = checked & ((got < host_before) | (got > host_after) | foreign)
    with tally.lock:
        tally.acquires += 1
        tally.pages_checked += int(checked.sum())
        tally.stale_pages_skipped += int((~checked).sum())
        for page in np.flatnonzero(bad)[:20]:
            tally.violations.append(Violation(region.name, device, int(page), int(host_before[page]),
                                              int(got[page]), fresh, lease.generation))


class WriterProcess:
    """A ``stamp_writer.py`` process writing a memfd that the parent registers with a remote tracker."""

    def __init__(self, name: str, npages: int, mode: str, writer_id: int, writes: int, seed: int,
                 seconds: float) -> None:
        self.name = name
        self.npages = npages
        self.mode = mode
        memfd = memfd_create(f"r3:{name}", npages * PAGE_SIZE)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(WRITER), "--sock", str(theirs.fileno()), "--memfd", str(memfd),
                 "--npages", str(npages), "--mode", mode, "--writer-id", str(writer_id),
                 "--writes", str(writes), "--seed", str(seed), "--seconds", str(seconds)],
                pass_fds=[theirs.fileno(), memfd], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.memfd = memfd
        self.sock.settimeout(STEP_TIMEOUT)
        msg, fds, _, _ = socket.recv_fds(self.sock, 64, 2)
        if not msg.startswith(b"R"):
            raise RuntimeError(f"writer {name} did not start (exit status {self.proc.poll()})")
        self.base = int.from_bytes(msg[1:9], "little")
        self.fds = fds
        self.written = 0

    def tracker(self) -> devrep.tracking.Tracker:
        if self.mode == "sync":
            from devrep.tracking._sync import SyncTracker

            return SyncTracker.remote(self.fds[0], self.base, self.npages * PAGE_SIZE)
        from devrep.tracking._async import AsyncTracker

        return AsyncTracker.remote(self.fds[0], self.fds[1], self.base, self.npages * PAGE_SIZE)

    def go(self) -> None:
        self.sock.send(b"G")

    def wait_done(self, timeout: float) -> int:
        self.sock.settimeout(timeout)
        msg = self.sock.recv(64)
        if not msg.startswith(b"D"):
            raise RuntimeError(f"writer {self.name} ended without finishing (exit status {self.proc.poll()})")
        self.written = int.from_bytes(msg[1:9], "little")
        return self.written

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(b"X")
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def local_writer(region: devrep.Region, writer_id: int, writes: int, seed: int, seconds: float,
                 tally: Tally) -> None:
    """Stamp ``region.array`` from a thread of this process (in-process library mode), paced over ``seconds``."""
    stamps = stamps_of(region.array)
    rng = np.random.default_rng(seed)
    tag = np.uint64(writer_id << STAMP_SHIFT)
    seq = 0
    start = time.monotonic()
    while seq < writes:
        # Bursts of ~64 writes, then a pause: fresh acquires need a quiet moment to succeed.
        ahead = start + seconds * (seq // 64 * 64) / writes - time.monotonic()
        if ahead > 0.001:
            time.sleep(ahead)
        burst = int(min(rng.choice([1, 1, 1, 2, 4, 16, 64]), writes - seq, region.npages))
        if burst == 1:
            seq += 1
            stamps[int(rng.integers(region.npages))] = tag | np.uint64(seq)
            continue
        pages = rng.permutation(region.npages)[:burst]
        stamps[pages] = tag | np.arange(seq + 1, seq + burst + 1, dtype=np.uint64)
        seq += burst
    with tally.lock:
        tally.writes += seq


def run_checker(rep: devrep.Replicator, regions: list[tuple[devrep.Region, int]], devices: list[str],
                writers_done: threading.Event, *, acquirers: int, seed: int, tally: Tally,
                deadline: float) -> None:
    """Acquirer threads (fresh and not) and one syncer thread until ``writers_done``, then a final check."""
    stop = threading.Event()

    def acquirer(i: int) -> None:
        rnd = random.Random(seed * 1000 + i)
        try:
            while not stop.is_set():
                region, wid = rnd.choice(regions)
                check_once(region, rnd.choice(devices), wid, fresh=rnd.random() < 0.7,
                           hold=rnd.choice([0.0, 0.0, 0.001, 0.003]), tally=tally)
        except Exception as exc:  # reported as a failure by the test, never silently dropped
            with tally.lock:
                tally.errors.append(f"acquirer {i}: {type(exc).__name__}: {exc}")

    def syncer() -> None:
        try:
            while not stop.wait(0.002):
                for region, _ in regions:
                    region.sync(timeout=STEP_TIMEOUT)
                    with tally.lock:
                        tally.syncs += 1
        except Exception as exc:
            with tally.lock:
                tally.errors.append(f"syncer: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=acquirer, args=(i,), daemon=True) for i in range(acquirers)]
    threads.append(threading.Thread(target=syncer, daemon=True))
    for t in threads:
        t.start()
    finished = writers_done.wait(max(0.0, deadline - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(STEP_TIMEOUT)
        if t.is_alive():
            tally.errors.append(f"{t.name} did not stop within {STEP_TIMEOUT}s")
    if not finished:
        tally.errors.append("writers did not finish before the deadline")
    # Quiescent: every replica must now equal the host byte for byte.
    for region, wid in regions:
        for device in devices:
            check_once(region, device, wid, fresh=True, hold=0.0, tally=tally)
            with region.acquire(device, timeout=STEP_TIMEOUT) as lease:
                same = np.array_equal(np.asarray(lease.array), region.array)
            if not same:
                tally.errors.append(f"{region.name} on {device}: replica differs from the quiescent host")


def summary(mode: str, variant: str, tally: Tally, seconds: float) -> dict[str, Any]:
    return {"mode": mode, "variant": variant, "writes": tally.writes, "acquires": tally.acquires,
            "pages_checked": tally.pages_checked, "stale_skipped": tally.stale_pages_skipped,
            "syncs": tally.syncs, "violations": len(tally.violations), "seconds": round(seconds, 1)}
