"""Issue 10 item 4: labels are not identities. A label chosen in ``hello`` is namespaced by the peer's uid
(``uid:<uid>/<label>``), so saying hello with a label someone shared with grants nothing; only operator-set token
labels are bare."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

import devrep.client

from ._harness import ATTACKER_UID, RootServer, root_server, run_as_attacker

ATTACKS = Path(__file__).with_name("_attacks_limits.py")


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[tuple[RootServer, str]]:
    tokens = tmp_path / "tokens"
    tokens.mkdir(mode=0o700)
    token = secrets.token_urlsafe(32)
    (tokens / "trainer").write_text(token)  # the operator's label "trainer"
    with root_server("--token-dir", str(tokens)) as srv:
        yield srv, token


def test_hello_label_does_not_match_a_share(token_server: tuple[RootServer, str]) -> None:
    server, token = token_server
    with devrep.client.connect(server.address, label="owner") as owner:
        assert owner.label == f"uid:{os.getuid()}/owner"
        for name, grantee in {"for-trainer": "label:trainer", "for-root-job": f"label:uid:{os.getuid()}/job",
                              "for-nobody-job": f"label:uid:{ATTACKER_UID}/job"}.items():
            region = owner.create_region(name, 4096)
            region.array[:] = 1
            owner.replicate(name, ["cpu:0"])
            owner.share(name, grantee)
        names = ["for-trainer", "for-root-job", "for-nobody-job"]

        # The attacker claims the operator's label, and a label dressed as another uid's namespace.
        for label in ("trainer", f"uid:{os.getuid()}/job", "job"):
            got = run_as_attacker(ATTACKS, "label_squat", server.address, label, names)
            print(got)
            assert got["label"] == f"uid:{ATTACKER_UID}/{label}", got
            expected_visible = ["for-nobody-job"] if label == "job" else []  # its own namespace: shared with it
            assert got["listed"] == expected_visible, got
            for name in names:
                assert got["codes"][name] == ("OK" if name in expected_visible else "NOT_FOUND"), (label, got)

        # The operator's token really carries the label (so the refusal above is the label check at work).
        got = run_as_attacker(ATTACKS, "label_squat", server.address, "whatever", names, token)
        print(got)
        assert got["label"] == "trainer" and got["listed"] == ["for-trainer"], got
        assert got["codes"]["for-trainer"] == "OK", got
