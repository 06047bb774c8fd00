"""A node's life as kubelet drives it: DaemonSet rollouts and reboots (tokens live on a hostPath), pods with init and
app containers and pod deletion (kubelet's PodResources API says who still holds which device), a kubelet restart
seen by inotify, and a non-root client pod in ``socketGroup`` reaching a server that runs as root with every
capability dropped, as the chart's containers do.

The fake kubelet serves the device-plugin Registration API (``FakeKubelet``) and the PodResources v1 ``List``
(``FakePodResources``) over real gRPC on Unix sockets, like pkg/kubelet/cm/devicemanager and
pkg/kubelet/apis/podresources do: ``Allocate`` once per container, init containers first and before any container
runs; app containers may reuse an init container's devices; ``List`` reports the devices of a pod's app containers
while the pod is active."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from _kube import WAIT, FakeKubelet, node_dirs
from _support import child_argv, wait_for

import devrep
import devrep.client
from devrep.backends import load_backend
from devrep.kube import chart, probe
from devrep.kube._gen import api_pb2, podresources_pb2, podresources_pb2_grpc
from devrep.kube.plugin import DEV_USERFAULTFD, HEALTHY, DevicePlugin, PluginConfig
from devrep.kube.tokens import TokenDirectory
from devrep.service.server import DevrepServer
from devrep.service.sessions import TokenStore

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]
RESOURCE = "devrep.io/replica"


class FakePodResources(podresources_pb2_grpc.PodResourcesListerServicer):
    """Kubelet's PodResources v1 server on ``<dir>/kubelet.sock``: ``pods`` maps (namespace, name) to
    {app container name: device ids of ``RESOURCE``}; tests add and delete pods."""

    def __init__(self, directory: str) -> None:
        self.socket = os.path.join(directory, "kubelet.sock")
        self.pods: dict[tuple[str, str], dict[str, list[str]]] = {}
        self.calls = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        podresources_pb2_grpc.add_PodResourcesListerServicer_to_server(self, self.server)
        self.server.add_insecure_port("unix:" + self.socket)
        self.server.start()

    def List(self, request: podresources_pb2.ListPodResourcesRequest, context: grpc.ServicerContext
             ) -> podresources_pb2.ListPodResourcesResponse:
        with self._lock:
            self.calls += 1
            pods = [podresources_pb2.PodResources(name=name, namespace=ns, containers=[
                podresources_pb2.ContainerResources(name=c, devices=[
                    # Another resource of the same container, as kubelet lists every device plugin's devices.
                    podresources_pb2.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=["GPU-0"]),
                    podresources_pb2.ContainerDevices(resource_name=RESOURCE, device_ids=ids)])
                for c, ids in containers.items()]) for (ns, name), containers in self.pods.items()]
        return podresources_pb2.ListPodResourcesResponse(pod_resources=pods)

    def set_pod(self, ns: str, name: str, containers: dict[str, list[str]] | None) -> None:
        with self._lock:
            if containers is None:
                self.pods.pop((ns, name), None)
            else:
                self.pods[(ns, name)] = containers

    def stop(self) -> None:
        self.server.stop(0).wait(5)
        Path(self.socket).unlink(missing_ok=True)


@pytest.fixture
def node() -> Iterator[dict[str, str]]:
    # 0755: a node's /run, /var/lib (other users may search them); the tokens directory as kubelet's
    # DirectoryOrCreate hostPath leaves it.
    with node_dirs("kn", "plugins", "run", "tokens", "podres", mode=0o755) as dirs:
        yield dirs


def allocate(stub: Any, slots: list[str]) -> str:
    """One container's Allocate, as kubelet sends it; the token it got."""
    reply = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
        api_pb2.ContainerAllocateRequest(devices_ids=slots)]), timeout=WAIT)
    return str(reply.container_responses[0].envs["DEVREP_TOKEN"])


def accepted(address: str, token: str) -> bool:
    """Whether the service gives ``token`` a session (a refused token raises UNAUTHENTICATED)."""
    try:
        with devrep.client.connect(address, token=token, timeout=10) as client:
            client.list_regions()
    except devrep.DevrepError as e:
        assert "token" in str(e).lower() or "unauthenticated" in str(e).lower(), e
        return False
    return True


