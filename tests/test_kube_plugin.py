"""The device plugin against a fake kubelet: a real gRPC Registration server on a temporary device-plugin
directory that dials the plugin back, like kubelet does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from _kube import WAIT, FakeKubelet, node_dirs
from _support import wait_for

from devrep.errors import InvalidArgumentError
from devrep.kube import probe
from devrep.kube._gen import api_pb2
from devrep.kube.plugin import HEALTH_SERVICE, HEALTHY, UNHEALTHY, DevicePlugin, PluginConfig
from devrep.kube.tokens import TokenDirectory

pytestmark = pytest.mark.timeout(60)
@pytest.fixture
def dirs() -> Iterator[dict[str, str]]:
    with node_dirs("dp", "plugins", "run", "tokens") as out:
        yield out


def make_config(dirs: dict[str, str], **kw: Any) -> PluginConfig:
    base: dict[str, Any] = dict(plugin_dir=dirs["plugins"], socket_dir=dirs["run"], slots=4, numa_nodes=[0, 1],
                                poll_interval=0.05, register_timeout=5.0, container_socket_dir="/run/devrep")
    base.update(kw)
    return PluginConfig(**base)


def by_slots(tokens: TokenDirectory) -> dict[str, str]:
    """label -> token with the labels' per-allocation nonce (``kube-<slots>.<nonce>``) cut off."""
    return {label.rpartition(".")[0] or label: token for label, token in tokens.tokens().items()}


def listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen()
    return s


@pytest.fixture
def kubelet(dirs: dict[str, str]) -> Iterator[FakeKubelet]:
    k = FakeKubelet(dirs["plugins"])
    yield k
    k.stop()


def test_registers_lists_and_allocates(dirs: dict[str, str], kubelet: FakeKubelet) -> None:
    tokens = TokenDirectory(dirs["tokens"])
    with DevicePlugin(make_config(dirs), tokens):
        req = kubelet.requests.get(timeout=WAIT)
        assert (req.version, req.endpoint, req.resource_name) == ("v1beta1", "devrep-replica.sock",
                                                                  "devrep.io/replica")
        assert req.options.get_preferred_allocation_available
        devices = kubelet.next_list()
        assert [d.ID for d in devices] == ["replica-0", "replica-1", "replica-2", "replica-3"]
        assert [d.topology.nodes[0].ID for d in devices] == [0, 1, 0, 1]
        assert {d.health for d in devices} == {UNHEALTHY}  # no devrep service socket yet
        assert kubelet.options[0].get_preferred_allocation_available

        service = listen(os.path.join(dirs["run"], "devrep.sock"))  # the service comes up: devices healthy
        assert {d.health for d in kubelet.next_list()} == {HEALTHY}
        service.close()  # it dies without cleaning up: the socket file stays, but nothing listens
        assert os.path.exists(os.path.join(dirs["run"], "devrep.sock"))
        assert {d.health for d in kubelet.next_list()} == {UNHEALTHY}

        stub = next(kubelet.plugin(req.endpoint))
        reply = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["replica-1"]),
            api_pb2.ContainerAllocateRequest(devices_ids=["replica-3", "replica-2"]),
        ]), timeout=WAIT)
        first, second = reply.container_responses
        assert first.envs["DEVREP_ADDRESS"] == "/run/devrep/devrep.sock"
        assert first.envs["DEVREP_SLOTS"] == "replica-1" and second.envs["DEVREP_SLOTS"] == "replica-2,replica-3"
        assert [(m.container_path, m.host_path, m.read_only) for m in first.mounts] == [
            ("/run/devrep", dirs["run"], True)]
        token1, token2 = first.envs["DEVREP_TOKEN"], second.envs["DEVREP_TOKEN"]
        assert len(token1) >= 32 and token1 != token2
        assert by_slots(tokens) == {"kube-replica-1": token1, "kube-replica-2+replica-3": token2}
        (label1,) = [label for label, token in tokens.tokens().items() if token == token1]
        assert oct(os.stat(os.path.join(dirs["tokens"], label1 + ".token")).st_mode & 0o777) == "0o600"
        assert oct(os.stat(dirs["tokens"]).st_mode & 0o777) == "0o700"

        # Kubelet reuses slot 2: the container that held 2 and 3 is gone, so its token is revoked.
        again = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=["replica-2"])]), timeout=WAIT)
        token3 = again.container_responses[0].envs["DEVREP_TOKEN"]
        assert by_slots(tokens) == {"kube-replica-1": token1, "kube-replica-2": token3}

        pref = stub.GetPreferredAllocation(api_pb2.PreferredAllocationRequest(container_requests=[
            api_pb2.ContainerPreferredAllocationRequest(
                available_deviceIDs=["replica-0", "replica-1", "replica-2", "replica-3"],
                must_include_deviceIDs=["replica-1"], allocation_size=2)]), timeout=WAIT)
        assert list(pref.container_responses[0].deviceIDs) == ["replica-1", "replica-3"]  # same NUMA node

        for bad in (["replica-9"], []):
            with pytest.raises(grpc.RpcError) as err:
                stub.Allocate(api_pb2.AllocateRequest(container_requests=[
                    api_pb2.ContainerAllocateRequest(devices_ids=bad)]), timeout=WAIT)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=["replica-1"]), timeout=WAIT)
    assert not os.path.exists(os.path.join(dirs["plugins"], "devrep-replica.sock"))  # stop() cleans up


