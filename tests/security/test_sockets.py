"""Issue 10 item 7: nobody else can swap the server's sockets, and the client talks only to a trusted server.

* A server (non-root: ``devrep serve`` as uid 65534 through setpriv; and root) refuses a socket directory that
  another uid owns or that others can write: whoever can write it can replace the sockets with its own and
  receive the victim clients' memfds, writable (the default ``/tmp/devrep-<uid>`` pre-created by another user).
* The client checks who serves the side channel (SO_PEERCRED) before it sends a token or an fd: an impostor
  listener run by uid 65534 gets nothing from a root client, unless that client names uid 65534 as its server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import devrep.client
from devrep import errors

from ._harness import ATTACKER_GID, ATTACKER_UID, ROOT, attacker_dir, root_server, run_as_attacker

ATTACKS = Path(__file__).with_name("_attacks_sockets.py")
OTHER_UID = 4242  # "another local user" that pre-creates the directory


@pytest.fixture
def base() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("socket attack tests need root: they create directories for other uids")
    path = Path(tempfile.mkdtemp(prefix="drsec-sock-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def _serve_as_nobody(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``devrep serve`` as uid/gid 65534 (no groups), like a user running their own server."""
    numba = tempfile.mkdtemp(prefix="drsec-numba-")
    os.chown(numba, ATTACKER_UID, ATTACKER_GID)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "HOME": "/nonexistent",
           "PYTHONDONTWRITEBYTECODE": "1", "NUMBA_CACHE_DIR": numba, **(env_extra or {})}
    return subprocess.Popen(["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_GID}", "--clear-groups",
                             "--", sys.executable, "-m", "devrep.cli", "serve", *args],
                            env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _refused(proc: subprocess.Popen[str], words: str) -> None:
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"devrep serve did not refuse the directory; it ran:\n{out}") from None
    print(out)
    assert proc.returncode != 0, out
    assert words in " ".join(out.split()), f"expected {words!r} in:\n{out}"  # rich wraps long lines


def _serves(proc: subprocess.Popen[str], sock: Path) -> None:
    try:
        deadline = time.monotonic() + 120
        while not (sock.exists() and sock.with_name("devrep.fd.sock").exists()):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "devrep serve did not start within 120 s"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def test_non_root_server_refuses_a_directory_another_user_precreated(base: Path) -> None:
    # the default path: $XDG_RUNTIME_DIR/devrep (or /tmp/devrep-<uid>), pre-created by another user
    xdg = base / "xdg"
    xdg.mkdir(mode=0o755)
    os.chown(xdg, ATTACKER_UID, ATTACKER_GID)
    squatted = xdg / "devrep"
    squatted.mkdir(mode=0o777)
    os.chown(squatted, OTHER_UID, OTHER_UID)
    squatted.chmod(0o777)
    _refused(_serve_as_nobody([], {"XDG_RUNTIME_DIR": str(xdg)}), f"belongs to uid {OTHER_UID}")
    assert not (squatted / "devrep.sock").exists()


def test_non_root_server_refuses_a_directory_others_can_write(base: Path) -> None:
    own = base / "own-but-open"
    own.mkdir()
    os.chown(own, ATTACKER_UID, ATTACKER_GID)
    own.chmod(0o777)
    _refused(_serve_as_nobody(["--socket", str(own / "devrep.sock")]), "writable by its group or others")
    # a parent others can write without the sticky bit lets them rename the whole directory
    parent = base / "open-parent"
    parent.mkdir()
    parent.chmod(0o777)
    child = parent / "child"
    child.mkdir(mode=0o700)
    os.chown(child, ATTACKER_UID, ATTACKER_GID)
    _refused(_serve_as_nobody(["--socket", str(child / "devrep.sock")]), "without the sticky bit")


def test_non_root_server_serves_from_its_own_directory(base: Path) -> None:
    """Positive control: the same server starts in a directory it owns that nobody else can write."""
    own = base / "mine"
    own.mkdir(mode=0o700)
    os.chown(own, ATTACKER_UID, ATTACKER_GID)
    _serves(_serve_as_nobody(["--socket", str(own / "devrep.sock")]), own / "devrep.sock")


