"""R6: session quotas and device-memory exhaustion give RESOURCE_EXHAUSTED while other clients keep working.

(The service's own tests cover the quota arithmetic; this adds a full device, a sync that needs a second
buffer on a full device, and a neighbour client whose every call must keep succeeding throughout.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import devrep
import devrep.client
from devrep._pages import PAGE_SIZE

from .conftest import ServerProcess

MiB = 1 << 20


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[ServerProcess]:
    # cpu:0 and cpu:1 hold 2 MiB each; a session may hold 3 MiB of replicas and 4 regions.
    server = ServerProcess(tmp_path, "--devices", "2", "--capacity", str(2 * MiB), "--max-bytes", str(3 * MiB),
                           "--max-regions", "4")
    try:
        yield server
    finally:
        server.stop()


class Neighbour:
    """A client doing ordinary work in a loop; every call must succeed."""

    def __init__(self, address: str) -> None:
        self.client = devrep.client.connect(address, label="neighbour")
        self.region = self.client.create_region("neighbour", 64 * PAGE_SIZE)
        self.region.array[:] = 1
        self.client.replicate("neighbour", ["cpu:1"])
        self.calls = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                page = n % 64
                self.region.array[page * PAGE_SIZE] = n & 0xFF
                self.client.invalidate("neighbour", page * PAGE_SIZE, PAGE_SIZE)
                with self.client.acquire("neighbour", "cpu:1") as lease:
                    if int(lease.array[page * PAGE_SIZE]) != n & 0xFF:
                        self.errors.append(f"call {n}: stale read")
                self.client.describe("neighbour")
                self.calls += 1
            except Exception as exc:
                self.errors.append(f"call {n}: {type(exc).__name__}: {exc}")

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()


def test_r6_exhaustion_is_resource_exhausted_and_isolated(small_server: ServerProcess) -> None:
    neighbour = Neighbour(small_server.address)
    try:
        with devrep.client.connect(small_server.address, label="hog") as hog:
            # Device memory: cpu:0 holds 2 MiB; the hog's quota (3 MiB) is not what stops it.
            big = hog.create_region("big", int(1.5 * MiB))
            big.array[:] = 7
            hog.replicate("big", ["cpu:0"])
            hog.create_region("more", MiB)
            with pytest.raises(devrep.ResourceExhaustedError, match="cpu:0 is full"):
                hog.replicate("more", ["cpu:0"])
            assert [r.device for r in hog.describe("more").replicas] == []  # nothing half-made

            # A sync that needs a second buffer (the first is leased) on the full device: no room for a spare,
            # so it waits for the reader, bounded by its timeout, then RESOURCE_EXHAUSTED; it never writes the
            # leased buffer.
            with hog.acquire("big", "cpu:0") as lease:
                big.array[0] = 8
                hog.invalidate("big", 0, PAGE_SIZE)
                with pytest.raises(devrep.ResourceExhaustedError, match="no room"):
                    hog.sync("big", timeout=0.5)
                assert int(lease.array[0]) == 7
            with hog.acquire("big", "cpu:0") as lease:  # once released, the one buffer is brought up to date
                assert int(lease.array[0]) == 8

            # The session quota: 1.5 MiB on cpu:0 + 1.5 MiB on cpu:1 is exactly 3 MiB; one more page is not.
            hog.replicate("big", ["cpu:1"])
            with pytest.raises(devrep.ResourceExhaustedError, match="quota"):
                hog.replicate("more", ["cpu:1"])
            hog.create_region("c", PAGE_SIZE)
            hog.create_region("d", PAGE_SIZE)
            with pytest.raises(devrep.ResourceExhaustedError, match="limit 4"):
                hog.create_region("e", PAGE_SIZE)
            assert hog.ping()
        # The hog's session ended: its device memory is free for others.
        with devrep.client.connect(small_server.address, label="next") as nxt:
            nxt.create_region("next", int(1.5 * MiB))
            nxt.replicate("next", ["cpu:0"])
            with nxt.acquire("next", "cpu:0") as lease:
                assert not np.asarray(lease.array).any()
    finally:
        neighbour.finish()
    assert not neighbour.errors, neighbour.errors[:10]
    assert neighbour.calls > 10
