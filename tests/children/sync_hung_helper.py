"""A sync-mode writer whose fault helper hangs during a rearm (test_tracking_sync).

``python sync_hung_helper.py``: a 16-page sync region with a 0.5 s rearm timeout; stops its helper (SIGSTOP),
syncs and prints ``timeout: <error>``; then stores to a protected page (must not block: the timed-out helper
was killed), prints ``wrote`` and the region's stale runs.
"""

from __future__ import annotations

import os
import signal

import devrep
from devrep.tracking._sync import SyncTracker


def main() -> None:
    with devrep.Replicator() as rep:
        region = rep.create_region("h", 16 * 4096, tracking=SyncTracker(rearm_timeout=0.5))
        rep.replicate("h", ["cpu:0"])
        region.array[4096] = 1  # unprotected now; the next sync re-protects it
        os.kill(region.tracker.helper_pid, signal.SIGSTOP)  # type: ignore[attr-defined]
        try:
            rep.sync("h")
        except devrep.LeaseTimeoutError as exc:
            print("timeout:", exc, flush=True)
        region.array[2 * 4096] = 1  # a protected page: must not block now that the handler was killed
        print("wrote", flush=True)
        print(region.invalid_runs("cpu:0").tolist(), flush=True)


if __name__ == "__main__":
    main()
