"""P2b: OpenCL page hash of 256 MiB (on the device, PoCL in CI) vs the CPU backend's ``hash_pages`` (numba, all
cores), both measured in this run; plus the OpenCL replicate rate vs a page-aligned memcpy, for context."""

from __future__ import annotations

from typing import Any

import numpy as np

from devrep import PAGE_SIZE
from devrep.backends import load_backend
from devrep.backends._staging import aligned_empty
from devrep.hashing import hash_pages

from ._util import entry, median_seconds

MiB = 1 << 20


def _random(nbytes: int) -> np.ndarray:
    data = aligned_empty(nbytes)
    rng = np.random.default_rng(0)
    for start in range(0, nbytes, 64 * MiB):
        stop = min(nbytes, start + 64 * MiB)
        data[start:stop] = rng.integers(0, 256, stop - start, dtype=np.uint8)
    return data


def run(results: dict[str, Any]) -> None:
    nbytes = 256 * MiB
    data = _random(nbytes)
    backend = load_backend("opencl")
    try:
        buf = backend.allocate(0, nbytes)
        runs = np.array([[0, nbytes // PAGE_SIZE]], dtype=np.int64)
        backend.copy_runs(data, runs, [buf])
        device_hashes = backend.hash_pages(buf)  # builds the kernels outside the timing
        assert np.array_equal(device_hashes, hash_pages(data)), "OpenCL and CPU page hashes differ"
        ocl = median_seconds(lambda: backend.hash_pages(buf), repeat=7)
        cpu = median_seconds(lambda: hash_pages(data), repeat=7)
        results["P2b"] = entry(
            nbytes / ocl / 1e9, nbytes / cpu / 1e9, 1.0, "GB/s",
            f"XXH64 of 256 MiB in 4 KiB pages on {backend.describe(0)} (incl. launch and reading the hashes "
            "back) vs the CPU backend's hash_pages (numba, all cores), same run",
        )
        copy = median_seconds(lambda: backend.copy_runs(data, runs, [buf]), repeat=5)
        dst = aligned_empty(nbytes)
        np.copyto(dst, data)  # fault the destination in, as the replica buffer already is
        memcpy = median_seconds(lambda: np.copyto(dst, data), repeat=5)
        results["P2c"] = entry(
            nbytes / copy / 1e9, nbytes / memcpy / 1e9, 0.9, "GB/s",
            "OpenCL copy_runs of one 256 MiB run host->device (replica in page-aligned USE_HOST_PTR memory on "
            "host-unified devices) vs numpy.copyto between page-aligned buffers",
        )
        backend.free(buf)
    finally:
        backend.close()
