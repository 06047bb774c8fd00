"""Leases cannot outlive their reader (issue 11 item 7, issue 10 item 8): a lease taken over plain gRPC by a process
that dies is released once its holder stops heartbeating, and no lease is held longer than ``--max-lease-s``; the
owner's syncs then proceed and the reader's next access fails with FAILED_PRECONDITION (docs/api.md)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable

import grpc
import pytest
from _devrep_service import client_process, inproc_server, read_line, server_process, tell
from _support import wait_for

from devrep import errors
from devrep.client import Client, connect
from devrep.service import TokenStore, sessions
from devrep.wire._gen import devrep_pb2 as pb
from devrep.wire._gen import devrep_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)

TOKEN = "grpc-only-job-token-0123456789"
BOUND = 60.0
"""Seconds a released/revoked lease may take to disappear (the guarantee is the TTL; the rest is load slack)."""


def kill_and_reap(child: subprocess.Popen[str]) -> None:
    """SIGKILL a client process (as a crash would end it) and reap it."""
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait(30)


def block_both_buffers(owner: Client, take: Callable[[], object]) -> list[object]:
    """Lease the readable buffer, let the owner sync into the spare (flip), lease that one too: with a new write,
    the owner's next sync has no buffer to write (until a lease goes)."""
    held = [take()]
    owner.invalidate("t", 0, 4096)
    owner.sync("t")
    held.append(take())
    owner.invalidate("t", 0, 4096)
    return held


def test_sigkilled_grpc_only_client_releases_its_leases() -> None:
    tokens = TokenStore()
    tokens.add(TOKEN, "grpc-job")
    ttl = 5.0
    with inproc_server(tokens=tokens, holder_ttl=ttl) as server, connect(server.address, label="owner") as owner:
        region = owner.create_region("t", 64 << 10)
        region.array[:] = 1
        owner.replicate("t", ["cpu:0"])
        owner.share("t", "*")
        child = client_process("lease_holder", server.address, "grpc-only", TOKEN)
        try:
            taken: list[str] = []

            def take() -> str:       # the child leased once at start; later leases when told
                if taken:
                    tell(child, "next")
                taken.append(read_line(child, 60))
                return taken[-1]
            held = block_both_buffers(owner, take)
            assert all(str(line).startswith("held") for line in held), held
            assert owner.stats().leases == 2
            with pytest.raises(errors.LeaseTimeoutError):       # the dead-to-be client's leases block the owner
                owner.sync("t", timeout=0.3)
            # Alive, the client keeps its leases past the TTL: its heartbeat (a Ping with its holder id) holds them.
            time.sleep(ttl * 1.5)
            assert owner.stats().leases == 2, "a live gRPC client lost its leases"
        finally:
            kill_and_reap(child)
        took = wait_for(lambda: owner.stats().leases == 0, "the killed client's leases were not released",
                        BOUND)
        print(f"leases of the SIGKILLed gRPC-only client released after {took:.1f}s (holder TTL {ttl}s)")
        report = owner.sync("t", timeout=10)                   # no longer blocked
        assert report.pages_copied >= 1
        region.array[:4096] = 9
        owner.invalidate("t", 0, 4096)
        with owner.acquire("t", "cpu:0") as lease:
            assert int(lease.array[0]) == 9


