"""A sync-mode client process for R1 (service killed -9 while writers fault). Run by test_r1; not a test.

``python r1_writer.py ADDRESS WRITER_ID STATUS_FILE``. A writer thread stores to random pages of its region
without pause (every store after a sync faults into the service); a second thread keeps syncing, so pages are
protected again and again. After each store the writer thread publishes ``(stores, monotonic time)`` in
``STATUS_FILE`` (shared mmap of float64), so the parent sees when stores complete after it killed the server.
When the service is gone the client reconnects (retrying), registers a fresh region with the same bytes,
replicates it, checks a fresh replica equals the host bytes and prints ``resynced <n> ok|bad``.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time

import _child  # noqa: F401  (dies with the test process)
import numpy as np

import devrep.client
from devrep._pages import PAGE_SIZE
from devrep.errors import DevrepError

NPAGES = 256
DEVICES = ["cpu:0", "cpu:1"]


def main(argv: list[str]) -> int:
    address, wid, status_path = argv[0], int(argv[1]), argv[2]
    fd = os.open(status_path, os.O_RDWR)
    status = np.frombuffer(mmap.mmap(fd, 64), dtype=np.float64)
    os.close(fd)
    rng = np.random.default_rng(wid)
    lock = threading.Lock()
    paused = threading.Event()
    state: dict[str, object] = {}

    def register(n: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = devrep.client.connect(address, timeout=5)
                break
            except DevrepError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        region = client.create_region(f"w{wid}-{n}", NPAGES * PAGE_SIZE, tracking="sync")
        old = state.get("array")
        if old is not None:
            region.array[:] = old  # type: ignore[call-overload]  # the host bytes the lost server had replicated
        client.replicate(region.name, DEVICES)
        ok = True
        for device in DEVICES:
            with client.acquire(region.name, device) as lease:
                ok &= bool(np.array_equal(np.asarray(lease.array), region.array))
        with lock:
            state.update(client=client, region=region, array=region.array)
        print(f"resynced {n} {'ok' if ok else 'bad'}", flush=True)

    register(0)

    def writer() -> None:
        stores = 0
        while True:
            if paused.is_set():
                time.sleep(0.001)
                continue
            with lock:
                array = state["array"]
            array[int(rng.integers(NPAGES)) * PAGE_SIZE + 8] = stores & 0xFF  # type: ignore[index]
            stores += 1
            status[1] = time.monotonic()
            status[0] = stores

    threading.Thread(target=writer, daemon=True).start()
    n = 0
    while True:
        try:
            with lock:
                client, region = state["client"], state["region"]
            client.sync(region.name)  # type: ignore[attr-defined]
            time.sleep(0.002)
        except DevrepError:
            # The service is gone: reconnect to its successor and register again.
            n += 1
            paused.set()
            try:
                register(n)
            finally:
                paused.clear()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
