"""Kubernetes-side costs: what Prometheus metrics add to a small sync, and the device plugin's Allocate round trip.

K1  one-page invalidate+sync on 2 CPU replicas, with a ``Metrics`` listener attached vs without (same run,
    interleaved rounds). ratio = without/with time; target >= 0.9 (metrics cost at most ~10 %).
K2  device-plugin ``Allocate`` over its Unix socket (new token, token file written and fsynced) vs a bare
    unary gRPC call on the same kind of socket. ratio = bare/Allocate; informational (target 0.05: Allocate
    runs once per container start, so even 20x a bare call is negligible next to a container start).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench._util import entry
from devrep import Replicator
from devrep.backends import load_backend
from devrep.kube._gen import api_pb2, api_pb2_grpc
from devrep.kube.plugin import DevicePlugin, PluginConfig
from devrep.kube.tokens import TokenDirectory
from devrep.metrics import Metrics

PAGE = 4096


def _sync_loop_seconds(rep: Replicator, name: str, n: int) -> float:
    region = rep.region(name)
    start = time.perf_counter()
    for i in range(n):
        page = (i * 7) % region.npages
        region.array[page * PAGE] = i & 0xFF
        region.invalidate(page * PAGE, 1)
        region.sync()
    return (time.perf_counter() - start) / n


def k1_metrics_overhead(results: dict[str, Any], rounds: int = 7, n: int = 2000) -> None:
    with Replicator(backends={"cpu": load_backend("cpu", devices=2)}) as rep:
        rep.create_region("k1", 4 << 20)
        rep.replicate("k1", ["cpu:0", "cpu:1"])
        _sync_loop_seconds(rep, "k1", 200)  # warm up (numba, allocator)
        without: list[float] = []
        with_: list[float] = []
        for i in range(rounds):  # alternate the order so neither side always runs second
            for attached in ((False, True) if i % 2 else (True, False)):
                metrics = Metrics(rep) if attached else None
                (with_ if attached else without).append(_sync_loop_seconds(rep, "k1", n))
                if metrics is not None:
                    metrics.close()
    value, baseline = statistics.median(with_) * 1e6, statistics.median(without) * 1e6
    results["K1_metrics_overhead_small_sync"] = entry(
        value, baseline, 0.9, "us/sync", "1-page invalidate+sync, 2 CPU replicas: with Metrics listener vs without",
        higher_is_better=False)


def k2_allocate_rtt(results: dict[str, Any], n: int = 300) -> None:
    root = tempfile.mkdtemp(prefix="bk", dir="/tmp")
    try:
        plugin = DevicePlugin(PluginConfig(plugin_dir=root, socket_dir=root, slots=4, numa_nodes=[]),
                              TokenDirectory(os.path.join(root, "tokens"))).start()
        bare = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), bare)
        bare.add_insecure_port(f"unix:{root}/bare.sock")
        bare.start()
        try:
            with grpc.insecure_channel(f"unix:{plugin.config.plugin_socket}") as ch, \
                    grpc.insecure_channel(f"unix:{root}/bare.sock") as bch:
                stub = api_pb2_grpc.DevicePluginStub(ch)
                check = health_pb2_grpc.HealthStub(bch)
                req = api_pb2.AllocateRequest(container_requests=[
                    api_pb2.ContainerAllocateRequest(devices_ids=["replica-1"])])
                alloc, base = [], []
                for i in range(n + 20):
                    t0 = time.perf_counter()
                    stub.Allocate(req, timeout=10)
                    t1 = time.perf_counter()
                    check.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    t2 = time.perf_counter()
                    if i >= 20:
                        alloc.append(t1 - t0)
                        base.append(t2 - t1)
        finally:
            bare.stop(0)
            plugin.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    value, baseline = statistics.median(alloc) * 1e6, statistics.median(base) * 1e6
    results["K2_plugin_allocate_rtt"] = entry(
        value, baseline, 0.05, "us", "device-plugin Allocate (token + fsynced token file) vs bare unary gRPC, UDS",
        higher_is_better=False)


def run(results: dict[str, Any]) -> None:
    k1_metrics_overhead(results)
    k2_allocate_rtt(results)


if __name__ == "__main__":
    import json

    out: dict[str, Any] = {}
    run(out)
    print(json.dumps(out, indent=2))
