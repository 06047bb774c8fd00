"""R5: a second client cannot list, acquire, invalidate, sync, verify, share or unregister the first client's
regions; unknown tokens are UNAUTHENTICATED; another uid cannot reach the sockets; socket modes are as
documented (directory 0750, gRPC and fd sockets 0660)."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import devrep
import devrep.client
from devrep._pages import PAGE_SIZE
from devrep.wire._gen import devrep_pb2 as pb
from devrep.wire._gen import devrep_pb2_grpc as pb_grpc

from .conftest import ServerProcess

NOBODY = 65534


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users may traverse, so only devrep's own modes decide who gets in."""
    with tempfile.TemporaryDirectory(prefix="devrep-r5-") as d:
        os.chmod(d, 0o755)
        yield Path(d)


@pytest.fixture
def srv(open_dir: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(open_dir / "run")
    try:
        yield server
    finally:
        server.stop()


def denied(call: Callable[[], Any]) -> str:
    """The error a call fails with (it must fail with NotFound or PermissionDenied, never succeed)."""
    with pytest.raises((devrep.NotFoundError, devrep.PermissionDeniedError)) as info:
        call()
    return type(info.value).__name__


def test_r5_other_session_sees_nothing(srv: ServerProcess) -> None:
    with devrep.client.connect(srv.address, label="alice") as alice, \
            devrep.client.connect(srv.address, label="mallory") as mallory:
        region = alice.create_region("secret", 16 * PAGE_SIZE)
        region.array[:] = 42
        alice.replicate("secret", ["cpu:0"])
        generation = alice.describe("secret").generation
        assert [r.name for r in mallory.list_regions()] == []
        attempts: dict[str, Callable[[], Any]] = {
            "describe": lambda: mallory.describe("secret"),
            "acquire": lambda: mallory.acquire("secret", "cpu:0"),
            "acquire_stale": lambda: mallory.acquire("secret", "cpu:0", fresh=False),
            "invalidate": lambda: mallory.invalidate("secret", 0, PAGE_SIZE),
            "sync": lambda: mallory.sync("secret"),
            "replicate": lambda: mallory.replicate("secret", ["cpu:1"]),
            "verify": lambda: mallory.verify("secret"),
            "share": lambda: mallory.share("secret", "*"),
            "unregister": lambda: mallory.unregister("secret"),
        }
        for name, call in attempts.items():
            assert denied(call) == "NotFoundError", name  # indistinguishable from a region that does not exist
        # Nothing changed for the owner.
        info = alice.describe("secret")
        assert info.generation == generation and [r.device for r in info.replicas] == ["cpu:0"]
        with alice.acquire("secret", "cpu:0") as lease:
            assert int(lease.array[0]) == 42

        # Shared read-only: mallory may now see and acquire, but still not change or remove it.
        alice.share("secret", f"label:{mallory.label}")
        assert [r.name for r in mallory.list_regions()] == ["secret"]
        with mallory.acquire("secret", "cpu:0") as lease:
            assert int(lease.array[0]) == 42
        for name in ("invalidate", "replicate", "share", "unregister"):
            assert denied(attempts[name]) == "PermissionDeniedError", name
        alice.share("secret", f"label:{mallory.label}", revoke=True)
        assert denied(attempts["acquire"]) == "NotFoundError"
        assert alice.describe("secret").name == "secret"


def test_r5_unknown_token_is_unauthenticated(srv: ServerProcess) -> None:
    channel = grpc.insecure_channel(srv.address)
    stub = pb_grpc.DevrepServiceStub(channel)
    try:
        for metadata in ((), (("authorization", "Bearer forged-token-0123456789abcdef"),),
                         (("x-devrep-token", ""),), (("authorization", "Basic xyz"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ListRegions(pb.ListRegionsRequest(), metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    finally:
        channel.close()
    with pytest.raises(devrep.client.UnauthenticatedError):
        devrep.client.Client(srv.address, token="forged-token-0123456789abcdef", fd_socket="/nonexistent")


def test_r5_socket_modes(srv: ServerProcess) -> None:
    sock = srv.socket
    fd_sock = sock.with_name("devrep.fd.sock")
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o750
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o660
    assert stat.S_ISSOCK(fd_sock.stat().st_mode) and stat.S_IMODE(fd_sock.stat().st_mode) == 0o660


def connect_as(uid: int, paths: list[str]) -> str:
    """Try to connect to each socket from a forked child running as ``uid`` (no exec: the interpreter may live
    where that user cannot read). Returns what happened to each, space-separated."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only system calls, then _exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            results = []
            for path in paths:
                kind = socket.SOCK_SEQPACKET if path.endswith(".fd.sock") else socket.SOCK_STREAM
                with socket.socket(socket.AF_UNIX, kind) as s:
                    try:
                        s.connect(path)
                        results.append("connected")
                    except PermissionError:
                        results.append("denied")
                    except OSError as exc:
                        results.append(f"error:{exc.errno}")
            os.write(w, " ".join(results).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            out = f.read().decode()
    finally:
        os.waitpid(pid, 0)
    return out


def test_r5_other_uid_cannot_connect(srv: ServerProcess) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to probe as another uid")
    paths = [str(srv.socket), str(srv.socket.with_name("devrep.fd.sock"))]
    assert connect_as(NOBODY, paths) == "denied denied"  # the 0750 directory stops it
    os.chmod(srv.socket.parent, 0o755)  # with the directory opened up, the 0660 sockets still stop it
    assert connect_as(NOBODY, paths) == "denied denied"
    os.chmod(srv.socket, 0o666)  # control: the probe does connect when the modes allow it
    assert connect_as(NOBODY, paths[:1]) == "connected"
