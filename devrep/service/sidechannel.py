"""The fd side channel server: sessions (SO_PEERCRED), fd hand-over (SCM_RIGHTS) and replica fds.

One thread per connection (connections are few: one per client process). The connection *is* the session's
lifetime: when it closes (client exit, crash, kill -9) the session's regions, replicas and leases go at once.
Every malformed packet gets an error reply and every fd received with it is closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backends import ExportHandle
from ..errors import (
    DevrepError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from ..memory import F_GET_SEALS, F_SEAL_SHRINK
from ..region import DEFAULT_TIMEOUT, Lease
from . import protocol
from .sessions import Session, SessionRegistry, UnauthenticatedError

log = logging.getLogger("devrep.service")

HELLO_TIMEOUT = 5.0
MAX_CONNECTIONS = 256

# What put_fds accepts: the roles of the fds, in order.
FD_KINDS: dict[str, tuple[str, ...]] = {
    "memfd": ("memfd",),
    "memfd+uffd": ("memfd", "uffd"),
    "memfd+uffd+pagemap": ("memfd", "uffd", "pagemap"),
    "file": ("file",),
}


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def check_writer_mapping(pid: int, writer_base: int, length: int, memfd: int) -> None:
    """Raise ``InvalidArgumentError`` unless ``[writer_base, writer_base+length)`` in process ``pid`` maps ``memfd``
    from offset 0, shared: a sync/async tracker trusts that address for every fault and scan."""
    st = os.fstat(memfd)
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError as exc:
        raise FailedPreconditionError(f"cannot check the writer's mapping in pid {pid}: {exc.strerror}") from None
    cursor, end = writer_base, writer_base + length
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 5:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if hi <= cursor or lo > cursor or int(parts[4]) != st.st_ino or "s" not in parts[1]:
            continue
        if int(parts[2], 16) + (cursor - lo) != cursor - writer_base:
            continue
        cursor = hi
        if cursor >= end:
            return
    raise InvalidArgumentError(
        f"memfd.writer_base {writer_base:#x}: pid {pid} has no shared mapping of this memfd from offset 0 covering "
        f"{length} bytes there; send the address of the mapping the userfaultfd was registered on")


def check_fd(fd: int, role: str) -> None:
    """Raise ``InvalidArgumentError`` unless ``fd`` is usable as ``role``."""
    try:
        st = os.fstat(fd)
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise InvalidArgumentError(f"{role} fd is not usable: {exc}") from None
    target = _fd_target(fd)
    if role in ("memfd", "file"):
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgumentError(f"{role} fd is not a regular file or memfd (it is {target})")
        if access == os.O_WRONLY:
            raise InvalidArgumentError(f"{role} fd was opened write-only; devrep needs to read it")
        if st.st_size <= 0:
            raise InvalidArgumentError(f"{role} fd is empty")
    if role == "memfd":
        try:
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError:
            raise InvalidArgumentError(f"memfd fd is not a memfd (it is {target})") from None
        if not seals & F_SEAL_SHRINK:
            raise InvalidArgumentError(
                "memfd must be sealed with F_SEAL_SHRINK (so it cannot be truncated under its replicas); "
                "create it with MFD_ALLOW_SEALING and add the seal"
            )
    elif role == "uffd" and target != "anon_inode:[userfaultfd]":
        raise InvalidArgumentError(f"uffd fd is not a userfaultfd (it is {target})")
    elif role == "pagemap" and not target.endswith("/pagemap"):
        raise InvalidArgumentError(f"pagemap fd is not a /proc/<pid>/pagemap file (it is {target})")


AcquireFn = Callable[[Session, str, str, bool, float, str | None], tuple[int, Lease, ExportHandle]]


def _positive_int(message: dict[str, Any], key: str) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidArgumentError(f"{message.get('op')} needs a positive integer {key!r}")
    return value


def set_group(path: Path, gid: int) -> None:
    """Give ``path`` to group ``gid`` (``devrep serve --socket-group``), with a clear error when not allowed."""
    try:
        os.chown(path, -1, gid)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot give {path} to group {gid}: {exc.strerror}") from None


class SideChannel:
    """Listens on ``path``; ``registry`` owns sessions."""

    def __init__(self, path: str | os.PathLike[str], registry: SessionRegistry, *, require_token: bool = False,
                 mode: int = 0o660, group: int | None = None, acquire: AcquireFn | None = None) -> None:
        self.path = Path(path)
        self.acquire = acquire
        self.registry = registry
        self.require_token = require_token
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock.bind(str(self.path))
        os.chmod(self.path, mode)
        if group is not None:
            try:
                set_group(self.path, group)
            except BaseException:
                self._sock.close()
                raise
        self._sock.listen(64)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="devrep-fd-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting and drop every connection (their sessions end)."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            with self._lock:
                if len(self._conns) >= MAX_CONNECTIONS:
                    with contextlib.suppress(OSError):
                        protocol.send(conn, protocol.error_reply(
                            self.registry.quota_error(
                                "connections", f"too many side-channel connections ({MAX_CONNECTIONS})")))
                    conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="devrep-fd-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        session: Session | None = None
        owns_session = False
        # Leases acquired on this connection are this connection's: when it closes they go, even if its session
        # lives on (a pre-authorized token shared by several processes).
        holder = f"side-channel:{id(conn):x}:{threading.get_ident():x}"
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            conn.settimeout(HELLO_TIMEOUT)
            while not self._closed:
                try:
                    message, fds = protocol.recv(conn)
                except protocol.ProtocolError as exc:
                    protocol.send(conn, protocol.error_reply(exc))
                    continue
                if message is None:
                    return
                try:
                    reply, out_fds = self._handle(message, fds, session, uid, pid, owns_session, holder)
                except DevrepError as exc:
                    protocol.close_fds(fds)
                    protocol.send(conn, protocol.error_reply(exc))
                    continue
                except Exception as exc:
                    log.exception("side channel: %s", message.get("op"))
                    protocol.close_fds(fds)
                    protocol.send(conn, protocol.error_reply(exc))
                    continue
                if isinstance(reply.get("_session"), Session):
                    session = reply.pop("_session")
                    owns_session = bool(reply.pop("_owns"))
                    conn.settimeout(None)  # from now on the connection lives as long as the client
                try:
                    protocol.send(conn, reply, out_fds)
                finally:
                    protocol.close_fds(out_fds)
                if message.get("op") == "bye":
                    return
        except (OSError, TimeoutError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            if session is not None and owns_session:
                self.registry.close(session)
            elif session is not None:
                self.registry.end_holder(session, holder, "was released: the side-channel connection that took it "
                                                          "closed")

    def _handle(self, message: dict[str, Any], fds: list[int], session: Session | None, uid: int, pid: int,
                owns_session: bool, holder: str | None = None) -> tuple[dict[str, Any], list[int]]:
        op = message.get("op")
        if op == "hello":
            if fds:
                raise InvalidArgumentError("hello carries no file descriptors")
            if session is not None:
                raise InvalidArgumentError("hello was already sent on this connection")
            token = message.get("token")
            label = message.get("label") or f"uid{uid}-pid{pid}"
            if not isinstance(label, str) or len(label) > 128:
                raise InvalidArgumentError("label must be a string of at most 128 characters")
            if token:
                if not isinstance(token, str):
                    raise InvalidArgumentError("token must be a string")
                # Join an existing session (pre-authorized, or another connection's): this connection passes fds
                # for it but does not own its lifetime.
                new, owns = self.registry.authenticate(token), False
            elif self.require_token:
                raise UnauthenticatedError("this server only accepts pre-authorized tokens (set DEVREP_TOKEN)")
            else:
                new, owns = self.registry.open(label, uid, pid), True
            return {"ok": True, "token": new.token, "session": new.id, "label": new.label, "_session": new,
                    "_owns": owns}, []
        if session is None:
            raise UnauthenticatedError("send hello first")
        if session.closed and op != "bye":
            raise UnauthenticatedError("session ended (its token was revoked, or the server is stopping)")
        if op == "put_fds":
            kind = message.get("kind", "memfd")
            roles = FD_KINDS.get(kind) if isinstance(kind, str) else None
            if roles is None:
                raise InvalidArgumentError(f"unknown fd kind {kind!r}; known: {', '.join(FD_KINDS)}")
            if len(fds) != len(roles):
                raise InvalidArgumentError(f"put_fds kind {kind!r} needs {len(roles)} fds ({', '.join(roles)}), "
                                           f"got {len(fds)}")
            for fd, role in zip(fds, roles, strict=True):
                check_fd(fd, role)
            return {"ok": True, "ticket": self.registry.add_ticket(session, fds, pid)}, []
        if fds:
            raise InvalidArgumentError(f"op {op!r} carries no file descriptors, got {len(fds)}")
        if op == "lease_fd":
            lease_id = _positive_int(message, "lease")
            handle = self.registry.lease(session, lease_id).export()
            if handle.kind != "fd" or not isinstance(handle.payload, int):
                raise NotFoundError(f"lease {lease_id} is on {handle.device}, which exports {handle.kind!r}, "
                                    "not an fd")
            return {"ok": True, "nbytes": handle.nbytes}, [os.dup(handle.payload)]
        if op == "acquire" and self.acquire is not None:
            # The whole acquire in one round trip: lease + generation + stale runs + the replica fd.
            name, device = message.get("name"), message.get("device")
            fresh, timeout_ms = message.get("fresh", True), message.get("timeout_ms", 0)
            if not isinstance(name, str) or not isinstance(device, str) or not isinstance(fresh, bool):
                raise InvalidArgumentError("acquire needs string 'name' and 'device' and a boolean 'fresh'")
            if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or not 0 <= timeout_ms <= 3_600_000:
                raise InvalidArgumentError("acquire 'timeout_ms' must be an integer in [0, 3600000]")
            lease_id, lease, handle = self.acquire(session, name, device, fresh,
                                                   timeout_ms / 1000 if timeout_ms else DEFAULT_TIMEOUT,
                                                   None if owns_session else holder)
            reply: dict[str, Any] = {"ok": True, "lease": lease_id, "generation": lease.generation,
                     "invalid_runs": lease.invalid_runs.reshape(-1).tolist(), "nbytes": lease.nbytes,
                     "device": lease.device, "export_kind": handle.kind, "buffer_nbytes": handle.nbytes,
                     "cuda_ipc_handle": handle.payload.hex() if isinstance(handle.payload, bytes) else ""}
            if len(reply["invalid_runs"]) > 4096:
                # Keep the packet small: one run covering them all (a superset of the stale pages is still safe;
                # the gRPC Acquire returns the exact list).
                runs = lease.invalid_runs
                first, end = int(runs[0, 0]), int(runs[-1, 0] + runs[-1, 1])
                reply["invalid_runs"], reply["invalid_runs_superset"] = [first, end - first], True
            if handle.kind == "fd" and isinstance(handle.payload, int):
                return reply, [os.dup(handle.payload)]
            return reply, []
        if op == "release":
            self.registry.release(session, _positive_int(message, "lease"))
            return {"ok": True}, []
        if op == "bye":
            if owns_session:
                self.registry.close(session)  # before the reply: close() returns with everything freed
            return {"ok": True}, []
        raise InvalidArgumentError(
            f"unknown side-channel op {op!r}; known: hello, put_fds, acquire, lease_fd, release, bye")
