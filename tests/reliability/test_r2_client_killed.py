"""R2: clients that register, replicate, acquire and are killed -9, over and over: the service's RSS, device
bytes and open fds return to baseline. Short: 30 cycles; soak: 1000 x ``DEVREP_SOAK_SCALE``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _support import proc_fds, proc_rss, soak_scale

import devrep.client

from .conftest import ServerProcess

ZYGOTE = Path(__file__).with_name("r2_zygote.py")


def device_bytes(pid: int) -> int:
    """Bytes of CPU-backend replica memfds the server holds open."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "devrep-replica" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                total += os.stat(f"/proc/{pid}/fd/{fd}").st_size
        except OSError:
            continue
    return total


def snapshot(server: ServerProcess, probe: devrep.client.Client) -> dict[str, int]:
    info = probe.stats()
    return {"rss": proc_rss(server.pid), "fds": proc_fds(server.pid), "device_bytes": device_bytes(server.pid),
            "sessions": info.sessions, "regions": info.regions, "leases": info.leases}


def settled(server: ServerProcess, probe: devrep.client.Client, timeout: float = 30,
            fds: int | None = None) -> dict[str, int]:
    """The server's state once every killed client's session is gone (and, given ``fds``, its open fds are back
    to at most that many: the thread serving the last killed client's connection may still be closing its socket
    when the session is already gone)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(server, probe)
        done = snap["sessions"] == 1 and snap["regions"] == 0 and snap["leases"] == 0
        if (done and (fds is None or snap["fds"] <= fds)) or time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def run_cycles(tmp_path: Path, cycles: int, warmup: int = 10) -> dict[str, int]:
    server = ServerProcess(tmp_path)
    zygote = subprocess.Popen([sys.executable, str(ZYGOTE), server.address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert zygote.stdin is not None and zygote.stdout is not None
    probe = devrep.client.connect(server.address, timeout=10)
    baseline: dict[str, int] = {}
    try:
        for n in range(warmup + cycles):
            if n == warmup:
                baseline = settled(server, probe)
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            line = zygote.stdout.readline().split()
            assert line and line[0] == "ready", f"cycle {n}: client failed: {line}"
            os.kill(int(line[1]), signal.SIGKILL)
        after = settled(server, probe, fds=baseline["fds"])
    finally:
        zygote.kill()
        zygote.wait(10)
        server.stop()
    figures = {"cycles": cycles, **{f"baseline_{k}": v for k, v in baseline.items()},
               **{f"after_{k}": v for k, v in after.items()}}
    print(json.dumps(figures))
    assert after["sessions"] == 1 and after["regions"] == 0 and after["leases"] == 0, figures
    assert after["device_bytes"] == baseline["device_bytes"] == 0, figures
    assert after["fds"] <= baseline["fds"], figures
    # Allocator noise: a few MiB; a leak of the 256 KiB region + 2 replicas per cycle would be >= 22 MiB.
    assert after["rss"] - baseline["rss"] < 16 << 20, figures
    return figures


def test_r2_client_killed_short(tmp_path: Path) -> None:
    run_cycles(tmp_path, cycles=30)


@pytest.mark.soak
def test_r2_client_killed_soak(tmp_path: Path) -> None:
    run_cycles(tmp_path, cycles=int(1000 * soak_scale()))
