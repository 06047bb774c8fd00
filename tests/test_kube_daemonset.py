"""The DaemonSet pod as the chart renders it, run as plain processes: the server and device-plugin containers'
commands and arguments (host paths moved into a temp dir), their exec probes, a fake kubelet allocating a slot,
the example job with the environment Allocate returned, a metrics scrape, and SIGTERM shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _kube import WAIT, FakeKubelet, node_dirs
from _support import free_port, wait_for

from devrep.kube import chart, probe
from devrep.kube._gen import api_pb2
from devrep.kube.plugin import HEALTHY

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
TOKENS_ON_NODE = "/var/lib/devrep/tokens"
POD_RESOURCES_ON_NODE = "/var/lib/kubelet/pod-resources"


@pytest.fixture
def node() -> Iterator[dict[str, str]]:
    with node_dirs("ds", "plugins", "run", "tokens", "podres") as dirs:
        yield dirs


def local(argv: list[str], dirs: dict[str, str]) -> list[str]:
    """A container's argv as a local command: our interpreter, the repo's probe, the temp host directories."""
    out = []
    for arg in argv:
        arg = {"python": sys.executable, "/usr/local/bin/devrep-probe": probe.__file__}.get(arg, arg)
        out.append(arg.replace(TOKENS_ON_NODE, dirs["tokens"]).replace(POD_RESOURCES_ON_NODE, dirs["podres"]))
    return out


def test_rendered_pod_runs(node: dict[str, str]) -> None:
    port = free_port()
    values: dict[str, Any] = {"socketDir": node["run"], "pluginDir": node["plugins"], "cpuDevices": 2,
                              "metrics": {"port": port}, "slots": 2}
    docs = [d for d in yaml.safe_load_all(chart.render_text(chart.render(ROOT / "deploy/helm/devrep", values))) if d]
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
    server_cmd = [sys.executable, "-m", "devrep.cli", *local(containers["server"]["args"], node)]  # ENTRYPOINT
    plugin_cmd = local(containers["device-plugin"]["command"] + containers["device-plugin"]["args"], node)

    kubelet = FakeKubelet(node["plugins"])
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(subprocess.Popen(server_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        server_sock = os.path.join(node["run"], "devrep.sock")
        wait_for(lambda: os.path.exists(server_sock), "the server socket", WAIT * 2)
        procs.append(subprocess.Popen(plugin_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        req = kubelet.requests.get(timeout=WAIT * 2)
        assert req.resource_name == "devrep.io/replica"
        wait_for(lambda: {d.health for d in kubelet.next_list()} == {HEALTHY}, "healthy devices")

        for name, container in containers.items():
            for kind in ("livenessProbe", "readinessProbe"):
                cmd = local(container[kind]["exec"]["command"], node)
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=container[kind]["timeoutSeconds"])
                assert done.returncode == 0, f"{name} {kind}: {done.stdout}{done.stderr}"

        stub = next(kubelet.plugin(req.endpoint))
        reply = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["replica-0"])]), timeout=WAIT)
        envs = dict(reply.container_responses[0].envs)
        # No wait: the server stats its token directory on every lookup, so the new token works at once.
        job = subprocess.run([sys.executable, str(ROOT / "deploy/examples/read_replica.py"), "--device", "cpu:1",
                              "--mib", "2"], env={**os.environ, **envs}, capture_output=True, text=True, timeout=90)
        assert job.returncode == 0, job.stdout + job.stderr
        assert json.loads(job.stdout.strip().splitlines()[-1])["replica_matched_host"] is True

        refused = subprocess.run([sys.executable, str(ROOT / "deploy/examples/read_replica.py"), "--mib", "1"],
                                 env={**os.environ, **envs, "DEVREP_TOKEN": "not-a-token-" + "x" * 30},
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "token" in refused.stderr  # --require-token: no allocation, no session

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert 'devrep_replicated_bytes_total{device="cpu:1"}' in text
        assert "devrep_grpc_requests_total{" in text

        for proc in reversed(procs):  # kubelet stops the pod: SIGTERM to every container
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            out, _ = proc.communicate(timeout=WAIT * 2)
            assert proc.returncode == 0, out
        assert not os.path.exists(os.path.join(node["plugins"], req.endpoint))
        assert not os.path.exists(server_sock)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT)
        kubelet.stop()
