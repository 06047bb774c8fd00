#!/usr/bin/env python3
"""The CUDA path: a replica in GPU memory read through ``lease.to_cupy()`` (CUDA IPC, zero-copy) and DLPack
(``torch.from_dlpack(lease)``), kept fresh while the host writes.

    python examples/cupy_reader.py [--address unix:/run/devrep/devrep.sock] [--device cuda:0] [--mib 64]

Needs an NVIDIA GPU and CuPy (``pip install devrep[cuda]``); without them it exits with status 7 (failed
precondition) and says what is missing. Without --address (or $DEVREP_ADDRESS) it starts its own `devrep serve`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXIT_NO_GPU = 7  # the CLI's "failed precondition"


def gpu_missing(device: str) -> str:
    """Why this machine cannot run the example ('' when it can)."""
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); install devrep[cuda] on a machine with an NVIDIA GPU"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError without a driver/GPU
        return f"no usable CUDA device ({exc})"
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        return f"{device} does not exist: this machine has {count} CUDA device(s)"
    return ""


def run(address: str, device: str, nbytes: int) -> int:
    import cupy

    from devrep.client import connect

    with connect(address, label="cupy-reader") as client:
        region = client.create_region("cupy-demo", nbytes)  # explicit tracking: we report our writes
        host = region.array
        host[:] = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)
        start = time.perf_counter()
        report = client.replicate("cupy-demo", [device])
        print(f"replicated {report.bytes_copied >> 20} MiB to {device} in {time.perf_counter() - start:.3f} s")

        with client.acquire("cupy-demo", device) as lease:
            replica = lease.to_cupy()  # uint8 CuPy array over the replica: CUDA IPC, no copy
            same = bool((replica == cupy.asarray(host)).all())
            print(f"to_cupy(): {replica.shape[0]} bytes on GPU {replica.device.id}, equal to host: {same}")
            if not same:
                return 1
            try:
                import torch

                torch_cuda = torch.cuda.is_available()
            except ImportError:
                torch_cuda = False
            if not torch_cuda:
                print("torch with CUDA not installed: skipping the DLPack check")
            else:
                tensor = torch.from_dlpack(lease)  # DLPack: the same device memory, seen by torch
                print(f"torch.from_dlpack(lease): {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}, "
                      f"sum {int(tensor.sum())} (host {int(host.sum(dtype=np.int64))})")
                if int(tensor.sum()) != int(host.sum(dtype=np.int64)):
                    return 1

        host[4096:8192] = 0xAB  # a host write ...
        region.invalidate(4096, 4096)  # ... reported; the next fresh acquire copies that one page
        with client.acquire("cupy-demo", device) as lease:
            fresh = lease.to_cupy()
            ok = bool((fresh[4096:8192] == 0xAB).all()) and bool((fresh == cupy.asarray(host)).all())
            print(f"after a host write of one page: fresh replica generation {lease.generation}, up to date: {ok}")
            return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=os.environ.get("DEVREP_ADDRESS"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    why = gpu_missing(args.device)
    if why:
        print(f"cupy_reader: this example needs an NVIDIA GPU with CuPy: {why}", file=sys.stderr)
        return EXIT_NO_GPU
    if args.address:
        return run(args.address, args.device, args.mib << 20)
    from devrep.demo import server_process  # a real `devrep serve` on a temporary socket

    with tempfile.TemporaryDirectory(prefix="devrep-") as tmp, server_process(Path(tmp)) as (address, _):
        return run(address, args.device, args.mib << 20)


if __name__ == "__main__":
    sys.exit(main())
