#!/usr/bin/env python3
"""Hot-swapping model weights: a safetensors checkpoint is rewritten in place, a reader process gets zero-copy
tensors by name from a replica and switches to the new weights on its next fresh acquire; only the pages of the
changed tensor move.

    python examples/weights_hot_swap/run.py [--address unix:/run/devrep/devrep.sock]

Without --address (or $DEVREP_ADDRESS) it starts its own `devrep serve` on a temporary socket.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REGION = "hot-swap-ckpt"
CHANGED = "layer1.weight"


def checkpoint(version: int) -> dict[str, np.ndarray]:
    """The model's tensors; version 2 changes only ``CHANGED`` (every element, so every one of its pages)."""
    rng = np.random.default_rng(0)
    tensors = {
        "embed.weight": rng.standard_normal((1024, 256), dtype=np.float32),
        "layer0.weight": rng.standard_normal((512, 512), dtype=np.float32),
        "layer1.weight": rng.standard_normal((512, 512), dtype=np.float32),
        "head.bias": rng.standard_normal(1000, dtype=np.float32),
    }
    tensors[CHANGED] += version - 1
    return tensors


def digests(tensors: Any) -> dict[str, float]:
    return {name: float(np.asarray(t, dtype=np.float64).sum()) for name, t in tensors.items()}


# ---------------------------------------------------------------------------------------------- reader
def reader(address: str) -> int:
    """Serves commands from stdin: ``acquire`` (fresh acquire, report what it sees as one JSON line), ``quit``."""
    import torch

    from devrep.client import connect

    warnings.filterwarnings("ignore", message=".*not writable.*")  # the replica is read-only memory, on purpose
    with connect(address, label="inference") as client:
        for command in sys.stdin:
            if command.strip() != "acquire":
                break
            with client.acquire_safetensors(REGION, "cpu:0") as model:
                # Zero-copy: every tensor views the replica's mapping (torch.from_numpy shares the memory too).
                weights = {name: torch.from_numpy(model[name]) for name in model}
                replica = model.lease.array
                lo, hi = replica.ctypes.data, replica.ctypes.data + replica.nbytes
                zero_copy = all(lo <= w.data_ptr() and w.data_ptr() + w.nbytes <= hi for w in weights.values())
                print(json.dumps({"generation": model.generation, "zero_copy": zero_copy,
                                  "digests": digests({n: w.numpy() for n, w in weights.items()})}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- driver
def _ask(proc: subprocess.Popen[str], command: str, timeout: float = 60.0) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise RuntimeError(f"reader did not answer {command!r} within {timeout:.0f}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"reader exited with {proc.wait(10)}")
    return dict(json.loads(line))


def check(what: str, ok: bool) -> None:
    print(f"  {'ok ' if ok else 'FAIL'} {what}")
    if not ok:
        raise SystemExit(1)


def drive(address: str, workdir: Path) -> int:
    from safetensors.numpy import save, save_file

    from devrep.client import connect
    from devrep.safetensors_io import changed_pages, parse_header

    path = workdir / "model.safetensors"
    save_file(checkpoint(1), str(path))
    infos, _ = parse_header(path.read_bytes())
    expected_pages = int(changed_pages(infos, [CHANGED])[:, 1].sum())

    with connect(address, label="loader") as client:
        region = client.register_file(REGION, path, tracking="file")
        first = client.replicate(REGION, ["cpu:0"])
        client.share(REGION, "*")
        npages = region.info.npages
        print(f"checkpoint {path.stat().st_size} bytes, {npages} pages; replicate copied {first.pages_copied} pages")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", "reader", "--address", address],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            before = _ask(proc, "acquire")
            check("reader's tensors are zero-copy views of the replica", before["zero_copy"])
            check("reader sees the version-1 weights", before["digests"] == digests(checkpoint(1)))

            # Rewrite the file in place (same shapes and dtypes: same header, same size), as a trainer's
            # checkpointing step does; only CHANGED's bytes differ.
            data = save(checkpoint(2))
            check("the new checkpoint has the same size", len(data) == path.stat().st_size)
            with open(path, "r+b") as f:
                f.write(data)
            start = time.monotonic()
            while True:  # file tracking notices by itself (inotify + per-page hash diff)
                valid = client.describe(REGION).replicas[0].valid_pages
                if valid <= npages - expected_pages or time.monotonic() - start > 30:
                    break
                time.sleep(0.05)
            check(f"file tracking invalidated {npages - valid} pages, those of {CHANGED!r} ({expected_pages})",
                  npages - valid == expected_pages)
            report = client.sync(REGION)
            print(f"sync after the rewrite: {report.pages_copied} of {npages} pages copied "
                  f"({report.bytes_copied} bytes) in {report.seconds * 1000:.1f} ms")
            check(f"only the changed pages moved: {report.pages_copied} == {expected_pages}",
                  report.pages_copied == expected_pages)

            after = _ask(proc, "acquire")
            check(f"next fresh acquire sees the new weights (generation {before['generation']} -> "
                  f"{after['generation']})", after["digests"] == digests(checkpoint(2)))
            check("unchanged tensors are identical", all(after["digests"][n] == before["digests"][n]
                                                         for n in before["digests"] if n != CHANGED))
            check("still zero-copy", after["zero_copy"])
            print("RESULT " + json.dumps({"npages": npages, "initial_pages": first.pages_copied,
                                          "swap_pages": report.pages_copied, "expected_pages": expected_pages}))
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["driver", "reader"], default="driver")
    parser.add_argument("--address", default=os.environ.get("DEVREP_ADDRESS"),
                        help="devrep server (default: $DEVREP_ADDRESS, else start one)")
    args = parser.parse_args()
    if args.role == "reader":
        return reader(args.address)
    with tempfile.TemporaryDirectory(prefix="devrep-hot-swap-") as tmp:
        if args.address:
            return drive(args.address, Path(tmp))
        from devrep.demo import server_process  # a real `devrep serve` on a temporary socket

        with server_process(Path(tmp)) as (address, _):
            return drive(address, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
