"""The Python client against a real server (in process: real gRPC and side channel, fast)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import devrep
from devrep.client import Client, ServiceUnavailableError, connect
from devrep.model import Event, EventKind
from devrep.service import DevrepServer
from devrep.service.watch import coalesce, merge_runs

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(devrep_server: DevrepServer) -> DevrepServer:
    return devrep_server  # devrep.testing's in-process server (tests/conftest.py loads the plugin)


@pytest.fixture
def client(devrep_client: Client) -> Client:
    return devrep_client


def test_region_roundtrip_readonly_zero_copy_views(client: Client) -> None:
    region = client.create_region("a", 3 * 4096 + 100)  # not a page multiple: the tail page is zero padded
    assert region.array.flags.writeable and region.array.size == 3 * 4096 + 100
    region.array[:] = np.arange(region.array.size) % 251
    region.invalidate()
    report = client.replicate("a", ["cpu:0", "cpu:1"])
    assert report.pages_copied == 8 and sorted(report.devices) == ["cpu:0", "cpu:1"]
    with client.acquire("a", "cpu:1") as lease:
        assert np.array_equal(lease.array, region.array)
        with pytest.raises(ValueError, match="read-only"):
            lease.array[0] = 1
        view = np.from_dlpack(lease)  # DLPack consumers get the same read-only memory
        assert not view.flags.writeable and np.array_equal(view, region.array)
    with pytest.raises(devrep.FailedPreconditionError):
        _ = lease.array


def test_stale_acquire_reports_invalid_runs_then_fresh_syncs(client: Client) -> None:
    region = client.create_region("b", 16 * 4096)
    client.replicate("b", ["cpu:0"])
    region.array[5 * 4096] = 42
    gen = region.invalidate(5 * 4096, 2 * 4096)
    with client.acquire("b", "cpu:0", fresh=False) as stale:
        assert stale.invalid_runs.tolist() == [[5, 2]] and int(stale.array[5 * 4096]) == 0
    with client.acquire("b", "cpu:0") as fresh:
        assert fresh.generation == gen and int(fresh.array[5 * 4096]) == 42 and fresh.invalid_runs.size == 0
    # a lease over gRPC (no side channel) says the same
    from devrep.wire._gen import devrep_pb2 as pb

    reply = client._call(client._stub.Acquire, pb.AcquireRequest(name="b", device="cpu:0", fresh=True))
    assert reply.generation == gen and reply.export_kind == "fd" and reply.nbytes == 16 * 4096
    client._call(client._stub.Release, pb.ReleaseRequest(lease_id=reply.lease_id))


def test_watch_streams_coalesced_runs(client: Client) -> None:
    client.create_region("c", 1024 * 4096)
    client.replicate("c", ["cpu:0"])
    with client.watch("c", coalesce_ms=20) as stream:
        batches = stream.batches()
        pages = np.arange(0, 1000, 2)  # 500 separate runs in one report
        client.invalidate("c", runs=np.stack([pages, np.ones_like(pages)], axis=1))
        client.invalidate("c", runs=[[1, 1], [3, 1]])  # joins the runs above when coalesced
        events: list[Event] = []
        while sum(e.pages for e in events if e.kind == "invalidate") < 502:
            events += next(batches)
    inval = [e for e in events if e.kind == "invalidate"]
    runs = merge_runs([e.runs for e in inval])
    assert runs[:2].tolist() == [[0, 5], [6, 1]] and int(runs[:, 1].sum()) == 502


def test_share_list_describe_unregister(server: DevrepServer, client: Client) -> None:
    client.create_region("d", 4096)
    desc = client.describe("d")
    assert (desc.name, desc.kind, desc.owner, desc.read_only) == ("d", "memfd", f"uid:{os.getuid()}/test", False)
    with connect(server.address, label="other") as other:
        assert other.list_regions() == []
        client.share("d", "*")
        assert [r.name for r in other.list_regions()] == ["d"]
        with pytest.raises(devrep.PermissionDeniedError):
            other.unregister("d")
    client.unregister("d")
    with pytest.raises(devrep.NotFoundError):
        client.describe("d")


def test_closing_a_client_ends_its_session(server: DevrepServer) -> None:
    with connect(server.address) as c:
        c.create_region("e", 4096)
        c.replicate("e", ["cpu:0"])
        c.acquire("e", "cpu:0")
    assert server.replicator.regions() == [] and server.registry.sessions() == []


def test_register_file_with_file_tracking(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 64)
    client.register_file("f", path, tracking="file")
    client.replicate("f", ["cpu:0"])
    with client.acquire("f", "cpu:0") as lease:
        assert bytes(lease.array) == path.read_bytes()
    with pytest.raises(devrep.NotFoundError):
        client.register_file("g", tmp_path / "missing")
    with pytest.raises(devrep.InvalidArgumentError):
        client.create_region("h", 0)


def test_connect_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ServiceUnavailableError):
        connect(f"unix:{tmp_path}/none.sock", timeout=2)
    monkeypatch.setenv("DEVREP_ADDRESS", f"unix:{tmp_path}/none.sock")
    with pytest.raises(ServiceUnavailableError):
        connect(timeout=2)


def test_address_and_token_from_the_environment(server: DevrepServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.tokens.add("pre-authorized-token-for-tests", "pod-b")
    monkeypatch.setenv("DEVREP_ADDRESS", server.address)
    monkeypatch.setenv("DEVREP_TOKEN", "pre-authorized-token-for-tests")
    with connect() as c:
        c.create_region("p", 4096)
        session = c.session_id
    # a pre-authorized session outlives the connection; its regions stay until unregistered
    with connect() as c:
        assert c.session_id == session and [r.name for r in c.list_regions()] == ["p"]
        c.unregister("p")
    os.environ.pop("DEVREP_TOKEN")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=8), max_size=5))
def test_merge_runs_is_the_union(parts: list[list[tuple[int, int]]]) -> None:
    arrays = [np.array(p, dtype=np.int64).reshape(-1, 2) for p in parts]
    merged = merge_runs(arrays)
    expect = sorted({a + i for p in parts for a, n in p for i in range(n)})
    got = [a + i for a, n in merged.tolist() for i in range(n)]
    assert got == expect
    if len(merged) > 1:
        assert np.all(merged[1:, 0] > merged[:-1, 0] + merged[:-1, 1])  # no touching runs left


def test_coalesce_merges_consecutive_events_only() -> None:
    r = np.array([[0, 1]])
    inv = EventKind.INVALIDATE
    events = [Event(inv, "a", 1, r), Event(inv, "a", 2, np.array([[1, 1]])),
              Event(EventKind.SYNC, "a", 2, r, "cpu:0"), Event(inv, "a", 3, np.array([[5, 1]])),
              Event(inv, "b", 3, r)]
    out = coalesce(events)
    assert [(e.kind, e.region, e.generation) for e in out] == [("invalidate", "a", 2), ("sync", "a", 2),
                                                                ("invalidate", "a", 3), ("invalidate", "b", 3)]
    assert out[0].runs.tolist() == [[0, 2]]


def test_truncated_file_fails_the_region_before_anything_reads_it(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"q" * (64 * 4096))
    client.register_file("t", path, tracking="explicit")  # the size guard, not the file tracker, must catch it
    client.replicate("t", ["cpu:0"])
    with client.watch("t") as stream:
        events = iter(stream)
        os.truncate(path, 4096)  # reading the lost pages would SIGBUS the service
        client.invalidate("t")
        with pytest.raises(devrep.FailedPreconditionError, match="shrank"):
            client.sync("t")
        assert "shrank" in (client.describe("t").failed or "")
        assert next(e for e in events if e.kind == "region_failed").region == "t"
    with pytest.raises(devrep.FailedPreconditionError):
        client.acquire("t", "cpu:0")
    client.unregister("t")
    assert client.ping()
