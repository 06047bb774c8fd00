"""How a ``Client`` reaches a devrep server: the transport seam (modelled on httpx's ``BaseTransport`` and
``MockTransport``).

``Client`` speaks the session's language (regions, leases, tokens, heartbeats); a ``Transport`` only moves its
messages. Three operations are all it needs (the contract is ``Transport``'s docstring):

- ``unary``: one gRPC call by method name -> the reply message and its trailing metadata;
- ``stream``: one server-streaming gRPC call (``Replicate``, ``Watch``) -> a ``Stream``;
- ``call``: one request on the fd side channel, optionally carrying file descriptors.

Errors are mapped at this seam and nowhere else: whatever goes wrong, a transport raises a ``DevrepError``
subclass (through ``devrep.client._errors``), never ``grpc.RpcError`` or ``OSError``. Replies that both paths
produce are converted here too: a lease, asked over gRPC or over the side channel, comes back as one
``LeaseGrant``.

Implementations: ``GrpcTransport`` (TCP, or a Unix socket without a side channel, e.g. a token session),
``SideChannelTransport`` (the local socket: gRPC plus the ``SOCK_SEQPACKET`` fd channel beside it, which carries
memfds, replica fds and the one-round-trip acquire) and ``devrep.testing.MockTransport`` (answers from a function;
no server).
"""

from __future__ import annotations

import abc
import contextlib
import os
import select
import socket
import struct
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np

from .. import errors
from .._pages import PAGE_SIZE, RunArray, pages_for
from ..errors import ServiceUnavailableError
from ..wire import HOLDER_TTL_KEY, unix_path
from ..wire import sidechannel as protocol
from ..wire._gen import devrep_pb2 as pb
from ..wire._gen import devrep_pb2_grpc as pb_grpc
from ._errors import NO_SERVER_HINT, _translate, side_error

Metadata = tuple[tuple[str, str], ...]
"""gRPC metadata as ``(key, value)`` pairs."""

NO_SIDE_CHANNEL = ("this client has no fd side channel (TCP address): memfd regions and CPU replica mappings need "
                   "the server's Unix socket on this host")


def _runs(flat: Sequence[int]) -> RunArray:
    return np.asarray(flat, dtype=np.int64).reshape(-1, 2)


class Reply(NamedTuple):
    """A unary call's answer: the response message and the trailing metadata the server sent with it."""

    message: Any
    trailing_metadata: Metadata = ()


@dataclass(eq=False)  # eq=False: a lease is itself (and numpy runs have no truth value to compare)
class LeaseGrant:
    """What the server grants with a lease, whichever way it was asked. The one definition of a lease's fields:
    the gRPC ``AcquireResponse`` and the side channel's ``acquire`` reply are both converted to it here, and
    ``ClientLease`` is a ``LeaseGrant`` plus the client-side mapping state."""

    lease_id: int
    generation: int
    invalid_runs: RunArray
    """``[first page, count]`` rows not yet valid in the replica (empty for a fresh acquire)."""
    device: str
    nbytes: int
    export_kind: str
    """``"fd"`` (a CPU replica's memfd), ``"cuda_fd"`` (a CUDA VMM fd) or ``"cuda_ipc"``."""
    buffer_nbytes: int
    """The replica buffer's size (whole pages, at least ``nbytes``): what the client maps."""
    cuda_ipc_handle: bytes = b""
    gpu_uuid: str = ""
    granularity: int = 0
    """The CUDA VMM granularity of a ``cuda_fd`` replica's GPU (0: unknown, use the buffer size)."""
    via_side_channel: bool = False
    """Taken over the side channel (so released there too)."""

    @classmethod
    def from_grpc(cls, r: pb.AcquireResponse) -> LeaseGrant:
        return cls(lease_id=r.lease_id, generation=r.generation, invalid_runs=_runs(r.invalid_runs),
                   device=r.device, nbytes=r.nbytes, export_kind=r.export_kind,
                   buffer_nbytes=r.buffer_nbytes or pages_for(r.nbytes) * PAGE_SIZE,
                   cuda_ipc_handle=bytes(r.cuda_ipc_handle), gpu_uuid=r.gpu_uuid, granularity=int(r.granularity))

    @classmethod
    def from_side_channel(cls, r: dict[str, Any]) -> LeaseGrant:
        try:
            nbytes = int(r["nbytes"])
            return cls(lease_id=int(r["lease"]), generation=int(r["generation"]), invalid_runs=_runs(r["invalid_runs"]),
                       device=str(r["device"]), nbytes=nbytes, export_kind=str(r["export_kind"]),
                       buffer_nbytes=int(r["buffer_nbytes"]) or pages_for(nbytes) * PAGE_SIZE,
                       cuda_ipc_handle=bytes.fromhex(r["cuda_ipc_handle"]), gpu_uuid=str(r.get("gpu_uuid", "")),
                       granularity=int(r.get("granularity", 0)), via_side_channel=True)
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.DevrepError(f"malformed side-channel acquire reply ({type(exc).__name__}: {exc})") from None