def _root_serve_refused(sock: Path, words: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "devrep.cli", "serve", "--socket", str(sock),
                           "--socket-group", str(ATTACKER_GID)],
                          capture_output=True, text=True, timeout=120, check=False)
    out = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    print(out)
    assert proc.returncode != 0 and words in out, out


def test_root_server_refuses_a_directory_a_user_owns(base: Path) -> None:
    """A root server would chmod/chgrp through paths in that directory: the user could aim them anywhere."""
    users = base / "users"
    users.mkdir(mode=0o755)
    os.chown(users, ATTACKER_UID, ATTACKER_GID)
    _root_serve_refused(users / "devrep.sock", f"belongs to uid {ATTACKER_UID}")
    assert not (users / "devrep.sock").exists()


def test_root_server_refuses_a_users_symlink_on_the_way(base: Path) -> None:
    """The target is a fine root directory, but the user's symlink could be re-pointed before the bind."""
    good = base / "root-only"
    good.mkdir(mode=0o755)
    link = base / "via-user-link"
    link.symlink_to(good)
    os.lchown(link, ATTACKER_UID, ATTACKER_GID)
    _root_serve_refused(link / "devrep.sock", f"the symlink {link} belongs to uid {ATTACKER_UID}")


def _impostor(directory: Path) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        result.update(run_as_attacker(ATTACKS, "fake_server", str(directory), 60.0, timeout=120))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (directory / "ready").exists():
        assert thread.is_alive() and time.monotonic() < deadline, f"impostor did not start: {result}"
        time.sleep(0.05)
    return thread, result


def _stop(directory: Path, thread: threading.Thread, result: dict[str, Any]) -> dict[str, Any]:
    (directory / "stop").touch()
    thread.join(90)
    assert not thread.is_alive() and result, "impostor did not finish"
    print(result)
    return result


def test_client_refuses_an_impostor_side_channel() -> None:
    att = attacker_dir()
    try:
        thread, result = _impostor(att)
        with pytest.raises(errors.PermissionDeniedError, match=f"served by uid {ATTACKER_UID}"):
            devrep.client.connect(f"unix:{att / 'devrep.sock'}", token="victim-pre-authorized-token")
        seen = _stop(att, thread, result)
        # it connected (SO_PEERCRED needs a connection) but sent nothing: no hello, no token, no fd
        assert seen["side_connections"] == 1 and seen["packets"] == [] and seen["fds"] == 0, seen
        assert seen["grpc_connections"] == 0, seen
    finally:
        subprocess.run(["rm", "-rf", str(att)], check=False)


def test_client_talks_to_a_uid_it_was_told_to_trust() -> None:
    """Positive control: naming uid 65534 as the server lets the same client through to the impostor."""
    att = attacker_dir()
    try:
        thread, result = _impostor(att)
        with pytest.raises(errors.DevrepError, match="impostor"):
            devrep.client.connect(f"unix:{att / 'devrep.sock'}", server_uid=ATTACKER_UID)
        seen = _stop(att, thread, result)
        assert seen["packets"][:1] == ["hello"], seen
    finally:
        subprocess.run(["rm", "-rf", str(att)], check=False)


def test_client_refuses_an_impostor_grpc_socket() -> None:
    """Without a side channel the token would go over gRPC: the socket file's owner is checked first."""
    att = attacker_dir()
    try:
        thread, result = _impostor(att)
        (att / "devrep.fd.sock").unlink()
        with pytest.raises(errors.PermissionDeniedError, match=f"belongs to uid {ATTACKER_UID}"):
            devrep.client.connect(f"unix:{att / 'devrep.sock'}", token="victim-pre-authorized-token")
        seen = _stop(att, thread, result)
        assert seen["grpc_connections"] == 0 and seen["grpc_bytes"] == 0, seen
    finally:
        subprocess.run(["rm", "-rf", str(att)], check=False)


def test_root_server_sockets_still_reach_their_group() -> None:
    """The root server's sockets (0660, group 65534) in its checked directory: the attacker's group connects."""
    with root_server() as server:
        # once a hello is answered, start() has set the gRPC socket's mode and group (the side channel starts after)
        devrep.client.connect(server.address).close()
        st = os.stat(server.fd_socket)
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, ATTACKER_GID)
        assert os.stat(server.socket).st_gid == ATTACKER_GID
