"""The client's transport seam (devrep/client/_transport.py): a ``Client`` over ``devrep.testing.MockTransport``
(no server: errors mapped, one ``LeaseGrant`` from either reply, timeouts and metadata passed), the real
``GrpcTransport`` / ``SideChannelTransport`` against a real in-process server, and what ``import devrep.client``
/ ``import devrep.testing`` load."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from devrep import errors
from devrep.client import Client, connect
from devrep.client._transport import GrpcTransport, LeaseGrant, Reply, SideChannelTransport
from devrep.memory import F_SEAL_GROW, F_SEAL_SHRINK, add_seals, map_fd, memfd_create
from devrep.service import DevrepServer
from devrep.testing import MockRequest, MockRpcError, MockTransport
from devrep.wire import HOLDER_KEY, HOLDER_TTL_KEY
from devrep.wire._gen import devrep_pb2 as pb

pytestmark = pytest.mark.timeout(60)

ADDRESS = "unix:/nonexistent/devrep.sock"  # never dialed: the transport answers
ERROR_CLASSES = sorted({v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.DevrepError)},
                       key=lambda c: c.__name__)


def ping_only(request: MockRequest) -> Any:
    if request.method == "Ping":
        return pb.PingResponse(session_id="s-1")
    raise AssertionError(f"unexpected request {request}")


def mock_client(handler: Any, **kwargs: Any) -> tuple[Client, MockTransport]:
    transport = MockTransport(handler, side_channel=kwargs.pop("side_channel", False))
    return Client(ADDRESS, token=kwargs.pop("token", "tok"), transport=transport, **kwargs), transport


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------------- MockTransport
def test_mock_client_sends_token_holder_and_timeouts() -> None:
    def handler(request: MockRequest) -> Any:
        if request.method == "Ping":
            return pb.PingResponse(session_id="s-1")
        if request.method == "Sync":
            return pb.SyncResponse(report=pb.SyncReport(region=request.message.name, generation=7))
        if request.method == "Verify":
            return pb.VerifyResponse()
        raise AssertionError(request)

    client, transport = mock_client(handler, timeout=3.0)
    with client:
        assert client.session_id == "s-1" and client.token == "tok"
        (ping,) = transport.requests
        md = dict(ping.metadata)
        print("ping metadata", md, "timeout", ping.timeout)
        assert md["authorization"] == "Bearer tok" and len(md[HOLDER_KEY]) == 32 and ping.timeout == 3.0
        report = client.sync("r", ["cpu:0"], timeout=5.0)
        assert report.region == "r" and report.generation == 7
        sync = transport.requests[-1]
        print("sync timeout", sync.timeout, "timeout_ms", sync.message.timeout_ms)
        assert sync.timeout == 5.0 + 3.0 and sync.message.timeout_ms == 5000 and list(sync.message.devices) == ["cpu:0"]
        client.verify("r")
        assert transport.requests[-1].timeout == 120.0  # verify waits at least two minutes
    assert transport.closed


def test_no_side_channel_no_token_is_unauthenticated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEVREP_TOKEN", raising=False)
    with pytest.raises(errors.UnauthenticatedError, match="DEVREP_TOKEN"):
        Client(ADDRESS, transport=MockTransport(ping_only), token=None)
    with pytest.raises(errors.UnauthenticatedError, match="DEVREP_TOKEN"):  # TCP: GrpcTransport, no token
        Client("127.0.0.1:9", token=None)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_mock_errors_are_mapped_to_the_named_class(cls: type[errors.DevrepError]) -> None:
    """A status with the server's class name comes out as exactly that class, through gRPC and the side
    channel alike (the transports' one mapping)."""
    def handler(request: MockRequest) -> Any:
        if request.kind == "side":
            if request.method == "hello":
                return {"ok": True, "token": "t", "session": "s", "label": "uid:0/x"}
            return {"ok": False, "code": cls.grpc_code, "class": cls.__name__, "error": "side boom"}
        if request.method == "Ping":
            return pb.PingResponse(session_id="s")
        raise MockRpcError(cls.grpc_code, "grpc boom", error_class=cls.__name__)

    client, _ = mock_client(handler, side_channel=True)
    with client:
        with pytest.raises(errors.DevrepError) as grpc_err:
            client.describe("x")
        with pytest.raises(errors.DevrepError) as side_err:
            client.acquire("x", "cpu:0")
    print(f"expected {cls.__name__}; got {type(grpc_err.value).__name__} / {type(side_err.value).__name__}")
    assert type(grpc_err.value) is cls and str(grpc_err.value) == "grpc boom"
    assert type(side_err.value) is cls and str(side_err.value) == "side boom"


@pytest.mark.parametrize("code, cls, hint", [
    ("NOT_FOUND", errors.NotFoundError, ""),
    ("DEADLINE_EXCEEDED", errors.DeadlineExceededError, "did not answer within the call's deadline"),
    ("UNAVAILABLE", errors.ServiceUnavailableError, "devrep serve"),
    ("INTERNAL", errors.DevrepError, ""),
])
def test_mock_unnamed_status_maps_to_the_status_class(code: str, cls: type[errors.DevrepError], hint: str) -> None:
    def handler(request: MockRequest) -> Any:
        if request.method == "Ping":
            return pb.PingResponse(session_id="s")
        raise MockRpcError(code, "details")

    client, _ = mock_client(handler)
    with client, pytest.raises(errors.DevrepError) as err:
        client.list_regions()
    print(f"{code}: expected {cls.__name__}; got {type(err.value).__name__}: {err.value}")
    assert type(err.value) is cls and hint in str(err.value)


def test_mock_side_channel_error_reply_closes_its_fds() -> None:
    fd = memfd_create("stray", 4096)

    def handler(request: MockRequest) -> Any:
        if request.method == "hello":
            return {"ok": True, "token": "t", "session": "s"}
        if request.method == "Ping":
            return pb.PingResponse(session_id="s")
        return {"ok": False, "code": "INVALID_ARGUMENT", "class": "AlignmentError", "error": "odd"}, [fd]

    client, _ = mock_client(handler, side_channel=True)
    with client, pytest.raises(errors.AlignmentError, match="odd"):
        client.acquire("x", "cpu:0")
    with pytest.raises(OSError):
        os.fstat(fd)  # the fd that came with the error reply was closed


def test_lease_grant_one_definition_from_either_reply() -> None:
    """The gRPC reply and the side channel's reply of the same lease become equal ``LeaseGrant`` fields."""
    fields: dict[str, Any] = dict(lease_id=9, generation=4, invalid_runs=[2, 3, 10, 1], device="cpu:1", nbytes=5000,
                  export_kind="fd", buffer_nbytes=8192, cuda_ipc_handle=b"\x01\xff", gpu_uuid="GPU-x", granularity=2)
    from_grpc = LeaseGrant.from_grpc(pb.AcquireResponse(**fields))
    side = {**fields, "ok": True, "lease": fields["lease_id"], "cuda_ipc_handle": b"\x01\xff".hex()}
    del side["lease_id"]
    from_side = LeaseGrant.from_side_channel(side)
    a, b = dataclasses.asdict(from_grpc), dataclasses.asdict(from_side)
    assert np.array_equal(a.pop("invalid_runs"), [[2, 3], [10, 1]])
    assert np.array_equal(b.pop("invalid_runs"), [[2, 3], [10, 1]])
    assert a.pop("via_side_channel") is False and b.pop("via_side_channel") is True
    print("grpc", a, "\nside", b)
    assert a == b
    # Not sent: the buffer is the whole pages of nbytes.
    assert LeaseGrant.from_grpc(pb.AcquireResponse(nbytes=5000)).buffer_nbytes == 8192
    with pytest.raises(errors.DevrepError, match="malformed"):
        LeaseGrant.from_side_channel({"ok": True, "lease": 1})


def test_mock_acquire_over_the_side_channel_maps_the_fd() -> None:
    data = np.arange(8192, dtype=np.uint8) % 251
    fd = memfd_create("replica", 8192)
    map_fd(fd, 8192, writable=True)[:] = data

    def handler(request: MockRequest) -> Any:
        if request.method == "hello":
            assert request.message["label"] == "me"
            return {"ok": True, "token": "t", "session": "s", "label": "uid:0/me"}
        if request.method == "Ping":
            return pb.PingResponse(session_id="s")
        if request.method == "acquire":
            m = request.message
            assert (m["name"], m["device"], m["fresh"], m["timeout_ms"]) == ("emb", "cpu:0", False, 2500), m
            assert request.timeout == 2.5 + 10.0
            return {"ok": True, "lease": 5, "generation": 3, "invalid_runs": [1, 1], "nbytes": 6000,
                    "device": "cpu:0", "export_kind": "fd", "buffer_nbytes": 8192, "cuda_ipc_handle": ""}, [os.dup(fd)]
        if request.method in ("release", "bye"):
            return {"ok": True}
        raise AssertionError(request)

    client, transport = mock_client(handler, side_channel=True, token=None, label="me")
    with client:
        assert client.label == "uid:0/me"
        before = open_fds()
        lease = client.acquire("emb", "cpu:0", fresh=False, timeout=2.5)
        assert open_fds() == before, "the fd that came with the grant was closed after mapping"
        assert isinstance(lease, LeaseGrant) and lease.via_side_channel and lease.lease_id == 5
        assert lease.invalid_runs.tolist() == [[1, 1]] and lease.generation == 3 and lease.region == "emb"
        assert np.array_equal(lease.array, data[:6000]) and not lease.array.flags.writeable
        lease.release()
        assert transport.requests[-1].message == {"op": "release", "lease": 5}
    assert [r.method for r in transport.requests][-1] == "bye"
    os.close(fd)


def test_mock_acquire_over_grpc_reads_the_holder_ttl() -> None:
    def handler(request: MockRequest) -> Any:
        if request.method == "Ping":
            return pb.PingResponse(session_id="s")
        if request.method == "Acquire":
            return Reply(pb.AcquireResponse(lease_id=2, generation=1, nbytes=4096, device="cuda:0",
                                            export_kind="cuda_ipc", cuda_ipc_handle=b"h" * 64),
                         ((HOLDER_TTL_KEY, "60000"),))
        if request.method == "Release":
            assert request.message.lease_id == 2
            return pb.ReleaseResponse()
        raise AssertionError(request)

    client, transport = mock_client(handler)
    with client:
        lease = client.acquire("g", "cuda:0")
        assert not lease.via_side_channel and lease.cuda_ipc_handle == b"h" * 64 and lease.buffer_nbytes == 4096
        assert client._heartbeat_thread is not None, "a holder TTL starts the heartbeat"
        with pytest.raises(errors.FailedPreconditionError, match="to_cupy"):
            lease.array  # noqa: B018
        lease.release()
        assert transport.requests[-1].method == "Release"
        with pytest.raises(errors.FailedPreconditionError, match="no fd side channel"):
            client.create_region("r", 4096, tracking="explicit")  # as over TCP: no side channel to hand a memfd over


def watch_handler(tail: Exception | None) -> Any:
    def handler(request: MockRequest) -> Any:
        if request.method == "Ping":
            return pb.PingResponse(session_id="s")
        assert request.kind == "stream" and request.method == "Watch", request

        def messages() -> Iterator[pb.WatchResponse]:
            for gen in (1, 2):
                yield pb.WatchResponse(events=[pb.Event(kind="invalidated", region="r", generation=gen,
                                                         runs=[gen, 1])], dropped=1)
            if tail is not None:
                raise tail
        return messages()
    return handler


@pytest.mark.parametrize("tail, bounded, raises", [
    (None, False, None),
    (MockRpcError("CANCELLED", "cancelled"), False, None),
    (MockRpcError("DEADLINE_EXCEEDED", "late"), True, None),
    (MockRpcError("DEADLINE_EXCEEDED", "late"), False, errors.DeadlineExceededError),
    (MockRpcError("PERMISSION_DENIED", "revoked", error_class="PermissionDeniedError"), True,
     errors.PermissionDeniedError),
])
def test_mock_watch_stream_ends_or_raises(tail: Exception | None, bounded: bool,
                                          raises: type[errors.DevrepError] | None) -> None:
    client, transport = mock_client(watch_handler(tail))
    with client:
        stream = client.watch("r", timeout=5.0 if bounded else None)
        assert transport.requests[-1].timeout == (5.0 if bounded else None)
        got: list[Any] = []
        if raises is None:
            got.extend(stream)
        else:
            with pytest.raises(raises):
                got.extend(stream)
        print([(e.generation, e.runs.tolist()) for e in got], stream.dropped)
        assert [e.generation for e in got] == [1, 2] and got[1].runs.tolist() == [[2, 1]] and stream.dropped == 2


def test_mock_watch_max_events_cancels() -> None:
    client, _ = mock_client(watch_handler(None))
    with client:
        stream = client.watch("r", max_events=1)
        assert [e.generation for e in stream] == [1]
        assert stream._call._cancelled.is_set()  # type: ignore[attr-defined]


def test_mock_replicate_reports_progress() -> None:
    def handler(request: MockRequest) -> Any:
        if request.method == "Ping":
            return pb.PingResponse(session_id="s")
        assert request.kind == "stream" and request.timeout == 30.0 + 10.0
        return iter([pb.ReplicateResponse(bytes_copied=10, bytes_total=20),
                     pb.ReplicateResponse(bytes_total=20, report=pb.SyncReport(region="r", bytes_copied=20))])

    client, _ = mock_client(handler)
    seen: list[tuple[int, int]] = []
    with client:
        report = client.replicate("r", ["cpu:0"], progress=lambda done, total: seen.append((done, total)))
    assert report.region == "r" and seen == [(10, 20), (20, 20)]


# ---------------------------------------------------------------------------------------------- real transports
def test_real_transports_against_an_in_process_server(devrep_server: DevrepServer) -> None:
    """SideChannelTransport and GrpcTransport alone (no Client) against a real server: the session handshake,
    errors mapped from real replies, and the same lease as one ``LeaseGrant`` from either path."""
    server = devrep_server
    assert server.fd_socket_path is not None
    with SideChannelTransport(server.address, server.fd_socket_path, timeout=10.0) as local, \
            GrpcTransport(server.address) as remote:
        with pytest.raises(errors.UnauthenticatedError):
            remote.unary("Ping", pb.PingRequest(), timeout=10.0, metadata=())
        hello, fds = local.call({"op": "hello", "label": "transport-test"})
        assert fds == [] and hello["ok"]
        md = (("authorization", f"Bearer {hello['token']}"), (HOLDER_KEY, "holder-1"))
        assert remote.unary("Ping", pb.PingRequest(), timeout=10.0, metadata=md).message.session_id == hello["session"]
        with pytest.raises(errors.InvalidArgumentError, match="unknown side-channel op"):
            local.call({"op": "nonsense"})
        with pytest.raises(errors.FailedPreconditionError, match="no fd side channel"):
            remote.call({"op": "hello"})
        with pytest.raises(errors.NotFoundError):
            remote.unary("DescribeRegion", pb.DescribeRegionRequest(name="nope"), timeout=10.0, metadata=md)
        # A region, replicated, then leased both ways.
        fd = memfd_create("t", 4 * 4096)
        add_seals(fd, F_SEAL_SHRINK | F_SEAL_GROW)
        try:
            ticket = local.call({"op": "put_fds", "kind": "memfd"}, [fd])[0]["ticket"]
        finally:
            os.close(fd)
        remote.unary("RegisterRegion", pb.RegisterRegionRequest(
            name="t", memfd=pb.MemfdSource(fd_ticket=ticket, nbytes=4 * 4096), tracking=pb.TRACKING_MODE_EXPLICIT),
            timeout=10.0, metadata=md)
        list(remote.stream("Replicate", pb.ReplicateRequest(name="t", devices=["cpu:0"]), timeout=30.0, metadata=md))
        request = pb.AcquireRequest(name="t", device="cpu:0", fresh=True)
        side = local.acquire(request, timeout=10.0, metadata=md)
        grpc_ = remote.acquire(request, timeout=10.0, metadata=md)
        try:
            assert side.fd >= 0 and grpc_.fd == -1 and side.grant.via_side_channel and not grpc_.grant.via_side_channel
            for f in ("generation", "device", "nbytes", "export_kind", "buffer_nbytes"):
                assert getattr(side.grant, f) == getattr(grpc_.grant, f), f
            assert side.grant.lease_id != grpc_.grant.lease_id and grpc_.holder_ttl > 0
        finally:
            os.close(side.fd)
        with pytest.raises(errors.DeadlineExceededError):  # a real gRPC deadline, mapped
            next(iter(remote.stream("Watch", pb.WatchRequest(names=["t"]), timeout=0.2, metadata=md)))
        stream = remote.stream("Watch", pb.WatchRequest(names=["t"]), timeout=0.2, metadata=md,
                               ends={"DEADLINE_EXCEEDED"})
        stream.wait_ready()
        assert list(stream) == []  # a bounded watch just ends
        local.call({"op": "bye"})
    with pytest.raises(errors.ServiceUnavailableError, match="closed"):
        remote.unary("Ping", pb.PingRequest(), timeout=10.0, metadata=md)
    with pytest.raises(errors.ServiceUnavailableError):
        local.call({"op": "hello"})


def test_client_picks_the_transport(devrep_server: DevrepServer, devrep_client: Client) -> None:
    """Locally the client takes the side channel; with a token and an explicit ``GrpcTransport`` it is a
    gRPC-only session (as over TCP) in the same session."""
    assert isinstance(devrep_client._transport, SideChannelTransport)
    devrep_client.create_region("shared", 4096).array[:] = 5
    devrep_client.invalidate("shared")
    devrep_client.replicate("shared", ["cpu:0"])
    with connect(devrep_server.address, token=devrep_client.token,
                 transport=GrpcTransport(devrep_server.address)) as remote:
        assert remote._sc is None and remote.session_id == devrep_client.session_id
        with remote.acquire("shared", "cpu:0") as lease:
            assert not lease.via_side_channel and lease.nbytes == 4096
            with pytest.raises(errors.FailedPreconditionError, match="no fd side channel"):
                lease.array  # noqa: B018  (mapping a CPU replica needs the side channel)
    with devrep_client.acquire("shared", "cpu:0") as lease:
        assert lease.via_side_channel and (lease.array == 5).all()


# ---------------------------------------------------------------------------------------------- import cost
@pytest.mark.parametrize("module, forbidden", [
    ("devrep.client", ("numba", "devrep.service", "devrep.engine", "devrep.region", "devrep.backends",
                       "devrep.tracking", "devrep.testing")),
    ("devrep.testing", ("numpy", "numba", "grpc", "devrep.client", "devrep.service", "devrep.engine",
                        "devrep.backends", "pytest")),
])
def test_import_loads_only_what_it_needs(module: str, forbidden: tuple[str, ...]) -> None:
    """The module set a fresh interpreter loads (not the time: that is bench I0): the client without the
    server, the engine and numba; ``devrep.testing`` without anything heavy until a double is used."""
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                            timeout=120).stdout.split()
    found = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert module in loaded and not found, f"import {module} loaded {found}"
