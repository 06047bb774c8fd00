"""Every RPC answers bad input with its documented status and the server keeps serving (docs/api.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from _devrep_service import client_process, inproc_server, read_line, tell

from devrep.client import connect
from devrep.metrics import Metrics
from devrep.service import Quota, TokenStore
from devrep.wire._gen import devrep_pb2 as pb
from devrep.wire._gen import devrep_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)
C = grpc.StatusCode


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[object, object, pb_grpc.DevrepServiceStub, tuple[tuple[str, str], ...]]]:
    tokens = TokenStore()
    tokens.add("k8s-allocation-token-0123456789", "pod-a")
    with inproc_server(quota=Quota(max_bytes=8 << 20, max_regions=3), tokens=tokens) as server, \
            connect(server.address, label="owner") as client:
        client.create_region("r", 1 << 20).array[:] = 1
        client.replicate("r", ["cpu:0"])
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.DevrepServiceStub(channel)
        yield server, client, stub, (("authorization", f"Bearer {client.token}"),)
        channel.close()


def status(fn: object, request: object, metadata: object = None) -> grpc.StatusCode:
    try:
        result = fn(request, metadata=metadata, timeout=10)  # type: ignore[operator]
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code()
    return C.OK


CASES: list[tuple[str, object, grpc.StatusCode]] = [
    ("Ping", pb.PingRequest(), C.OK),
    ("RegisterRegion", pb.RegisterRegionRequest(), C.INVALID_ARGUMENT),  # missing name
    ("RegisterRegion", pb.RegisterRegionRequest(name="x"), C.INVALID_ARGUMENT),  # missing source
    ("RegisterRegion", pb.RegisterRegionRequest(name="x" * 300, file=pb.FileSource(path="/etc/hostname")),
     C.INVALID_ARGUMENT),  # oversized name
    ("RegisterRegion", pb.RegisterRegionRequest(name="x", block_size=-4096, file=pb.FileSource(path="/etc/hostname")),
     C.INVALID_ARGUMENT),
    ("RegisterRegion", pb.RegisterRegionRequest(name="x", memfd=pb.MemfdSource(fd_ticket="nope")), C.NOT_FOUND),
    ("RegisterRegion", pb.RegisterRegionRequest(name="x", memfd=pb.MemfdSource(fd_ticket="t", nbytes=-1)),
     C.INVALID_ARGUMENT),
    ("RegisterRegion", pb.RegisterRegionRequest(name="x", file=pb.FileSource(path="relative")), C.INVALID_ARGUMENT),
    ("RegisterRegion", pb.RegisterRegionRequest(name="x", file=pb.FileSource(path="/no/such/file")), C.NOT_FOUND),
    ("RegisterRegion", pb.RegisterRegionRequest(name="x", file=pb.FileSource(path="/etc/hostname"),
                                                tracking=pb.TRACKING_MODE_SYNC), C.INVALID_ARGUMENT),
    ("RegisterRegion", pb.RegisterRegionRequest(name="r", file=pb.FileSource(path="/etc/hostname")),
     C.ALREADY_EXISTS),
    ("UnregisterRegion", pb.UnregisterRegionRequest(), C.INVALID_ARGUMENT),
    ("UnregisterRegion", pb.UnregisterRegionRequest(name="unknown"), C.NOT_FOUND),
    ("DescribeRegion", pb.DescribeRegionRequest(name="unknown"), C.NOT_FOUND),
    ("DescribeRegion", pb.DescribeRegionRequest(name="r"), C.OK),
    ("ListRegions", pb.ListRegionsRequest(), C.OK),
    ("GetServerInfo", pb.GetServerInfoRequest(), C.OK),
    ("ShareRegion", pb.ShareRegionRequest(name="r"), C.INVALID_ARGUMENT),
    ("ShareRegion", pb.ShareRegionRequest(name="r", grantee="uid:abc"), C.INVALID_ARGUMENT),
    ("ShareRegion", pb.ShareRegionRequest(name="unknown", grantee="*"), C.NOT_FOUND),
    ("Replicate", pb.ReplicateRequest(name="r"), C.INVALID_ARGUMENT),
    ("Replicate", pb.ReplicateRequest(name="r", devices=["gpu:0"]), C.NOT_FOUND),
    ("Replicate", pb.ReplicateRequest(name="r", devices=["cpu:99"]), C.NOT_FOUND),
    ("Replicate", pb.ReplicateRequest(name="r", devices=["cpu:0"], timeout_ms=-5), C.INVALID_ARGUMENT),
    ("Replicate", pb.ReplicateRequest(name="r", devices=[f"cpu:{i}" for i in range(100)]), C.INVALID_ARGUMENT),
    ("Replicate", pb.ReplicateRequest(name="r", devices=[f"cpu:{i % 4}" for i in range(9)]), C.OK),
    ("Replicate", pb.ReplicateRequest(name="r" * 200, devices=["cpu:0"]), C.NOT_FOUND),
    ("Sync", pb.SyncRequest(name="r", devices=["opencl:7"]), C.NOT_FOUND),
    ("Sync", pb.SyncRequest(name="r", timeout_ms=-1), C.INVALID_ARGUMENT),
    ("Acquire", pb.AcquireRequest(name="r"), C.INVALID_ARGUMENT),
    ("Acquire", pb.AcquireRequest(name="r", device="cpu:7"), C.NOT_FOUND),
    ("Acquire", pb.AcquireRequest(name="r", device="cpu:0", timeout_ms=-1), C.INVALID_ARGUMENT),
    ("Release", pb.ReleaseRequest(), C.INVALID_ARGUMENT),
    ("Release", pb.ReleaseRequest(lease_id=123456), C.NOT_FOUND),
    ("Invalidate", pb.InvalidateRequest(name="r", offset=-1), C.INVALID_ARGUMENT),
    ("Invalidate", pb.InvalidateRequest(name="r", length=-1), C.INVALID_ARGUMENT),
    ("Invalidate", pb.InvalidateRequest(name="r", offset=1 << 40), C.INVALID_ARGUMENT),
    ("Invalidate", pb.InvalidateRequest(name="r", runs=[1]), C.INVALID_ARGUMENT),
    ("Invalidate", pb.InvalidateRequest(name="r", runs=[-1, 1]), C.INVALID_ARGUMENT),
    ("Invalidate", pb.InvalidateRequest(name="r", runs=[0, 0]), C.INVALID_ARGUMENT),
    ("Invalidate", pb.InvalidateRequest(name="r", runs=[255, 2]), C.INVALID_ARGUMENT),
    ("Invalidate", pb.InvalidateRequest(name="r", runs=[3, 2]), C.OK),
    ("Invalidate", pb.InvalidateRequest(name="unknown"), C.NOT_FOUND),
    ("Verify", pb.VerifyRequest(name="r", devices=["cpu:7"]), C.NOT_FOUND),
    ("Verify", pb.VerifyRequest(name="r", devices=["cpu:1"], resync=True), C.OK),
    ("Watch", pb.WatchRequest(names=["unknown"]), C.NOT_FOUND),
    ("Watch", pb.WatchRequest(coalesce_ms=-1), C.INVALID_ARGUMENT),
    ("Watch", pb.WatchRequest(coalesce_ms=5000), C.INVALID_ARGUMENT),
]


@pytest.mark.parametrize(("method", "request_", "code"), CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_status(env: tuple[object, object, pb_grpc.DevrepServiceStub, object], method: str, request_: object,
                code: grpc.StatusCode) -> None:
    _, _, stub, md = env
    assert status(getattr(stub, method), request_, md) == code
    assert status(stub.Ping, pb.PingRequest(), md) == C.OK  # still serving


@pytest.mark.parametrize("method", sorted(pb.DESCRIPTOR.services_by_name["DevrepService"].methods_by_name))
@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("x-devrep-token", ""),)])
def test_every_rpc_needs_a_valid_token(env: tuple[object, object, pb_grpc.DevrepServiceStub, object], method: str,
                                       metadata: object) -> None:
    _, _, stub, md = env
    request = getattr(pb, f"{method}Request")()
    assert status(getattr(stub, method), request, metadata) == C.UNAUTHENTICATED
    assert status(stub.Ping, pb.PingRequest(), md) == C.OK


def test_pre_authorized_token_and_isolation(env: tuple[object, object, pb_grpc.DevrepServiceStub, object]) -> None:
    _, _, stub, _ = env
    pod = (("x-devrep-token", "k8s-allocation-token-0123456789"),)
    assert status(stub.Ping, pb.PingRequest(), pod) == C.OK
    # another session sees nothing of the owner's region until it is shared
    assert stub.ListRegions(pb.ListRegionsRequest(), metadata=pod).regions == []
    assert status(stub.Acquire, pb.AcquireRequest(name="r", device="cpu:0"), pod) == C.NOT_FOUND
    # a world-readable file may be registered by path alone (no side channel: grpcurl-style client)
    assert status(stub.RegisterRegion, pb.RegisterRegionRequest(
        name="pod/hostname", file=pb.FileSource(path="/etc/hostname")), pod) == C.OK
    assert status(stub.UnregisterRegion, pb.UnregisterRegionRequest(name="pod/hostname"), pod) == C.OK


def test_sharing_is_read_only(env: tuple[object, object, pb_grpc.DevrepServiceStub, object]) -> None:
    server, owner, stub, _ = env
    with connect(server.address, label="guest") as guest:  # type: ignore[attr-defined]
        owner.share("r", f"label:{guest.label}")  # type: ignore[attr-defined]
        try:
            [desc] = guest.list_regions()
            assert desc.read_only and desc.owner == f"uid:{os.getuid()}/owner"
            with guest.acquire("r", "cpu:0") as lease:
                assert lease.array.flags.writeable is False
            md = (("authorization", f"Bearer {guest.token}"),)
            for method, request in [("Invalidate", pb.InvalidateRequest(name="r")),
                                    ("UnregisterRegion", pb.UnregisterRegionRequest(name="r")),
                                    ("Replicate", pb.ReplicateRequest(name="r", devices=["cpu:1"])),
                                    ("ShareRegion", pb.ShareRegionRequest(name="r", grantee="*")),
                                    ("Verify", pb.VerifyRequest(name="r", resync=True))]:
                assert status(getattr(stub, method), request, md) == C.PERMISSION_DENIED, method
        finally:
            owner.share("r", f"label:{guest.label}", revoke=True)  # type: ignore[attr-defined]
        assert guest.list_regions() == []


def test_quotas_give_resource_exhausted() -> None:
    metrics = Metrics()
    with inproc_server(quota=Quota(max_bytes=2 << 20, max_regions=2, max_leases=2), metrics=metrics) as server, \
            connect(server.address) as client:
        client.create_region("a", 1 << 20)
        client.create_region("b", 1 << 20)
        with pytest.raises(Exception, match="limit 2") as exc:
            client.create_region("c", 1 << 20)
        assert type(exc.value).__name__ == "ResourceExhaustedError"
        client.replicate("a", ["cpu:0", "cpu:1"])  # exactly 2 MiB of replicas
        with pytest.raises(Exception, match="quota") as exc:
            client.replicate("b", ["cpu:0"])
        assert type(exc.value).__name__ == "ResourceExhaustedError"
        leases = [client.acquire("a", "cpu:0"), client.acquire("a", "cpu:1")]
        with pytest.raises(Exception, match="limit 2"):
            client.acquire("a", "cpu:0")
        for lease in leases:
            lease.release()
        assert client.ping()
    # each refusal counted once, by resource (devrep serve --metrics-port wires the same Metrics)
    for resource in ("regions", "bytes", "leases"):
        assert metrics.registry.get_sample_value("devrep_quota_rejections_total", {"resource": resource}) == 1.0
    metrics.close()


def test_acquire_fresh_honours_the_deadline() -> None:
    with inproc_server() as server, connect(server.address) as client:
        client.create_region("d", 1 << 20)
        client.replicate("d", ["cpu:0"])
        holders = [client.acquire("d", "cpu:0")]
        client.invalidate("d", 0, 4096)
        holders.append(client.acquire("d", "cpu:0", fresh=True))  # syncs into the spare buffer
        client.invalidate("d", 0, 4096)
        # both buffers are leased: a fresh acquire cannot sync and must give up at its timeout, not hang
        with pytest.raises(Exception) as exc:
            client.acquire("d", "cpu:0", fresh=True, timeout=0.3)
        assert type(exc.value).__name__ == "LeaseTimeoutError"
        stub = pb_grpc.DevrepServiceStub(grpc.insecure_channel(server.address))
        try:
            stub.Acquire(pb.AcquireRequest(name="d", device="cpu:0", fresh=True, timeout_ms=60_000),
                         metadata=(("authorization", f"Bearer {client.token}"),), timeout=0.3)
        except grpc.RpcError as err:
            assert err.code() == C.DEADLINE_EXCEEDED
        else:
            pytest.fail("acquire outlived its deadline")
        for lease in holders:
            lease.release()
        with client.acquire("d", "cpu:0", fresh=True, timeout=5) as lease:
            assert lease.generation == 2


def test_shutdown_releases_write_protection_while_the_process_lives() -> None:
    """server.stop() itself (not process exit) un-protects a sync-tracked client region."""
    from devrep.tracking import TRACKERS, _register_kernel_trackers

    _register_kernel_trackers()
    assert "sync" in TRACKERS, "sync tracking is not installed"
    with inproc_server() as server:
        proc = client_process("sync_writer_after_stop", server.address)
        try:
            assert read_line(proc) == "READY"
            server.stop(1.0)
            assert os.path.exists(f"/proc/{os.getpid()}")
            tell(proc, "go")
            assert read_line(proc, timeout=10) == "WROTE"
        finally:
            proc.kill()
            proc.wait(10)
