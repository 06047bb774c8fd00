"""pytest fixtures over ``devrep.testing``: load with ``pytest_plugins = ["devrep.testing.pytest_plugin"]`` in a
top-level ``conftest.py`` (or ``-p devrep.testing.pytest_plugin``).

- ``devrep_server``: a real in-process server (``serve_in_process()``) for one test;
- ``devrep_client``: a ``Client`` session with it (closed after the test).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from ._server import serve_in_process

if TYPE_CHECKING:
    from ..client import Client
    from ..service import DevrepServer


@pytest.fixture
def devrep_server() -> Iterator[DevrepServer]:
    with serve_in_process() as server:
        yield server


@pytest.fixture
def devrep_client(devrep_server: DevrepServer) -> Iterator[Client]:
    from ..client import connect

    with connect(devrep_server.address, label="test") as client:
        yield client
