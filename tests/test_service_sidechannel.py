"""Malformed side-channel traffic gets a clean error reply, never a crash, and never leaks a descriptor."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _devrep_service import inproc_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import devrep
from devrep.memory import F_SEAL_GROW, F_SEAL_SHRINK, add_seals, memfd_create
from devrep.service import DevrepServer
from devrep.wire import sidechannel as protocol

pytestmark = pytest.mark.timeout(60)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def server() -> Iterator[DevrepServer]:
    with inproc_server() as srv:
        yield srv


def connect_raw(server: DevrepServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(str(server.fd_socket_path))
    return sock


def call(sock: socket.socket, payload: bytes | dict[str, Any], fds: list[int] | None = None
         ) -> tuple[dict[str, Any], list[int]]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)
    reply, got = protocol.recv(sock)
    assert reply is not None
    return reply, got


def sealed_memfd(size: int = 1 << 16) -> int:
    fd = memfd_create("t", size)
    add_seals(fd, F_SEAL_SHRINK | F_SEAL_GROW)
    return fd


def hello(sock: socket.socket) -> str:
    reply, _ = call(sock, {"op": "hello", "label": "raw"})
    assert reply["ok"], reply
    return str(reply["token"])


def test_malformed_packets_get_error_replies_and_leak_nothing(server: DevrepServer) -> None:
    sock = connect_raw(server)
    baseline = None
    try:
        packets: list[tuple[bytes | dict[str, Any], str]] = [
            (b"\xff\xfe not json", "INVALID_ARGUMENT"), (b"[1, 2]", "INVALID_ARGUMENT"),
            (b'{"op": "hel', "INVALID_ARGUMENT"),  # truncated
            (b"[" * 60000, "INVALID_ARGUMENT"),  # nests past the parser's recursion limit
            ('{"op": "hello"}'.encode("utf-16"), "INVALID_ARGUMENT"),  # the wire is UTF-8 only
            (b"x" * (protocol.MAX_MESSAGE + 10), "INVALID_ARGUMENT"),
            ({"op": "put_fds"}, "UNAUTHENTICATED"),
            ({"op": "hello", "label": 5}, "INVALID_ARGUMENT")]
        for payload, code in packets:
            reply, _ = call(sock, payload)
            assert (reply["ok"], reply["code"]) == (False, code), (str(payload)[:40], reply)
        hello(sock)
        baseline = open_fds()
        tmp = tempfile.NamedTemporaryFile()  # noqa: SIM115 - closed after the fd cases below
        wronly = os.open(tmp.name, os.O_WRONLY)
        regular = os.open(tmp.name, os.O_RDWR)
        os.write(regular, b"x" * 8192)
        unsealed = memfd_create("u", 4096, sealable=False)
        a, b = socket.socketpair()
        good = sealed_memfd()
        cases: list[tuple[dict[str, Any], list[int], str]] = [
            ({"op": "put_fds", "kind": "memfd"}, [a.fileno()], "not a regular file"),
            ({"op": "put_fds", "kind": "memfd"}, [unsealed], "F_SEAL_SHRINK"),
            ({"op": "put_fds", "kind": "memfd"}, [regular], "not a memfd"),
            ({"op": "put_fds", "kind": "file"}, [wronly], "write-only"),
            ({"op": "put_fds", "kind": "memfd"}, [], "needs 1 fds"),
            ({"op": "put_fds", "kind": "memfd"}, [good, good], "needs 1 fds"),
            ({"op": "put_fds", "kind": "memfd+uffd"}, [good, regular], "not a userfaultfd"),
            ({"op": "put_fds", "kind": "memfd+uffd+pagemap"}, [good, good, good], "not a userfaultfd"),
            ({"op": "put_fds", "kind": "nope"}, [good], "unknown fd kind"),
            ({"op": "put_fds", "kind": "memfd"}, [good] * 5, "too many file descriptors"),
            ({"op": "hello"}, [good], "no file descriptors"),
            ({"op": "lease_fd", "lease": 99}, [], "no lease"),
            ({"op": "lease_fd", "lease": "1"}, [], "positive integer"),
            ({"op": "release", "lease": -1}, [], "positive integer"),
            ({"op": "acquire", "name": 1, "device": "cpu:0"}, [], "acquire needs"),
            ({"op": "acquire", "name": "x", "device": "cpu:0", "timeout_ms": -1}, [], "timeout_ms"),
            ({"op": "acquire", "name": "x", "device": "cpu:0"}, [], "no region"),
            ({"op": "frobnicate"}, [], "unknown side-channel op"),
            ({"op": "hello"}, [], "already sent"),
        ]
        for message, fds, text in cases:
            reply, got = call(sock, message, fds)
            assert not got
            assert not reply["ok"] and text in reply["error"], (message, reply)
        for fd in (wronly, regular, unsealed, good):
            os.close(fd)
        a.close()
        b.close()
        tmp.close()
        # three accepted tickets, never used: they go with the connection
        for _ in range(3):
            fd = sealed_memfd()
            reply, _ = call(sock, {"op": "put_fds", "kind": "memfd"}, [fd])
            os.close(fd)
            assert reply["ok"] and reply["ticket"]
    finally:
        sock.close()
    deadline = time.monotonic() + 2
    while open_fds() > (baseline or 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert baseline is not None and open_fds() <= baseline, "the server leaked descriptors"
    # and it still serves
    sock = connect_raw(server)
    hello(sock)
    sock.close()


def test_ticket_limit_and_connection_end_closes_fds(server: DevrepServer) -> None:
    sock = connect_raw(server)
    hello(sock)
    before = open_fds()
    limit = server.registry.quota.max_tickets
    for i in range(limit + 1):
        fd = sealed_memfd(4096)
        reply, _ = call(sock, {"op": "put_fds", "kind": "memfd"}, [fd])
        os.close(fd)
        assert reply["ok"] == (i < limit), reply
        if i == limit:
            assert reply["code"] == "RESOURCE_EXHAUSTED"
    assert open_fds() >= before + limit
    sock.close()
    deadline = time.monotonic() + 2
    while open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert open_fds() <= before
    assert server.registry.sessions() == []


def test_hello_timeout_drops_silent_connections(server: DevrepServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from devrep.service import sidechannel

    monkeypatch.setattr(sidechannel, "HELLO_TIMEOUT", 0.2)
    sock = connect_raw(server)
    try:
        assert sock.recv(100) == b""  # closed by the server
    finally:
        sock.close()


def test_hello_with_a_token_joins_without_owning_the_session(server: DevrepServer) -> None:
    first = connect_raw(server)
    token = hello(first)
    second = connect_raw(server)
    try:
        reply, _ = call(second, {"op": "hello", "token": "not-a-token"})
        assert (reply["ok"], reply["code"]) == (False, "UNAUTHENTICATED")
        reply, _ = call(second, {"op": "hello", "token": token})
        assert reply["ok"] and reply["token"] == token  # joined: may pass fds for that session
        fd = sealed_memfd()
        reply, _ = call(second, {"op": "put_fds", "kind": "memfd"}, [fd])
        os.close(fd)
        assert reply["ok"]
        reply, _ = call(second, {"op": "bye"})
        assert reply["ok"]
    finally:
        second.close()
    time.sleep(0.2)
    # the joiner leaving ended nothing (a hello label is namespaced by the peer's uid)
    assert [s.label for s in server.registry.sessions()] == [f"uid:{os.getuid()}/raw"]
    server.tokens.add("operator-token-0123456789", "job")
    third = connect_raw(server)
    reply, _ = call(third, {"op": "hello", "token": "operator-token-0123456789"})
    assert reply["ok"] and reply["label"] == "job"
    third.close()
    first.close()
    time.sleep(0.2)
    assert [s.label for s in server.registry.sessions()] == ["job"]  # pre-authorized: outlives connections


def test_writer_mapping_check_works_through_the_fds() -> None:
    # The server checks (and establishes) the writer's userfaultfd registration through the fds alone, never
    # /proc/<pid>: here one process plays both sides. Nothing writes the protected pages (no fault handler runs).
    import ctypes
    import mmap

    from devrep.errors import UnsupportedModeError
    from devrep.linux.uffd import Feature
    from devrep.memory import buffer_address, map_fd
    from devrep.service.sidechannel import check_writer_mapping
    from devrep.tracking._setup import WP_FEATURES, open_uffd, register_wp

    try:
        sync_uffd, other = open_uffd("sync", WP_FEATURES), open_uffd("sync", WP_FEATURES)
        async_uffd = open_uffd("async", WP_FEATURES, Feature.WP_ASYNC)
    except UnsupportedModeError as exc:
        pytest.skip(f"userfaultfd write-protect unavailable here: {exc}")
    size = 8 * 4096
    fd = sealed_memfd(size)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        array = map_fd(fd, size, writable=True)
        base = buffer_address(array)
        # A range the client did not register is registered and write-protected now; registered twice is fine.
        check_writer_mapping("sync", [fd, sync_uffd.fd], base, size)
        check_writer_mapping("sync", [fd, sync_uffd.fd], base, size)
        assert sync_uffd.fd >= 0  # borrowed, not closed

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        hole_base = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert libc.munmap(ctypes.c_void_p(hole_base), ctypes.c_size_t(size)) == 0  # nothing there any more
        for bad_base, length, uffd, words in [
            (base + 1, size, sync_uffd, "page-aligned"), (0, size, sync_uffd, "page-aligned"),
            (hole_base, size, sync_uffd, "not (fully|all) mapped"),
            (base, size, other, "another userfaultfd"),
        ]:
            with pytest.raises(devrep.InvalidArgumentError, match=words):
                check_writer_mapping("sync", [fd, uffd.fd], bad_base, length)

        # async: the pagemap fd must show the range as async-write-protectable.
        second = map_fd(fd, size, writable=True)
        second_base = buffer_address(second)
        register_wp(async_uffd, "async", second_base, size)
        check_writer_mapping("async", [fd, async_uffd.fd, pagemap], second_base, size)
        second[:] = 3  # async: no fault, nothing blocks
        third = map_fd(fd, size, writable=True)
        with pytest.raises(devrep.InvalidArgumentError, match="async-write-protectable"):
            check_writer_mapping("async", [fd, other.fd, pagemap], buffer_address(third), size)  # sync uffd
    finally:
        for u in (sync_uffd, other, async_uffd):
            u.close()  # unregisters everything
        os.close(pagemap)
        os.close(fd)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(message=st.dictionaries(
    st.sampled_from(["op", "kind", "lease", "name", "device", "fresh", "timeout_ms", "token", "label"]),
    st.one_of(st.sampled_from(["hello", "put_fds", "acquire", "lease_fd", "release", "bye", "memfd", "file",
                               "cpu:0", "r"]),
              st.integers(-(2**70), 2**70), st.booleans(), st.none(), st.text(max_size=8),
              st.lists(st.integers(), max_size=3)), max_size=6),
    nfds=st.integers(0, 5))
def test_fuzz_side_channel(message: dict[str, Any], nfds: int) -> None:
    server = _FUZZ_SERVER[0]
    sock = connect_raw(server)
    try:
        if message.get("op") != "hello":
            hello(sock)
        fds = [sealed_memfd(4096) for _ in range(nfds)]
        try:
            reply, got = call(sock, message, fds)
        finally:
            for fd in fds:
                os.close(fd)
        for fd in got:
            os.close(fd)
        assert reply["ok"] or reply["code"] in {"INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED",
                                                "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "PERMISSION_DENIED",
                                                "DEADLINE_EXCEEDED"}, reply
    finally:
        sock.close()


_FUZZ_SERVER: list[DevrepServer] = []


@pytest.fixture(autouse=True, scope="module")
def _fuzz_server() -> Iterator[None]:
    with inproc_server() as srv:
        _FUZZ_SERVER.append(srv)
        yield
        _FUZZ_SERVER.clear()
