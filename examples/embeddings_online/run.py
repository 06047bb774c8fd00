#!/usr/bin/env python3
"""Online embedding table: one trainer updates rows in a sync-mode region, two inference processes look rows up
from fresh replicas through a `devrep serve` process, with torch.nn.functional.embedding over the lease.

    python examples/embeddings_online/run.py [--seconds 5] [--rows 65536] [--dim 62] [--device cpu:0 --device cpu:1]

Without --address (or $DEVREP_ADDRESS) it starts its own `devrep serve` on a temporary socket.

Freshness protocol (what the readers check). Each row is ``[stamp, row_id, v, v, ..., v]`` (float32, exact for
integers < 2**24). Update ``k`` of a batch of rows writes the values ``v = k`` and the row id first, then the
stamp ``k`` last; only after those stores have returned does the trainer record ``ledger[row] = k`` in a plain
shared file (not replicated). A reader snapshots ``ledger[ids]`` *before* its fresh acquire, so every update in
that snapshot completed before the acquire began; the replica must therefore show, for every looked-up row,
``stamp >= ledger snapshot`` (never older than the last completed update), ``row_id == id`` (no misplaced
row) and ``every value >= stamp`` (the stamp is written last, so a row is never newer than its values). Any
violation is counted and makes the run fail. ``--stale-reads`` acquires with ``fresh=False`` instead, to show the
check does catch stale rows.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REGION = "emb-online"
READY_TIMEOUT = 60.0


def table_view(buf: Any, rows: int, dim: int) -> np.ndarray:
    """The region's bytes as the ``[rows, dim + 2]`` float32 table."""
    return np.frombuffer(buf, dtype=np.float32, count=rows * (dim + 2)).reshape(rows, dim + 2)


def open_ledger(path: Path, rows: int, writable: bool) -> np.ndarray:
    return np.memmap(path, dtype=np.int64, mode="r+" if writable else "r", shape=(rows,))