def test_reregisters_when_kubelet_restarts(dirs: dict[str, str], kubelet: FakeKubelet) -> None:
    with DevicePlugin(make_config(dirs), TokenDirectory(dirs["tokens"])) as plugin:
        kubelet.requests.get(timeout=WAIT)
        kubelet.next_list()
        assert plugin.registrations == 1
        # A restarting kubelet removes every socket in its directory, then serves a new kubelet.sock.
        kubelet.stop()
        Path(plugin.config.plugin_socket).unlink()
        wait_for(lambda: not plugin.registered, "the plugin to notice kubelet went away")
        restarted = FakeKubelet(dirs["plugins"])
        try:
            req = restarted.requests.get(timeout=WAIT)
            assert req.endpoint == "devrep-replica.sock"
            assert [d.ID for d in restarted.next_list()] == plugin.slot_ids
            assert plugin.registrations == 2 and plugin.registered
            stub = next(restarted.plugin(req.endpoint))
            reply = stub.Allocate(api_pb2.AllocateRequest(container_requests=[
                api_pb2.ContainerAllocateRequest(devices_ids=["replica-0"])]), timeout=WAIT)
            assert reply.container_responses[0].envs["DEVREP_TOKEN"]
        finally:
            restarted.stop()


def test_recreates_its_socket_when_deleted(dirs: dict[str, str], kubelet: FakeKubelet) -> None:
    with DevicePlugin(make_config(dirs), TokenDirectory(dirs["tokens"])) as plugin:
        kubelet.requests.get(timeout=WAIT)
        os.unlink(plugin.config.plugin_socket)
        req = kubelet.requests.get(timeout=WAIT)  # registered again, same kubelet
        assert req.endpoint == "devrep-replica.sock"
        ok, message = probe.check(plugin.config.plugin_socket)
        assert ok, message  # serving on the new socket
        wait_for(lambda: plugin.registrations == 2, "the second registration")
        assert len(kubelet.next_list()) == 4


def test_waits_for_kubelet_and_reports_readiness(dirs: dict[str, str]) -> None:
    with DevicePlugin(make_config(dirs), TokenDirectory(dirs["tokens"])) as plugin:
        sock = plugin.config.plugin_socket
        assert probe.check(sock)[0]  # serving before registering
        ok, message = probe.check(sock, HEALTH_SERVICE)
        assert not ok and "NOT_SERVING" in message
        kubelet = FakeKubelet(dirs["plugins"])  # kubelet shows up later
        try:
            kubelet.requests.get(timeout=WAIT)
            wait_for(lambda: probe.check(sock, HEALTH_SERVICE)[0], "readiness after registering")
            assert probe.main(["--address", sock, "--service", HEALTH_SERVICE]) == 0
            # The images run the probe as a plain script (no devrep import): it must work that way too.
            script = subprocess.run([sys.executable, probe.__file__, "--address", sock, "--service", HEALTH_SERVICE],
                                    capture_output=True, text=True, timeout=WAIT)
            assert script.returncode == 0 and "SERVING" in script.stdout, script.stderr
        finally:
            kubelet.stop()
    assert probe.main(["--address", os.path.join(dirs["run"], "absent.sock"), "--timeout", "1"]) == 1


