"""``soak``: the file attacks of ``test_files.py`` in a loop against one long-lived root server (``make soak``).

The flip race runs for minutes instead of seconds; the other attacks repeat, and the server must stay up and
leak nothing throughout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from . import test_files as t
from ._harness import root_server, run_as_attacker

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def scene() -> Iterator[t.Scene]:
    with root_server() as server:
        s = t.Scene(server)
        try:
            yield s
        finally:
            s.cleanup()


def test_file_attacks_in_a_loop(scene: t.Scene) -> None:
    fifo = scene.att / "soak-fifo"
    os.mkfifo(fifo)
    for _ in range(20):
        t.test_unreadable_files_and_unsearchable_directories_are_refused(scene)
        t.test_fd_route_accepts_only_a_real_read_fd_of_a_data_file(scene)
        t.test_other_sessions_memory_is_unreachable_through_proc(scene)
        got = run_as_attacker(t.ATTACKS, "fifo_flood", scene.server.address, str(fifo), 40, timeout=120)
        assert got["hung"] == 0 and got["ping"], got
        assert scene.server.alive()


def test_symlink_flip_race_for_minutes(scene: t.Scene) -> None:
    link = str(scene.att / "flip-soak")
    got = run_as_attacker(t.ATTACKS, "flip_race", scene.server.address, link, str(scene.own),
                          str(scene.secret), 240.0, timeout=600)
    print(got)
    assert all(key.startswith(t.OWN[:16]) for key in got["contents"]), got
    assert set(got["codes"]) <= {"PERMISSION_DENIED", "INVALID_ARGUMENT", "NOT_FOUND"}, got
