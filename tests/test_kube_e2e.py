"""End to end on one node, without Kubernetes: a fake kubelet allocates a slot from the real device plugin, the
real devrep server accepts the token the plugin handed out (through the token directory), and the example job
deploy/examples/read_replica.py runs in another process with exactly the environment Allocate returned. The
server's metrics interceptor and listener see the job's work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _kube import WAIT, FakeKubelet, node_dirs
from _support import scrape, wait_for

import devrep
import devrep.client
from devrep.backends import load_backend
from devrep.kube._gen import api_pb2
from devrep.kube.plugin import HEALTHY, DevicePlugin, PluginConfig
from devrep.kube.tokens import TokenDirectory
from devrep.metrics import Metrics
from devrep.service.server import DevrepServer
from devrep.service.sessions import TokenStore

pytestmark = pytest.mark.timeout(120)
EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "examples" / "read_replica.py"


@pytest.fixture
def node() -> Iterator[dict[str, str]]:
    with node_dirs("dn", "plugins", "run", "tokens") as dirs:
        yield dirs


def test_allocated_pod_reads_a_replica(node: dict[str, str]) -> None:
    replicator = devrep.Replicator(backends={"cpu": load_backend("cpu", devices=2)})
    metrics = Metrics(replicator)
    server = DevrepServer(f"unix:{node['run']}/devrep.sock", replicator=replicator,
                          tokens=TokenStore(node["tokens"]), require_token=True,
                          interceptors=[metrics.interceptor()]).start()
    kubelet = FakeKubelet(node["plugins"])
    config = PluginConfig(plugin_dir=node["plugins"], socket_dir=node["run"], container_socket_dir=node["run"],
                          slots=2, numa_nodes=[], poll_interval=0.05)
    plugin = DevicePlugin(config, TokenDirectory(node["tokens"])).start()
    port = metrics.serve(0, "127.0.0.1")
    try:
        req = kubelet.requests.get(timeout=WAIT)
        wait_for(lambda: {d.health for d in kubelet.next_list()} == {HEALTHY}, "devices healthy")
        stub = next(kubelet.plugin(req.endpoint))
        reply = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["replica-1"])]), timeout=WAIT)
        envs = dict(reply.container_responses[0].envs)
        assert envs["DEVREP_ADDRESS"] == f"{node['run']}/devrep.sock"
        # The server stats its token directory on every lookup: the new token works at once.
        assert server.tokens.lookup(envs["DEVREP_TOKEN"])

        job = subprocess.run([sys.executable, str(EXAMPLE), "--device", "cpu:1", "--mib", "4"],
                             env={**os.environ, **envs}, capture_output=True, text=True, timeout=90)
        assert job.returncode == 0, job.stdout + job.stderr
        result = json.loads(job.stdout.strip().splitlines()[-1])
        assert result["replica_matched_host"] is True and result["first_copy_bytes"] == 4 << 20

        with pytest.raises(devrep.DevrepError):  # a made-up token is refused
            devrep.client.connect(envs["DEVREP_ADDRESS"], token="x" * 43, timeout=5).list_regions()

        samples = scrape(port)
        assert samples[("devrep_replicated_bytes_total", (("device", "cpu:1"),))] >= (4 << 20) + 8 * 4096
        assert samples[("devrep_invalidated_pages_total", ())] >= 8
        ok = sum(v for (name, labels), v in samples.items()
                 if name == "devrep_grpc_requests_total" and ("code", "OK") in labels)
        assert ok >= 4  # create, replicate, invalidate, acquire, ... each counted
    finally:
        metrics.close()
        plugin.stop()
        kubelet.stop()
        server.stop(1.0)


def test_in_process_hand_off_to_the_server_token_table(node: dict[str, str]) -> None:
    # Plugin and server in one process: the plugin publishes straight into the server's token table.
    server = DevrepServer(f"unix:{node['run']}/devrep.sock",
                          replicator=devrep.Replicator(backends={"cpu": load_backend("cpu", devices=1)}),
                          require_token=True).start()
    plugin = DevicePlugin(PluginConfig(plugin_dir=node["plugins"], socket_dir=node["run"],
                                       container_socket_dir=node["run"], slots=1, numa_nodes=[]), server.tokens)
    try:
        envs = plugin.allocate(["replica-0"]).envs
        with devrep.client.connect(envs["DEVREP_ADDRESS"], token=envs["DEVREP_TOKEN"], timeout=10) as client:
            assert client.list_regions() == []
        renewed = plugin.allocate(["replica-0"]).envs["DEVREP_TOKEN"]  # the slot is reused: old token revoked
        assert server.tokens.lookup(renewed) and not server.tokens.lookup(envs["DEVREP_TOKEN"])
    finally:
        server.stop(1.0)


@pytest.mark.parametrize("device", ["cpu:0", "opencl:0"])
def test_example_reads_each_export_kind(node: dict[str, str], device: str) -> None:
    # cpu exports an fd (mapped by the job), OpenCL exports nothing (the job has the server compare on the device).
    kind = device.partition(":")[0]
    backends = {"cpu": load_backend("cpu", devices=1)}
    if kind == "opencl":
        backends["opencl"] = load_backend("opencl")
    server = DevrepServer(f"unix:{node['run']}/devrep.sock", replicator=devrep.Replicator(backends=backends),
                          tokens=TokenStore(node["tokens"]), require_token=True).start()
    plugin = DevicePlugin(PluginConfig(plugin_dir=node["plugins"], socket_dir=node["run"],
                                       container_socket_dir=node["run"], slots=1, numa_nodes=[]),
                          TokenDirectory(node["tokens"]))
    try:
        envs = dict(plugin.allocate(["replica-0"]).envs)
        job = subprocess.run([sys.executable, str(EXAMPLE), "--device", device, "--mib", "2"],
                             env={**os.environ, **envs}, capture_output=True, text=True, timeout=90)
        assert job.returncode == 0, job.stdout + job.stderr
        result = json.loads(job.stdout.strip().splitlines()[-1])
        assert result["export_kind"] == {"cpu": "fd", "opencl": "none"}[kind], result
        assert result["replica_matched_host"] is True and result["first_copy_bytes"] == 2 << 20, result
    finally:
        server.stop(1.0)
