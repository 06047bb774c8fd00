"""A small job for a pod that requested ``devrep.io/replica: 1``.

The device plugin put ``DEVREP_ADDRESS`` (the service socket, in a read-only mount of its directory) and
``DEVREP_TOKEN`` (this allocation's token) in the environment; ``devrep.client.connect()`` reads both.

The job writes a table into host memory shared with the node's devrep server, replicates it to a device,
reads the replica back, changes a few rows, reports them, and reads again: the replica is never stale.
Prints one JSON line; exits 0 when every read matched the host, 1 otherwise.

How it reads a replica depends on what the device exports (``lease.export_kind``):

* ``fd`` (``cpu:N``): the replica's memfd mapped read-only here, ``lease.array`` (numpy, zero-copy);
* ``cuda_ipc`` (``cuda:N``; the pod also requests ``nvidia.com/gpu`` so the NVIDIA runtime gives it the GPU):
  ``lease.to_cupy()`` opens the replica through CUDA IPC, zero-copy (``torch.from_dlpack(lease)`` works too);
* ``none`` (``opencl:N``): OpenCL cannot share device memory between processes, so a client pod cannot map the
  replica. It still gets a fresh replica on every acquire; to check its bytes it asks the server to compare them
  on the device (``client.verify``: XXH64 of every page, replica against host) without copying them back.

    python read_replica.py [--device cuda:0] [--mib 64] [--name demo-table]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import devrep.client

PAGE = 4096


def replica_matches(client: devrep.client.Client, name: str, lease: devrep.client.ClientLease,
                    host: np.ndarray) -> bool:
    """Whether the leased replica holds exactly ``host``, read the way its export kind allows."""
    if lease.export_kind == "fd":
        return bool(np.array_equal(np.asarray(lease.array), host))
    if lease.export_kind == "cuda_ipc":
        import cupy  # the cuda image has it (devrep[cuda])

        return bool(cupy.array_equal(lease.to_cupy(), cupy.asarray(host)))
    if lease.export_kind == "none":
        # Compared on the device by the server while our lease pins the replica (no resync: a mismatch is reported).
        (report,) = client.verify(name, [lease.device], resync=False)
        return report.pages_checked == (host.nbytes + PAGE - 1) // PAGE and report.mismatched_pages == 0
    raise SystemExit(f"replica on {lease.device} exports {lease.export_kind!r}, which this example cannot read")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=os.environ.get("DEVREP_DEVICE", "cpu:0"))
    p.add_argument("--mib", type=int, default=int(os.environ.get("DEVREP_EXAMPLE_MIB", "64")))
    p.add_argument("--name", default=f"example-{os.getpid()}")
    args = p.parse_args(argv)

    nbytes = args.mib << 20
    with devrep.client.connect() as client:
        region = client.create_region(args.name, nbytes)
        host = region.array
        host[:] = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)

        start = time.perf_counter()
        report = client.replicate(args.name, [args.device])
        first_s = time.perf_counter() - start
        with client.acquire(args.name, args.device) as lease:
            kind = lease.export_kind
            same_first = replica_matches(client, args.name, lease, host)

        rows = np.random.default_rng(0).choice(nbytes // PAGE, size=8, replace=False)
        for row in rows:  # write a few pages, then report them (explicit tracking)
            host[row * PAGE:(row + 1) * PAGE] = 0xAB
            client.invalidate(args.name, int(row) * PAGE, PAGE)
        start = time.perf_counter()
        with client.acquire(args.name, args.device) as lease:  # fresh: syncs only the 8 stale pages
            fresh_s = time.perf_counter() - start
            same_after = replica_matches(client, args.name, lease, host)
        client.unregister(args.name)

    print(json.dumps({
        "device": args.device, "export_kind": kind, "bytes": nbytes, "first_copy_bytes": report.bytes_copied,
        "first_replicate_s": round(first_s, 4), "fresh_acquire_after_8_writes_s": round(fresh_s, 4),
        "replica_matched_host": same_first and same_after,
    }))
    return 0 if same_first and same_after else 1


if __name__ == "__main__":
    sys.exit(main())
