"""One server per socket path: never take over a live server's socket, and remove only the files we created.

Binding a Unix socket needs its path to be free, so a server used to unlink whatever was there: a second
``devrep serve`` on the same path silently took the socket over (the first one still ran, unreachable), and when
either exited it deleted the files the other served. Now a server

* probes an existing path first: a connection that succeeds means a live server (``SocketInUseError`` naming its
  pid, from ``SO_PEERCRED``); ``ECONNREFUSED`` means nobody listens (a crashed server's leftover), which is the
  only case it is replaced; anything else (not a socket, no permission to probe) is refused with the reason;
* records the device and inode of each socket file it binds, and at exit unlinks a path only while it still names
  that file (an operator may have moved it and started another server there meanwhile).

gRPC needs one more step: its core unlinks any socket at the path it bound, both before binding and at shutdown.
So it binds a private name beside the public one, which is then hard-linked to the public path (``link`` fails if
the path exists: two servers starting at once cannot both win) and removed; at shutdown gRPC's unlink of the
private name finds nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from pathlib import Path

from ..errors import SocketInUseError

PROBE_TIMEOUT = 2.0

Identity = tuple[int, int]


def _peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


def claim(path: Path, kind: socket.SocketKind) -> None:
    """Make ``path`` free to bind a ``kind`` socket: absent, or a stale socket (removed here). Raises
    ``SocketInUseError`` when a live server answers there, or when the path cannot be judged safe to replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            pass  # nobody listens: a crashed server's leftover
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:  # a socket of another type: not ours to judge
                raise SocketInUseError(f"socket {path} is in use by another kind of socket") from None
            raise SocketInUseError(f"socket {path} may be in use (cannot probe it: {exc.strerror}); "
                                   "stop the server that owns it or choose another --socket") from None
        else:
            pid = _peer_pid(probe)
            raise SocketInUseError(f"socket {path} in use by pid {pid}: another devrep server serves it; stop it "
                                   "or choose another --socket")
    finally:
        probe.close()
    with contextlib.suppress(FileNotFoundError):
        current = os.lstat(path)
        if (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):  # still the stale one we probed
            path.unlink()


MAX_PATH = 107
"""Longest Unix socket path (``sun_path`` less the terminating NUL)."""


def private_name(path: Path) -> Path | None:
    """Where gRPC binds before ``publish``; ``None`` when that name would be too long for a socket address (then
    gRPC binds ``path`` itself)."""
    private = path.with_name(f".{path.name}.{os.getpid()}")
    return private if len(os.fsencode(private)) <= MAX_PATH else None


def publish(private: Path, public: Path) -> None:
    """Give the socket bound at ``private`` its ``public`` name, atomically, and drop the private name."""
    try:
        os.link(private, public)
    except FileExistsError:
        raise SocketInUseError(f"socket {public} was created by another process while this server started") from None
    except OSError:  # a file system without hard links: rename (not atomic against a racing server, but works)
        os.rename(private, public)
    finally:
        with contextlib.suppress(FileNotFoundError):
            private.unlink()


def identity(path: Path) -> Identity | None:
    """Device and inode of the socket file at ``path`` (just bound by us), or ``None`` if there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def unlink_if_ours(path: Path | None, ours: Identity | None) -> None:
    """Remove ``path`` only if it is still the socket file we bound (same device and inode)."""
    if path is None or ours is None:
        return
    if identity(path) == ours:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
