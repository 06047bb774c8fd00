"""issue 11 item 3: one server per socket. Real ``devrep serve`` processes on one socket path: the second refuses
(exit 1, "socket X in use by pid N"), a crashed server's leftover socket is replaced, and a server removes only the
socket files it created."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _devrep_service import short_tmpdir

import devrep
from devrep.client import connect
from devrep.demo import server_process
from devrep.service.sockets import SocketInUseError, claim

START = 120.0

pytestmark = pytest.mark.timeout(300)  # several real server processes per test


def serve(sock: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "devrep.cli", "serve", "--socket", str(sock), *extra],
                          capture_output=True, text=True, timeout=START)


def ping(address: str) -> str:
    with connect(address, timeout=30) as client:
        return client.ping()


def test_second_server_refuses_a_live_socket() -> None:
    with short_tmpdir() as tmp, server_process(tmp) as (address, first):
        sock = tmp / "devrep.sock"
        before = {p: os.stat(p).st_ino for p in (sock, tmp / "devrep.fd.sock")}
        second = serve(sock)
        print(second.stderr)
        assert second.returncode == 1, f"expected exit 1, got {second.returncode}: {second.stderr}"
        assert f"socket {sock} in use by pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert {p: os.stat(p).st_ino for p in before} == before, "the live server's socket files were replaced"
        assert ping(address)  # the first server still serves on them
        # A separate --fd-socket that is live is refused too, even when the gRPC socket is free.
        other = tmp / "other.sock"
        third = serve(other, "--fd-socket", str(tmp / "devrep.fd.sock"))
        assert third.returncode == 1 and f"in use by pid {first.pid}" in third.stderr, third.stderr
        assert not other.exists(), "the refused server left its gRPC socket behind"
        assert ping(address)


def test_stale_socket_of_a_killed_server_is_replaced() -> None:
    with short_tmpdir() as tmp:
        with server_process(tmp) as (_address, first):
            os.killpg(first.pid, signal.SIGKILL)  # no cleanup: its socket files stay behind
            first.wait(30)
        sock = tmp / "devrep.sock"
        assert sock.exists() and (tmp / "devrep.fd.sock").exists()
        # The leftover files exist already, so wait for the new server to answer, not for the files.
        with server_process(tmp) as (address, second):
            deadline = time.monotonic() + START
            while True:
                assert second.poll() is None, (tmp / "server.log").read_text()
                try:
                    assert ping(address)
                    break
                except devrep.DevrepError:
                    assert time.monotonic() < deadline, "the new server never answered"
                    time.sleep(0.1)
            assert second.poll() is None


def test_server_removes_only_the_files_it_created() -> None:
    """Server A's sockets are moved aside (A still serves them) and server B starts on the path. When A stops it
    must leave B's files alone; when B stops it removes its own."""
    with short_tmpdir() as tmp, short_tmpdir() as moved:
        sock, fd_sock = tmp / "devrep.sock", tmp / "devrep.fd.sock"
        with server_process(tmp) as (a_address, a):
            assert ping(a_address)  # serving (the files appear at bind, before the server is up)
            os.rename(sock, moved / "devrep.sock")
            os.rename(fd_sock, moved / "devrep.fd.sock")
            assert ping(f"unix:{moved / 'devrep.sock'}")  # A still serves through the moved files
            with server_process(tmp) as (b_address, b):
                b_files = {p: os.stat(p).st_ino for p in (sock, fd_sock)}
                a.send_signal(signal.SIGTERM)
                assert a.wait(60) == 0
                assert {p: os.stat(p).st_ino for p in b_files} == b_files, "A removed B's socket files"
                assert ping(b_address)
            assert b.returncode == 0
            assert not sock.exists() and not fd_sock.exists(), "B did not remove its own socket files"


def test_claim_refuses_what_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    path.write_text("not a socket")
    with pytest.raises(SocketInUseError, match="is not a socket"):
        claim(path, socket.SOCK_STREAM)
    assert path.read_text() == "not a socket"
