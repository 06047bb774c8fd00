"""Build and run the devrep gRPC server (``devrep serve``).

``build_server(...)`` returns a started-on-demand ``DevrepServer`` that tests use in process; ``run(...)`` is
the daemon: it serves until SIGTERM/SIGINT, then shuts down gracefully (health NOT_SERVING, streams ended,
in-flight RPCs drained, every session closed and the Replicator closed, which releases every write
protection and frees device memory).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .._signals import StopSignals
from ..engine import Replicator
from ..errors import InvalidArgumentError, UnauthenticatedError
from ..wire import default_socket_path, unix_path
from ..wire._gen import devrep_pb2 as pb
from ..wire._gen import devrep_pb2_grpc as pb_grpc
from ..wire.sidechannel import side_channel_path
from . import sockets
from .reflection import enable_server_reflection
from .servicer import DevrepServicer
from .sessions import Quota, SessionRegistry, TokenStore
from .sidechannel import SideChannel, set_group
from .sockdir import check_socket_directory
from .status import abort
from .watch import WatchHub

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("devrep.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DevrepService"].full_name
MAX_MESSAGE = 64 << 20
"""Largest message the server sends (a Watch batch, a ListRegions)."""
MAX_REQUEST = 16 << 20
"""Largest request the server reads: the biggest legitimate one, an Invalidate of 10^6 runs, is ~10 MiB of
varints. gRPC buffers a whole request before any handler runs, so this bounds what a caller can make the server
hold per call (larger: RESOURCE_EXHAUSTED); ``AuthenticateFirst`` keeps it from being parsed without a token."""


class AuthenticateFirst(grpc.ServerInterceptor):
    """Refuse a DevrepService call without a valid session token *before its request is parsed*.

    Parsing costs several times the message's size in memory (a packed list of 10^7 varints becomes a list of
    10^7 integers); an unauthenticated caller gets ``UNAUTHENTICATED`` from a handler that takes the request as
    raw bytes, so it can cost the server at most ``MAX_REQUEST`` per call. Health and reflection need no token.
    """

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry
        self._prefix = f"/{SERVICE_NAME}/"

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        token = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
                token = value[7:].strip()
            elif key == "x-devrep-token" and isinstance(value, str):
                token = value.strip()
        try:
            self.registry.authenticate(token)
        except UnauthenticatedError as exc:
            refusal = exc
        else:
            return handler

        def refuse(request: bytes, context: grpc.ServicerContext) -> Any:
            abort(context, refusal, handler_call_details.method)

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


MAX_SOCKET_PATH = 107
"""Bytes in a Unix socket path (sun_path holds 108 with the terminating NUL)."""
DEFAULT_MAX_LEASE_S = 300.0
"""``devrep serve --max-lease-s``: a lease held longer is revoked (0 = no limit)."""
DEFAULT_HOLDER_TTL = 30.0
"""``devrep serve --holder-timeout-s``: a gRPC lease holder silent this long has its leases released."""


def _open_directory(path: Path, socket_mode: int, group: int | None) -> None:
    """Let whoever ``socket_mode`` lets connect reach the sockets in ``path``: connecting needs search (x)
    permission on the directory. A directory others can already search is left alone (e.g. /tmp); otherwise the
    group bit is added (and ``group`` given to the directory) where the socket is group-writable, and the other
    bit where it is world-writable."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InvalidArgumentError(f"socket directory {path}: {exc.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IXOTH:
        return
    new_mode, new_gid = mode, -1
    if socket_mode & stat.S_IWGRP:
        new_mode |= stat.S_IXGRP
        if group is not None and st.st_gid != group:
            new_gid = group
    if socket_mode & stat.S_IWOTH:
        new_mode |= stat.S_IXOTH
    try:
        if new_gid != -1:
            os.chown(path, -1, new_gid)
            log.info("socket directory %s: group %d", path, new_gid)
        if new_mode != mode:
            os.chmod(path, new_mode)
            log.info("socket directory %s: mode %#o", path, new_mode)
    except OSError as exc:  # not ours to change: serve anyway, but say why clients may be refused
        log.warning("cannot open socket directory %s to the socket's group/others: %s", path, exc.strerror)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None = None
    """With a CA, clients must present a certificate it signed (mTLS)."""


class DevrepServer:
    """A gRPC server + fd side channel around one ``Replicator``."""

    def __init__(self, address: str, *, replicator: Replicator | None = None, tokens: TokenStore | None = None,
                 quota: Quota | None = None, fd_socket: str | os.PathLike[str] | None = None,
                 require_token: bool = False, interceptors: Sequence[grpc.ServerInterceptor] = (),
                 tls: TlsFiles | None = None, insecure: bool = False, max_workers: int = 32,
                 socket_mode: int = 0o660, socket_group: int | None = None, metrics: Metrics | None = None,
                 max_lease_s: float = DEFAULT_MAX_LEASE_S, holder_ttl: float = DEFAULT_HOLDER_TTL) -> None:
        self.address = address if unix_path(address) is None else f"unix:{unix_path(address)}"
        self.replicator = replicator if replicator is not None else Replicator()
        self.tokens = tokens if tokens is not None else TokenStore()
        self.registry = SessionRegistry(self.replicator, self.tokens, quota or Quota())
        if metrics is not None:  # requests and region events are fed by its interceptor and listener
            self.registry.on_quota = metrics.quota_rejected
        self.hub = WatchHub()
        self.replicator.add_listener(self.hub)
        if max_workers < 8:
            raise InvalidArgumentError(f"max_workers must be >= 8, got {max_workers}")
        self.servicer = DevrepServicer(self.replicator, self.registry, self.hub, max_streams=max_workers // 2)
        if max_lease_s < 0 or holder_ttl <= 0:
            raise InvalidArgumentError(f"max_lease_s must be >= 0 (0 = no limit) and holder_ttl > 0, got "
                                       f"{max_lease_s}, {holder_ttl}")
        self.max_lease_s = max_lease_s
        self.holder_ttl = holder_ttl
        self.servicer.holder_ttl = holder_ttl
        self._reaper: threading.Thread | None = None
        self.health = health.HealthServicer(experimental_non_blocking=True)
        if not 0 <= socket_mode <= 0o777:
            raise InvalidArgumentError(f"socket mode must be within 0o000..0o777, got {socket_mode:#o}")
        if socket_group is not None and socket_group < 0:
            raise InvalidArgumentError(f"socket group must be a gid >= 0, got {socket_group}")
        self._socket_mode = socket_mode
        self._socket_group = socket_group
        sock = unix_path(address)
        if sock is None and tls is None and not insecure:
            raise InvalidArgumentError(
                f"refusing to serve {address} over plain TCP: give --tls-cert/--tls-key (and --tls-ca for mTLS), "
                "or --insecure explicitly"
            )
        fd_path = Path(fd_socket) if fd_socket else (side_channel_path(sock) if sock else None)
        if sock is not None:
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                raise InvalidArgumentError(f"socket path {sock} is {len(os.fsencode(sock))} bytes; Unix sockets "
                                           f"allow at most {MAX_SOCKET_PATH}: choose a shorter --socket")
            try:
                sock.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as exc:
                raise InvalidArgumentError(
                    f"cannot create the socket directory {sock.parent}: {exc.strerror}") from None
            check_socket_directory(sock.parent)  # path chmod/chgrp below are safe only where no one else writes
            _open_directory(sock.parent, socket_mode, socket_group)
            # Both paths are checked before either is bound: a live server there keeps them (SocketInUseError).
            sockets.claim(sock, socket.SOCK_STREAM)
        if fd_path is not None:
            sockets.claim(fd_path, socket.SOCK_SEQPACKET)
        self.socket_path = sock
        self.fd_socket_path = fd_path
        self._socket_identity: sockets.Identity | None = None
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="devrep-rpc"),
            interceptors=[*interceptors, AuthenticateFirst(self.registry)],
            options=[("grpc.max_receive_message_length", MAX_REQUEST),
                     ("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=max_workers * 4,
        )
        pb_grpc.add_DevrepServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        enable_server_reflection(  # v1 (grpcurl, current clients) and v1alpha
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), self._server)
        private = sockets.private_name(sock) if sock is not None else None
        bind = f"unix:{private}" if private is not None else self.address  # see devrep.service.sockets
        try:
            if tls is not None:
                creds = grpc.ssl_server_credentials(
                    [(tls.key.read_bytes(), tls.cert.read_bytes())],
                    root_certificates=tls.ca.read_bytes() if tls.ca else None,
                    require_client_auth=tls.ca is not None)
                self.port = self._server.add_secure_port(bind, creds)
            else:
                self.port = self._server.add_insecure_port(bind)
        except RuntimeError as exc:  # grpcio raises "Failed to bind to address ..." (older ones return 0)
            raise InvalidArgumentError(f"cannot listen on {self.address}: {exc}") from None
        if self.port == 0:
            raise InvalidArgumentError(f"cannot listen on {self.address}")
        if sock is not None:
            if private is not None:
                try:  # the public name appears with its final mode and group
                    os.chmod(private, socket_mode)
                    if socket_group is not None:
                        set_group(private, socket_group)
                except BaseException:
                    private.unlink()
                    raise
                sockets.publish(private, sock)
            self._socket_identity = sockets.identity(sock)  # what stop() may remove
        if fd_path is not None and fd_path.parent != (sock.parent if sock else None):
            fd_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            check_socket_directory(fd_path.parent)
            _open_directory(fd_path.parent, socket_mode, socket_group)
        self.side_channel = (SideChannel(fd_path, self.registry, require_token=require_token, mode=socket_mode,
                                         group=socket_group, acquire=self.servicer.acquire_lease)
                             if fd_path else None)
        self._stopped = threading.Event()
        self._token_watch = False

    def start(self) -> DevrepServer:
        self._server.start()
        if self.socket_path is not None:
            os.chmod(self.socket_path, self._socket_mode)
            if self._socket_group is not None:
                set_group(self.socket_path, self._socket_group)
        if self.side_channel is not None:
            self.side_channel.start()
        self._token_watch = not self.tokens.watching
        if self._token_watch:
            self.tokens.start()  # removed token files end their sessions without waiting for a call
        self._reaper = threading.Thread(target=self._reap_loop, name="devrep-lease-reaper", daemon=True)
        self._reaper.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def _reap_loop(self) -> None:
        """Release leases whose gRPC holder went silent, and leases held past ``max_lease_s`` (the last resort:
        a reader, e.g. a read-only grantee, can never block the owner's syncs for longer)."""
        limits = [self.holder_ttl / 4, 1.0] + ([self.max_lease_s / 4] if self.max_lease_s else [])
        interval = max(0.05, min(limits))
        while not self._stopped.wait(interval):
            try:
                self.registry.reap(holder_ttl=self.holder_ttl, max_lease_s=self.max_lease_s)
            except Exception:  # never let the reaper die: leases would then leak
                log.exception("lease reaper")

    def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown; idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING
        self.servicer.stopping.set()
        self.hub.close()  # end Watch streams so draining does not wait for them
        if self.side_channel is not None:
            self.side_channel.close()
        self._server.stop(grace).wait(grace + 1)
        self.registry.detach()
        if self._token_watch:
            self.tokens.close()
        self.registry.close_all()
        self.replicator.close()  # releases every write protection, frees device memory
        sockets.unlink_if_ours(self.socket_path, self._socket_identity)

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> DevrepServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_server(address: str | None = None, **options: Any) -> DevrepServer:
    """A server on ``address`` (default: the default Unix socket); call ``.start()``. See ``DevrepServer``."""
    return DevrepServer(address or f"unix:{default_socket_path()}", **options)


def _compile_kernels() -> None:
    """numba keeps the arguments of a compiling call alive until the cyclic GC runs: compile on throwaway arrays
    first, so no client's memory is kept mapped by it (see ``devrep._warmup``)."""
    from .._warmup import compile_kernels

    try:
        compile_kernels()
    except Exception:  # the kernels compile on first real use instead
        log.debug("kernel warm-up failed", exc_info=True)


def run(address: str | None = None, *, grace: float = 5.0, ready: Any = None, **options: Any) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status (0 after a clean shutdown)."""
    server = build_server(address, **options)
    with StopSignals() as signals:  # not an Event set by the handler: see devrep._signals
        try:
            server.start()
            # After start, not before: loading numba and the kernels takes longer than starting to serve, and a
            # request that needs a kernel first waits for this load (``kernels()`` holds a lock) rather than
            # redoing it.
            threading.Thread(target=_compile_kernels, name="devrep-warmup", daemon=True).start()
            log.info("devrep serving on %s (fd side channel %s)", server.address, server.fd_socket_path)
            if ready is not None:
                ready(server)
            signals.wait()
            log.info("devrep shutting down")
            server.stop(grace)
        finally:
            server.stop(0)
    return 0
