"""Attacks on the sockets (issue 10 item 7), run as uid/gid 65534 by ``test_sockets.py``."""

from __future__ import annotations

import json
import os
import select
import socket
import time
from pathlib import Path
from typing import Any


def fake_server(directory: str, seconds: float) -> dict[str, Any]:
    """An impostor devrep: a SEQPACKET "side channel" at ``directory/devrep.fd.sock`` and a stream socket at
    ``directory/devrep.sock`` (standing in for gRPC). Records every packet, fd and connection it gets until
    ``directory/stop`` appears or ``seconds`` pass; answers each packet with an error reply."""
    d = Path(directory)
    side = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    side.bind(str(d / "devrep.fd.sock"))
    side.listen(8)
    grpc_like = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    grpc_like.bind(str(d / "devrep.sock"))
    grpc_like.listen(8)
    os.chmod(d / "devrep.fd.sock", 0o777)
    os.chmod(d / "devrep.sock", 0o777)
    (d / "ready").touch()
    seen: dict[str, Any] = {"side_connections": 0, "packets": [], "fds": 0, "grpc_connections": 0,
                            "grpc_bytes": 0}
    conns: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (d / "stop").exists():
        ready, _, _ = select.select([side, grpc_like, *conns], [], [], 0.05)
        for s in ready:
            if s is side:
                conn, _ = side.accept()
                seen["side_connections"] += 1
                conns.append(conn)
            elif s is grpc_like:
                conn, _ = grpc_like.accept()
                seen["grpc_connections"] += 1
                conns.append(conn)
            elif s.type == socket.SOCK_SEQPACKET:
                data, fds, _, _ = socket.recv_fds(s, 65536, 8)
                if not data and not fds:
                    conns.remove(s)
                    s.close()
                    continue
                seen["packets"].append(json.loads(data).get("op"))
                seen["fds"] += len(fds)
                for fd in fds:
                    os.close(fd)
                s.send(json.dumps({"ok": False, "code": "UNAUTHENTICATED", "error": "impostor"}).encode())
            else:
                data = s.recv(65536)
                seen["grpc_bytes"] += len(data)
                if not data:
                    conns.remove(s)
                    s.close()
    return seen
