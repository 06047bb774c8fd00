"""The fd side channel server: sessions (SO_PEERCRED), fd hand-over (SCM_RIGHTS) and replica fds.

One thread per connection (connections are few: one per client process). The connection *is* the session's
lifetime: when it closes (client exit, crash, kill -9) the session's regions, replicas and leases go at once.
Every malformed packet gets an error reply and every fd received with it is closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backends import ExportHandle
from ..errors import (
    DevrepError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
)
from ..memory import F_GET_SEALS, F_SEAL_SHRINK
from ..model import ExportKind
from ..region import DEFAULT_TIMEOUT, Lease
from ..wire import sidechannel as protocol
from . import sockets
from .fileaccess import check_file_fd
from .limits import ROOT_UID, Limiter
from .sessions import Session, SessionRegistry

log = logging.getLogger("devrep.service")

HELLO_TIMEOUT = 5.0
"""Seconds from connecting to a successful ``hello``, all packets together (not restarted by each packet)."""
MAX_CONNECTIONS = 256
MAX_CONNECTIONS_PER_UID = 32
"""Side-channel connections one unprivileged uid may hold at a time (root is not limited per uid, see
``limits.ROOT_UID``); the rest of ``MAX_CONNECTIONS`` stays for everyone else."""
_FD_KINDS = (ExportKind.FD, ExportKind.CUDA_FD)  # exports whose payload is an fd the reply carries (SCM_RIGHTS)

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


def check_writer_mapping(mode: str, fds: list[int], writer_base: int, length: int) -> None:
    """Make the writer's userfaultfd (``fds[1]``) track ``[writer_base, writer_base+length)`` of the writer's own
    address space, or raise ``InvalidArgumentError``: a sync/async tracker trusts that range for every fault and scan.

    Everything goes through the fds the client sent, never ``/proc/<pid>``: the client may live in another PID
    namespace (a pod; its SO_PEERCRED pid is then 0 here) and the server needs no ``CAP_SYS_PTRACE``.

    * ``UFFDIO_REGISTER`` of the range for write-protect on the client's userfaultfd: a no-op when the client
      registered it (as ``prepare_sync_client``/``prepare_async_client`` do); refused when the range is not fully
      mapped (ENOMEM), not anonymous/shmem memory (EINVAL) or registered with another userfaultfd (EBUSY); a range
      the client left unregistered is registered now. Then ``UFFDIO_WRITEPROTECT`` of the whole range, so from here
      every write to it is reported, whatever the client did before.
    * async: ``PAGEMAP_SCAN`` on the client's pagemap fd (``fds[2]``) must see every page of the range as
      async-write-protectable (``PAGE_IS_WPALLOWED``): the pagemap is of the memory the userfaultfd protects, and the
      userfaultfd has ``UFFD_FEATURE_WP_ASYNC``.

    What no fd can tell is *which* memory is mapped there: a client may register some other mapping of its own, use
    a user-mode-only or async userfaultfd for sync mode, or hand over another process's pagemap. Such a lying owner
    only makes the replicas of its own region stale (writes the tracker does not see); readers of that region trust
    its owner anyway, and the server's own memory is not involved (it reads the memfd through its own mapping)."""
    from ..linux.pagemap import PageCategory, PagemapScanner
    from ..linux.uffd import RegisterMode, Userfaultfd
    from ..protect import register_failure

    if not writer_base or writer_base % os.sysconf("SC_PAGE_SIZE") or length <= 0:
        raise InvalidArgumentError(f"{mode} tracking needs the page-aligned address of the writer's mapping "
                                   f"(memfd.writer_base), got {writer_base:#x}")
    where = f"memfd.writer_base {writer_base:#x}: the writer's {length} bytes there"
    uffd = Userfaultfd(fds[1])  # borrowed: the tracker takes the fd over later
    try:
        try:
            uffd.register(writer_base, length, RegisterMode.WP)
        except OSError as exc:
            raise InvalidArgumentError(f"{where}: {register_failure(exc)}; send the address of the mapping the "
                                       "userfaultfd was registered on") from None
        try:
            uffd.writeprotect(writer_base, length, True)
        except OSError as exc:
            raise InvalidArgumentError(f"{where} cannot be write-protected: {exc.strerror}") from None
    finally:
        uffd.detach()  # never close the client's fd here
    if mode == "async":
        try:
            unprotectable = PagemapScanner(fds[2]).scan(
                writer_base, writer_base + length, category_mask=PageCategory.WPALLOWED,
                category_inverted=PageCategory.WPALLOWED, return_mask=PageCategory.WPALLOWED)
        except OSError as exc:
            raise InvalidArgumentError(f"PAGEMAP_SCAN on the pagemap fd failed: {exc.strerror}") from None
        if len(unprotectable):
            raise InvalidArgumentError(
                f"{where} are not async-write-protectable in the pagemap fd's process: send your own "
                "/proc/self/pagemap and a userfaultfd with UFFD_FEATURE_WP_ASYNC")


