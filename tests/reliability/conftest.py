"""Helpers of the reliability suite: kernel feature checks, soak sizing, a hang guard."""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator

import pytest

import devrep
from devrep._pages import PAGE_SIZE


def require_tracking(mode: str) -> None:
    """Skip, saying exactly what is missing, when this kernel cannot do ``mode`` tracking."""
    try:
        with devrep.Replicator(cpu_devices=1) as rep:
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
