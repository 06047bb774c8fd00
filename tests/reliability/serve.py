"""Run a devrep server for the reliability suite in its own process (so tests can kill -9 it).

``python serve.py SOCKET [--capacity BYTES] [--max-bytes BYTES] [--max-regions N] [--token TOKEN]``; prints
``READY <pid>`` once it serves. Uses the service's own ``run`` (SIGTERM: graceful shutdown).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _child  # noqa: F401  (dies with the test process)

import devrep
from devrep.backends._cpu import CpuBackend
from devrep.service.server import run
from devrep.service.sessions import Quota, TokenStore


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--capacity", type=int, default=None, help="bytes per CPU device")
    p.add_argument("--max-bytes", type=int, default=0)
    p.add_argument("--max-regions", type=int, default=256)
    p.add_argument("--token", action="append", default=[])
    p.add_argument("--workers", type=int, default=32)
    args = p.parse_args(argv)
    tokens = TokenStore()
    for i, token in enumerate(args.token):
        tokens.add(token, f"pre{i}")
    rep = devrep.Replicator(backends={"cpu": CpuBackend(args.devices, args.capacity)})

    def ready(server: Any) -> None:
        import os

        print(f"READY {os.getpid()}", flush=True)

    return run(f"unix:{args.socket}", ready=ready, replicator=rep, tokens=tokens,
               quota=Quota(max_bytes=args.max_bytes, max_regions=args.max_regions), max_workers=args.workers)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
