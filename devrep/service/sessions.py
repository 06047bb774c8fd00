"""Sessions, tokens, ownership, sharing and quotas.

A session is a client's identity: created by ``hello`` on the side channel (it ends when that connection
closes, including when the process dies) or pre-authorized by the operator (``TokenStore``: e.g. a
per-allocation token the Kubernetes device plugin puts in ``DEVREP_TOKEN``; such a session lives until the
token is removed or the server stops). gRPC calls carry the token in metadata. A session sees and touches
only its own regions, plus regions their owners shared with it (read-only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .._pages import PAGE_SIZE
from ..errors import (
    DevrepError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from ..wire.sidechannel import close_fds

if TYPE_CHECKING:
    from ..engine import Replicator
    from ..region import Lease

log = logging.getLogger("devrep.service")

_POLL = 0.5
"""Seconds between backstop stats of the token directory in the watch thread."""
_RACY_NS = 100_000_000
MAX_ENDED_LEASES = 4096
"""How many ended lease ids a session remembers (to answer a late release with the reason)."""
"""A directory modified this recently (ns) may change again without its mtime moving: re-read it."""


def physical_memory() -> int:
    """Bytes of RAM on this host (the default cap on the host bytes one session may register)."""
    return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class Quota:
    """Per-session limits. ``max_bytes`` counts device memory held by the session's replicas (bytes of the
    region times its replicas); ``0`` means unlimited.

    ``max_host_bytes`` counts the bytes of the regions a session registered, at registration: a sparse memfd or
    file costs nothing to its owner but the server keeps 8 bytes of state per page and maps it, so a 1 TiB sparse
    memfd would cost 2 GiB of server memory (default: this host's RAM; 0 = unlimited). ``max_fds`` bounds the
    file descriptors the server holds for the session (pending tickets and its regions' memfds, userfaultfds,
    pagemaps, files). ``max_blocking`` bounds the session's RPCs that may wait (RegisterRegion, Replicate, Sync,
    Acquire, Verify), and the same number bounds them per uid (all its sessions together; see ``limits``), so one
    client cannot hold every gRPC worker. ``max_connections`` bounds the side-channel connections of one session."""

    max_bytes: int = 0
    max_regions: int = 256
    max_leases: int = 4096
    max_tickets: int = 16
    max_watchers: int = 8
    max_host_bytes: int = field(default_factory=physical_memory)
    max_fds: int = 512
    max_blocking: int = 8
    max_connections: int = 8


@dataclass(eq=False)
class Session:
    id: str
    token: str
    label: str
    uid: int | None = None
    pid: int | None = None
    persistent: bool = False
    gid: int | None = None
    groups: tuple[int, ...] = ()
    """SO_PEERCRED gid and SO_PEERGROUPS of the hello connection: with ``uid``, the identity file paths are
    opened with (service/fileaccess.py)."""
    regions: set[str] = field(default_factory=set)
    leases: dict[int, Lease] = field(default_factory=dict)
    tickets: dict[str, list[int]] = field(default_factory=dict)
    ticket_pids: dict[str, int] = field(default_factory=dict)
    """The pid that sent each ticket's fds (SO_PEERCRED): whose address space ``writer_base`` refers to."""
    watchers: int = 0
    lease_started: dict[int, float] = field(default_factory=dict)
    """``time.monotonic()`` when each lease was taken (``--max-lease-s``)."""
    lease_holder: dict[int, str] = field(default_factory=dict)
    """The gRPC holder (``x-devrep-holder``) of leases taken over plain gRPC: released when it stops heartbeating."""
    # An OrderedDict: dropping the oldest of a plain dict with ``next(iter(d))`` walks every slot deleted before it
    # (until the dict is rebuilt), microseconds per release once the cap is reached (bench S2).
    ended_leases: OrderedDict[int, str] = field(default_factory=OrderedDict)
    """Why recent leases ended (released, revoked, holder gone): a second release, or a ``lease_fd`` after a
    revocation, is ``FAILED_PRECONDITION`` with that reason rather than ``NOT_FOUND``. Bounded (oldest dropped)."""
    closed: bool = False
    region_slots: int = 0
    """Regions registered or being registered (the region quota is reserved before the work, released on failure)."""
    host_bytes: int = 0
    """Host bytes of those regions (``Quota.max_host_bytes``)."""
    fds: int = 0
    """Descriptors the server holds for this session: pending tickets and its regions' (``Quota.max_fds``)."""
    pending_bytes: int = 0
    """Replica bytes reserved by Replicates under way (so concurrent ones cannot all pass the quota)."""
    charges: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per owned region: ``(host_bytes, fds)`` charged for it, given back when it goes."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def describe(self) -> str:
        who = f"uid {self.uid} pid {self.pid}" if self.uid is not None else "pre-authorized"
        return f"{self.label} ({who})"

    @property
    def principal(self) -> object:
        """Who is limited per uid: the side channel's uid, or the session itself for pre-authorized sessions (an
        operator-issued token is one principal); ``None`` for root (see ``limits.ROOT_UID``)."""
        if self.uid is None:
            return self
        return None if self.uid == 0 else ("uid", self.uid)