# ---------------------------------------------------------------------------------------------- the pod, as rendered
def rendered_pod(node: dict[str, str], **values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"socketDir": node["run"], "pluginDir": node["plugins"], "tokenDir": node["tokens"],
                            "podResourcesDir": node["podres"], "cpuDevices": 1, "metrics": {"enabled": False},
                            "slots": 2}
    base.update(values)
    (ds,) = [d for d in yaml.safe_load_all(chart.render_text(chart.render(ROOT / "deploy/helm/devrep", base)))
             if d and d["kind"] == "DaemonSet"]
    return dict(ds["spec"]["template"]["spec"])


def commands(spec: dict[str, Any]) -> dict[str, list[str]]:
    """Each container's command line, run locally (the image's ENTRYPOINT is `devrep`)."""
    c = {x["name"]: x for x in spec["containers"]}
    plugin = [sys.executable if a == "python" else a
              for a in c["device-plugin"]["command"] + c["device-plugin"]["args"]]
    return {"server": [sys.executable, "-m", "devrep.cli", *c["server"]["args"]],
            "device-plugin": [*plugin, "--pod-resources-interval", "0.2", "--numa-nodes", ""]}


class Pod:
    """The DaemonSet pod's two containers as processes."""

    def __init__(self, cmds: dict[str, list[str]], node: dict[str, str]) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        server_sock = os.path.join(node["run"], "devrep.sock")
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a stuck container can be asked for its stacks (stop)
        self.procs.append(subprocess.Popen(cmds["server"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, env=env))
        wait_for(lambda: probe.check(server_sock, timeout=1)[0], "the server", WAIT * 4)
        self.procs.append(subprocess.Popen(cmds["device-plugin"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, env=env))

    def stop(self) -> None:
        """SIGTERM to every container, as kubelet stops a pod in a rollout; both must exit cleanly."""
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                out, _ = proc.communicate(timeout=WAIT * 2)
            except subprocess.TimeoutExpired:
                # Seen once in a full run (not reproduced in 30 runs alone or under stress-ng): say where it hung.
                proc.send_signal(signal.SIGABRT)  # faulthandler (enabled in __init__) prints every thread's stack
                out, _ = proc.communicate(timeout=WAIT)
                pytest.fail(f"pid {proc.pid} did not exit within {WAIT * 2}s of SIGTERM; its output and stacks:\n"
                            f"{out}")
            assert proc.returncode == 0, out

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=WAIT)


def test_tokens_survive_a_rollout_and_a_reboot_and_follow_the_pod(node: dict[str, str]) -> None:
    address = os.path.join(node["run"], "devrep.sock")
    cmds = commands(rendered_pod(node))
    pod_resources = FakePodResources(node["podres"])
    kubelet = FakeKubelet(node["plugins"])
    pods: list[Pod] = []
    try:
        pods.append(Pod(cmds, node))
        req = kubelet.requests.get(timeout=WAIT * 2)
        wait_for(lambda: {d.health for d in kubelet.next_list()} == {HEALTHY}, "healthy devices")
        reply = next(kubelet.plugin(req.endpoint)).Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["replica-0"])]), timeout=WAIT)
        token = reply.container_responses[0].envs["DEVREP_TOKEN"]
        if os.path.exists("/sys/class/misc/userfaultfd"):  # the chart's --dev-userfaultfd auto found the device
            assert [d.container_path for d in reply.container_responses[0].devices] == [DEV_USERFAULTFD]
        pod_resources.set_pod("ml", "trainer", {"main": ["replica-0"]})  # admitted: kubelet lists it
        assert accepted(address, token)
        tokens = Path(node["tokens"])
        assert stat.S_IMODE(tokens.stat().st_mode) == 0o700  # the hostPath came 0755; the plugin closed it
        assert {stat.S_IMODE(f.stat().st_mode) for f in tokens.iterdir()} == {0o600}

        # helm upgrade / eviction: the DaemonSet pod is replaced, the workload is not (kubelet never calls Allocate
        # for it again). The new plugin and server re-adopt the token from the hostPath.
        pods.pop().stop()
        pods.append(Pod(cmds, node))
        assert kubelet.requests.get(timeout=WAIT * 2).endpoint == req.endpoint
        assert accepted(address, token), "the workload's token was refused after a rollout"

        # Node reboot: everything restarts, kubelet included; the workload's container restarts from kubelet's
        # checkpoint with the same DEVREP_TOKEN.
        pods.pop().stop()
        kubelet.stop()
        kubelet = FakeKubelet(node["plugins"])
        pods.append(Pod(cmds, node))
        assert kubelet.requests.get(timeout=WAIT * 2).endpoint == req.endpoint
        assert accepted(address, token), "the workload's token was refused after a reboot"

        # The workload's pod is deleted: the re-adopted token follows the pod, not the slot.
        calls = pod_resources.calls
        wait_for(lambda: pod_resources.calls > calls, "a PodResources List by the new plugin")
        pod_resources.set_pod("ml", "trainer", None)
        wait_for(lambda: not accepted(address, token), "revocation of the deleted pod's token")
        assert list(tokens.iterdir()) == []
        pods.pop().stop()
    finally:
        for p in pods:
            p.kill()
        kubelet.stop()
        pod_resources.stop()


