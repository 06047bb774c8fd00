"""P1-P3 and the sync-vs-dirty-fraction plot (core engine, CPU backend)."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

import devrep
from devrep import PAGE_SIZE
from devrep.hashing import hash_pages

from ._util import entry, median_seconds

GiB = 1 << 30
MiB = 1 << 20
PLOT = Path(__file__).with_name("sync_vs_dirty.png")


def _aligned(nbytes: int) -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


def _random_fill(array: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    chunk = 64 * MiB
    for start in range(0, array.size, chunk):
        array[start:start + chunk] = rng.integers(0, 256, min(chunk, array.size - start), dtype=np.uint8)


def p1_replicate(results: dict[str, Any]) -> None:
    with devrep.Replicator() as rep:
        region = rep.create_region("p1", GiB)
        _random_fill(region.array)

        def replicate() -> None:
            rep.replicate("p1", ["cpu:0"])

        def drop() -> None:
            if region.devices:
                region.remove_replica("cpu:0")

        ours = median_seconds(replicate, repeat=3, setup=drop)
        dst: list[np.ndarray] = []
        base = median_seconds(lambda: np.copyto(dst[0], region.array), repeat=3,
                              setup=lambda: (dst.clear(), dst.append(_aligned(GiB))))
        # Warm: the replica exists and every page is stale; the baseline copies into a warm buffer.
        ours_warm = median_seconds(region.sync, repeat=5, setup=lambda: region.invalidate())
        base_warm = median_seconds(lambda: np.copyto(dst[0], region.array), repeat=5)
    results["P1"] = entry(GiB / ours / 1e9, GiB / base / 1e9, 0.9, "GB/s",
                          "replicate 1 GiB to cpu:0 (allocate + copy) vs numpy.copyto into a fresh page-aligned buffer")
    results["P1b"] = entry(GiB / ours_warm / 1e9, GiB / base_warm / 1e9, 0.9, "GB/s",
                           "re-sync all of 1 GiB into an existing replica vs numpy.copyto into a warm buffer")


def p2_hash(results: dict[str, Any]) -> None:
    data = _aligned(256 * MiB)
    _random_fill(data)
    hash_pages(data[: 64 * PAGE_SIZE])  # compile outside the timing
    ours = median_seconds(lambda: hash_pages(data), repeat=5)
    view = memoryview(data)
    n = data.size // PAGE_SIZE

    def per_page() -> None:
        digest = xxhash.xxh64_intdigest
        for i in range(n):
            digest(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])

    base = median_seconds(per_page, repeat=3)
    results["P2"] = entry(data.size / ours / 1e9, data.size / base / 1e9, 1.0, "GB/s",
                          "XXH64 of 256 MiB in 4 KiB pages: devrep (numba, all cores) vs python-xxhash per page")


def _sync_seconds(rep: devrep.Replicator, region: devrep.Region, fraction: float, repeat: int = 5) -> float:
    rng = np.random.default_rng(1)
    count = max(1, round(region.npages * fraction))

    def dirty() -> None:
        region.invalidate_pages(np.sort(rng.choice(region.npages, count, replace=False)))

    return median_seconds(region.sync, repeat=repeat, setup=dirty)


def p3_sync_and_plot(results: dict[str, Any]) -> None:
    curves: dict[str, list[tuple[float, float]]] = {}
    fractions = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    for size in (256 * MiB, GiB):
        with devrep.Replicator() as rep:
            region = rep.create_region("p3", size)
            _random_fill(region.array)
            rep.replicate("p3", ["cpu:0"])
            curves[f"{size // MiB} MiB region"] = [(f * size, _sync_seconds(rep, region, f, repeat=3))
                                                   for f in fractions]
            if size == GiB:
                one = _sync_seconds(rep, region, 0.01, repeat=7)
                full = _sync_seconds(rep, region, 1.0, repeat=3)
                results["P3"] = entry(one * 1e3, full * 1e3, 50.0, "ms", "sync of 1% random pages of 1 GiB vs a "
                                      "full re-replicate (every page stale); ratio = full / partial",
                                      higher_is_better=False)
    _plot(curves)
    results["P3"]["note"] += f"; plot: {PLOT.name}"


def _plot(curves: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for label, points in curves.items():
        xs, ys = zip(*points, strict=True)
        ax.plot([x / MiB for x in xs], [y * 1e3 for y in ys], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dirty data (MiB; 0.1% .. 100% of each region, random 4 KiB pages)")
    ax.set_ylabel("sync time (ms)")
    ax.set_title("devrep sync cost follows dirty pages, not region size (CPU backend)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT)
    plt.close(fig)


def run(results: dict[str, Any]) -> None:
    p1_replicate(results)
    p2_hash(results)
    p3_sync_and_plot(results)
