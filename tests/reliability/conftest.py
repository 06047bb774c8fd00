"""Helpers of the reliability suite: kernel feature checks, soak sizing, a hang guard."""

from __future__ import annotations

import faulthandler
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import devrep
from devrep._pages import PAGE_SIZE

SERVE = Path(__file__).with_name("serve.py")


def require_tracking(mode: str) -> None:
    """Skip, saying exactly what is missing, when this kernel cannot do ``mode`` tracking."""
    try:
        with devrep.Replicator(cpu_devices=1) as rep, tempfile.NamedTemporaryFile() as f:
            if mode == "file":
                f.write(bytes(PAGE_SIZE))
                f.flush()
                rep.register_file("probe", f.name, tracking=mode)
            else:
                rep.create_region("probe", PAGE_SIZE, tracking=mode)
    except devrep.UnsupportedModeError as exc:
        pytest.skip(f"tracking={mode!r} unavailable on this machine: {exc}")


@pytest.fixture(autouse=True)
def hang_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    # A store blocked on a sync-mode fault holds the GIL, so pytest-timeout's signal handler might never
    # run; a C-level watchdog a little past the test timeout ends such a hang with every thread's stack.
    timeout = float(request.config.getoption("timeout", None) or 120)
    faulthandler.dump_traceback_later(timeout + 30, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class ServerProcess:
    """``serve.py`` in a child process; ``kill()`` is kill -9, ``restart()`` starts a fresh one on the same socket."""

    def __init__(self, directory: Path, *args: str) -> None:
        self.socket = directory / "devrep.sock"
        self.address = f"unix:{self.socket}"
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen([sys.executable, str(SERVE), str(self.socket), *self.args],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not ready or not ready[0].startswith("READY"):
            self.kill()
            raise RuntimeError(f"devrep server did not start within {timeout}s: {ready}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(tmp_path)
    try:
        yield srv
    finally:
        srv.stop()
