"""The attack harness really attacks: the attacker is uid/gid 65534 and reaches the root server."""

from __future__ import annotations

from pathlib import Path

from ._harness import ATTACKER_GID, ATTACKER_UID, RootServer, run_as_attacker

ATTACKS = Path(__file__).with_name("_attacks_harness.py")


def test_attacker_holds_no_root_id() -> None:
    ids = run_as_attacker(ATTACKS, "whoami")
    assert ids == {"uids": [ATTACKER_UID] * 3, "gids": [ATTACKER_GID] * 3, "groups": [ATTACKER_GID]}


def test_attacker_reaches_the_root_server(server: RootServer) -> None:
    assert run_as_attacker(ATTACKS, "ping", server.address)
    assert server.alive()
