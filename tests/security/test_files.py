"""Issue 10 items 1-3: a uid-65534 attacker gets no file through the root server that it could not open itself.

Attacks (``_attacks_files.py``) run as uid/gid 65534 against a real root ``devrep serve``; the victim's secrets
are root-owned files, files under a root-only directory, and another session's memfd region.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import devrep.client

from ._harness import ATTACKER_GID, ATTACKER_UID, RootServer, attacker_dir, root_server, run_as_attacker

ATTACKS = Path(__file__).with_name("_attacks_files.py")
SECRET = "TOP-SECRET-ROOT-ONLY"
HIDDEN = "HIDDEN-BEHIND-A-0700-DIRECTORY"
OWN = "attacker-own-bytes"
VICTIM = "VICTIM-SESSION-MEMFD"
REFUSED = {"INVALID_ARGUMENT", "PERMISSION_DENIED", "NOT_FOUND"}


class Scene:
    def __init__(self, server: RootServer) -> None:
        self.server = server
        self.root_dir = Path(tempfile.mkdtemp(prefix="drsec-root-"))
        self.root_dir.chmod(0o755)
        self.secret = self.root_dir / "secret"
        self.secret.write_text(SECRET)
        self.secret.chmod(0o600)
        closed = self.root_dir / "closed"
        closed.mkdir(mode=0o700)
        self.hidden = closed / "world-readable"
        self.hidden.write_text(HIDDEN)
        self.hidden.chmod(0o644)
        self.att = attacker_dir()
        self.own = self.att / "own"
        self.own.write_text(OWN)
        os.chown(self.own, ATTACKER_UID, ATTACKER_GID)
        for name, target in (("to-secret", self.secret), ("to-hidden", self.hidden), ("to-zero", "/dev/zero")):
            os.symlink(target, self.att / name)

    def cleanup(self) -> None:
        subprocess.run(["rm", "-rf", str(self.root_dir), str(self.att)], check=False)


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    with root_server() as server:
        s = Scene(server)
        # another (root) session's private memory: the attacker must never reach this memfd
        with devrep.client.connect(server.address, label="victim") as victim:
            region = victim.create_region("victim/secret", 1 << 16)
            region.array[: len(VICTIM)] = memoryview(VICTIM.encode())
            victim.replicate("victim/secret", ["cpu:0"])
            try:
                yield s
            finally:
                s.cleanup()


def _no_leak(results: dict[str, dict[str, Any]]) -> None:
    for what, got in results.items():
        content = got.get("content", "")
        assert not any(secret in content for secret in (SECRET, HIDDEN, VICTIM)), f"{what} leaked: {got}"


def _refused(results: dict[str, dict[str, Any]], expected: set[str] = REFUSED) -> None:
    _no_leak(results)
    for what, got in results.items():
        assert got.get("code") in expected, f"{what}: expected a refusal in {sorted(expected)}, got {got}"


def test_path_route_opens_with_the_callers_rights(scene: Scene) -> None:
    """Positive control first: the attacker's own file and a world-readable file register by path alone."""
    got = run_as_attacker(ATTACKS, "register_paths", scene.server.address, [str(scene.own), "/etc/hostname"])
    assert got[str(scene.own)].get("content", "").startswith(OWN), got
    assert got["/etc/hostname"].get("content") == Path("/etc/hostname").read_text()[:64], got


def test_unreadable_files_and_unsearchable_directories_are_refused(scene: Scene) -> None:
    """Item 1 (a root-only file, directly or through the attacker's symlink) and item 2 (a world-readable file
    under a 0700 root directory)."""
    paths = [str(scene.secret), str(scene.hidden), str(scene.att / "to-secret"), str(scene.att / "to-hidden")]
    got = run_as_attacker(ATTACKS, "register_paths", scene.server.address, paths)
    _refused(got, {"PERMISSION_DENIED"})
    assert scene.server.alive()


def test_special_files_are_refused_before_any_blocking_open(scene: Scene) -> None:
    special = run_as_attacker(ATTACKS, "make_fifo_and_socket", str(scene.att))
    paths = [*special, "/dev/zero", "/dev/null", str(scene.att / "to-zero"), "/tmp", str(scene.att),
             "/sys/kernel/mm/transparent_hugepage/enabled", "/proc/version"]
    got = run_as_attacker(ATTACKS, "register_paths", scene.server.address, paths)
    _refused(got, {"INVALID_ARGUMENT"})


def test_fifo_paths_cannot_exhaust_the_workers(scene: Scene) -> None:
    """40 concurrent FIFO registrations (more than the 32 gRPC workers) all get an answer; the service lives."""
    fifo = scene.att / "flood-fifo"
    os.mkfifo(fifo)
    os.chown(fifo, ATTACKER_UID, ATTACKER_GID)
    got = run_as_attacker(ATTACKS, "fifo_flood", scene.server.address, str(fifo), 40, timeout=120)
    print(got)
    assert got == {"codes": ["INVALID_ARGUMENT"], "answered": 40, "hung": 0, "ping": True}


def test_fd_route_accepts_only_a_real_read_fd_of_a_data_file(scene: Scene) -> None:
    got = run_as_attacker(ATTACKS, "register_fds", scene.server.address, str(scene.secret), str(scene.own))
    print(got)
    own = got.pop("own_rdonly")
    assert own.get("content", "").startswith(OWN), own
    got = {k: v for k, v in got.items() if v.get("code") != "SKIPPED-OPEN"}
    assert {"secret_o_path", "own_o_path", "own_write_only", "memfd", "memfd_ticket_as_file",
            "proc_self_status", "dev_zero", "directory"} <= set(got), got
    _refused(got, {"INVALID_ARGUMENT"})


def test_other_sessions_memory_is_unreachable_through_proc(scene: Scene) -> None:
    """Item 3: /proc/self/fd/N (self is the server when it resolves the path), /proc/<server>/fd/N, the
    attacker's own memfd by /proc/<pid>/fd and map_files, and symlinks to each: none registers."""
    got = run_as_attacker(ATTACKS, "proc_paths", scene.server.address, scene.server.pid, str(scene.att))
    assert len(got) > 80, got
    _refused(got)
    assert scene.server.alive()


def test_symlink_flip_race_never_yields_the_secret(scene: Scene) -> None:
    """The stat-then-open race: a symlink flipping between the attacker's file and a root-only one. Every
    registration either reads the attacker's own bytes or is refused."""
    link = str(scene.att / "flip")
    got = run_as_attacker(ATTACKS, "flip_race", scene.server.address, link, str(scene.own), str(scene.secret),
                          4.0, timeout=120)
    print(got)
    assert got["attempts"] >= 1 and got["flips"] >= 1, got
    assert all(key.startswith(OWN[:16]) for key in got["contents"]), got
    assert set(got["codes"]) <= {"PERMISSION_DENIED", "INVALID_ARGUMENT", "NOT_FOUND"}, got