def test_leases_are_revoked_after_max_lease_s_and_the_reader_gets_failed_precondition() -> None:
    limit = 3.0
    with inproc_server(max_lease_s=limit) as server, connect(server.address, label="owner") as owner:
        region = owner.create_region("t", 64 << 10)
        region.array[:] = 1
        owner.replicate("t", ["cpu:0"])
        start = time.monotonic()
        held = block_both_buffers(owner, lambda: owner.acquire("t", "cpu:0", fresh=False))
        stub = pb_grpc.DevrepServiceStub(grpc.insecure_channel(server.address))
        md = (("authorization", f"Bearer {owner.token}"),)
        grpc_lease = stub.Acquire(pb.AcquireRequest(name="t", device="cpu:0"), metadata=md, timeout=30).lease_id
        if time.monotonic() - start < limit - 1:                # (under heavy load the leases may already be gone)
            with pytest.raises(errors.LeaseTimeoutError):
                owner.sync("t", timeout=0.3)
        wait_for(lambda: owner.stats().leases == 0, "leases held past --max-lease-s were not revoked", BOUND)
        print(f"leases gone {time.monotonic() - start:.1f}s after the first was taken (limit {limit}s)")
        assert owner.sync("t", timeout=10).pages_copied >= 1   # the owner's syncs proceed
        for lease in held:
            with pytest.raises(errors.FailedPreconditionError, match="max-lease-s"):
                lease.release()                                 # type: ignore[attr-defined]
        with pytest.raises(errors.FailedPreconditionError, match="max-lease-s"):
            owner._side().call({"op": "lease_fd", "lease": held[0].lease_id})  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as err:
            stub.Release(pb.ReleaseRequest(lease_id=grpc_lease), metadata=md, timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
        assert "max-lease-s" in (err.value.details() or "")


def test_devrep_serve_max_lease_s_flag() -> None:
    with server_process("--max-lease-s", "1") as (address, _proc), connect(address) as client:
        client.create_region("t", 8192)
        client.replicate("t", ["cpu:0"])
        lease = client.acquire("t", "cpu:0")
        took = wait_for(lambda: client.stats().leases == 0, "devrep serve --max-lease-s 1 did not revoke", BOUND)
        print(f"revoked within {took:.1f}s of polling")
        with pytest.raises(errors.FailedPreconditionError, match="revoked"):
            lease.release()


def test_release_twice_is_failed_precondition_on_both_paths() -> None:
    with inproc_server() as server, connect(server.address) as client:
        client.create_region("t", 8192)
        client.replicate("t", ["cpu:0"])
        side = client.acquire("t", "cpu:0")                  # side channel
        client._side().call({"op": "release", "lease": side.lease_id})
        with pytest.raises(errors.FailedPreconditionError, match="already released"):
            client._side().call({"op": "release", "lease": side.lease_id})
        stub = pb_grpc.DevrepServiceStub(grpc.insecure_channel(server.address))
        md = (("authorization", f"Bearer {client.token}"),)
        lease_id = stub.Acquire(pb.AcquireRequest(name="t", device="cpu:0"), metadata=md, timeout=30).lease_id
        stub.Release(pb.ReleaseRequest(lease_id=lease_id), metadata=md, timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            stub.Release(pb.ReleaseRequest(lease_id=lease_id), metadata=md, timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
        with pytest.raises(grpc.RpcError) as err:                # never issued: NOT_FOUND
            stub.Release(pb.ReleaseRequest(lease_id=10**9), metadata=md, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_ended_lease_reasons_are_bounded_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session remembers why its last ``MAX_ENDED_LEASES`` leases ended, dropping the oldest first: a long-lived
    reader's acquire/release loop keeps a fixed amount of memory and a constant cost per release."""
    monkeypatch.setattr(sessions, "MAX_ENDED_LEASES", 8)
    with inproc_server() as server, connect(server.address) as client:
        client.create_region("t", 8192)
        client.replicate("t", ["cpu:0"])
        ids = []
        for _ in range(20):
            lease = client.acquire("t", "cpu:0")
            ids.append(lease.lease_id)
            lease.release()
        for lease_id in ids[:12]:                              # forgotten: never issued, as far as it can tell
            with pytest.raises(errors.NotFoundError):
                client._side().call({"op": "release", "lease": lease_id})
        for lease_id in ids[12:]:
            with pytest.raises(errors.FailedPreconditionError, match="already released"):
                client._side().call({"op": "release", "lease": lease_id})


def test_sigkilled_process_sharing_a_token_session_releases_its_side_channel_leases() -> None:
    tokens = TokenStore()
    tokens.add(TOKEN, "pod")
    with inproc_server(tokens=tokens) as server, connect(server.address, label="owner") as owner:
        owner.create_region("t", 64 << 10)
        owner.replicate("t", ["cpu:0"])
        owner.share("t", "*")
        child = client_process("lease_holder", server.address, "joined", TOKEN)
        try:
            assert read_line(child, 60).startswith("held")
            assert owner.stats().leases == 1
        finally:
            kill_and_reap(child)
        took = wait_for(lambda: owner.stats().leases == 0, "the killed process's lease outlived its connection",
                        BOUND)
        print(f"lease of the SIGKILLed token-sharing process released after {took:.2f}s")
        assert any(s.persistent for s in server.registry.sessions())  # the session itself lives on
