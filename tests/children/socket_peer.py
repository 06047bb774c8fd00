"""A peer that tries both of a server's sockets (test_cli; run as uid/gid 65534).

``python socket_peer.py GRPC_SOCKET FD_SOCKET``: prints ``grpc ok`` if a gRPC health check over the Unix socket
GRPC_SOCKET answers, else ``grpc <status code name>``; then ``fd ok`` if the side-channel socket FD_SOCKET
accepts a connection, else ``fd <exception class name>``.
"""

from __future__ import annotations

import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(grpc_sock: str, fd_sock: str) -> None:
    with grpc.insecure_channel("unix:" + grpc_sock) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            print("grpc ok")
        except grpc.RpcError as exc:
            print("grpc", exc.code().name)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(fd_sock)
        print("fd ok")
    except OSError as exc:
        print("fd", type(exc).__name__)


if __name__ == "__main__":
    main(*sys.argv[1:3])