class Acquired(NamedTuple):
    """``Transport.acquire``'s result: the grant, the replica fd that came with it (-1: none; the caller closes it)
    and the holder TTL in seconds the server announced for gRPC leases (0: none)."""

    grant: LeaseGrant
    fd: int
    holder_ttl: float


class Stream(abc.ABC):
    """A server-streaming call in progress.

    Iterating yields the response messages until the server ends the call. A status in the ``ends`` given to
    ``Transport.stream`` ends the iteration quietly; any other error status is raised as its ``DevrepError``.
    ``cancel()`` (any thread) ends the call from this side: the iteration then stops.
    """

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Any]: ...

    @abc.abstractmethod
    def wait_ready(self) -> None:
        """Block until the server accepted the call (sent its initial metadata); raises its error if it refused."""

    @abc.abstractmethod
    def cancel(self) -> None: ...


class Transport(abc.ABC):
    """What a ``Client`` sends its requests through. The contract every implementation keeps:

    - ``unary(method, request, timeout=, metadata=)`` makes one gRPC call, ``method`` being the RPC's name in
      ``DevrepService`` (``"Ping"``), and returns its ``Reply``. ``timeout`` is the call's deadline in seconds;
      ``metadata`` goes out with the call (the session token, the holder id).
    - ``stream(method, request, timeout=, metadata=, ends=)`` starts a server-streaming call; see ``Stream``.
      ``timeout=None``: no deadline.
    - ``call(message, fds, timeout=)`` sends one side-channel request (a JSON-able dict with an ``op``, plus
      the fds, which stay the caller's) and returns ``(reply, fds)``: the reply has ``ok`` true, and the
      caller owns (and must close) the fds that came with it. ``timeout=None``: the transport's own.
      Requests are serialized. Without a side channel (``side_channel`` false) this raises
      ``FailedPreconditionError``.
    - Every failure is raised as a ``DevrepError`` subclass, mapped by ``devrep.client._errors`` from the gRPC
      status (and the ``devrep-error`` class name) or the side channel's error reply: never ``grpc.RpcError``
      or ``OSError``. An unreachable server is ``ServiceUnavailableError``.
    - All three may be called from several threads at once. ``close()`` is idempotent; nothing may be called
      after it.
    """

    side_channel: bool = False
    """Whether ``call`` works: the fd side channel (memfd regions, CPU replica mappings) is there."""

    @abc.abstractmethod
    def unary(self, method: str, request: Any, *, timeout: float, metadata: Metadata) -> Reply: ...

    @abc.abstractmethod
    def stream(self, method: str, request: Any, *, timeout: float | None, metadata: Metadata,
               ends: Collection[str] = ()) -> Stream: ...

    @abc.abstractmethod
    def call(self, message: dict[str, Any], fds: Sequence[int] = (), *, timeout: float | None = None
             ) -> tuple[dict[str, Any], list[int]]: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection (idempotent)."""

    def acquire(self, request: pb.AcquireRequest, *, timeout: float, metadata: Metadata) -> Acquired:
        """A lease, as one ``LeaseGrant`` whichever way it was asked: with a side channel, one round trip that
        also carries the replica's fd; otherwise the gRPC ``Acquire``, whose trailing metadata names the holder
        TTL (the client must then keep calling, see ``Client._start_heartbeat``)."""
        if self.side_channel:
            reply, fds = self.call({"op": "acquire", "name": request.name, "device": request.device,
                                    "fresh": request.fresh, "timeout_ms": request.timeout_ms}, timeout=timeout)
            protocol.close_fds(fds[1:])
            try:
                grant = LeaseGrant.from_side_channel(reply)
            except BaseException:
                protocol.close_fds(fds[:1])
                raise
            return Acquired(grant, fds[0] if fds else -1, 0.0)
        answer = self.unary("Acquire", request, timeout=timeout, metadata=metadata)
        ttl_ms = next((int(v) for k, v in answer.trailing_metadata if k == HOLDER_TTL_KEY), 0)
        return Acquired(LeaseGrant.from_grpc(answer.message), -1, ttl_ms / 1000 if ttl_ms > 0 else 0.0)

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_side_reply(reply: dict[str, Any] | None, fds: list[int]) -> dict[str, Any]:
    """A side-channel reply as ``Transport.call`` returns it: an error reply (or none: the server hung up) is
    raised, and the fds that came with it are closed."""
    if reply is None:
        protocol.close_fds(fds)
        raise ServiceUnavailableError("the devrep server closed the side channel")
    if not reply.get("ok"):
        protocol.close_fds(fds)
        raise side_error(reply)
    return reply


def _denied_hint(path: Path) -> str:
    return (f"permission denied connecting to {path}: this user may not use the devrep socket; run the server with "
            "`devrep serve --socket-group <group>` and join that group (or use a token), see docs/api.md")


def _exists(path: Path) -> bool:
    """Whether the side-channel socket is there; a directory this user cannot search is a permission problem,
    not a missing server."""
    try:
        os.stat(path)
    except PermissionError:
        raise errors.PermissionDeniedError(_denied_hint(path)) from None
    except OSError:
        return False
    return True


def _check_socket_owner(sock: Path, server_uids: frozenset[int]) -> None:
    """The gRPC socket file must belong to a trusted uid too (its owner is whoever bound it)."""
    try:
        owner = os.stat(sock).st_uid  # the socket itself, not a symlink to it
    except OSError:
        return  # no socket file: the gRPC call fails with UNAVAILABLE
    trusted = {0, os.geteuid(), *server_uids}
    if owner not in trusted:
        raise errors.PermissionDeniedError(
            f"the devrep socket {sock} belongs to uid {owner}, not root, this user or a configured server uid "
            f"({sorted(trusted)}): refusing to send the session token to it (connect(server_uid=...) or "
            "DEVREP_SERVER_UID name another server uid)")


def _server_uids(server_uid: int | None) -> frozenset[int]:
    """The uids besides root and this user that may serve the side channel: ``server_uid`` and
    ``DEVREP_SERVER_UID`` (comma-separated)."""
    uids = {server_uid} if server_uid is not None else set()
    for item in os.environ.get("DEVREP_SERVER_UID", "").split(","):
        if item.strip():
            try:
                uids.add(int(item))
            except ValueError:
                raise errors.InvalidArgumentError(f"DEVREP_SERVER_UID must be uids separated by commas, got "
                                                  f"{item!r}") from None
    return frozenset(uids)


class _GrpcStream(Stream):
    def __init__(self, call: Any, ends: Collection[str]) -> None:
        self._call = call
        self._ends = frozenset(ends)

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if isinstance(code, grpc.StatusCode) and code.name in self._ends:
                return
            raise _translate(exc) from None

    def wait_ready(self) -> None:
        try:
            self._call.initial_metadata()
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    def cancel(self) -> None:
        self._call.cancel()


class GrpcTransport(Transport):
    """gRPC only: a TCP address, or a Unix socket this process reaches without the side channel (a token
    session). A Unix socket file must belong to root, this user or ``server_uid`` / ``DEVREP_SERVER_UID``:
    checked here, before any token goes over it."""

    def __init__(self, address: str, *, credentials: grpc.ChannelCredentials | None = None,
                 server_uid: int | None = None) -> None:
        sock = unix_path(address)
        if sock is not None:
            _check_socket_owner(sock, _server_uids(server_uid))
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        target = f"unix:{sock}" if sock is not None else address
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.DevrepServiceStub(self.channel)
        self.closed = False

    def _check_open(self) -> None:
        if self.closed:  # (grpc itself would raise ValueError on a closed channel)
            raise ServiceUnavailableError("this devrep client is closed")

    def unary(self, method: str, request: Any, *, timeout: float, metadata: Metadata) -> Reply:
        self._check_open()
        try:
            message, call = getattr(self.stub, method).with_call(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        return Reply(message, tuple((k, v) for k, v in call.trailing_metadata() or ()))

    def stream(self, method: str, request: Any, *, timeout: float | None, metadata: Metadata,
               ends: Collection[str] = ()) -> Stream:
        self._check_open()
        return _GrpcStream(getattr(self.stub, method)(request, metadata=metadata, timeout=timeout), ends)

    def call(self, message: dict[str, Any], fds: Sequence[int] = (), *, timeout: float | None = None
             ) -> tuple[dict[str, Any], list[int]]:
        raise errors.FailedPreconditionError(NO_SIDE_CHANNEL)

    def close(self) -> None:
        self.closed = True
        self.channel.close()


class SideChannelTransport(GrpcTransport):
    """The local transport: gRPC over the server's Unix socket plus the ``SOCK_SEQPACKET`` fd side channel
    beside it (packet format: ``devrep.wire.sidechannel``). The side channel's peer must run as root, this
    user or a uid the user named (``server_uid`` / ``DEVREP_SERVER_UID``): checked at connect, before any
    token or fd goes out (a memfd sent to an impostor is handed over writable)."""

    side_channel = True

    def __init__(self, address: str, fd_path: Path, *, timeout: float,
                 credentials: grpc.ChannelCredentials | None = None, server_uid: int | None = None) -> None:
        server_uids = _server_uids(server_uid)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(fd_path))
        except PermissionError:
            self.sock.close()
            raise errors.PermissionDeniedError(_denied_hint(fd_path)) from None
        except OSError as exc:
            self.sock.close()
            raise ServiceUnavailableError(f"cannot connect to the devrep fd side channel {fd_path}: {exc.strerror}; "
                                          f"{NO_SERVER_HINT}") from None
        pid, uid, _gid = struct.unpack("3i", self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                  struct.calcsize("3i")))
        trusted = {0, os.geteuid(), *server_uids}
        if uid not in trusted:
            self.sock.close()
            raise errors.PermissionDeniedError(
                f"the fd side channel {fd_path} is served by uid {uid} (pid {pid}), not root, this user or a "
                f"configured server uid ({sorted(trusted)}): refusing to talk to it. If that uid is your devrep "
                "server, pass connect(server_uid=...) or set DEVREP_SERVER_UID")
        self.server_pid: int = pid
        """The server's pid (``SO_PEERCRED``): a server in this very process needs explicit tracking."""
        self.lock = threading.Lock()
        self.timeout = timeout
        try:
            super().__init__(address, credentials=credentials, server_uid=server_uid)
        except BaseException:
            self.sock.close()
            raise

    def call(self, message: dict[str, Any], fds: Sequence[int] = (), *, timeout: float | None = None
             ) -> tuple[dict[str, Any], list[int]]:
        self._check_open()
        with self.lock:
            try:
                self.sock.settimeout(timeout or self.timeout)
                protocol.send(self.sock, message, list(fds))
                reply, got = protocol.recv(self.sock)
            except (OSError, TimeoutError) as exc:
                raise ServiceUnavailableError(f"devrep side channel failed: {exc}") from None
        return check_side_reply(reply, got), got

    def peer_closed(self, timeout: float) -> bool:
        """Whether the server ended the side channel (it stopped or died) within ``timeout`` seconds. The server
        never speaks unasked, so any input while no request is in flight is the end of the stream."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        with self.lock:
            return bool(poller.poll(int(timeout * 1000)))

    def close(self) -> None:
        self.side_channel = False  # a closed client has no side channel (its leases release over gRPC: closed too)
        with contextlib.suppress(OSError):
            self.sock.close()
        super().close()
