"""N1-N2: the NUMA backend. Replicate and sync on ``numa:0`` vs the CPU backend's ``cpu:0`` in the same run (the
mbind costs nothing measurable: target 0.95x); and, on a host with 2+ nodes, a reader pinned to one node scanning
the replica on its own node vs one on another node (the reason the backend exists). Timings interleave the two
devices so the machine's noise falls on both alike."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import devrep
from devrep import PAGE_SIZE
from devrep.numa import SYSFS_NODE_ROOT, parse_node_list, read_topology

from ._util import entry

MiB = 1 << 20
SIZE = 256 * MiB
REPEAT = 15


def _fill(array: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    for start in range(0, array.size, 64 * MiB):
        stop = min(array.size, start + 64 * MiB)
        array[start:stop] = rng.integers(0, 256, stop - start, dtype=np.uint8)


def _timed(fn: Callable[[], Any], after: Callable[[], Any] | None) -> float:
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    if after is not None:
        after()
    return elapsed


def _interleaved(a: Callable[[], Any], b: Callable[[], Any], setup: Callable[[], Any] | None = None,
                 after_a: Callable[[], Any] | None = None, after_b: Callable[[], Any] | None = None
                 ) -> tuple[float, float, float]:
    """Median times of ``a`` and ``b``, measured alternately (a first on even rounds, b first on odd ones), after an
    untimed ``setup`` each round and each followed by its untimed ``after``; and the median of the per-round ratios
    ``time(b) / time(a)``: the two runs of a round see the same machine load, so their ratio is the steadier
    figure on a shared, noisy machine."""
    rounds: list[tuple[float, float]] = []
    for i in range(REPEAT + 1):  # round 0 is untimed: first calls load compiled code and start thread pools
        if setup is not None:
            setup()
        if i % 2:
            tb = _timed(b, after_b)
            ta = _timed(a, after_a)
        else:
            ta = _timed(a, after_a)
            tb = _timed(b, after_b)
        rounds.append((ta, tb))
    timed = rounds[1:]
    return (statistics.median(t[0] for t in timed), statistics.median(t[1] for t in timed),
            statistics.median(t[1] / t[0] for t in timed))


def n1_replicate_and_sync(results: dict[str, Any]) -> None:
    with devrep.Replicator(cpu_devices=1) as rep:
        region = rep.create_region("n1", SIZE)
        _fill(region.array)

        # replicate = allocate (memfd, + mbind for numa) + fallocate + copy; the replica is dropped (untimed) after
        # each, so there is one replica at a time (replicate syncs every replica of the region)
        numa, cpu, ratio = _interleaved(lambda: rep.replicate("n1", ["numa:0"]),
                                        lambda: rep.replicate("n1", ["cpu:0"]),
                                        after_a=lambda: region.remove_replica("numa:0"),
                                        after_b=lambda: region.remove_replica("cpu:0"))
        results["N1"] = entry(SIZE / numa / 1e9, SIZE / cpu / 1e9, 0.95, "GB/s", ratio=ratio, note=
                              "replicate 256 MiB to numa:0 (memfd bound to its node with mbind) vs to cpu:0 (the "
                              "same memfd, unbound), same run, interleaved; ratio: median of per-round ratios")

        rep.replicate("n1", ["numa:0", "cpu:0"])
        # 1/8 of the pages stale, in 16-page runs spread over the region: a typical incremental sync
        stale = (np.arange(0, region.npages, 128, dtype=np.int64)[:, None] + np.arange(16)).reshape(-1)

        numa, cpu, ratio = _interleaved(lambda: region.sync(["numa:0"]), lambda: region.sync(["cpu:0"]),
                                        setup=lambda: region.invalidate_pages(stale))
        nbytes = stale.size * PAGE_SIZE
        results["N1b"] = entry(nbytes / numa / 1e9, nbytes / cpu / 1e9, 0.95, "GB/s", ratio=ratio, note=
                               "sync 32 MiB stale in 16-page runs (1/8 of 256 MiB) into numa:0 vs cpu:0, same run, "
                               "interleaved; ratio: median of per-round ratios")


def n2_local_vs_remote(results: dict[str, Any]) -> None:
    topo = read_topology()
    if len(topo.nodes) < 2:
        print(f"  N2 (local vs remote replica scan) skipped: this host has {len(topo.nodes)} NUMA node(s) with "
              f"memory ({list(topo.nodes)}); it needs 2+")
        return
    allowed = os.sched_getaffinity(0)
    local_node = topo.nodes[0]
    cpus = set(parse_node_list((SYSFS_NODE_ROOT / f"node{local_node}" / "cpulist").read_text())) & allowed
    if not cpus:
        print(f"  N2 skipped: no CPU of node {local_node} is in this process's affinity mask")
        return
    remote_node = max(topo.nodes[1:], key=lambda n: (topo.distance[local_node].get(n, 0), -n))
    local_dev, remote_dev = topo.device(local_node), topo.device(remote_node)
    with devrep.Replicator() as rep:
        region = rep.create_region("n2", SIZE)
        _fill(region.array)
        rep.replicate("n2", [local_dev, remote_dev])
        os.sched_setaffinity(0, cpus)  # the reader runs on the local node from here on
        try:
            with region.acquire(local_dev) as near, region.acquire(remote_dev) as far:
                a = near.array.view(np.uint64)
                b = far.array.view(np.uint64)
                assert int(np.bitwise_xor.reduce(a)) == int(np.bitwise_xor.reduce(b))  # warm both, same bytes
                local, remote, ratio = _interleaved(lambda: np.bitwise_xor.reduce(a),
                                                    lambda: np.bitwise_xor.reduce(b))
        finally:
            os.sched_setaffinity(0, allowed)
    results["N2"] = entry(SIZE / local / 1e9, SIZE / remote / 1e9, 1.0, "GB/s", ratio=ratio, note=
                          f"a reader on node {local_node} scanning 256 MiB of its local replica ({local_dev}) vs the "
                          f"replica on node {remote_node} ({remote_dev}, distance "
                          f"{topo.distance[local_node].get(remote_node)})")


def run(results: dict[str, Any]) -> None:
    n1_replicate_and_sync(results)
    n2_local_vs_remote(results)