class TokenStore:
    """Pre-authorized tokens: added in process (``add``) or read from ``token_dir`` (one file per token: the file
    name is the label, the content the token).

    The directory is re-read whenever it changes: every lookup stats it (one ``stat``; a changed mtime/ctime or
    inode means a file was created, renamed or removed), and ``start()`` runs an inotify watch that re-reads it
    as soon as it changes, so a removed token file revokes the token at once even if no call uses it. Files are
    expected to be replaced atomically (write + rename, as the device plugin does); a token rewritten in place
    is still found when an unknown token shows up (at most one such re-read a second). Listeners added with
    ``on_revoke`` are told which tokens went away (the server ends their sessions)."""

    def __init__(self, token_dir: str | os.PathLike[str] | None = None) -> None:
        self._tokens: dict[str, str] = {}
        self._from_dir: dict[str, str] = {}
        self._dir = Path(token_dir) if token_dir else None
        self._lock = threading.Lock()
        self._last_scan = 0.0
        self._signature: tuple[int, int, int] | None = None
        self._racy = False
        self._listeners: list[Callable[[set[str]], None]] = []
        self._watch: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = -1
        if self._dir is not None:
            with self._lock:
                self._scan(self._stat())

    def add(self, token: str, label: str) -> None:
        if not token or len(token) < 16:
            raise InvalidArgumentError("a pre-authorized token needs at least 16 characters")
        with self._lock:
            self._tokens[token] = label

    def remove(self, token: str) -> None:
        with self._lock:
            gone = token in self._tokens and token not in self._from_dir
            self._tokens.pop(token, None)
        if gone:
            self._notify({token})

    def on_revoke(self, listener: Callable[[set[str]], None]) -> None:
        """Call ``listener(tokens)`` (on the thread that noticed) when tokens are removed."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[set[str]], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _notify(self, tokens: set[str]) -> None:
        for listener in list(self._listeners):
            try:
                listener(tokens)
            except Exception:  # one broken listener must not keep revoked sessions alive in the others
                log.exception("token revocation listener failed")

    # ------------------------------------------------------------------ the directory
    def _stat(self) -> tuple[int, int, int] | None:
        assert self._dir is not None
        try:
            st = os.stat(self._dir)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)

    def _scan(self, signature: tuple[int, int, int] | None) -> set[str]:
        """Re-read the directory (lock held); returns the tokens that disappeared."""
        assert self._dir is not None
        found: dict[str, str] = {}
        try:
            entries = list(self._dir.iterdir())
        except OSError:
            entries = []
        for entry in entries:
            try:
                if entry.is_file() and not entry.name.startswith("."):
                    token = entry.read_text().strip()
                    if len(token) >= 16:
                        found[token] = entry.name
            except OSError:
                continue
        gone = {t for t in self._from_dir if t not in found and t not in self._tokens}
        self._from_dir = found
        self._last_scan = time.monotonic()
        self._signature = signature
        # A change within the file system's timestamp granularity of this scan could leave the mtime as it is:
        # until the directory's mtime is safely in the past, the next check re-reads it anyway.
        self._racy = signature is not None and abs(time.time_ns() - signature[1]) < _RACY_NS
        return gone

    def refresh(self, force: bool = False) -> None:
        """Re-read the directory if it changed (one stat when it did not); tell listeners about removed tokens."""
        if self._dir is None:
            return
        signature = self._stat()
        with self._lock:
            if not force and not self._racy and signature == self._signature:
                return
            gone = self._scan(signature)
        if gone:
            self._notify(gone)

    def lookup(self, token: str) -> str | None:
        self.refresh()
        with self._lock:
            label = self._tokens.get(token) or self._from_dir.get(token)
            stale = label is None and self._dir is not None and time.monotonic() - self._last_scan > 1.0
        if stale:  # perhaps a file rewritten in place, which the stat cannot see
            self.refresh(force=True)
            with self._lock:
                label = self._tokens.get(token) or self._from_dir.get(token)
        return label

    def known(self, token: str) -> str | None:
        """The label of ``token`` as of the last read of the directory (no stat)."""
        with self._lock:
            return self._tokens.get(token) or self._from_dir.get(token)

    def __contains__(self, token: str) -> bool:
        return self.lookup(token) is not None

    @property
    def watching(self) -> bool:
        return self._watch is not None

    # ------------------------------------------------------------------ the watch
    def start(self) -> TokenStore:
        """Watch the directory in a daemon thread (inotify, plus a stat every ``_POLL`` seconds as a backstop, e.g.
        while the directory does not exist yet). Idempotent; a no-op without a directory."""
        if self._dir is None or self._watch is not None:
            return self
        self._stop.clear()
        wake_r, self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._watch = threading.Thread(target=self._watch_loop, args=(wake_r,), name="devrep-token-watch",
                                       daemon=True)
        self._watch.start()
        return self

    def close(self) -> None:
        """Stop the watch (the store still answers lookups)."""
        self._stop.set()
        if self._watch is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake, b"x")  # wakes the watch's poll at once
            self._watch.join(timeout=_POLL + 2)
            self._watch = None
            os.close(self._wake)

    def _watch_loop(self, wake: int) -> None:
        from inotify_simple import INotify
        from inotify_simple import flags as IN

        assert self._dir is not None
        mask = (IN.CREATE | IN.DELETE | IN.MOVED_FROM | IN.MOVED_TO | IN.CLOSE_WRITE | IN.ATTRIB
                | IN.DELETE_SELF | IN.MOVE_SELF)
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        try:
            with INotify() as inotify:
                poller.register(inotify.fileno(), select.POLLIN)
                watching = False
                while not self._stop.is_set():
                    try:
                        if not watching:
                            try:
                                inotify.add_watch(self._dir, mask)
                                watching = True
                            except OSError:  # not there yet: the backstop stat below finds it
                                pass
                        ready = {fd for fd, _ in poller.poll(int(_POLL * 1000))}
                        if self._stop.is_set():
                            return
                        events = inotify.read(timeout=0) if inotify.fileno() in ready else []
                        if any(e.mask & (IN.IGNORED | IN.DELETE_SELF | IN.MOVE_SELF) for e in events):
                            watching = False  # the directory itself went: watch its replacement
                        self.refresh(force=bool(events))
                    except Exception:  # never let the watch die: lookups still stat the directory
                        log.exception("token directory watch")
                        self._stop.wait(_POLL)
        finally:
            os.close(wake)


def view_name(key: str) -> str:
    """The name a client gave a region, from the server's key for it (``<session id>/<name>``)."""
    return key.partition("/")[2]


