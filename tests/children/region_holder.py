"""A client that owns a replicated region until its stdin ends (test_field_cli).

``python region_holder.py ADDRESS``: creates the 64 KiB region ``theirs``, replicates it to cpu:0, prints
``ready`` and waits for a stdin line.
"""

from __future__ import annotations

import sys

import devrep.client


def main(address: str) -> None:
    client = devrep.client.connect(address)
    _region = client.create_region("theirs", 1 << 16)  # kept referenced, as the region stays the client's
    client.replicate("theirs", ["cpu:0"])
    print("ready", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main(sys.argv[1])
