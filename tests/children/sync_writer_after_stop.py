"""A sync-tracked client region written after its server stopped (test_service_errors).

``python sync_writer_after_stop.py ADDRESS``: creates the 1 MiB sync region ``w``, replicates it to cpu:0, prints
``READY``, waits for a stdin line, then fills the region (blocks forever if a protection outlived the server)
and prints ``WROTE``.
"""

from __future__ import annotations

import sys

from devrep.client import connect


def main(address: str) -> None:
    c = connect(address)
    r = c.create_region("w", 1 << 20, tracking="sync")
    c.replicate("w", ["cpu:0"])
    print("READY", flush=True)
    sys.stdin.readline()
    r.array[:] = 3
    print("WROTE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