# ---------------------------------------------------------------------------------------------- pods, in process
@pytest.fixture
def service(node: dict[str, str]) -> Iterator[DevrepServer]:
    server = DevrepServer(f"unix:{node['run']}/devrep.sock",
                          replicator=devrep.Replicator(backends={"cpu": load_backend("cpu", devices=1)}),
                          tokens=TokenStore(node["tokens"]), require_token=True).start()
    yield server
    server.stop(1.0)


def plugin_config(node: dict[str, str], **kw: Any) -> PluginConfig:
    base: dict[str, Any] = dict(plugin_dir=node["plugins"], socket_dir=node["run"], container_socket_dir=node["run"],
                                slots=4, numa_nodes=[], poll_interval=0.05, pending_grace=60.0,
                                pod_resources_socket=os.path.join(node["podres"], "kubelet.sock"),
                                pod_resources_interval=0.1)
    base.update(kw)
    return PluginConfig(**base)


def test_init_and_app_containers_keep_their_tokens_until_the_pod_is_deleted(
        node: dict[str, str], service: DevrepServer) -> None:
    address = os.path.join(node["run"], "devrep.sock")
    pod_resources = FakePodResources(node["podres"])
    kubelet = FakeKubelet(node["plugins"])
    plugin = DevicePlugin(plugin_config(node), TokenDirectory(node["tokens"])).start()
    try:
        stub = next(kubelet.plugin(kubelet.requests.get(timeout=WAIT).endpoint))
        # Pod "a": kubelet admits it by allocating for the init container, then for the app container, which reuses
        # the init container's device; neither runs yet, and the pod is not listed yet.
        init = allocate(stub, ["replica-0"])
        app = allocate(stub, ["replica-0"])
        assert pod_resources.calls >= 2  # every Allocate asks kubelet who still holds what
        assert accepted(address, init) and accepted(address, app), "the init container's token was revoked"
        pod_resources.set_pod("ns", "a", {"app": ["replica-0"]})
        wait_for(lambda: set(plugin.tokens_by_pod().values()) == {("ns", "a")}, "both tokens tied to pod a")

        # Pod "b" on another slot, and a second pod "c" that reuses... nothing of a: a's tokens are unaffected.
        other = allocate(stub, ["replica-1"])
        pod_resources.set_pod("ns", "b", {"main": ["replica-1"]})
        assert accepted(address, init) and accepted(address, app) and accepted(address, other)

        # Pod a is deleted: both its tokens are revoked within a poll, b's stays.
        pod_resources.set_pod("ns", "a", None)
        wait_for(lambda: not accepted(address, app) and not accepted(address, init), "revocation of pod a's tokens")
        assert accepted(address, other)

        # Kubelet gives replica-0 to a new pod: its token works, nothing else changes.
        fresh = allocate(stub, ["replica-0"])
        pod_resources.set_pod("ns", "d", {"main": ["replica-0"]})
        assert accepted(address, fresh) and accepted(address, other)

        # Pod b is deleted and a pod of the same name comes back on another slot before the next List.
        pod_resources.set_pod("ns", "b", {"main": ["replica-2"]})
        again = allocate(stub, ["replica-2"])
        assert not accepted(address, other), "a token of the deleted incarnation of pod b is still valid"
        assert accepted(address, again)

        # Kubelet's PodResources goes away (kubelet restarting): nobody is known to be gone, nothing is revoked.
        pod_resources.stop()
        assert plugin.reconcile() is False
        assert accepted(address, fresh) and accepted(address, again)
    finally:
        plugin.stop()
        kubelet.stop()
        pod_resources.stop()


