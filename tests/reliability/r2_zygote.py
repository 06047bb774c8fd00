"""Client factory for R2 (clients killed -9). Run by test_r2; not a test.

``python r2_zygote.py ADDRESS``: imports devrep once, then for every ``go`` line on stdin forks a child
that connects, creates a region, replicates it to two devices, acquires a lease on each (mapping the CPU
replica's fd), prints ``ready <pid>`` and sleeps until it is killed. Forking skips the interpreter start-up,
so a thousand cycles take minutes; no gRPC object exists in the parent when it forks.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import _child  # noqa: F401  (dies with the test process)
import numpy as np

import devrep.client
from devrep._pages import PAGE_SIZE


def child(address: str, n: int) -> None:
    client = devrep.client.connect(address, timeout=60)  # a bound for loaded machines, not a speed target
    region = client.create_region(f"r2-{os.getpid()}-{n}", 64 * PAGE_SIZE, tracking="explicit")
    region.array[:] = n & 0xFF
    client.replicate(region.name, ["cpu:0", "cpu:1"])
    leases = [client.acquire(region.name, d) for d in ("cpu:0", "cpu:1")]
    assert all(int(np.asarray(lease.array)[0]) == n & 0xFF for lease in leases)
    print(f"ready {os.getpid()}", flush=True)
    while True:
        time.sleep(60)


def main(argv: list[str]) -> int:
    address = argv[0]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    n = 0
    for line in sys.stdin:
        if line.strip() != "go":
            continue
        n += 1
        pid = os.fork()
        if pid == 0:
            try:
                child(address, n)
            except BaseException as exc:
                print(f"failed {os.getpid()} {type(exc).__name__}: {exc}", flush=True)
            finally:
                os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
