"""R7: many concurrent clients (separate processes, separate sessions) x mixed RPCs against one server: zero
errors; p50/p99 per RPC printed. Short: 16 x 50; soak: 64 x 1000 (clients x ``DEVREP_SOAK_SCALE``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _support import soak_scale

import devrep.client
from devrep._pages import PAGE_SIZE

from .conftest import ServerProcess

CLIENT = Path(__file__).with_name("r7_client.py")


def run_load(tmp_path: Path, clients: int, calls: int, timeout: float) -> dict[str, dict[str, float]]:
    server = ServerProcess(tmp_path, "--workers", "64")
    try:
        with devrep.client.connect(server.address, label="host") as host:
            shared = host.create_region("shared", 64 * PAGE_SIZE)
            shared.array[:] = 1
            host.replicate("shared", ["cpu:0"])
            host.share("shared", "*")
            procs = [subprocess.Popen([sys.executable, str(CLIENT), server.address, str(i), str(calls), "shared"],
                                      stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
                     for i in range(clients)]
            results = []
            for proc in procs:
                out, _ = proc.communicate(timeout=timeout)
                assert proc.returncode == 0, f"load client exited {proc.returncode}"
                results.append(json.loads(out.strip().splitlines()[-1]))
            assert host.ping()
    finally:
        server.stop()
    errors = [e for r in results for e in r["errors"]]
    total_errors = sum(r["error_count"] for r in results)
    by_rpc: dict[str, list[float]] = {}
    for r in results:
        for rpc, values in r["latencies"].items():
            by_rpc.setdefault(rpc, []).extend(values)
    table = {rpc: {"calls": len(v), "p50_ms": 1000 * float(np.percentile(v, 50)),
                   "p99_ms": 1000 * float(np.percentile(v, 99))} for rpc, v in sorted(by_rpc.items())}
    print(json.dumps({"clients": clients, "calls_per_client": calls, "errors": total_errors, "per_rpc": table},
                     indent=1))
    assert total_errors == 0, errors[:20]
    assert sum(t["calls"] for t in table.values()) == clients * calls
    return table


def test_r7_load_short(tmp_path: Path) -> None:
    run_load(tmp_path, clients=16, calls=50, timeout=110)


@pytest.mark.soak
def test_r7_load_soak(tmp_path: Path) -> None:
    run_load(tmp_path, clients=int(64 * soak_scale()), calls=1000, timeout=3000)
