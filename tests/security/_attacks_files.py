"""Attacks on file registration (issue 10 items 1-3), run as uid/gid 65534 by ``test_files.py``.

Each attack returns, per attempt, either ``{"code": <gRPC status name>, "error": ...}`` or ``{"content": ...}``
(the bytes the attacker read back from a CPU replica, latin-1 decoded), so the test can tell a refusal from a
leak and print what happened.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

READ = 64


def _client(address: str) -> Any:
    import devrep.client

    return devrep.client.connect(address, label="attacker")


def _outcome(client: Any, name: str, register: Callable[[], Any]) -> dict[str, Any]:
    """Run ``register`` (which registers ``name``); on success read the replica back and unregister."""
    from devrep import errors

    try:
        register()
    except errors.DevrepError as exc:
        return {"code": exc.grpc_code, "error": str(exc)}
    try:
        client.replicate(name, ["cpu:0"])
        with client.acquire(name, "cpu:0") as lease:
            return {"content": bytes(lease.array[:READ]).decode("latin-1")}
    finally:
        with contextlib.suppress(Exception):
            client.unregister(name)


def _register_path(client: Any, name: str, path: str) -> Any:
    """What a gRPC-only client (grpcurl) does: a path, no fd ticket."""
    from devrep.wire._gen import devrep_pb2 as pb

    return client._call(client._stub.RegisterRegion,
                        pb.RegisterRegionRequest(name=name, file=pb.FileSource(path=path)))


def _register_ticket(client: Any, name: str, fd: int, kind: str = "file", path: str = "/x") -> Any:
    """``put_fds`` then ``RegisterRegion`` naming the ticket (path only informational)."""
    from devrep.wire._gen import devrep_pb2 as pb

    ticket = client._put_fds(kind, [fd])
    return client._call(client._stub.RegisterRegion,
                        pb.RegisterRegionRequest(name=name, file=pb.FileSource(path=path, fd_ticket=ticket)))


def register_paths(address: str, paths: list[str]) -> dict[str, dict[str, Any]]:
    """Register each path by name alone (the path route); what came back for each."""
    with _client(address) as client:
        return {p: _outcome(client, f"p{i}", functools.partial(_register_path, client, f"p{i}", p))
                for i, p in enumerate(paths)}


def register_fds(address: str, secret: str, own: str) -> dict[str, dict[str, Any]]:
    """Hand over fds of every kind in a ``kind=file`` ticket: only ``own_rdonly`` is a legitimate one."""
    out: dict[str, dict[str, Any]] = {}
    with _client(address) as client:
        memfd = os.memfd_create("attacker", os.MFD_CLOEXEC)
        os.write(memfd, b"memfd-bytes".ljust(4096, b"\0"))
        opener: dict[str, Callable[[], int]] = {
            "secret_o_path": lambda: os.open(secret, os.O_PATH),  # needs no read permission on the file
            "own_o_path": lambda: os.open(own, os.O_PATH),
            "own_write_only": lambda: os.open(own, os.O_WRONLY),
            "own_rdonly": lambda: os.open(own, os.O_RDONLY),
            "memfd": lambda: os.dup(memfd),
            "proc_self_status": lambda: os.open("/proc/self/status", os.O_RDONLY),
            "proc_self_environ": lambda: os.open("/proc/self/environ", os.O_RDONLY),
            "sysfs": lambda: os.open("/sys/kernel/mm/transparent_hugepage/enabled", os.O_RDONLY),
            "directory": lambda: os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY),
            "dev_zero": lambda: os.open("/dev/zero", os.O_RDONLY),
        }
        for i, (what, make) in enumerate(opener.items()):
            try:
                fd = make()
            except OSError as exc:
                out[what] = {"code": "SKIPPED-OPEN", "error": str(exc)}
                continue
            try:
                out[what] = _outcome(client, f"f{i}", functools.partial(_register_ticket, client, f"f{i}", fd))
            finally:
                os.close(fd)
        # a memfd ticket (kind=memfd, a legitimate ticket) named as a *file* source
        out["memfd_ticket_as_file"] = _outcome(
            client, "mt", lambda: _register_ticket(client, "mt", memfd, kind="memfd"))
        os.close(memfd)
    return out


def flip_race(address: str, link: str, own: str, secret: str, seconds: float) -> dict[str, Any]:
    """Flip ``link`` between ``own`` and ``secret`` (atomic rename of a fresh symlink) while registering ``link``
    by path as fast as possible: the stat-then-open-as-root race. Returns the contents seen and refusal codes."""
    stop = threading.Event()
    flips = 0

    def flipper() -> None:
        nonlocal flips
        tmp = link + ".tmp"
        while not stop.is_set():
            for target in (own, secret):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                os.symlink(target, tmp)
                os.rename(tmp, link)
                flips += 1

    os.symlink(own, link)
    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    contents: dict[str, int] = {}
    codes: dict[str, int] = {}
    attempts = 0
    try:
        with _client(address) as client:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                attempts += 1
                got = _outcome(client, "race", lambda: _register_path(client, "race", link))
                key = got.get("content", "")[:16] if "content" in got else ""
                if "content" in got:
                    contents[key] = contents.get(key, 0) + 1
                else:
                    codes[got["code"]] = codes.get(got["code"], 0) + 1
    finally:
        stop.set()
        thread.join()
    return {"contents": contents, "codes": codes, "attempts": attempts, "flips": flips}


def fifo_flood(address: str, fifo: str, calls: int) -> dict[str, Any]:
    """``calls`` concurrent path registrations of a FIFO (today each parks a server worker in open(2)), then a
    Ping from a fresh session: the service must still answer."""
    codes: list[str] = []
    lock = threading.Lock()
    with _client(address) as client:
        def one(i: int) -> None:
            got = _outcome(client, f"fifo{i}", lambda: _register_path(client, f"fifo{i}", fifo))
            with lock:
                codes.append(str(got.get("code", "REGISTERED")))

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(calls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        hung = sum(t.is_alive() for t in threads)
    with _client(address) as other:
        pong = bool(other.ping())
    return {"codes": sorted(set(codes)), "answered": len(codes), "hung": hung, "ping": pong}


def proc_paths(address: str, server_pid: int, workdir: str) -> dict[str, dict[str, Any]]:
    """Other sessions' memory through /proc: the server's own fds (/proc/self is the *server* when it resolves
    the path), its map_files, this process's memfd by /proc/<pid>/fd, and symlinks in ``workdir`` to each."""
    memfd = os.memfd_create("attacker-memfd", 0)
    os.write(memfd, b"attacker memfd".ljust(4096, b"\0"))
    mapping = mmap.mmap(memfd, 4096)
    me = os.getpid()
    ranges = [line.split()[0] for line in open(f"/proc/{me}/maps").read().splitlines()  # noqa: SIM115
              if "memfd:attacker-memfd" in line]
    starts = {int(r.split("-")[0], 16) for r in ranges}
    map_files = next((f"/proc/{me}/map_files/{e}" for e in os.listdir(f"/proc/{me}/map_files")
                      if int(e.split("-")[0], 16) in starts), f"/proc/{me}/map_files/none")
    paths = [f"/proc/self/fd/{n}" for n in range(3, 40)]
    paths += [f"/proc/{server_pid}/fd/{n}" for n in range(3, 40)]
    paths += [f"/proc/{me}/fd/{memfd}", map_files, "/proc/self/mem", "/proc/self/environ",
              f"/proc/{server_pid}/environ", "/proc/thread-self/fd/3"]
    links = []
    for i, target in enumerate([f"/proc/{me}/fd/{memfd}", map_files, "/proc/self/mem", "/proc/self/fd/5",
                                f"/proc/{server_pid}/fd/7", "/proc/self/cwd/etc/shadow", "/proc/1/root/etc/shadow"]):
        link = os.path.join(workdir, f"proc-link-{me}-{i}")
        os.symlink(target, link)
        links.append(link)
    try:
        return register_paths(address, paths + links)
    finally:
        mapping.close()
        os.close(memfd)


def make_fifo_and_socket(workdir: str) -> list[str]:
    """A FIFO and a listening Unix socket owned by the attacker (targets for the path route)."""
    fifo = os.path.join(workdir, "fifo")
    os.mkfifo(fifo)
    sock_path = os.path.join(workdir, "sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(sock_path)
    sock.close()
    return [fifo, sock_path]
