"""Writes through a torch view of a CPU replica (test_typed_views): the replica is mapped read-only, so the
store must kill this process with SIGSEGV.

``python torch_view_writer.py in-process`` (a Replicator in this process) or ``python torch_view_writer.py client
ADDRESS`` (a client of that server): acquires cpu:0 of a 4-page explicit region, takes a float32 torch view of it,
prints ``viewed``, stores into it and prints ``wrote`` (never reached when the mapping is read-only).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from devrep import Replicator
from devrep.client import connect


def main(argv: list[str]) -> None:
    region: Any  # a Region or a client's Region; like the replicator or client, referenced until the end
    lease: Any
    if argv[0] == "in-process":
        rep = Replicator(cpu_devices=1)
        region = rep.create_region("t", 4 * 4096, tracking="explicit")
        rep.replicate("t", ["cpu:0"])
        lease = region.acquire("cpu:0")
    else:
        client = connect(argv[1])
        region = client.create_region("w", 4 * 4096, tracking="explicit")
        client.replicate("w", ["cpu:0"])
        lease = client.acquire("w", "cpu:0")
    tensor = lease.torch(torch.float32, 16)
    print("viewed", flush=True)
    tensor[0] = 42.0
    print("wrote", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
