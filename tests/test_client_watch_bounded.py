"""Client.watch(max_events=..., timeout=...): a watch that ends by itself (what scripts and the docs use)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _devrep_service import inproc_server

import devrep
from devrep.client import Client, connect


@pytest.fixture
def client() -> Iterator[Client]:
    with inproc_server() as server, connect(server.address, label="test") as c:
        yield c


def test_max_events_ends_the_stream(client: Client) -> None:
    client.create_region("w", 64 * 4096)
    client.replicate("w", ["cpu:0"])
    with client.watch("w", max_events=2, coalesce_ms=0) as events:
        for page in range(0, 40, 2):  # 20 separate invalidations: more than max_events
            client.invalidate("w", page * 4096, 4096)
        got = list(events)  # returns: the stream ends after two events, although more are queued
    assert len(got) == 2, f"expected 2 events, got {len(got)}: {got}"
    assert all(e.kind == "invalidate" for e in got), got
    assert list(events) == []  # iterating again after the limit yields nothing


def test_max_events_cuts_batches(client: Client) -> None:
    client.create_region("b", 64 * 4096)
    client.replicate("b", ["cpu:0"])
    with client.watch("b", max_events=3, coalesce_ms=0) as events:
        for page in range(0, 40, 2):
            client.invalidate("b", page * 4096, 4096)
        total = sum(len(batch) for batch in events.batches())
    assert total == 3, f"expected 3 events over all batches, got {total}"


def test_timeout_ends_a_quiet_stream_without_error(client: Client) -> None:
    client.create_region("q", 4096)
    with client.watch("q", timeout=0.5) as events:
        got = list(events)  # nothing happens to "q": the deadline ends the stream, no exception
    assert got == []


def test_both_bounds_first_one_wins(client: Client) -> None:
    client.create_region("t", 8 * 4096)
    client.replicate("t", ["cpu:0"])
    with client.watch("t", max_events=1, timeout=60.0, coalesce_ms=0) as events:
        client.invalidate("t", 0, 4096)
        got = list(events)  # ends at the first event, long before the deadline
    assert [e.kind for e in got] == ["invalidate"], got


@pytest.mark.parametrize("kwargs", [{"max_events": 0}, {"max_events": -1}, {"timeout": 0}, {"timeout": -2.0}])
def test_bad_bounds_are_invalid_argument(client: Client, kwargs: dict[str, float]) -> None:
    with pytest.raises(devrep.InvalidArgumentError):
        client.watch("x", **kwargs)  # type: ignore[arg-type]
