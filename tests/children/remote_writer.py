"""The writer side of a remote (another process's) sync or async region (test_tracking_sync, test_tracking_async).

``python remote_writer.py {sync|async} SOCKET_FD [--npages N] [--pages P,...] [--offset K] [--blocked]``: maps an
N-page memfd writable, prepares it for MODE tracking and sends its address with the fds (sync: userfaultfd and
memfd; async: userfaultfd, pagemap and memfd) over the socket ``SOCKET_FD``, closing its own tracking fds (the
service must hold the last reference).

Default: waits for ``g``, stores page number P (its low byte) at byte K of every page P, sends ``d`` and waits for
one more byte.
``--blocked``: at once stores to page 1 (blocks until the service handles the fault or lets go of the
userfaultfd), then sends ``w``.
"""

from __future__ import annotations

import argparse
import os
import socket

from devrep.memory import map_fd, memfd_create
from devrep.protect import prepare_async_client, prepare_sync_client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sync", "async"])
    parser.add_argument("fd", type=int)
    parser.add_argument("--npages", type=int, default=64)
    parser.add_argument("--pages", default="")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--blocked", action="store_true")
    args = parser.parse_args()

    sock = socket.socket(fileno=args.fd)
    fd = memfd_create("client", args.npages * 4096)
    array = map_fd(fd, args.npages * 4096, writable=True)
    tracking = [prepare_sync_client(array)] if args.mode == "sync" else list(prepare_async_client(array))
    socket.send_fds(sock, [array.__array_interface__["data"][0].to_bytes(8, "little")], [*tracking, fd])
    for tracking_fd in tracking:
        os.close(tracking_fd)  # the service must hold the last reference
    if args.blocked:
        array[4096] = 1  # blocks until the service handles the fault or lets go of the userfaultfd
        sock.sendall(b"w")
        return
    assert sock.recv(1) == b"g"
    for page in map(int, args.pages.split(",")):
        array[page * 4096 + args.offset] = page & 0xFF
    sock.sendall(b"d")
    sock.recv(1)


if __name__ == "__main__":
    main()