# ---------------------------------------------------------------------------------------------- trainer
def trainer(args: argparse.Namespace) -> int:
    from devrep.client import connect

    rows, dim = args.rows, args.dim
    ledger = open_ledger(args.ledger, rows, writable=True)
    with connect(args.address, label="trainer") as client:
        region = client.create_region(REGION, rows * (dim + 2) * 4, tracking="sync")
        table = region.array.view(np.float32).reshape(rows, dim + 2)
        table[:, 0] = 0
        table[:, 1] = np.arange(rows, dtype=np.float32)
        table[:, 2:] = 0
        ledger[:] = 0
        client.replicate(REGION, sorted(set(args.device)))
        client.share(REGION, "*")  # readers are other sessions: read-only access for them
        print("READY", flush=True)

        rng = np.random.default_rng(1)
        step, updated, start = 0, 0, time.perf_counter()
        # Until the driver says stop (or closes stdin). Waiting `step_ms` for stdin stands for the forward/backward
        # pass of a real training step; a trainer that stores without pause would keep every page dirty.
        while not select.select([sys.stdin], [], [], args.step_ms / 1000)[0]:
            step += 1
            ids = np.unique(rng.integers(0, rows, args.batch))
            table[ids, 2:] = step            # values first ...
            table[ids, 1] = ids              # ... the row id ...
            table[ids, 0] = step             # ... the stamp last
            ledger[ids] = step               # then publish: update `step` of these rows has completed
            updated += len(ids)
        elapsed = time.perf_counter() - start
        print(json.dumps({"role": "trainer", "steps": step, "rows_updated": updated, "seconds": elapsed,
                          "rows_per_s": updated / elapsed}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- reader
def reader(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from devrep.client import connect

    # torch warns that the replica's numpy view is not writable: that is the point (it is a read-only mapping;
    # a write would be SIGSEGV). F.embedding only reads it.
    warnings.filterwarnings("ignore", message=".*non-writable.*")
    warnings.filterwarnings("ignore", message=".*not writable.*")
    rows, dim, device = args.rows, args.dim, args.device[0]
    ledger = open_ledger(args.ledger, rows, writable=False)
    cuda = device.startswith("cuda:")
    rng = np.random.default_rng(os.getpid())
    lookups = acquires = violations = 0
    stale_rows_seen = 0
    first_violation = ""
    generations: set[int] = set()
    with connect(args.address, label=f"reader-{device}") as client:
        deadline = time.perf_counter() + args.seconds
        start = time.perf_counter()
        while time.perf_counter() < deadline:
            ids = rng.integers(0, rows, args.lookups)
            expected = np.array(ledger[ids])  # before the acquire: these updates have completed
            with client.acquire(REGION, device, fresh=not args.stale_reads, timeout=30.0) as lease:
                if cuda:
                    weight = torch.from_dlpack(lease.to_cupy()).view(torch.float32).view(rows, dim + 2)
                    out = F.embedding(torch.from_numpy(ids).to(weight.device), weight).cpu().numpy()
                else:
                    weight = torch.from_numpy(table_view(lease.array, rows, dim))  # zero-copy, read-only memory
                    out = F.embedding(torch.from_numpy(ids), weight).numpy()
                generations.add(lease.generation)
            acquires += 1
            lookups += len(ids)
            stamps = out[:, 0].astype(np.int64)
            bad = (stamps < expected) | (out[:, 1].astype(np.int64) != ids) | (out[:, 2:].min(axis=1) < out[:, 0])
            stale_rows_seen += int((stamps < expected).sum())
            if bad.any():
                violations += int(bad.sum())
                if not first_violation:
                    i = int(np.flatnonzero(bad)[0])
                    first_violation = (f"row {ids[i]}: stamp {stamps[i]} < last completed update {expected[i]}"
                                       if stamps[i] < expected[i] else f"row {ids[i]}: torn/misplaced {out[i, :4]}")
        elapsed = time.perf_counter() - start
    print(json.dumps({"role": "reader", "device": device, "acquires": acquires, "lookups": lookups,
                      "seconds": elapsed, "lookups_per_s": lookups / elapsed, "acquires_per_s": acquires / elapsed,
                      "violations": violations, "stale_rows": stale_rows_seen, "first_violation": first_violation,
                      "generations_seen": len(generations)}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- driver
def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise RuntimeError(f"no output from {proc.args!r} within {timeout:.0f}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.args!r} exited with {proc.wait(10)} before saying anything")
    return line.strip()


def drive(args: argparse.Namespace, address: str) -> int:
    me = [sys.executable, os.path.abspath(__file__), "--address", address, "--rows", str(args.rows),
          "--dim", str(args.dim)]
    with tempfile.TemporaryDirectory(prefix="devrep-emb-") as tmp:
        ledger_path = Path(tmp) / "ledger.i64"
        ledger_path.write_bytes(bytes(8 * args.rows))
        common = [*me, "--ledger", str(ledger_path)]
        devices = args.device or ["cpu:0", "cpu:1"]
        train = subprocess.Popen([*common, "--role", "trainer", "--batch", str(args.batch), "--step-ms",
                                  str(args.step_ms),
                                  *[a for d in devices for a in ("--device", d)]],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        readers: list[subprocess.Popen[str]] = []
        try:
            line = _read_line(train, READY_TIMEOUT)
            if line != "READY":
                raise RuntimeError(f"trainer said {line!r}")
            for i in range(2):
                readers.append(subprocess.Popen(
                    [*common, "--role", "reader", "--device", devices[i % len(devices)], "--seconds",
                     str(args.seconds), "--lookups", str(args.lookups), *(["--stale-reads"] if args.stale_reads
                                                                          else [])],
                    stdout=subprocess.PIPE, text=True))
            results = [json.loads(_read_line(r, args.seconds + 120)) for r in readers]
            for r in readers:
                if r.wait(30):
                    raise RuntimeError(f"reader exited with {r.returncode}")
            assert train.stdin is not None
            train.stdin.write("stop\n")
            train.stdin.flush()
            results.insert(0, json.loads(_read_line(train, 60)))
            train.stdin.close()
            if train.wait(30):
                raise RuntimeError(f"trainer exited with {train.returncode}")
        finally:
            for p in [train, *readers]:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
    t, rs = results[0], results[1:]
    print(f"trainer: {t['rows_updated']} row updates in {t['steps']} steps, {t['rows_per_s']:,.0f} rows/s "
          f"(sync-mode region, {args.rows} x {args.dim + 2} float32)")
    for r in rs:
        print(f"reader on {r['device']}: {r['lookups_per_s']:,.0f} lookups/s, {r['acquires_per_s']:,.1f} fresh "
              f"acquires/s, {r['generations_seen']} generations seen, {r['violations']} violations "
              f"({r['stale_rows']} rows older than their last completed update)")
        if r["first_violation"]:
            print(f"  first violation: {r['first_violation']}")
    print("RESULT " + json.dumps({"trainer": t, "readers": rs}))
    return 1 if any(r["violations"] for r in rs) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["driver", "trainer", "reader"], default="driver")
    parser.add_argument("--address", default=os.environ.get("DEVREP_ADDRESS"),
                        help="devrep server (default: $DEVREP_ADDRESS, else start one)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the readers run")
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=62, help="embedding width (a row is dim + 2 float32)")
    parser.add_argument("--batch", type=int, default=64, help="rows per trainer update")
    parser.add_argument("--step-ms", type=float, default=2.0, help="trainer compute time between updates")
    parser.add_argument("--lookups", type=int, default=1024, help="ids per reader lookup batch")
    parser.add_argument("--device", action="append", default=[],
                        help="replica devices, one per reader (default cpu:0 and cpu:1; cuda:0 on a GPU)")
    parser.add_argument("--stale-reads", action="store_true",
                        help="readers acquire with fresh=False: shows that the check catches stale rows")
    parser.add_argument("--ledger", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "trainer":
        return trainer(args)
    if args.role == "reader":
        return reader(args)
    if args.address:
        return drive(args, args.address)
    from devrep.demo import server_process  # a real `devrep serve` on a temporary socket

    with tempfile.TemporaryDirectory(prefix="devrep-") as tmp, server_process(Path(tmp)) as (address, _):
        return drive(args, address)


if __name__ == "__main__":
    sys.exit(main())
