"""A client holding two replicated regions and a lease when its session ends (test_field_memory).

``python memory_client.py ADDRESS NBYTES ENDING TRACKING``: creates ``mem0`` and ``mem1`` (NBYTES each, tracked
by TRACKING), touches every page, replicates each to cpu:0 and cpu:1 and checks a read; keeps a lease of mem0 on
cpu:1, prints ``ready`` and waits for a stdin line (the test may instead close stdin or kill it). ENDING
``close``: then closes the client, prints ``closed`` and waits for another line.
"""

from __future__ import annotations

import sys

import devrep.client


def main(address: str, nbytes: int, ending: str, tracking: str) -> None:
    client = devrep.client.connect(address)
    for i in range(2):
        region = client.create_region(f"mem{i}", nbytes, tracking=tracking)
        region.array[::4096] = 1 + i
        client.replicate(f"mem{i}", ["cpu:0", "cpu:1"])
        with client.acquire(f"mem{i}", "cpu:0") as lease:
            assert int(lease.array[4096]) == 1 + i
    _held = client.acquire("mem0", "cpu:1")  # still held when the process goes
    print("ready", flush=True)
    sys.stdin.readline()
    if ending == "close":
        client.close()
        print("closed", flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
