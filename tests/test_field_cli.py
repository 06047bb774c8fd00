"""issue 11 "Also": ``devrep add`` notices that its server died; ``devrep ls`` has an admin view for root and says
why it shows nothing. Real server and CLI processes."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _devrep_service import client_process, inproc_server, read_line, server_process, tell
from _support import run_cli

from devrep.client import connect
from devrep.errors import PermissionDeniedError
from devrep.service import TokenStore

DEADLINE = 60.0

pytestmark = pytest.mark.timeout(300)  # real server and CLI processes, bounded waits below that


def cli(*args: str, address: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--address", address, timeout=120)


def wait_for_stderr(proc: subprocess.Popen[bytes], needle: str, timeout: float) -> str:
    """Raw reads of the pipe (a buffered readline would hide data from the next select)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"expected {needle!r} on stderr within {timeout}s, got {seen!r}"
        if sel.select(left):
            chunk = os.read(fd, 65536)
            assert chunk, f"stderr closed (exit {proc.poll()}) before {needle!r}: {seen!r}"
            seen += chunk
    return seen.decode(errors="replace")


def test_add_exits_when_its_server_dies(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(1 << 20))
    with server_process() as (address, server):
        add = subprocess.Popen([sys.executable, "-m", "devrep.cli", "add", str(data), "--device", "cpu:0",
                                "--address", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for_stderr(add, "holding the region", 120)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
            try:
                add.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"devrep add still runs {DEADLINE}s after its server was killed") from None
            err = add.stderr.read().decode() if add.stderr else ""
            print(err)
            assert add.returncode == 3, f"expected exit 3 (cannot connect), got {add.returncode}: {err}"
            assert "went away" in err and "Traceback" not in err
        finally:
            add.kill()
            add.wait(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="the admin view is for root: this test runs the CLI as this user")
def test_ls_admin_view_for_root() -> None:
    with server_process() as (address, _server):
        empty = cli("ls", address=address)
        assert empty.returncode == 0 and "the server holds no regions" in empty.stderr, empty.stderr
        holder = client_process("region_holder", address)
        try:
            assert read_line(holder, 120) == "ready"
            admin = cli("ls", "--json", address=address)  # root: every session's regions by default
            assert admin.returncode == 0, admin.stderr
            got = [(r["name"], r["owner"]) for r in json.loads(admin.stdout)]
            assert [name for name, _ in got] == ["theirs"], got
            assert got[0][1].startswith("uid:0/pid"), got  # the owner's label, namespaced by its uid
            explicit = cli("ls", "--all", address=address)
            assert explicit.returncode == 0 and "theirs" in explicit.stdout, explicit.stdout
            mine = cli("ls", "--mine", "--json", address=address)
            assert mine.returncode == 0 and json.loads(mine.stdout) == []
            assert "holds 1 regions of other sessions" in mine.stderr and "--all" in mine.stderr, mine.stderr
        finally:
            tell(holder, "")
            holder.wait(30)


def test_admin_view_is_refused_to_a_non_root_session() -> None:
    """A pre-authorized token session has no uid (it is not root on the local socket): ``all`` is refused."""
    tokens = TokenStore()
    tokens.add("t" * 32, "job")
    with inproc_server(tokens=tokens) as server, connect(server.address) as owner:
        owner.create_region("r", 1 << 16)
        with connect(server.address, token="t" * 32) as other:
            with pytest.raises(PermissionDeniedError, match="for root"):
                other.list_regions(all_sessions=True)
            assert other.list_regions() == []
        if os.geteuid() == 0:  # the owner connected as root on the local socket
            assert [r.name for r in owner.list_regions(all_sessions=True)] == ["r"]


def test_server_alive_without_a_side_channel() -> None:
    """A TCP client (no side channel, a pre-authorized token) learns by ping that the server went away."""
    from devrep.engine import Replicator
    from devrep.service import build_server

    tokens = TokenStore()
    tokens.add("k" * 32, "tcp-job")
    server = build_server("127.0.0.1:0", insecure=True, tokens=tokens, replicator=Replicator(cpu_devices=1))
    server.start()
    try:
        client = connect(f"127.0.0.1:{server.port}", token="k" * 32, timeout=5)
        assert client.server_alive(timeout=0.05)
    finally:
        server.stop(0)
    try:
        assert not client.server_alive(timeout=0.05)
    finally:
        client.close()