def test_a_token_no_pod_ever_holds_expires_after_the_grace(node: dict[str, str]) -> None:
    # E.g. kubelet allocated, then failed to admit the pod: it never calls the plugin again.
    tokens = TokenDirectory(node["tokens"])
    plugin = DevicePlugin(plugin_config(node, pending_grace=0.3), tokens)
    pod_resources = FakePodResources(node["podres"])
    try:
        orphan = plugin.allocate(["replica-3"]).envs["DEVREP_TOKEN"]
        held = plugin.allocate(["replica-1"]).envs["DEVREP_TOKEN"]
        pod_resources.set_pod("ns", "p", {"main": ["replica-1"]})
        assert plugin.reconcile() and set(tokens.tokens().values()) == {orphan, held}
        wait_for(lambda: plugin.reconcile() and orphan not in tokens.tokens().values(), "the orphan token to expire")
        assert list(tokens.tokens().values()) == [held]
        assert plugin.tokens_by_pod() == {held: ("ns", "p")}
    finally:
        pod_resources.stop()


def test_without_pod_resources_a_reused_slot_revokes(node: dict[str, str]) -> None:
    # The fallback when kubelet's PodResources socket is not configured: revoke on slot reuse.
    tokens = TokenDirectory(node["tokens"])
    plugin = DevicePlugin(plugin_config(node, pod_resources_socket=None), tokens)
    first = plugin.allocate(["replica-0"]).envs["DEVREP_TOKEN"]
    second = plugin.allocate(["replica-0"]).envs["DEVREP_TOKEN"]
    assert list(tokens.tokens().values()) == [second] and first != second


def test_allocate_hands_out_dev_userfaultfd(node: dict[str, str]) -> None:
    plugin = DevicePlugin(plugin_config(node, dev_userfaultfd=DEV_USERFAULTFD), TokenDirectory(node["tokens"]))
    (device,) = plugin.allocate(["replica-0"]).devices
    assert (device.container_path, device.host_path, device.permissions) == (DEV_USERFAULTFD, DEV_USERFAULTFD, "rw")
    plain = DevicePlugin(plugin_config(node), TokenDirectory(node["tokens"]))
    assert list(plain.allocate(["replica-1"]).devices) == []


def test_kubelet_restart_is_seen_by_inotify(node: dict[str, str]) -> None:
    # Health polling every 60 s: only the inotify watch on the plugin directory can notice the new kubelet.sock.
    kubelet = FakeKubelet(node["plugins"])
    plugin = DevicePlugin(plugin_config(node, poll_interval=60.0, pod_resources_socket=None),
                          TokenDirectory(node["tokens"])).start()
    try:
        kubelet.requests.get(timeout=WAIT)
        kubelet.stop()
        Path(plugin.config.plugin_socket).unlink()  # kubelet wipes the directory when it starts
        kubelet = FakeKubelet(node["plugins"])
        assert kubelet.requests.get(timeout=WAIT).endpoint == "devrep-replica.sock"
        # (Not plugin.registered: gRPC may unlink the old fake kubelet's socket path late, taking the new one.)
        wait_for(lambda: plugin.registrations >= 2, "the second registration")
        assert len(kubelet.next_list()) == 4
    finally:
        plugin.stop()
        kubelet.stop()


# ---------------------------------------------------------------------------------------------- socketGroup
GROUP = 1000680000  # an OpenShift-range gid: renders as 1.00068e+09 without int64
def as_container(cmd: list[str], uid: int, gid: int, groups: list[int]) -> list[str]:
    """``cmd`` as a container process: that uid/gid and supplementary groups, every capability dropped."""
    group_args = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", *group_args, "--inh-caps=-all", "--bounding-set=-all",
            *cmd]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop capabilities")