def test_adopts_tokens_after_restart(dirs: dict[str, str]) -> None:
    tokens = TokenDirectory(dirs["tokens"])
    tokens.add("stale-from-bigger-config", "kube-replica-40")
    first = DevicePlugin(make_config(dirs), tokens)
    assert "kube-replica-40" not in tokens.tokens()  # no such slot any more: revoked at once
    old = first.allocate(["replica-0", "replica-1"]).envs["DEVREP_TOKEN"]
    second = DevicePlugin(make_config(dirs), TokenDirectory(dirs["tokens"]))  # e.g. the plugin container restarted
    new = second.allocate(["replica-1"]).envs["DEVREP_TOKEN"]
    assert by_slots(tokens) == {"kube-replica-1": new}
    assert old not in tokens.tokens().values()


def test_bad_configuration_and_labels(dirs: dict[str, str]) -> None:
    tokens = TokenDirectory(dirs["tokens"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"slots": 0}, "slots"), ({"resource_name": "replica"}, "resource name"),
        ({"endpoint": "../x.sock"}, "endpoint"), ({"endpoint": "kubelet.sock"}, "endpoint"),
        ({"socket_dir": "run"}, "absolute"), ({"poll_interval": 0}, "positive"), ({"pending_grace": 0}, "positive"),
        ({"pod_resources_interval": -1}, "positive")]
    for kw, words in cases:
        with pytest.raises(InvalidArgumentError, match=words):
            DevicePlugin(make_config(dirs, **kw), tokens)
    with pytest.raises(InvalidArgumentError, match="label"):
        tokens.add("t", "../escape")
    with pytest.raises(InvalidArgumentError, match="token"):
        tokens.add("two words", "ok")
    plugin = DevicePlugin(make_config(dirs), tokens)
    with pytest.raises(InvalidArgumentError, match="cannot pick"):
        plugin.prefer(["replica-0"], [], 2)
    with pytest.raises(InvalidArgumentError, match="unknown"):
        plugin.prefer(["gpu-0"], [], 1)


def test_no_numa_topology_when_unknown(dirs: dict[str, str]) -> None:
    plugin = DevicePlugin(make_config(dirs, numa_nodes=[]), TokenDirectory(dirs["tokens"]))
    assert all(not d.HasField("topology") for d in plugin.devices())


def test_command_line_plugin_stops_cleanly_on_sigterm(dirs: dict[str, str], kubelet: FakeKubelet) -> None:
    cmd = [sys.executable, "-m", "devrep.kube", "--plugin-dir", dirs["plugins"], "--socket-dir", dirs["run"],
           "--token-dir", dirs["tokens"], "--slots", "3", "--numa-nodes", "", "--poll-interval", "0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        req = kubelet.requests.get(timeout=WAIT * 2)  # includes interpreter start-up
        assert req.resource_name == "devrep.io/replica"
        assert len(kubelet.next_list()) == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)
    assert not os.path.exists(os.path.join(dirs["plugins"], "devrep-replica.sock"))


def test_reregisters_when_only_kubelet_sock_is_recreated(dirs: dict[str, str], kubelet: FakeKubelet) -> None:
    # A kubelet that comes back before the plugin polls, leaving our socket alone: the new kubelet.sock may
    # even get the old inode number back, so the plugin must still see it is a different socket.
    with DevicePlugin(make_config(dirs, poll_interval=0.5), TokenDirectory(dirs["tokens"])) as plugin:
        kubelet.requests.get(timeout=WAIT)
        kubelet.stop()
        restarted = FakeKubelet(dirs["plugins"])
        try:
            assert restarted.requests.get(timeout=WAIT).endpoint == "devrep-replica.sock"
            assert len(restarted.next_list()) == 4
            assert plugin.registrations == 2
        finally:
            restarted.stop()


def test_refused_registration_backs_off_and_retries(dirs: dict[str, str]) -> None:
    kubelet = FakeKubelet(dirs["plugins"], refuse="resource devrep.io/replica is already registered")
    try:
        with DevicePlugin(make_config(dirs, poll_interval=0.05), TokenDirectory(dirs["tokens"])) as plugin:
            wait_for(lambda: kubelet.refused >= 3, "a few refused attempts")
            time.sleep(1.0)
            # Backoff doubles from 0.05 s: about 5 attempts in the first 1.5 s, not 30.
            assert 3 <= kubelet.refused <= 8 and not plugin.registered
            assert not probe.check(plugin.config.plugin_socket, HEALTH_SERVICE)[0]
            kubelet.refuse = ""  # e.g. the other plugin went away
            wait_for(lambda: plugin.registered, "registration once kubelet accepts", 5.0)
            assert kubelet.requests.get(timeout=WAIT).resource_name == "devrep.io/replica"
    finally:
        kubelet.stop()
