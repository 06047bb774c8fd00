"""Waiting for SIGTERM/SIGINT in a daemon's main thread (``devrep serve``, the device plugin); a leaf: standard
library only.

Why not the usual ``threading.Event`` set from the handler: Python runs a signal handler in the main thread between
two bytecodes, and that can be while the main thread is inside ``Event.wait`` holding the event's internal lock
(on the way in, before it blocks, or on the way out, after it wakes). ``Event.set()`` in the handler then waits for
a lock its own thread holds, and the process never exits: kubelet would kill it after the grace period, skipping
the shutdown. ``StopSignals`` instead has the handler write the signal number to a pipe (``os.write`` takes no Python
lock) and the main thread wait on the pipe. A signal that arrives before ``wait`` is kept in the pipe, not lost.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGTERM and SIGINT only queue their number for ``stop.wait()``; the
    previous handlers come back on exit. Main thread only (where Python can install handlers)."""

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self._previous: dict[signal.Signals, Any] = {}
        self._read_fd = self._write_fd = -1

    def __enter__(self) -> StopSignals:
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A full pipe (thousands of signals nobody waited for) already says "stop": dropping more loses nothing.
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, bytes((signum,)))

    def wait(self, timeout: float | None = None) -> signal.Signals | None:
        """The first stop signal received (now or earlier), or ``None`` after ``timeout`` seconds without one."""
        if self._read_fd < 0:
            raise RuntimeError("StopSignals.wait() outside its with block")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                data = os.read(self._read_fd, 1)
            except BlockingIOError:
                data = b""
            if data:
                return signal.Signals(data[0])
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            select.select([self._read_fd], [], [], left)  # retried after a handler runs (PEP 475)
