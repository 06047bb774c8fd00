"""The ``devrep`` command against a real server process: output, --json and exit codes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from _devrep_service import ROOT, short_tmpdir
from _support import child_argv, free_port, run_cli, scrape

from devrep.client import connect
from devrep.demo import server_process as start_server
from devrep.errors import ResourceExhaustedError

pytestmark = pytest.mark.timeout(120)


def devrep_cli(*args: str, timeout: float = 60, address: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, address=address, env={"COLUMNS": "160"}, timeout=timeout)


def test_usage_and_connection_exit_codes(tmp_path: Path) -> None:
    assert devrep_cli().returncode == 2
    assert devrep_cli("frobnicate").returncode == 2
    r = devrep_cli("ls", "--address", f"unix:{tmp_path}/none.sock")
    assert r.returncode == 3 and "no devrep server" in r.stderr
    r = devrep_cli("serve", "--address", "127.0.0.1:0")  # TCP without TLS or --insecure
    assert r.returncode == 2 and "TLS" in r.stderr


def test_ls_stats_verify_add(address: str, tmp_path: Path) -> None:
    r = devrep_cli("ls", "--json", address=address)
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = devrep_cli("stats", "--json", address=address)
    info = json.loads(r.stdout)["server"]
    assert r.returncode == 0 and "cpu:0" in info["devices"] and "explicit" in info["tracking_modes"]
    r = devrep_cli("verify", "nope", address=address)
    assert r.returncode == 4 and "no region" in r.stderr
    data = tmp_path / "blob.bin"
    data.write_bytes(os.urandom(3 * 4096 + 5))
    r = devrep_cli("add", str(data), "--device", "cpu:0", "--device", "cpu:1", "--no-wait", "--json",
                   address=address)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["pages_copied"] == 8 and sorted(report["devices"]) == ["cpu:0", "cpu:1"]
    r = devrep_cli("add", str(tmp_path / "missing"), "--device", "cpu:0", "--no-wait", address=address)
    assert r.returncode == 4
    r = devrep_cli("add", str(data), "--device", "cpu:77", "--no-wait", address=address)
    assert r.returncode == 4 and "cpu:77" in r.stderr


def test_watch_verify_and_tables_on_a_shared_region(address: str) -> None:
    with connect(address, label="owner") as owner:
        region = owner.create_region("cli/r", 64 * 4096)
        owner.replicate("cli/r", ["cpu:0"])
        owner.share("cli/r", "*")
        watcher = subprocess.Popen([sys.executable, "-m", "devrep.cli", "watch", "cli/r", "--json", "--count", "1",
                                    "--address", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=ROOT)
        try:
            # the watcher subscribes asynchronously: keep reporting until it has seen one event
            for _ in range(200):
                region.array[4096 * 3] = 1
                region.invalidate(4096 * 3, 4096)
                try:
                    out, err = watcher.communicate(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    continue
            assert watcher.returncode == 0, err
            event = json.loads(out.splitlines()[0])
            assert event["kind"] == "invalidate" and event["runs"] == [[3, 1]]
        finally:
            watcher.kill()
            watcher.wait(10)
        r = devrep_cli("verify", "cli/r", "--json", "--no-resync", address=address)
        assert r.returncode == 0 and json.loads(r.stdout)[0]["mismatched_pages"] == 0
        r = devrep_cli("verify", "cli/r", address=address)  # resyncing changes the region: owner only
        assert r.returncode == 5 and "read-only" in r.stderr
        r = devrep_cli("ls", address=address)
        assert r.returncode == 0 and "cli/r" in r.stdout and "owner (shared)" in r.stdout
        r = devrep_cli("stats", "cli/r", address=address)
        assert r.returncode == 0 and "invalidations" in r.stdout


def test_doctor_json() -> None:
    r = devrep_cli("doctor", "--json")
    assert r.returncode in (0, 1)
    assert isinstance(json.loads(r.stdout), dict)


def test_demo_runs_end_to_end() -> None:
    r = devrep_cli("demo", "--size-mib", "32", timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "devrep demo summary" in r.stdout and "FAILED" not in r.stdout
    assert "exit status 0" in r.stdout


def test_serve_metrics_count_quota_rejections() -> None:
    port = free_port()
    with short_tmpdir() as tmp, \
            start_server(tmp, "--metrics-port", str(port), "--quota-regions", "1") as (addr, _proc), \
            connect(addr) as client:
        client.create_region("one", 4096)
        with pytest.raises(ResourceExhaustedError):
            client.create_region("two", 4096)
        samples = scrape(port)
    assert samples[("devrep_quota_rejections_total", (("resource", "regions"),))] == 1.0


def as_nobody(*args: str) -> list[str]:
    """Run children/socket_peer.py as uid/gid 65534 (nobody/nogroup) with no other groups: a non-root client."""
    cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
           *child_argv("socket_peer", *args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")[:2]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a socket's group and running as nobody needs root")
def test_serve_socket_mode_and_group_let_a_non_root_client_in() -> None:
    with short_tmpdir() as tmp:
        # mkdtemp made the directory 0700 root:root: the server opens it to the sockets' group
        with start_server(tmp, "--socket-mode", "0660", "--socket-group", "nogroup"):
            for name in ("devrep.sock", "devrep.fd.sock"):
                st = os.stat(tmp / name)
                assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 65534), name
            st = os.stat(tmp)
            assert st.st_gid == 65534 and st.st_mode & stat.S_IXGRP and not st.st_mode & stat.S_IXOTH
            assert as_nobody(str(tmp / "devrep.sock"), str(tmp / "devrep.fd.sock")) == ["grpc ok", "fd ok"]
        with start_server(tmp, "--socket-mode", "0600"):  # same directory, owner only: nobody is refused
            assert stat.S_IMODE(os.stat(tmp / "devrep.sock").st_mode) == 0o600
            assert as_nobody(str(tmp / "devrep.sock"), str(tmp / "devrep.fd.sock")) == [
                "grpc UNAVAILABLE", "fd PermissionError"]
    r = devrep_cli("serve", "--socket-group", "no-such-group-here")
    assert r.returncode == 2 and "no group named" in r.stderr
    r = devrep_cli("serve", "--socket-mode", "0999")
    assert r.returncode == 2 and "octal" in r.stderr
