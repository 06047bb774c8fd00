"""Issue 10 item 8 (Watch part): revocation is complete. After ``ShareRegion(..., revoke=True)`` a grantee's Watch
streams stop delivering that region's events at once (the stream stays open: other regions may still be
visible to it); after its token's removal its streams end with UNAUTHENTICATED."""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import devrep.client
from devrep._pages import PAGE_SIZE

from ._attacks_limits import _mark, _wait_mark
from ._harness import ATTACKER_UID, RootServer, attacker_dir, root_server, run_as_attacker

ATTACKS = Path(__file__).with_name("_attacks_limits.py")
SECRET_PAGE = 7
"""Only written after the revocation: an event naming it reached someone who had lost access."""


class Watching:
    """The attacker's ``watch_until`` in a background thread."""

    def __init__(self, address: str, names: list[str], token: str | None = None) -> None:
        self.marks = attacker_dir()
        self.out: list[Any] = []
        self.err: list[BaseException] = []

        def run() -> None:
            try:
                self.out.append(run_as_attacker(ATTACKS, "watch_until", address, str(self.marks), names, token,
                                                timeout=150))
            except BaseException as exc:
                self.err.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self, mark: str, action: Any = None, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not _wait_mark(str(self.marks), mark, 0.1):
            assert time.monotonic() < deadline and self.thread.is_alive(), f"no {mark!r}: {self.err}"
            if action is not None:
                action()

    def result(self) -> dict[str, Any]:
        _mark(str(self.marks), "release")
        self.thread.join(120)
        if self.err:
            raise self.err[0]
        result: dict[str, Any] = self.out[0]
        return result


def secret_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def touches(runs: list[int]) -> bool:
        return any(first <= SECRET_PAGE < first + count for first, count in zip(runs[::2], runs[1::2], strict=True))

    return [e for e in events if touches(e["runs"])]


def write_then_settle(owner: Any, name: str) -> None:
    """Write the secret page repeatedly, and sync, so any leaking stream would have events to carry."""
    for _ in range(20):
        owner.invalidate(name, SECRET_PAGE * PAGE_SIZE, PAGE_SIZE)
    owner.sync(name)
    time.sleep(1.0)  # a leaking stream (coalescing 1 ms) would have delivered by now


@pytest.mark.parametrize("named", [True, False], ids=["named", "all-visible"])
def test_revoked_share_stops_watch_delivery(server: RootServer, named: bool) -> None:
    with devrep.client.connect(server.address, label="owner") as owner:
        owner.create_region("shared", 16 * PAGE_SIZE)
        owner.replicate("shared", ["cpu:0"])
        owner.share("shared", f"uid:{ATTACKER_UID}")
        watching = Watching(server.address, ["shared"] if named else [])
        watching.wait("watching")
        watching.wait("got-event", lambda: owner.invalidate("shared", 0, PAGE_SIZE))  # delivery works
        owner.share("shared", f"uid:{ATTACKER_UID}", revoke=True)
        write_then_settle(owner, "shared")
        got = watching.result()
    print({"events": len(got["events"]), "end": got["end"], "secret": secret_events(got["events"])[:3]})
    assert got["events"], "the grantee never saw an event before the revocation: not a fair test"
    assert secret_events(got["events"]) == [], "events reached the grantee after the revocation"
    assert got["end"] is None  # documented: the stream stays open, delivering nothing of that region


def test_removed_token_ends_watch_streams(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir(mode=0o700)
    token = secrets.token_urlsafe(32)
    (tokens / "pod").write_text(token)
    with root_server("--token-dir", str(tokens)) as srv, \
            devrep.client.connect(srv.address, label="owner") as owner:
        owner.create_region("shared", 16 * PAGE_SIZE)
        owner.replicate("shared", ["cpu:0"])
        owner.share("shared", "label:pod")
        watching = Watching(srv.address, ["shared"], token)
        watching.wait("watching")
        watching.wait("got-event", lambda: owner.invalidate("shared", 0, PAGE_SIZE))
        (tokens / "pod").unlink()
        watching.wait("ended", lambda: owner.invalidate("shared", 0, PAGE_SIZE), timeout=30)
        write_then_settle(owner, "shared")
        got = watching.result()
    print({"events": len(got["events"]), "end": got["end"]})
    assert got["end"] == "UNAUTHENTICATED", got["end"]
    assert secret_events(got["events"]) == [], "events reached the grantee after its token was removed"


def test_region_names_reveal_nothing(server: RootServer) -> None:
    """``ALREADY_EXISTS`` vs ``NOT_FOUND`` must not reveal another session's private names: each session has its
    own namespace, so registering a name someone else holds privately succeeds exactly like a free name."""
    with devrep.client.connect(server.address, label="owner") as owner, \
            devrep.client.connect(server.address, label="other") as other:
        secret = owner.create_region("secret-model", 4096)
        secret.array[:] = 5
        owner.replicate("secret-model", ["cpu:0"])
        owner.create_region("public-model", 4096)
        owner.share("public-model", "*")
        for who in (owner, other):  # two owners share the same name with everyone: ambiguous for a grantee
            who.create_region("dup", 4096)
            who.share("dup", "*")
        got = run_as_attacker(ATTACKS, "name_probe", server.address, ["secret-model", "never-existed",
                                                                      "public-model"])
        print(got)
        assert got["secret-model"] == got["never-existed"], got
        assert got["secret-model"] == {"describe": "NOT_FOUND", "register": "OK", "again": "ALREADY_EXISTS",
                                       "then": "own"}, got
        # A shared name is visible before; once the attacker has its own, its own comes first.
        assert got["public-model"] == {"describe": "OK", "register": "OK", "again": "ALREADY_EXISTS",
                                       "then": "own"}, got
        assert got["dup"] == "FAILED_PRECONDITION", got
        assert got["listed"] == ["dup", "dup", "never-existed", "public-model", "public-model", "secret-model"], got
        # The owner's regions are untouched.
        with owner.acquire("secret-model", "cpu:0") as lease:
            assert int(lease.array[0]) == 5
        assert not owner.describe("public-model").read_only
