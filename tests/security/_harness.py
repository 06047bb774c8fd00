"""Attack harness: a real root ``devrep serve`` and attacker processes running as an unprivileged uid.

Every test in ``tests/security`` attacks the way a hostile local user would: a process with uid/gid 65534
(nobody/nogroup) that is in the sockets' group, talking to a server running as root. Attacks live in ordinary
module functions (linted and type-checked like any code), run through ``_attacker.py`` in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import devrep.client
from devrep.demo import server_process

from ._attacker import RESULT_MARK

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("_attacker.py")
ATTACKER_UID = 65534
ATTACKER_GID = 65534  # nogroup; also the sockets' group, so the attacker can connect

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="attack tests need root: a uid-65534 attacker against a root server")


@dataclass(frozen=True)
class RootServer:
    """A running root ``devrep serve`` whose sockets the attacker's group may connect to."""

    address: str
    socket: Path
    fd_socket: Path
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")


RSS_BOUND = 200 << 20
"""A generous bound on what one attack may add to the server's resident memory (the limit attacks cost 0.5 GiB to
OOM before the fixes)."""


def still_serves(server: RootServer) -> None:
    """A victim (another client) is served normally after the attack."""
    assert server.alive(), server.log()[-3000:]
    with devrep.client.connect(server.address, label="victim") as victim:
        region = victim.create_region("victim", 1 << 16)
        region.array[:] = 3
        victim.replicate("victim", ["cpu:0"])
        with victim.acquire("victim", "cpu:0") as lease:
            assert int(lease.array[-1]) == 3
    assert "Traceback" not in server.log(), server.log()[-3000:]


@contextmanager
def root_server(*extra: str) -> Iterator[RootServer]:
    """``devrep serve`` as root on a fresh socket directory, sockets 0660 in the attacker's group."""
    if os.geteuid() != 0:
        pytest.skip("attack tests need root: a uid-65534 attacker against a root server")
    workdir = Path(tempfile.mkdtemp(prefix="drsec-"))
    try:
        args = ("--socket-mode", "0660", "--socket-group", str(ATTACKER_GID), *extra)
        with server_process(workdir, *args) as (address, proc):
            sock = workdir / "devrep.sock"
            yield RootServer(address, sock, sock.with_name("devrep.fd.sock"), workdir, proc)
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def attacker_dir() -> Path:
    """A fresh directory owned by the attacker (its files, FIFOs and symlinks live there)."""
    path = Path(tempfile.mkdtemp(prefix="drsec-att-"))
    os.chown(path, ATTACKER_UID, ATTACKER_GID)
    path.chmod(0o755)
    return path


def run_as_attacker(module: str | os.PathLike[str], function: str, *args: Any,
                    groups: Sequence[int] = (ATTACKER_GID,), timeout: float = 60.0) -> Any:
    """``function(*args)`` from the module file ``module``, in a fresh process as uid/gid 65534.

    ``subprocess`` forks and execs util-linux ``setpriv``, which calls setgroups(groups), setresgid and
    setresuid, then execs the runner (nothing runs in Python between fork and exec, so this is safe while this
    process runs gRPC threads). setpriv keeps its capabilities until that exec, so the interpreter is found
    even when it lives under root's 0700 home (pyenv); the exec itself clears every capability of the new uid,
    which the runner checks. Returns the function's JSON result; any failure of the attacker process
    (exception, timeout) fails the test with its output.
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),  # this checkout's devrep, whatever the venv's editable install points at
        "HOME": "/nonexistent",
        "PYTHONDONTWRITEBYTECODE": "1",
        # numba may be imported by the client; its cache must not need a writable install tree
        "NUMBA_CACHE_DIR": tempfile.mkdtemp(prefix="drsec-numba-"),
        "PYTHONUNBUFFERED": "1",
    }
    os.chown(env["NUMBA_CACHE_DIR"], ATTACKER_UID, ATTACKER_GID)
    try:
        drop = ["setpriv", f"--reuid={ATTACKER_UID}", f"--regid={ATTACKER_GID}",
                f"--groups={','.join(str(g) for g in groups)}" if groups else "--clear-groups", "--"]
        proc = subprocess.run([*drop, sys.executable, str(RUNNER), str(module), function, json.dumps(list(args))],
                              env=env, cwd="/", capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"attacker {function} did not finish within {timeout}s: {exc.stdout!r} {exc.stderr!r}"
                             ) from None
    finally:
        subprocess.run(["rm", "-rf", env["NUMBA_CACHE_DIR"]], check=False)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith(RESULT_MARK):
        raise AssertionError(f"attacker {function} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len(RESULT_MARK):])
