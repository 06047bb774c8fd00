"""Helpers shared by the service, client, CLI and safetensors tests: servers on short temporary socket paths
(Unix socket paths are limited to 107 bytes, pytest's tmp_path can be longer) and client subprocesses."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _support import child_argv

from devrep.service import DevrepServer, Quota, TokenStore
from devrep.testing import serve_in_process, short_tmpdir

ROOT = Path(__file__).resolve().parents[1]


def tell(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


@contextmanager
def server_process(*extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``devrep serve [extra...]`` as a real process on a temporary socket (stopped, or killed, afterwards)."""
    from devrep.demo import server_process as start

    with short_tmpdir() as tmp, start(tmp, *extra) as (address, proc):
        yield address, proc


@contextmanager
def inproc_server(quota: Quota | None = None, tokens: TokenStore | None = None, **options: Any
                  ) -> Iterator[DevrepServer]:
    """A real gRPC server + side channel in this process (fast; for status-code and protocol tests)."""
    with serve_in_process(quota=quota, tokens=tokens, **options) as server:
        yield server


def client_process(name: str, address: str, *args: str) -> subprocess.Popen[str]:
    """Run child program ``name`` (``tests/children/<name>.py``) as ``<name> ADDRESS ARGS...`` in a fresh Python
    process; stdin, stdout and stderr are pipes."""
    return subprocess.Popen(child_argv(name, address, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The next stdout line of ``proc`` within ``timeout`` seconds (fails the test otherwise)."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError(f"client process said nothing within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise AssertionError(f"client process exited ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
    return line.strip()
