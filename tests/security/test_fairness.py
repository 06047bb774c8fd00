"""Issue 10 item 6: fair sharing. One unprivileged client (uid 65534, any number of sessions) cannot take all the
gRPC workers, side-channel slots, Watch streams or fds of a root server, nor pass its replica quota with
concurrent calls; a victim client is still served, within a bounded wait, while the attack is under way."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _support import proc_fds

import devrep.client
from devrep.service.sidechannel import HELLO_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_UID

from ._attacks_limits import _mark, _wait_mark
from ._harness import RootServer, attacker_dir, root_server, run_as_attacker

ATTACKS = Path(__file__).with_name("_attacks_limits.py")
VICTIM_WAIT = 20.0
"""Seconds the victim may wait for each call while the attacker holds what it can (generous: load 10)."""


class Attack:
    """``run_as_attacker`` in a background thread; ``result()`` joins it. An argument ``"MARKS"`` becomes the
    directory through which the attacker and the test signal each other (``holding``, ``release``)."""

    def __init__(self, function: str, *args: Any, timeout: float = 120.0) -> None:
        self.marks = attacker_dir()
        args = tuple(str(self.marks) if a == "MARKS" else a for a in args)
        self._result: list[Any] = []
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                self._result.append(run_as_attacker(ATTACKS, function, *args, timeout=timeout))
            except BaseException as exc:
                self._error.append(exc)

        self._thread = threading.Thread(target=run, daemon=True)

    def start(self) -> Attack:
        self._thread.start()
        return self

    def wait_holding(self) -> None:
        for _ in range(90 * 10):
            if _wait_mark(str(self.marks), "holding", 0.1):
                return
            if not self._thread.is_alive():
                break
        raise AssertionError(f"attacker never got going: {self._error}")

    def result(self) -> Any:
        _mark(str(self.marks), "release")
        self._thread.join(150)
        if self._error:
            raise self._error[0]
        return self._result[0]


def victim_served(server: RootServer, extra: Callable[[Any], None] | None = None) -> None:
    """A new client (its own session) connects, registers, replicates and reads, each call bounded."""
    with devrep.client.connect(server.address, label="victim", timeout=VICTIM_WAIT) as victim:
        assert victim.ping()
        region = victim.create_region("victim", 1 << 16)
        region.array[:] = 9
        victim.replicate("victim", ["cpu:1"], timeout=VICTIM_WAIT)
        with victim.acquire("victim", "cpu:1", timeout=VICTIM_WAIT) as lease:
            assert int(lease.array[0]) == 9
        if extra is not None:
            extra(victim)


def test_long_syncs_cannot_take_every_worker(server: RootServer) -> None:
    # 4 sessions x 12 threads, each Sync waiting 30 s, against 32 workers.
    attack = Attack("long_syncs", server.address, "MARKS", 4, 12, 30.0).start()
    attack.wait_holding()
    victim_served(server)
    finished_early = (attack.marks / "first-done").exists()
    got = attack.result()
    print(got)
    assert not finished_early, "the attacker's waiting syncs ended before the victim was served: not a fair test"
    codes = got["codes"]
    assert codes.get("RESOURCE_EXHAUSTED", 0) >= 48 - 8, codes
    assert codes.get("DEADLINE_EXCEEDED", 0) <= 8, codes
    assert "INTERNAL" not in codes and "UNKNOWN" not in codes, codes


def test_side_channel_slots_are_capped_per_uid(server: RootServer) -> None:
    attack = Attack("side_channel_flood", str(server.fd_socket), MAX_CONNECTIONS + 44, "MARKS",
                    MAX_CONNECTIONS_PER_UID).start()
    attack.wait_holding()
    victim_served(server)
    got = attack.result()
    print(got)
    assert got["held"] <= MAX_CONNECTIONS_PER_UID, got


def test_hello_deadline_is_absolute(server: RootServer) -> None:
    # Bad packets every second: each used to restart the 5 s timeout, so the connection (a thread) lived forever.
    got = run_as_attacker(ATTACKS, "hello_stalling", str(server.fd_socket), {"op": "nope"}, 1.0, 4 * HELLO_TIMEOUT)
    print(got)
    assert got["cut_after"] is not None, f"never cut within {4 * HELLO_TIMEOUT} s: {got}"
    assert set(got["codes"]) <= {"UNAUTHENTICATED"}, got


def test_require_token_cuts_tokenless_clients() -> None:
    with root_server("--require-token") as srv:
        got = run_as_attacker(ATTACKS, "hello_stalling", str(srv.fd_socket), {"op": "hello", "label": "x"}, 1.0,
                              4 * HELLO_TIMEOUT)
    print(got)
    assert got["cut_after"] is not None and not got.get("session"), got
    assert set(got["codes"]) <= {"UNAUTHENTICATED"}, got


def test_watch_streams_are_capped_per_uid(server: RootServer) -> None:
    attack = Attack("watch_flood", server.address, "MARKS", 3, 8, 8).start()
    attack.wait_holding()

    def watch(victim: Any) -> None:
        stream = victim.watch("victim", coalesce_ms=1)
        try:
            victim.invalidate("victim", 0, 4096)
            event = next(iter(stream))
            assert event.region == "victim" and event.kind == "invalidate", event
        finally:
            stream.cancel()

    victim_served(server, watch)
    got = attack.result()
    print(got)
    assert got["opened"] == 24 and got["held"] <= 8, got


def test_fd_budget_per_session() -> None:
    with root_server("--quota-fds", "24") as srv:
        before = proc_fds(srv.pid)
        got = run_as_attacker(ATTACKS, "fd_hoard", srv.address, 100)
        after = proc_fds(srv.pid)
        print(got, f"server fds {before} -> {after}")
        assert got["registered"] == 24 and got["code"] == "RESOURCE_EXHAUSTED", got
        assert "file descriptors" in got["message"], got
        assert got["after unregister"] == "OK", got
        victim_served(srv)


def test_concurrent_replicates_respect_the_quota() -> None:
    quota = 64 << 20
    with root_server("--quota-bytes", str(quota)) as srv:
        got = run_as_attacker(ATTACKS, "concurrent_replicates", srv.address, 4, 48 << 20)
        print(got)
        assert got["max_bytes"] == quota
        assert got["used_bytes"] <= quota, got
        assert got["codes"] == ["OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"], got
        victim_served(srv)
