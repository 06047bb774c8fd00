"""``devrep._signals.StopSignals``: how ``devrep serve`` and the device plugin wait for SIGTERM/SIGINT without the
``threading.Event``-in-a-handler deadlock (see the module docstring)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from devrep._signals import StopSignals

pytestmark = pytest.mark.timeout(60)


def test_a_signal_sent_before_wait_is_kept() -> None:
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at once, in this (the main) thread
        assert stop.wait(timeout=10) == signal.SIGTERM


def test_sigint_is_a_stop_signal_too() -> None:
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # never KeyboardInterrupt inside the block
        assert stop.wait(timeout=10) == signal.SIGINT


def test_wait_times_out_with_none() -> None:
    with StopSignals() as stop:
        assert stop.wait(timeout=0.05) is None
        assert stop.wait(timeout=0) is None


def test_a_signal_from_another_thread_wakes_a_blocked_wait() -> None:
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    with StopSignals() as stop:
        timer.start()
        try:
            assert stop.wait(timeout=30) == signal.SIGTERM
        finally:
            timer.cancel()


def test_previous_handlers_come_back() -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        with StopSignals():
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old)


def test_wait_outside_the_block_is_an_error() -> None:
    stop = StopSignals()
    with pytest.raises(RuntimeError, match="outside"):
        stop.wait(0)
    with stop:
        pass
    with pytest.raises(RuntimeError, match="outside"):
        stop.wait(0)


def test_many_signals_nobody_waits_for_do_not_block_the_handler() -> None:
    with StopSignals() as stop:
        for _ in range(100_000):  # far more than a pipe holds: the handler drops what does not fit
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(timeout=10) == signal.SIGTERM


def _run(code: str, timeout: float) -> subprocess.CompletedProcess[str] | None:
    """Run ``code`` in a fresh interpreter; ``None`` if it was still running after ``timeout`` seconds."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_a_signal_while_the_main_thread_holds_a_lock_still_stops() -> None:
    """The situation that hangs an Event-based wait (next test): the handler runs while the main thread holds a
    lock. StopSignals' handler takes no lock, so the process goes on and sees the signal."""
    done = _run("""
        import os, signal, threading
        from devrep._signals import StopSignals
        lock = threading.Lock()
        with StopSignals() as stop:
            with lock:
                os.kill(os.getpid(), signal.SIGTERM)
                x = sum(range(10))  # bytecodes: the handler runs here, lock held
            print(stop.wait(timeout=10).name)
    """, timeout=30)
    assert done is not None, "StopSignals hung with a lock held when the signal came"
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SIGTERM"


def test_why_not_an_event_set_by_the_handler() -> None:
    """The pattern StopSignals replaces, in the state ``Event.wait`` is in between its lock and its block: the
    handler's ``set()`` waits forever for a lock its own thread holds (bounded here by the subprocess timeout)."""
    done = _run("""
        import os, signal, threading
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        with stop._cond:  # what Event.wait holds on its way in and out
            os.kill(os.getpid(), signal.SIGTERM)
            x = sum(range(10))
        print("not reached")
    """, timeout=3)
    assert done is None, f"an Event set by a signal handler did not deadlock: {done}"