def test_socket_group_lets_a_non_root_client_pod_in(node: dict[str, str]) -> None:
    spec = rendered_pod(node, socketGroup=GROUP, requireToken=False)
    groups = spec["securityContext"]["supplementalGroups"]
    assert groups == [GROUP]
    server_cmd = commands(spec)["server"]
    assert server_cmd[server_cmd.index("--socket-group") + 1] == str(GROUP)
    address = os.path.join(node["run"], "devrep.sock")
    env = {**os.environ, "HOME": "/tmp"}

    # Without the pod's supplementalGroups the server (root, no CAP_CHOWN) may not give its socket to the group.
    refused = subprocess.run(as_container(server_cmd, 0, 0, []), capture_output=True, text=True, timeout=WAIT * 4,
                             env=env)
    assert refused.returncode != 0 and str(GROUP) in refused.stderr, refused.stderr

    server = subprocess.Popen(as_container(server_cmd, 0, 0, groups), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for(lambda: probe.check(address, timeout=1)[0] or server.poll() is not None, "the server", WAIT * 4)
        assert server.poll() is None, server.communicate()[0]
        assert os.stat(address).st_gid == GROUP
        client = child_argv("kube_client", address)
        member = subprocess.run(as_container(client, 1000, 1000, [GROUP]), capture_output=True, text=True,
                                timeout=WAIT * 4, env=env)
        assert member.stdout.startswith("connected []"), member.stdout + member.stderr
        outsider = subprocess.run(as_container(client, 1000, 1000, []), capture_output=True, text=True,
                                  timeout=WAIT * 4, env=env)
        assert outsider.stdout.startswith("refused"), outsider.stdout + outsider.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=WAIT * 2)
        assert server.returncode == 0, out


# ---------------------------------------------------------------------------------------------- pod namespaces
def in_own_namespaces(cmd: list[str], uid: int = 0, groups: tuple[int, ...] = ()) -> list[str]:
    """``cmd`` as a pod's process: its own PID (it is pid 1 there) and mount namespace with its own /proc, every
    capability dropped, uid (and gid) ``uid`` (0 is a container's default user) with ``groups`` as its
    supplementary groups. SIGTERM to unshare reaches the process."""
    group_args = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    return ["unshare", "--pid", "--fork", "--kill-child=SIGTERM", "--mount-proc", "setpriv", f"--reuid={uid}",
            f"--regid={uid}", *group_args, "--inh-caps=-all", "--bounding-set=-all", *cmd]


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("setpriv") is None,
                    reason="needs unshare and setpriv (util-linux) to run processes as pods")
@pytest.mark.skipif(not os.path.exists(DEV_USERFAULTFD), reason="needs /dev/userfaultfd (Linux 6.1+)")
def test_sync_and_async_tracking_across_pod_namespaces_without_capabilities(node: dict[str, str]) -> None:
    from devrep.doctor import probe as doctor_probe

    caps = doctor_probe()
    if not (caps.modes["sync"].works and caps.modes["async"].works):
        pytest.skip(f"this kernel lacks sync or async tracking: {caps.modes}")
    spec = rendered_pod(node, requireToken=False, socketGroup=2000)
    server_container = {c["name"]: c for c in spec["containers"]}["server"]
    # The chart's server needs no capability for client memory tracking (it checks the client's userfaultfd
    # registration through the fds, not /proc/<pid>/maps).
    assert server_container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    address = os.path.join(node["run"], "devrep.sock")
    server = subprocess.Popen(in_own_namespaces(commands(spec)["server"],
                                                groups=tuple(spec["securityContext"]["supplementalGroups"])),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    env = {**os.environ, "HOME": "/tmp"}
    try:
        wait_for(lambda: probe.check(address, timeout=1)[0] or server.poll() is not None, "the server", WAIT * 4)
        assert server.poll() is None, server.communicate()[0]

        def pod_client(uid: int, groups: tuple[int, ...]) -> dict[str, Any]:
            done = subprocess.run(in_own_namespaces(child_argv("pod_client", address), uid, groups),
                                  capture_output=True, text=True, timeout=WAIT * 8, env=env)
            assert done.returncode == 0, done.stdout + done.stderr
            report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
            assert report["pid"] == 1 and report["caps"] == ["0000000000000000"], report  # a pod, as promised
            assert report["syscall_errno"] == errno.EPERM, report  # userfaultfd(2) is refused without capabilities
            return report

        # uid 0 (a container's default user): /dev/userfaultfd (root's, mode 0600) makes every mode work.
        report = pod_client(0, ())
        assert (report["sync"], report["async"], report["explicit"]) == (True, True, True), report
        # A non-root pod in the socket group: it connects, but cannot open the node's /dev/userfaultfd either, so
        # sync and async are refused up front with the reason (docs/kubernetes.md's table says so); explicit works.
        report = pod_client(1000, (2000,))
        assert report["explicit"] is True, report
        for mode in ("sync", "async"):
            assert str(report[mode]).startswith("unsupported:") and "userfaultfd" in report[mode], report
    finally:
        server.send_signal(signal.SIGTERM)  # unshare dies, and --kill-child passes SIGTERM on to the server
        try:
            server.communicate(timeout=WAIT * 2)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate(timeout=WAIT)
