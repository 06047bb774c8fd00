"""End to end: a real ``devrep serve`` process on a temporary Unix socket and real clients in other processes."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from _devrep_service import client_process, read_line, server_process, tell

from devrep.client import connect
from devrep.tracking import TRACKERS, _register_kernel_trackers

pytestmark = pytest.mark.timeout(90)

def _need(mode: str) -> None:
    _register_kernel_trackers()
    if mode not in TRACKERS:
        pytest.fail(f"tracking mode {mode!r} is not installed")


@pytest.mark.parametrize("mode", ["explicit", "sync", "async"])
def test_replicate_acquire_watch_across_processes(mode: str) -> None:
    _need(mode)
    with server_process() as (address, _server):
        owner = client_process("e2e_owner", address, mode)
        try:
            assert read_line(owner) == "READY"
            with connect(address, label="reader") as reader:
                [desc] = reader.list_regions()
                assert desc.name == "e2e/t" and desc.read_only and desc.tracking == mode
                with reader.acquire("e2e/t", "cpu:1") as lease:
                    assert lease.array.flags.writeable is False
                    assert int(lease.array.min()) == 1 and lease.array.size == 1 << 20
                    gen0 = lease.generation
                stream = reader.watch("e2e/t", coalesce_ms=1)
                events = iter(stream)
                tell(owner, "write 7 9")
                assert read_line(owner) == "WROTE"
                # async mode reports writes when the region is next consulted; a fresh acquire does that
                with reader.acquire("e2e/t", "cpu:1") as lease:
                    assert int(lease.array[7 * 4096]) == 9 and int(lease.array[8 * 4096]) == 1
                    assert lease.generation > gen0
                    assert np.array_equal(np.asarray(lease.invalid_runs), np.empty((0, 2)))
                seen = next(e for e in events if e.kind == "invalidate")
                assert seen.region == "e2e/t" and seen.runs.tolist() == [[7, 1]]
                stream.cancel()
                # read-only: the reader may not change the owner's region
                with pytest.raises(Exception, match="read-only"):
                    reader.invalidate("e2e/t", 0, 4096)
                assert all(r.mismatched_pages == 0 for r in reader.verify("e2e/t", resync=False))
        finally:
            owner.kill()
            owner.wait(10)


def test_client_killed_minus_9_has_everything_freed_within_1s() -> None:
    with server_process() as (address, _server), connect(address, label="observer") as observer:
        owner = client_process("e2e_owner", address, "explicit")
        try:
            assert read_line(owner) == "READY"
            tell(owner, "hold")
            assert read_line(owner).startswith("HOLDING")
            info = observer.stats()
            assert (info.sessions, info.regions, info.leases) == (2, 1, 1)
            owner.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            while True:
                info = observer.stats()
                if (info.sessions, info.regions, info.leases, info.host_bytes) == (1, 0, 0, 0):
                    break
                assert time.monotonic() - t0 < 1.0, f"not freed after 1 s: {info}"
                time.sleep(0.01)
        finally:
            owner.kill()
            owner.wait(10)


def test_sigterm_releases_every_write_protection_and_exits_cleanly() -> None:
    _need("sync")
    with server_process() as (address, server):
        owner = client_process("e2e_owner", address, "sync")
        try:
            assert read_line(owner) == "READY"
            tell(owner, "hold")  # a lease and a watch stream open while the server shuts down
            assert read_line(owner).startswith("HOLDING")
            server.send_signal(signal.SIGTERM)
            assert server.wait(15) == 0
            # Every page was write-protected by the (now gone) server: writing all of them must not block.
            tell(owner, "writeall 5")
            assert read_line(owner, timeout=15) == "WROTEALL"
        finally:
            owner.kill()
            owner.wait(10)
