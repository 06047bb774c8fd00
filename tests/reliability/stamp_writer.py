"""A writer process for the coherence checker (R3). Run by ``_coherence.WriterProcess``; not a test.

It maps a memfd it inherited, sets up write tracking on its own mapping (a userfaultfd for ``sync``; a
userfaultfd plus its ``/proc/self/pagemap`` for ``async``), hands those fds to the parent over a
SOCK_SEQPACKET socket and, on ``G``, stamps pages: the first 8 bytes of a page get
``writer_id << 48 | seq`` with ``seq`` rising by one per store. One aligned 8-byte store per stamp, so a
reader sees either the old or the new stamp, never a mix. It then reports ``D<count>`` and waits for
``X`` (or EOF) before it exits: in async mode the parent scans this process's page tables, which must
outlive the checks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import struct
import sys
import time

import _child  # noqa: F401  (dies with the test process)
import numpy as np

from devrep._pages import PAGE_SIZE
from devrep.memory import map_fd

WORDS_PER_PAGE = PAGE_SIZE // 8
BASE = struct.Struct("<Q")
STAMP_SHIFT = 48


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sock", type=int, required=True)
    p.add_argument("--memfd", type=int, required=True)
    p.add_argument("--npages", type=int, required=True)
    p.add_argument("--mode", choices=["sync", "async"], required=True)
    p.add_argument("--writer-id", type=int, required=True)
    p.add_argument("--writes", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=0.0, help="spread the writes over at least this long")
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.sock)
    array = map_fd(args.memfd, args.npages * PAGE_SIZE, writable=True)
    os.close(args.memfd)
    if args.mode == "sync":
        from devrep.protect import prepare_sync_client

        fds = [prepare_sync_client(array)]
    else:
        from devrep.protect import prepare_async_client

        fds = list(prepare_async_client(array))
    socket.send_fds(sock, [b"R" + BASE.pack(int(array.__array_interface__["data"][0]))], fds)
    for fd in fds:
        os.close(fd)  # the parent holds the only references now
    if sock.recv(16) != b"G":
        return 3
    stamps = array.view(np.uint64)[::WORDS_PER_PAGE]
    rng = np.random.default_rng(args.seed)
    tag = np.uint64(args.writer_id << STAMP_SHIFT)
    seq = 0
    start = time.monotonic()
    while seq < args.writes:
        # Bursts of ~64 writes, then a pause: fresh acquires need a quiet moment to succeed.
        ahead = start + args.seconds * (seq // 64 * 64) / args.writes - time.monotonic()
        if ahead > 0.001:
            time.sleep(ahead)  # paced, so the acquirers check while writes keep landing
        # Mostly single stores (each may fault), sometimes a burst over distinct pages (vectorized stores).
        burst = int(min(rng.choice([1, 1, 1, 2, 4, 16, 64]), args.writes - seq))
        if burst == 1:
            seq += 1
            stamps[int(rng.integers(args.npages))] = tag | np.uint64(seq)
        else:
            pages = rng.permutation(args.npages)[:burst] if burst < args.npages else rng.permutation(args.npages)
            burst = len(pages)
            stamps[pages] = tag | np.arange(seq + 1, seq + burst + 1, dtype=np.uint64)
            seq += burst
    sock.send(b"D" + BASE.pack(seq))
    sock.settimeout(600)
    with contextlib.suppress(OSError):
        sock.recv(16)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
