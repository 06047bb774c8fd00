"""issue 11 item 5: an ended session's memory leaves the server at once, not when Python's cyclic GC runs.

The server is a real ``devrep serve`` process whose cyclic garbage collector is switched off before it starts (by
this test's launcher, not by any devrep option): whatever it frees, it frees by reference counting or explicit
closes, so a reference cycle left on the way would keep the memory mapped for good and fail the test.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from _devrep_service import client_process, read_line, short_tmpdir
from _support import child_argv

from devrep.client import connect
from devrep.demo import stop_server

MIB = 1 << 20
REGION = 256 * MIB
WAIT = 30.0
SLACK_KIB = 8 * 1024  # shared memory the server may legitimately hold besides our regions (none expected)

pytestmark = pytest.mark.timeout(300)  # a server start, a 256 MiB client, bounded waits


@contextmanager
def gc_off_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with short_tmpdir() as tmp:
        sock = tmp / "devrep.sock"
        log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(child_argv("serve_without_gc", "serve", "--socket", str(sock)),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not (sock.exists() and sock.with_name("devrep.fd.sock").exists()):
                assert proc.poll() is None, (tmp / "server.log").read_text()
                assert time.monotonic() < deadline, "devrep serve did not start"
                time.sleep(0.05)
            yield f"unix:{sock}", proc
        finally:
            stop_server(proc)
            log.close()


def shmem_kib(pid: int) -> int:
    match = re.search(r"^RssShmem:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match is not None
    return int(match.group(1))


def memfd_mappings(pid: int) -> list[str]:
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "memfd:" in line]


def wait_for_baseline(pid: int, base_kib: int, base_maps: int, what: str) -> None:
    """Bounded wait (the session's teardown runs on the server's side-channel thread after the client goes)."""
    deadline = time.monotonic() + WAIT
    while True:
        kib, maps = shmem_kib(pid), memfd_mappings(pid)
        if kib <= base_kib + SLACK_KIB and len(maps) <= base_maps:
            print(f"{what}: RssShmem {kib} kB (baseline {base_kib} kB), {len(maps)} memfd mappings "
                  f"(baseline {base_maps}) after {WAIT - (deadline - time.monotonic()):.2f}s")
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: expected RssShmem <= {base_kib + SLACK_KIB} kB and <= {base_maps} memfd mappings within "
                f"{WAIT}s, got {kib} kB and {len(maps)}:\n" + "\n".join(maps))
        time.sleep(0.1)


@pytest.mark.parametrize(("ending", "tracking"), [("exit", "explicit"), ("kill", "explicit"), ("close", "explicit"),
                                                  ("exit", "sync"), ("kill", "async")])
def test_server_frees_an_ended_sessions_memory_at_once(ending: str, tracking: str) -> None:
    with gc_off_server() as (address, server):
        with connect(address) as warm:  # the server's first session: lazily created state settles
            warm.ping()
        base_kib, base_maps = shmem_kib(server.pid), len(memfd_mappings(server.pid))
        client = client_process("memory_client", address, str(REGION), ending, tracking)
        try:
            assert read_line(client, 120) == "ready"
            held_kib = shmem_kib(server.pid)
            print(f"held: RssShmem {held_kib} kB, {len(memfd_mappings(server.pid))} memfd mappings")
            # 2 regions + 2 replicas each, all touched: the server maps at least the 4 replicas.
            assert held_kib >= base_kib + 4 * REGION // 1024, f"server holds {held_kib} kB (baseline {base_kib})"
            if ending == "exit":
                client.stdin.close()  # type: ignore[union-attr]
                assert client.wait(60) == 0, client.stderr.read() if client.stderr else ""
            elif ending == "kill":
                client.kill()
                client.wait(60)
            else:
                client.stdin.write("\n")  # type: ignore[union-attr]
                client.stdin.flush()  # type: ignore[union-attr]
                assert read_line(client, 60) == "closed"
            wait_for_baseline(server.pid, base_kib, base_maps, f"after the client's {ending}")
        finally:
            client.kill()
            client.wait(30)
        assert server.poll() is None


def test_unregister_frees_at_once() -> None:
    """The same for one region unregistered while its session goes on."""
    with gc_off_server() as (address, server), connect(address) as client:
        client.ping()
        base_kib, base_maps = shmem_kib(server.pid), len(memfd_mappings(server.pid))
        region = client.create_region("one", REGION)
        region.array[:] = np.uint8(3)
        client.replicate("one", ["cpu:0"])
        with client.acquire("one", "cpu:0") as lease:
            assert int(lease.array[-1]) == 3
        assert shmem_kib(server.pid) >= base_kib + REGION // 1024
        client.unregister("one")
        wait_for_baseline(server.pid, base_kib, base_maps, "after unregister")


def test_file_region_unmapped_at_once() -> None:
    """A file region (file tracking: an inotify watcher thread) leaves no mapping of the file and no replica."""
    with short_tmpdir() as tmp, gc_off_server() as (address, server), connect(address) as client:
        path = tmp / "weights.bin"
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 64 * MIB, dtype=np.uint8).tobytes())
        client.ping()
        base_kib, base_maps = shmem_kib(server.pid), len(memfd_mappings(server.pid))
        client.register_file("w", path, tracking="file")
        client.replicate("w", ["cpu:0"])
        with client.acquire("w", "cpu:0") as lease:
            assert lease.array[:16].tobytes() == path.read_bytes()[:16]

        def file_maps() -> int:
            return Path(f"/proc/{server.pid}/maps").read_text().count(str(path))

        assert file_maps() >= 1
        client.unregister("w")
        wait_for_baseline(server.pid, base_kib, base_maps, "after unregistering a file region")
        deadline = time.monotonic() + WAIT
        while file_maps() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert file_maps() == 0, f"the server still maps {path}"
