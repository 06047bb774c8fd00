"""The owning client of the end-to-end tests (test_service_e2e).

``python e2e_owner.py ADDRESS MODE``: connects as ``owner``, creates the 1 MiB region ``e2e/t`` tracked by MODE,
fills it with 1, replicates it to cpu:0 and cpu:1, shares it with everyone and prints ``READY``. Then per stdin
line: ``write PAGE VALUE`` fills that page (and invalidates it in explicit mode), prints ``WROTE``;
``writeall VALUE`` fills the region, prints ``WROTEALL``; ``hold`` acquires cpu:0, opens a watch and prints
``HOLDING <lease id>``.
"""

from __future__ import annotations

import sys

from devrep.client import connect


def main(address: str, mode: str) -> None:
    c = connect(address, label="owner")
    r = c.create_region("e2e/t", 1 << 20, tracking=mode)
    r.array[:] = 1
    if mode == "explicit":
        r.invalidate()
    c.replicate("e2e/t", ["cpu:0", "cpu:1"])
    c.share("e2e/t", "*")
    print("READY", flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "write":
            page, value = int(rest[0]), int(rest[1])
            r.array[page * 4096: page * 4096 + 4096] = value
            if mode == "explicit":
                r.invalidate(page * 4096, 4096)
            print("WROTE", flush=True)
        elif cmd == "writeall":
            r.array[:] = int(rest[0])
            print("WROTEALL", flush=True)
        elif cmd == "hold":
            lease = c.acquire("e2e/t", "cpu:0")
            _watch = c.watch("e2e/t")  # held open (like the lease) until the next hold or the end
            print("HOLDING", lease.lease_id, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
