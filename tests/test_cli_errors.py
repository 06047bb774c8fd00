"""Errors tell the user what to do (issue 11 item 9): each case through the ``devrep`` CLI in a subprocess."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _devrep_service import ROOT, read_line
from _support import run_cli

from devrep.client import connect

pytestmark = pytest.mark.timeout(180)


def devrep_cli(*args: str, address: str | None = None, timeout: float = 60,
               token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": "200", **({"DEVREP_TOKEN": token} if token else {})}
    out = run_cli(*args, address=address, env=env, timeout=timeout)
    print(f"devrep {' '.join(args)} -> {out.returncode}\n{out.stderr}")
    assert "Traceback" not in out.stderr, out.stderr
    return out


def test_no_server_suggests_devrep_serve_and_devrep_address(tmp_path: Path) -> None:
    for out in (devrep_cli("ls", "--address", f"unix:{tmp_path}/none.sock"),
                devrep_cli("ls", address=f"unix:{tmp_path}/none.sock")):
        assert out.returncode == 3, out
        assert "devrep serve" in out.stderr and "DEVREP_ADDRESS" in out.stderr
    out = devrep_cli("ls", "--address", "127.0.0.1:1", token="some-pre-authorized-token")  # TCP: nobody listens
    assert out.returncode == 3 and "devrep serve" in out.stderr, out


def cli_as_nobody(*args: str) -> tuple[int, str]:
    """``devrep.cli.main(args)`` in a forked child running as uid/gid 65534 with no supplementary groups (the
    attacker-test pattern: the venv may not be readable by nobody, so everything is imported before the fork)."""
    from devrep import cli

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            sys.stderr = os.fdopen(write_end, "w")  # rich's error console writes to sys.stderr
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            code = cli.main(list(args))
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    print(f"devrep {' '.join(args)} as nobody -> {os.waitstatus_to_exitcode(status)}: {err}")
    return os.waitstatus_to_exitcode(status), err


def test_permission_denied_on_the_socket_names_socket_group(address: str) -> None:
    code, err = cli_as_nobody("ls", "--address", address)
    assert code == 5, err
    assert "--socket-group" in err and "Traceback" not in err


def test_garbage_address_gets_a_reason() -> None:
    out = devrep_cli("ls", "--address", "garbage://x")
    assert out.returncode == 2, out
    assert "garbage://x" in out.stderr and "scheme 'garbage'" in out.stderr


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_missing_cupy_is_failed_precondition_and_keeps_the_brackets(address: str, tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 8192)
    out = devrep_cli("add", str(path), "--device", "cuda:0", "--no-wait", address=address)
    assert out.returncode == 7, out                            # failed precondition, not 1 (internal)
    assert "devrep[cuda12]" in out.stderr, out.stderr          # Rich markup did not eat "[cuda12]"
    assert "internal error" not in out.stderr.lower()
    with connect(address) as client:                           # and the status itself
        client.create_region("cupy-check", 4096)
        try:
            client.replicate("cupy-check", ["cuda:0"])
        except Exception as exc:  # the class is what is checked
            assert type(exc).__name__ == "BackendUnavailableError", repr(exc)
            assert getattr(exc, "status").name == "FAILED_PRECONDITION"  # noqa: B009
        else:
            pytest.fail("replicate to cuda:0 without CuPy succeeded")


def test_unbindable_socket_is_one_line_and_non_zero() -> None:
    for sock in ("/proc/devrep-nope/devrep.sock", "/tmp/" + "x" * 120 + "/devrep.sock"):
        out = devrep_cli("serve", "--socket", sock, timeout=60)
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode != 0, out
        assert len(lines) == 1 and lines[0].startswith("devrep serve:"), lines
        assert os.path.dirname(sock)[:15] in lines[0], lines


def test_ctrl_c_says_interrupted_and_exits_130(address: str) -> None:
    with connect(address) as owner:
        owner.create_region("sigint", 4096, tracking="explicit")
        owner.share("sigint", "*")
        env = {**os.environ, "DEVREP_ADDRESS": address}
        proc = subprocess.Popen([sys.executable, "-m", "devrep.cli", "watch", "sigint", "--json"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(600):                               # until the watch is running: its first event
                owner.invalidate("sigint")
                import selectors

                sel = selectors.DefaultSelector()
                assert proc.stdout is not None
                sel.register(proc.stdout, selectors.EVENT_READ)
                if sel.select(0.1):
                    break
            read_line(proc, 60)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    print(f"watch after SIGINT -> {proc.returncode}: {err!r}")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
