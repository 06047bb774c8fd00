"""Test doubles for the Kubernetes tests (test_kube_*): a fake kubelet and a node's host directories.

Test-suite only (see ``_support`` for the rest); ``devrep.kube`` is what they exercise.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc

from devrep.kube._gen import api_pb2, api_pb2_grpc

WAIT = 15.0
LOCAL_SUBCHANNELS = [("grpc.use_local_subchannel_pool", 1)]


class FakeKubelet(api_pb2_grpc.RegistrationServicer):
    """Registration server on ``<dir>/kubelet.sock``; after each Register it dials the plugin's endpoint,
    asks for its options and follows ListAndWatch into ``self.lists``."""

    def __init__(self, plugin_dir: str, refuse: str = "") -> None:
        self.dir = plugin_dir
        self.refuse = refuse
        self.refused = 0
        self.requests: queue.Queue[api_pb2.RegisterRequest] = queue.Queue()
        self.lists: queue.Queue[list[api_pb2.Device]] = queue.Queue()
        self.options: list[api_pb2.DevicePluginOptions] = []
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_RegistrationServicer_to_server(self, self.server)
        self.server.add_insecure_port("unix:" + os.path.join(plugin_dir, "kubelet.sock"))
        self.server.start()

    def Register(self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext) -> api_pb2.Empty:
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported version {request.version}")
        if self.refuse:
            self.refused += 1
            context.abort(grpc.StatusCode.ALREADY_EXISTS, self.refuse)
        self.requests.put(request)
        threading.Thread(target=self._dial, args=(request.endpoint,), daemon=True).start()
        return api_pb2.Empty()

    def _dial(self, endpoint: str) -> None:
        # Like kubelet, a fresh connection per registration: gRPC would otherwise share a subchannel still backing
        # off from a deleted socket with the new channel.
        channel = grpc.insecure_channel("unix:" + os.path.join(self.dir, endpoint), options=LOCAL_SUBCHANNELS)
        with self._lock:
            self._channels.append(channel)
        stub = api_pb2_grpc.DevicePluginStub(channel)
        try:
            self.options.append(stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=WAIT))
            for reply in stub.ListAndWatch(api_pb2.Empty()):
                self.lists.put(list(reply.devices))
        except (grpc.RpcError, ValueError):
            pass  # the plugin or this kubelet went away (ValueError: our channel was closed by stop())

    def plugin(self, endpoint: str) -> Iterator[api_pb2_grpc.DevicePluginStub]:
        channel = grpc.insecure_channel("unix:" + os.path.join(self.dir, endpoint), options=LOCAL_SUBCHANNELS)
        with self._lock:
            self._channels.append(channel)
        yield api_pb2_grpc.DevicePluginStub(channel)

    def next_list(self, timeout: float = WAIT) -> list[api_pb2.Device]:
        return self.lists.get(timeout=timeout)

    def stop(self) -> None:
        """Like a kubelet restart: stop serving and remove kubelet.sock."""
        self.server.stop(0).wait(5)
        with self._lock:
            for channel in self._channels:
                channel.close()
        Path(self.dir, "kubelet.sock").unlink(missing_ok=True)


@contextmanager
def node_dirs(prefix: str, *names: str, mode: int = 0o777) -> Iterator[dict[str, str]]:
    """A node's host directories ``names`` (name -> path) under a fresh directory in /tmp (short: Unix socket paths
    are limited to 107 bytes), made with ``mode`` (less the umask); removed afterwards. A ``mode`` other than the
    default also opens the parent to it (mkdtemp makes it 0700): e.g. 0o755, a node's /run or /var/lib that other
    users may search."""
    root = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    if mode != 0o777:
        os.chmod(root, mode)
    dirs = {name: os.path.join(root, name) for name in names}
    for path in dirs.values():
        os.makedirs(path, mode=mode)
    try:
        yield dirs
    finally:
        shutil.rmtree(root, ignore_errors=True)