class SessionRegistry:
    """Every session, region ownership and sharing.

    Region names are per session: the ``Replicator`` knows a region as ``<session id>/<name>`` (``key``), so one
    session's ``RegisterRegion("x")`` can neither collide with nor reveal another session's private ``x``
    (``ALREADY_EXISTS`` only ever concerns the caller's own names). A name a session uses resolves to its own
    region, else to the one region of that name shared with it (``resolve``)."""

    def __init__(self, replicator: Replicator, tokens: TokenStore, quota: Quota) -> None:
        self.replicator = replicator
        self.tokens = tokens
        self.quota = quota
        self.on_quota: Callable[[str], None] | None = None
        """Told the resource of every request a quota refuses (the server wires ``Metrics.quota_rejected``)."""
        tokens.on_revoke(self._revoked)
        self._sessions: dict[str, Session] = {}
        self.owners: dict[str, Session] = {}
        self.shares: dict[str, set[str]] = {}
        self._lock = threading.RLock()
        self._ids = 0
        self._lease_ids = 0
        self._holders: dict[tuple[str, str], float] = {}
        """(session id, holder id) -> ``time.monotonic()`` of its last call."""

    def quota_error(self, resource: str, message: str) -> ResourceExhaustedError:
        """The error for a request refused by the quota on ``resource``, counted through ``on_quota``."""
        hook = self.on_quota
        if hook is not None:
            try:
                hook(resource)
            except Exception:  # counting must never change the answer
                log.exception("quota hook failed")
        return ResourceExhaustedError(message)

    # ------------------------------------------------------------------ sessions
    def _new_id(self) -> str:
        self._ids += 1
        return f"s{self._ids}"

    def open(self, label: str, uid: int | None, pid: int | None) -> Session:
        with self._lock:
            session = Session(self._new_id(), secrets.token_urlsafe(32), label, uid, pid)
            self._sessions[session.token] = session
            return session

    def authenticate(self, token: str | None) -> Session:
        if not token:
            raise UnauthenticatedError(
                "missing session token: send 'authorization: Bearer <token>' (from the side channel's hello, or "
                "a pre-authorized token)"
            )
        with self._lock:
            session = self._sessions.get(token)
        if session is not None and not session.closed and not session.persistent:
            return session
        # Pre-authorized: ask the token store every time (one stat of its directory), so a revoked token stops
        # working at once; the store's revocation listener (below) ends the session.
        label = self.tokens.lookup(token)
        if label is None:
            if session is not None:
                self.close(session)
            raise UnauthenticatedError("unknown or expired session token")
        with self._lock:
            session = self._sessions.get(token)
            if session is None or session.closed:
                if self.tokens.known(token) is None:  # revoked since the lookup: its listener found no session
                    raise UnauthenticatedError("unknown or expired session token")
                session = Session(self._new_id(), token, label, persistent=True)
                self._sessions[token] = session
            return session

    def _revoked(self, tokens: set[str]) -> None:
        """Token store listener: end the sessions of removed pre-authorized tokens, as if their client left."""
        with self._lock:
            doomed = [s for t in tokens if (s := self._sessions.get(t)) is not None and s.persistent]
        for session in doomed:
            log.info("token of session %s revoked: closing it", session.describe())
            self.close(session)

    def detach(self) -> None:
        """Stop listening to the token store (the server is stopping)."""
        self.tokens.remove_listener(self._revoked)

    def sessions(self) -> list[Session]:
        with self._lock:
            return [s for s in self._sessions.values() if not s.closed]

    def close(self, session: Session) -> None:
        """End a session: release its leases, unregister its regions, close pending fds."""
        with self._lock:
            if session.closed:
                return
            session.closed = True
            self._sessions.pop(session.token, None)
            for key in [k for k in self._holders if k[0] == session.id]:
                del self._holders[key]
        with session.lock:
            leases = list(session.leases.values())
            session.leases.clear()
            session.lease_started.clear()
            session.lease_holder.clear()
            tickets = list(session.tickets.values())
            session.tickets.clear()
            names = list(session.regions)
        for lease in leases:
            lease.release()
        for fds in tickets:
            close_fds(fds)
        for name in names:
            self.drop_region(session, name)

    def close_all(self) -> None:
        for session in self.sessions():
            self.close(session)

    # ------------------------------------------------------------------ tickets (fds from the side channel)
    def add_ticket(self, session: Session, fds: list[int], pid: int | None = None) -> str:
        with session.lock:
            if session.closed:
                raise UnauthenticatedError("session ended")
            if len(session.tickets) >= self.quota.max_tickets:
                raise self.quota_error(
                    "tickets",
                    f"session holds {len(session.tickets)} unused fd tickets (limit {self.quota.max_tickets}); "
                    "register regions with them first"
                )
            self._charge_locked(session, fds=len(fds))
            ticket = secrets.token_hex(8)
            session.tickets[ticket] = fds
            if pid is not None:
                session.ticket_pids[ticket] = pid
            return ticket

    def take_ticket(self, session: Session, ticket: str) -> list[int]:
        return self.take_ticket_with_pid(session, ticket)[0]

    def take_ticket_with_pid(self, session: Session, ticket: str) -> tuple[list[int], int | None]:
        with session.lock:
            fds = session.tickets.pop(ticket, None)
            pid = session.ticket_pids.pop(ticket, None)
            if fds is not None:  # the caller owns them now; a region that keeps them charges them again
                session.fds -= len(fds)
        if fds is None:
            raise NotFoundError(f"no fd ticket {ticket!r} in this session (tickets are single-use)")
        return fds, pid

    # ------------------------------------------------------------------ regions
    def claim(self, session: Session, name: str) -> None:
        """Reserve a region slot for ``session`` (quota) before registering it; ``adopt`` keeps it, ``unclaim``
        gives it back when the registration fails. Reserving (not just checking) makes concurrent registrations
        unable to pass the quota together."""
        with session.lock:
            if session.closed:
                raise UnauthenticatedError("session ended")
            if session.region_slots >= self.quota.max_regions:
                raise self.quota_error(
                    "regions",
                    f"session {session.label} already has {session.region_slots} regions "
                    f"(limit {self.quota.max_regions})"
                )
            session.region_slots += 1

    def unclaim(self, session: Session, host_bytes: int = 0, fds: int = 0) -> None:
        """Give back a slot from ``claim`` (and what ``charge`` reserved) after a failed registration."""
        with session.lock:
            session.region_slots -= 1
            session.host_bytes -= host_bytes
            session.fds -= fds

    def _charge_locked(self, session: Session, host_bytes: int = 0, fds: int = 0) -> None:
        q = self.quota
        if host_bytes and q.max_host_bytes and session.host_bytes + host_bytes > q.max_host_bytes:
            raise self.quota_error(
                "host_bytes", f"session {session.label}: a region of {host_bytes} bytes would exceed its quota of "
                              f"{q.max_host_bytes} registered host bytes ({session.host_bytes} in use)")
        if fds and session.fds + fds > q.max_fds:
            raise self.quota_error(
                "fds", f"session {session.label}: {fds} more file descriptors would exceed its budget of "
                       f"{q.max_fds} held by the server ({session.fds} in use: pending tickets and regions)")
        session.host_bytes += host_bytes
        session.fds += fds

    def charge(self, session: Session, host_bytes: int = 0, fds: int = 0) -> None:
        """Reserve a region's host bytes and fds (``Quota.max_host_bytes``, ``max_fds``) before it is built."""
        with session.lock:
            self._charge_locked(session, host_bytes, fds)

    def adopt(self, session: Session, name: str, host_bytes: int = 0, fds: int = 0) -> None:
        """``session`` owns the registered region ``name``, which keeps the slot and the charges reserved for it."""
        with self._lock, session.lock:
            self.owners[name] = session
            session.regions.add(name)
            session.charges[name] = (host_bytes, fds)

    def drop_region(self, session: Session, name: str) -> None:
        with self._lock, session.lock:
            if self.owners.get(name) is not session:
                return
            session.regions.discard(name)
            host_bytes, fds = session.charges.pop(name, (0, 0))
            session.region_slots -= 1
            session.host_bytes -= host_bytes
            session.fds -= fds
        with contextlib.suppress(NotFoundError):
            self.replicator.unregister(name)
        with self._lock:
            if self.owners.get(name) is session:
                del self.owners[name]
            self.shares.pop(name, None)

    @staticmethod
    def key(session: Session, name: str) -> str:
        """The server's key for ``session``'s region ``name``."""
        return f"{session.id}/{name}"

    def resolve(self, session: Session, name: str) -> str:
        """The key of the region ``name`` means to ``session``: its own, else the one shared with it under that
        name (or under its full key ``<session id>/<name>``, which ``FAILED_PRECONDITION`` suggests when two
        owners shared the same name). ``NOT_FOUND`` for anything it cannot read, whether it exists or not."""
        own = self.key(session, name)
        if self.owners.get(own) is session:
            return own
        if self.owners.get(name) is not None and self.can_read(session, name):
            return name
        with self._lock:
            keys = list(self.owners)
        matches = [k for k in keys if view_name(k) == name and self.can_read(session, k)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFoundError(f"no region named {name!r}")
        raise FailedPreconditionError(f"{len(matches)} regions named {name!r} are shared with you; name one by its "
                                      f"full key: {', '.join(sorted(matches))}")

    def can_read(self, session: Session, name: str) -> bool:
        owner = self.owners.get(name)
        if owner is None:
            return False
        if owner is session:
            return True
        grants = self.shares.get(name, ())
        return "*" in grants or f"label:{session.label}" in grants or (
            session.uid is not None and f"uid:{session.uid}" in grants)

    def check(self, session: Session, name: str, *, write: bool) -> tuple[str, bool]:
        """Raise unless ``session`` may use region ``name``; returns its key and whether ``session`` owns it."""
        key = self.resolve(session, name)
        if self.owners.get(key) is session:
            return key, True
        if write:
            raise PermissionDeniedError(f"region {name!r} is shared with you read-only; only its owner may change it")
        return key, False

    def share(self, session: Session, name: str, grantee: str, revoke: bool) -> None:
        name, _ = self.check(session, name, write=True)
        kind, sep, value = grantee.partition(":")
        if grantee != "*" and not (sep and value and (kind == "label" or (kind == "uid" and value.isdigit()))):
            raise InvalidArgumentError(f"bad grantee {grantee!r}: use '*', 'uid:<number>' or 'label:<label>'")
        with self._lock:
            grants = self.shares.setdefault(name, set())
            if revoke:
                grants.discard(grantee)
            else:
                grants.add(grantee)

    def visible(self, session: Session) -> list[tuple[str, bool]]:
        """``(name, owned)`` of the regions ``session`` can see."""
        with self._lock:
            names = list(self.owners)
        return [(n, self.owners.get(n) is session) for n in names if self.can_read(session, n)]

    def owner_label(self, name: str) -> str:
        owner = self.owners.get(name)
        return owner.label if owner else ""

    # ------------------------------------------------------------------ quota
    def device_bytes(self, session: Session) -> int:
        total = 0
        for name in list(session.regions):
            try:
                region = self.replicator.region(name)
            except NotFoundError:
                continue
            total += region.npages * PAGE_SIZE * len(region.devices)
        return total

    def check_bytes(self, session: Session, extra: int) -> None:
        with self.reserve_bytes(session, extra):
            pass

    @contextlib.contextmanager
    def reserve_bytes(self, session: Session, extra: int) -> Iterator[None]:
        """Hold ``extra`` replica bytes of the quota while the replicas are made: checked and reserved under the
        session's lock, so concurrent Replicates cannot each see the same free space (the check alone let four
        64 MiB Replicates pass a 64 MiB quota together). Replicas already added while the reservation is held
        count twice until it ends: briefly conservative, never over the quota."""
        with session.lock:
            used = self.device_bytes(session) + session.pending_bytes
            if self.quota.max_bytes and used + extra > self.quota.max_bytes:
                raise self.quota_error(
                    "bytes",
                    f"session {session.label}: {extra} more bytes of replicas would exceed its quota of "
                    f"{self.quota.max_bytes} bytes ({used} in use or being replicated)"
                )
            session.pending_bytes += extra
        try:
            yield
        finally:
            with session.lock:
                session.pending_bytes -= extra

    # ------------------------------------------------------------------ leases
    def add_lease(self, session: Session, lease: Lease, holder: str | None = None) -> int:
        with self._lock:  # lock order: registry, then session (as in drop_region)
            self._lease_ids += 1
            lease_id = self._lease_ids
        with session.lock:
            if session.closed:
                lease.release()
                raise UnauthenticatedError("session ended")
            if len(session.leases) >= self.quota.max_leases:
                lease.release()
                raise self.quota_error("leases", f"session holds {len(session.leases)} leases "
                                                 f"(limit {self.quota.max_leases}); release some")
            session.leases[lease_id] = lease
            session.lease_started[lease_id] = time.monotonic()
            if holder is not None:
                session.lease_holder[lease_id] = holder
            return lease_id

    def _gone(self, session: Session, lease_id: int) -> DevrepError:
        """The error for a lease id that is not held (lock held): why it ended, if this session had it."""
        reason = session.ended_leases.get(lease_id)
        if reason is not None:
            return FailedPreconditionError(f"lease {lease_id} {reason}")
        return NotFoundError(f"no lease {lease_id} in this session")

    def _end_lease_locked(self, session: Session, lease_id: int, reason: str) -> Lease | None:
        lease = session.leases.pop(lease_id, None)
        session.lease_started.pop(lease_id, None)
        session.lease_holder.pop(lease_id, None)
        if lease is not None:
            session.ended_leases[lease_id] = reason
            while len(session.ended_leases) > MAX_ENDED_LEASES:
                session.ended_leases.popitem(last=False)
        return lease

    def lease(self, session: Session, lease_id: int) -> Lease:
        with session.lock:
            lease = session.leases.get(lease_id)
            if lease is None:
                raise self._gone(session, lease_id)
        return lease

    def release(self, session: Session, lease_id: int) -> None:
        with session.lock:
            lease = self._end_lease_locked(session, lease_id, "was already released")
            if lease is None:
                raise self._gone(session, lease_id)
        lease.release()

    def lease_count(self) -> int:
        return sum(len(s.leases) for s in self.sessions())

    # ------------------------------------------------------------------ lease lifetime (holders, max hold time)
    def touch_holder(self, session: Session, holder: str) -> None:
        """A call carrying ``x-devrep-holder``: that holder is alive."""
        with self._lock:
            self._holders[(session.id, holder)] = time.monotonic()

    def holder_alive(self, session: Session, holder: str) -> bool:
        with self._lock:
            return (session.id, holder) in self._holders

    def end_holder(self, session: Session, holder: str, reason: str) -> int:
        """Release every lease of ``holder`` in ``session`` now (e.g. the side-channel connection that took them
        closed while its session lives on, as a pre-authorized one does). Returns how many."""
        with session.lock:
            ids = [i for i, h in session.lease_holder.items() if h == holder]
            leases = [lease for i in ids if (lease := self._end_lease_locked(session, i, reason)) is not None]
        for lease in leases:
            lease.release()
        return len(leases)

    def reap(self, *, holder_ttl: float, max_lease_s: float, now: float | None = None) -> int:
        """Release the leases whose gRPC holder has been silent for ``holder_ttl`` seconds (its process or
        connection is gone) and every lease held longer than ``max_lease_s`` (0 = no limit). Returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            dead = {key for key, seen in self._holders.items() if now - seen > holder_ttl}
            for key in dead:
                del self._holders[key]
        doomed: list[tuple[Session, int, Lease, str]] = []
        for session in self.sessions():
            with session.lock:
                for lease_id, started in list(session.lease_started.items()):
                    holder = session.lease_holder.get(lease_id)
                    if holder is not None and (session.id, holder) in dead:
                        reason = (f"was released: its holder {holder!r} sent no call for {holder_ttl:g} s "
                                  "(the client's process or connection is gone)")
                    elif max_lease_s and now - started > max_lease_s:
                        reason = (f"was revoked: held longer than {max_lease_s:g} s, the server's maximum "
                                  "(devrep serve --max-lease-s)")
                    else:
                        continue
                    lease = self._end_lease_locked(session, lease_id, reason)
                    if lease is not None:
                        doomed.append((session, lease_id, lease, reason))
        for session, lease_id, lease, reason in doomed:
            log.info("lease %d of session %s %s", lease_id, session.describe(), reason)
            lease.release()
        return len(doomed)


def readable_by(st: os.stat_result, uid: int | None, gids: Iterable[int] = ()) -> bool:
    """Whether a user may read a file with these permission bits (root may read anything)."""
    if uid == 0:
        return True
    if uid is not None and st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid in set(gids):
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)