def check_fd(fd: int, role: str) -> None:
    """Raise ``InvalidArgumentError`` unless ``fd`` is usable as ``role``."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        access = flags & os.O_ACCMODE
    except OSError as exc:
        raise InvalidArgumentError(f"{role} fd is not usable: {exc}") from None
    target = _fd_target(fd)
    if role == "file":  # a client's read fd of a regular data file; never O_PATH, never re-opened
        check_file_fd(fd, "file fd")
        return
    if flags & os.O_PATH:
        raise InvalidArgumentError(f"{role} fd is an O_PATH fd ({_fd_target(fd)})")
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


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def peer_groups(conn: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups when it connected (SO_PEERGROUPS, Linux >= 4.13); () if unknown (more than
    256 groups, an old kernel): fewer groups only ever grant less."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # Python caps buflen at 1024
    except OSError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


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
        sockets.claim(self.path, socket.SOCK_SEQPACKET)  # a live server's socket is never taken over
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.bind(str(self.path))
        self._identity = sockets.identity(self.path)  # close() removes the path only while it is still ours
        os.chmod(self.path, mode)
        if group is not None:
            try:
                set_group(self.path, group)
            except BaseException:
                self._sock.close()
                raise
        self._sock.listen(64)
        self._conns: set[socket.socket] = set()
        self._per_uid = Limiter("side-channel connections", MAX_CONNECTIONS_PER_UID,
                                functools.partial(registry.quota_error, "connections"))
        self._per_session = Limiter("side-channel connections", registry.quota.max_connections,
                                    functools.partial(registry.quota_error, "connections"))
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
        if self._thread.ident is not None:  # started (stop() also runs after a failed start)
            self._thread.join(timeout=2)
        sockets.unlink_if_ours(self.path, self._identity)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                uid = struct.unpack("3i", creds)[1]
            except OSError:
                conn.close()
                continue
            key = None if uid == ROOT_UID else uid
            with self._lock:
                refusal: DevrepError | None = None
                if len(self._conns) >= MAX_CONNECTIONS:
                    refusal = self.registry.quota_error(
                        "connections", f"too many side-channel connections ({MAX_CONNECTIONS})")
                elif key is not None and not self._per_uid.try_acquire(key):
                    refusal = self.registry.quota_error(
                        "connections", f"uid {uid} already holds {MAX_CONNECTIONS_PER_UID} side-channel connections")
                if refusal is not None:
                    with contextlib.suppress(OSError):
                        protocol.send(conn, protocol.error_reply(refusal))
                    conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, key), name="devrep-fd-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, uid_key: int | None) -> None:
        session: Session | None = None
        owns_session = False
        # Leases acquired on this connection are this connection's: when it closes they go, even if its session
        # lives on (a pre-authorized token shared by several processes).
        holder = f"side-channel:{id(conn):x}:{threading.get_ident():x}"
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, gid = struct.unpack("3i", creds)
            groups = peer_groups(conn)
            # Absolute: a client that keeps sending packets (bad ones, or hellos refused under --require-token)
            # is still cut when the time is up, instead of holding a slot forever.
            hello_deadline = time.monotonic() + HELLO_TIMEOUT
            while not self._closed:
                if session is None:
                    left = hello_deadline - time.monotonic()
                    if left <= 0:
                        with contextlib.suppress(OSError):
                            protocol.send(conn, protocol.error_reply(UnauthenticatedError(
                                f"no successful hello within {HELLO_TIMEOUT:g} s of connecting")))
                        return
                    conn.settimeout(left)
                try:
                    message, fds = protocol.recv(conn)
                except protocol.ProtocolError as exc:
                    protocol.send(conn, protocol.error_reply(exc))
                    continue
                if message is None:
                    return
                try:
                    reply, out_fds = self._handle(message, fds, session, uid, pid, owns_session, holder)
                    if isinstance(reply.get("_session"), Session) and reply.get("_owns"):
                        reply["_session"].gid, reply["_session"].groups = gid, groups
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
                    joined: Session = reply.pop("_session")
                    if not self._per_session.try_acquire(joined):
                        protocol.send(conn, protocol.error_reply(self.registry.quota_error(
                            "connections", f"session {joined.label} already has "
                                           f"{self._per_session.limit} side-channel connections")))
                        if reply.pop("_owns"):
                            self.registry.close(joined)
                        return
                    session = joined
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
                if uid_key is not None:
                    self._per_uid.release(uid_key)
            if session is not None:
                self._per_session.release(session)
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
            chosen = message.get("label") or f"pid{pid}"
            if not isinstance(chosen, str) or len(chosen) > 128:
                raise InvalidArgumentError("label must be a string of at most 128 characters")
            # A label the client chose is namespaced by its uid: it can never equal an operator-set token label
            # (token file names hold no '/') nor another uid's label, so ShareRegion(grantee="label:X") grants
            # nothing to a stranger who says hello with label X. See docs/security.md (4. Labels are not identities).
            label = f"uid:{uid}/{chosen}"
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
            if handle.kind not in _FD_KINDS or not isinstance(handle.payload, int):
                raise NotFoundError(f"lease {lease_id} is on {handle.device}, which exports {str(handle.kind)!r}, "
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
                     "device": lease.device, "export_kind": str(handle.kind), "buffer_nbytes": handle.nbytes,
                     "cuda_ipc_handle": handle.payload.hex() if isinstance(handle.payload, bytes) else "",
                     "gpu_uuid": handle.gpu_uuid, "granularity": handle.granularity}
            if len(reply["invalid_runs"]) > 4096:
                # Keep the packet small: one run covering them all (a superset of the stale pages is still safe;
                # the gRPC Acquire returns the exact list).
                runs = lease.invalid_runs
                first, end = int(runs[0, 0]), int(runs[-1, 0] + runs[-1, 1])
                reply["invalid_runs"], reply["invalid_runs_superset"] = [first, end - first], True
            if handle.kind in _FD_KINDS and isinstance(handle.payload, int):  # memfd / CUDA VMM fd
                return reply, [os.dup(handle.payload)]
            return reply, []
        if op == "release":
            self.registry.release(session, _positive_int(message, "lease"))
            return protocol.OK, []
        if op == "bye":
            if owns_session:
                self.registry.close(session)  # before the reply: close() returns with everything freed
            return protocol.OK, []
        raise InvalidArgumentError(
            f"unknown side-channel op {op!r}; known: hello, put_fds, acquire, lease_fd, release, bye")
