"""A sync-mode writer whose fault helper the test kills while a store is blocked on it (test_tracking_sync).

``python sync_killed_helper.py``: creates a 64-page sync region, stops its helper (SIGSTOP) and prints the
helper's pid; then stores to a protected page (blocks until the helper is gone) and prints, one a line: the
monotonic time the store returned, the region's stale runs, ``refused: <error>`` from a sync and ``failed: <reason>``.
"""

from __future__ import annotations

import os
import signal
import time

import devrep


def main() -> None:
    with devrep.Replicator() as rep:
        region = rep.create_region("k", 64 * 4096, tracking="sync")
        rep.replicate("k", ["cpu:0"])
        pid = region.tracker.helper_pid  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGSTOP)  # the handler stops answering: the next store blocks
        print(pid, flush=True)
        region.array[3 * 4096] = 1
        print(time.monotonic(), flush=True)
        print(region.invalid_runs("cpu:0").tolist(), flush=True)
        try:
            rep.sync("k")
        except devrep.FailedPreconditionError as exc:
            print("refused:", exc, flush=True)
        deadline = time.monotonic() + 5
        while region.failed is None and time.monotonic() < deadline:
            time.sleep(0.01)
        print("failed:", region.failed, flush=True)


if __name__ == "__main__":
    main()
