"""One load client for R7. Run by test_r7; not a test.

``python r7_client.py ADDRESS CLIENT_ID CALLS SHARED_REGION``: connects (its own session), creates a region,
then makes ``CALLS`` RPCs drawn from a fixed mix, timing each. Prints one JSON line:
``{"latencies": {rpc: [seconds, ...]}, "errors": ["rpc: error", ...]}``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import _child  # noqa: F401  (dies with the test process)
import numpy as np

import devrep.client
from devrep._pages import PAGE_SIZE

NPAGES = 32


def main(argv: list[str]) -> int:
    address, cid, calls, shared = argv[0], int(argv[1]), int(argv[2]), argv[3]
    rnd = random.Random(cid)
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    with devrep.client.connect(address, label=f"load{cid}", timeout=60) as client:
        name = f"load-{cid}"
        region = client.create_region(name, NPAGES * PAGE_SIZE, tracking="explicit")  # the mix reports its writes
        region.array[:] = cid & 0xFF
        client.replicate(name, ["cpu:0"])

        devices = ["cpu:0"]

        def acquire_own() -> None:
            with client.acquire(name, rnd.choice(devices)) as lease:
                if int(np.asarray(lease.array)[0]) != cid & 0xFF:
                    raise AssertionError("read another client's bytes")

        def acquire_shared() -> None:
            with client.acquire(shared, "cpu:0", fresh=False):
                pass

        def write_invalidate() -> None:
            page = rnd.randrange(NPAGES)
            region.array[page * PAGE_SIZE + 1] = rnd.randrange(256)
            client.invalidate(name, page * PAGE_SIZE, PAGE_SIZE)

        def replicate() -> None:
            client.replicate(name, ["cpu:0", "cpu:1"])
            devices[:] = ["cpu:0", "cpu:1"]

        mix: list[tuple[str, int, Callable[[], Any]]] = [
            ("Ping", 20, client.ping),
            ("GetServerInfo", 5, client.stats),
            ("ListRegions", 5, client.list_regions),
            ("DescribeRegion", 10, lambda: client.describe(name)),
            ("Invalidate", 15, write_invalidate),
            ("Sync", 10, lambda: client.sync(name)),
            ("Acquire+Release", 20, acquire_own),
            ("Acquire(shared)+Release", 10, acquire_shared),
            ("Replicate", 3, replicate),
            ("Verify", 2, lambda: client.verify(name)),
        ]
        ops = [m for m in mix for _ in range(m[1])]
        for _ in range(calls):
            label, _, op = rnd.choice(ops)
            start = time.perf_counter()
            try:
                op()
            except Exception as exc:
                errors.append(f"{label}: {type(exc).__name__}: {exc}")
            latencies.setdefault(label, []).append(time.perf_counter() - start)
    print(json.dumps({"latencies": latencies, "errors": errors[:20], "error_count": len(errors)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
