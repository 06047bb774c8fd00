"""Fixtures of the attack suite (see ``_harness``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._harness import RootServer, root_server


@pytest.fixture
def server() -> Iterator[RootServer]:
    """A root ``devrep serve`` with default options, sockets open to the attacker's group."""
    with root_server() as srv:
        yield srv
