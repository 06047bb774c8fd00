"""Kubelet device plugin (API v1beta1) advertising devrep as a schedulable resource.

Every node advertises ``slots`` devices of ``resource_name`` (default ``devrep.io/replica``); a pod that
asks for ``devrep.io/replica: 1`` gets, from ``Allocate``:

* a read-only bind mount of the devrep socket *directory* (a bind-mounted socket file would go stale
  when the service recreates its socket);
* ``DEVREP_ADDRESS``: the service socket's path inside the container;
* ``DEVREP_TOKEN``: a fresh token, published to a ``TokenSink`` the service reads (see ``tokens.py``).

Life cycle: serve on ``<plugin_dir>/<endpoint>`` first, then ``Registration.Register`` with kubelet on
``<plugin_dir>/kubelet.sock``. A watcher thread polls (every ``poll_interval`` seconds) for a new
kubelet socket (kubelet restarted: it wipes the directory and forgets plugins), for our socket being
deleted (serve again on a new one) and whether the service accepts connections (device health); it
re-registers as needed. Polling stat() is enough here: kubelet restarts are rare and a second of
delay only postpones scheduling, and it needs no inotify binding.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..errors import InvalidArgumentError
from ._gen import api_pb2, api_pb2_grpc
from .tokens import TokenSink

log = logging.getLogger("devrep.kube")

API_VERSION = "v1beta1"
RESOURCE_NAME = "devrep.io/replica"
DEFAULT_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
KUBELET_SOCKET = "kubelet.sock"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
HEALTH_SERVICE = "devrep.kube.DevicePlugin"
"""Health-service name that reports SERVING only while registered with kubelet (readiness)."""
SLOT_PREFIX = "replica-"
MAX_BACKOFF = 30.0
"""Longest wait between Register attempts that the same kubelet refused."""
LABEL_PREFIX = "kube-"

_RESOURCE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


@dataclass
class PluginConfig:
    plugin_dir: str = DEFAULT_PLUGIN_DIR
    """Kubelet's device-plugin directory (holds kubelet.sock and our socket)."""
    resource_name: str = RESOURCE_NAME
    endpoint: str = "devrep-replica.sock"
    """Our socket's file name inside ``plugin_dir``."""
    slots: int = 16
    socket_dir: str = "/run/devrep"
    """Host directory holding the devrep service socket; mounted read-only into pods."""
    socket_name: str = "devrep.sock"
    container_socket_dir: str = "/run/devrep"
    """Where ``socket_dir`` appears inside allocated containers."""
    numa_nodes: Sequence[int] | None = None
    """NUMA nodes to spread slots over; ``None`` reads /sys/devices/system/node, empty means unknown."""
    poll_interval: float = 1.0
    register_timeout: float = 10.0
    extra_envs: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        if not _RESOURCE.fullmatch(self.resource_name):
            raise InvalidArgumentError(f"bad resource name {self.resource_name!r}: expected <domain>/<name>")
        if not 1 <= self.slots <= 4096:
            raise InvalidArgumentError(f"slots must be 1..4096, not {self.slots}")
        if "/" in self.endpoint or not self.endpoint.endswith(".sock") or self.endpoint == KUBELET_SOCKET:
            raise InvalidArgumentError(f"bad endpoint {self.endpoint!r}: a socket file name ending in .sock")
        if self.poll_interval <= 0 or self.register_timeout <= 0:
            raise InvalidArgumentError("poll_interval and register_timeout must be positive")
        for name, path in (("socket_dir", self.socket_dir), ("container_socket_dir", self.container_socket_dir)):
            if not os.path.isabs(path):
                raise InvalidArgumentError(f"{name} must be an absolute path, not {path!r}")

    @property
    def plugin_socket(self) -> str:
        return os.path.join(self.plugin_dir, self.endpoint)

    @property
    def kubelet_socket(self) -> str:
        return os.path.join(self.plugin_dir, KUBELET_SOCKET)

    @property
    def service_socket(self) -> str:
        return os.path.join(self.socket_dir, self.socket_name)


def numa_nodes(sysfs: str = "/sys/devices/system/node") -> list[int]:
    """NUMA node ids this host reports (empty when sysfs has no node directory)."""
    try:
        names = os.listdir(sysfs)
    except OSError:
        return []
    return sorted(int(n[4:]) for n in names if re.fullmatch(r"node\d+", n))


def _inode(path: str) -> tuple[int, int, int] | None:
    """Identity of the socket at ``path``; the change time tells a recreated socket that got the old inode
    number back (filesystems reuse freed inode numbers at once)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


def listening(path: str, timeout: float = 0.5) -> bool:
    """Whether something accepts connections on the Unix socket ``path``. A server killed with SIGKILL leaves its
    socket file behind, so the file existing is not enough."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


class DevicePlugin(api_pb2_grpc.DevicePluginServicer):
    """The plugin: ``start()`` serves and registers, ``stop()`` shuts down and removes the socket."""

    def __init__(self, config: PluginConfig, tokens: TokenSink,
                 health_check: Callable[[], bool] | None = None) -> None:
        config.check()
        self.config = config
        self.tokens = tokens
        self._health_check = health_check or (lambda: listening(config.service_socket))
        nodes = list(config.numa_nodes) if config.numa_nodes is not None else numa_nodes()
        self._slot_node: dict[str, int | None] = {
            f"{SLOT_PREFIX}{i}": (nodes[i % len(nodes)] if nodes else None) for i in range(config.slots)
        }
        self._cond = threading.Condition()
        self._healthy = False
        self._version = 0  # bumped whenever the device list changes; ListAndWatch streams follow it
        self._slot_token: dict[str, str] = {}
        self._token_slots: dict[str, list[str]] = {}
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._own_inode: tuple[int, int, int] | None = None
        self._kubelet_inode: tuple[int, int, int] | None = None
        self._registered = False
        # After a refused Register, retry the same kubelet with exponential backoff (a resource name that another
        # plugin holds stays refused; hammering kubelet every poll would only fill its log).
        self._retry_at = 0.0
        self._backoff = 0.0
        self._refused_by: tuple[int, int, int] | None = None
        self.registrations = 0
        """Successful Register calls so far (a kubelet restart adds one)."""
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._adopt_tokens()

    # ------------------------------------------------------------------ state
    @property
    def slot_ids(self) -> list[str]:
        return list(self._slot_node)

    @property
    def registered(self) -> bool:
        return self._registered

    def devices(self) -> list[api_pb2.Device]:
        with self._cond:
            health_str = HEALTHY if self._healthy else UNHEALTHY
        out = []
        for slot, node in self._slot_node.items():
            topology = api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=node)]) if node is not None else None
            out.append(api_pb2.Device(ID=slot, health=health_str, topology=topology))
        return out

    def _adopt_tokens(self) -> None:
        """After a plugin restart, take over the allocations a token directory still holds."""
        existing = getattr(self.tokens, "tokens", None)
        if not callable(existing):
            return
        for label, token in existing().items():
            if not label.startswith(LABEL_PREFIX):
                continue
            slots = [s for s in label[len(LABEL_PREFIX):].split("+") if s in self._slot_node]
            if not slots:  # slots from a larger configuration: nobody can get them again, revoke now
                self.tokens.remove(token)
                continue
            self._token_slots[token] = slots
            for slot in slots:
                self._slot_token[slot] = token

    def _refresh_health(self) -> None:
        try:
            healthy = bool(self._health_check())
        except Exception:  # a broken check means we cannot vouch for the service
            log.exception("device health check failed")
            healthy = False
        with self._cond:
            if healthy != self._healthy:
                log.info("devrep service %s: devices now %s", self.config.service_socket,
                         HEALTHY if healthy else UNHEALTHY)
                self._healthy = healthy
                self._version += 1
                self._cond.notify_all()

    # ------------------------------------------------------------------ DevicePlugin service
    def GetDevicePluginOptions(self, request: api_pb2.Empty, context: grpc.ServicerContext
                               ) -> api_pb2.DevicePluginOptions:
        return api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def ListAndWatch(self, request: api_pb2.Empty, context: grpc.ServicerContext
                     ) -> Iterator[api_pb2.ListAndWatchResponse]:
        seen = -1
        while not self._stopping.is_set() and context.is_active():
            with self._cond:
                if self._version == seen:
                    # Wake now and then to notice a client that went away or a stop().
                    self._cond.wait(timeout=min(self.config.poll_interval, 1.0))
                    if self._version == seen:
                        continue
                seen = self._version
            yield api_pb2.ListAndWatchResponse(devices=self.devices())

    def GetPreferredAllocation(self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
                               ) -> api_pb2.PreferredAllocationResponse:
        responses = []
        for req in request.container_requests:
            try:
                chosen = self.prefer(list(req.available_deviceIDs), list(req.must_include_deviceIDs),
                                     req.allocation_size)
            except InvalidArgumentError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    def prefer(self, available: list[str], must: list[str], size: int) -> list[str]:
        """Must-include slots, then free slots on the NUMA nodes those use, then the least-used slots."""
        unknown = [d for d in [*available, *must] if d not in self._slot_node]
        if unknown:
            raise InvalidArgumentError(f"unknown device ids {unknown}")
        if size < len(must) or size > len(set(available) | set(must)):
            raise InvalidArgumentError(f"cannot pick {size} of {len(available)} available devices "
                                       f"including {len(must)} required ones")
        chosen = list(dict.fromkeys(must))
        nodes = {self._slot_node[d] for d in chosen}
        rest = [d for d in available if d not in chosen]
        # Same NUMA node first, then slots with no live token (keeps older tokens valid longer).
        rest.sort(key=lambda d: (bool(nodes) and self._slot_node[d] not in nodes, d in self._slot_token,
                                 int(d[len(SLOT_PREFIX):])))
        return chosen + rest[: size - len(chosen)]

    def Allocate(self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext) -> api_pb2.AllocateResponse:
        try:
            return api_pb2.AllocateResponse(
                container_responses=[self.allocate(list(r.devices_ids)) for r in request.container_requests])
        except InvalidArgumentError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise  # abort raises; this keeps type checkers happy

    def allocate(self, slots: list[str]) -> api_pb2.ContainerAllocateResponse:
        """One container's share: mount, address and a new token (revoking the slots' previous tokens)."""
        if not slots:
            raise InvalidArgumentError("an allocation needs at least one device id")
        unknown = [s for s in slots if s not in self._slot_node]
        if unknown:
            raise InvalidArgumentError(f"unknown device ids {unknown}; this plugin has "
                                       f"{SLOT_PREFIX}0..{SLOT_PREFIX}{self.config.slots - 1}")
        slots = sorted(dict.fromkeys(slots), key=lambda s: int(s[len(SLOT_PREFIX):]))
        token = secrets.token_urlsafe(32)
        with self._cond:
            # Kubelet only hands out a slot it considers free, so whoever held it before is gone.
            for old in {self._slot_token[s] for s in slots if s in self._slot_token}:
                for s in self._token_slots.pop(old, []):
                    self._slot_token.pop(s, None)
                self.tokens.remove(old)
            self.tokens.add(token, LABEL_PREFIX + "+".join(slots))
            self._token_slots[token] = slots
            for s in slots:
                self._slot_token[s] = token
        cfg = self.config
        envs = {
            **cfg.extra_envs,
            "DEVREP_ADDRESS": os.path.join(cfg.container_socket_dir, cfg.socket_name),
            "DEVREP_TOKEN": token,
            "DEVREP_SLOTS": ",".join(slots),
        }
        mount = api_pb2.Mount(container_path=cfg.container_socket_dir, host_path=cfg.socket_dir, read_only=True)
        return api_pb2.ContainerAllocateResponse(envs=envs, mounts=[mount])

    def PreStartContainer(self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
                          ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()

    # ------------------------------------------------------------------ serving and registering
    def _serve(self) -> None:
        path = self.config.plugin_socket
        os.makedirs(self.config.plugin_dir, exist_ok=True)
        Path(path).unlink(missing_ok=True)  # a leftover from a previous run would make bind fail
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="devrep-kube"))
        api_pb2_grpc.add_DevicePluginServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_insecure_port("unix:" + path)
        server.start()
        self._server = server
        self._own_inode = _inode(path)
        if self._own_inode is None:
            server.stop(0)
            raise OSError(f"device plugin socket {path} did not appear after the server started")
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("device plugin serving on %s", path)

    def _unserve(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)
            self._server = None
        if self._own_inode is not None and _inode(self.config.plugin_socket) == self._own_inode:
            Path(self.config.plugin_socket).unlink(missing_ok=True)
        self._own_inode = None

    def _set_registered(self, registered: bool) -> None:
        self._registered = registered
        self._health.set(HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING if registered
                         else health_pb2.HealthCheckResponse.NOT_SERVING)

    def register(self) -> bool:
        """Register with kubelet now; False (logged) when kubelet is absent or refuses."""
        cfg = self.config
        inode = _inode(cfg.kubelet_socket)
        if inode is None:
            self._set_registered(False)
            return False
        request = api_pb2.RegisterRequest(
            version=API_VERSION, endpoint=cfg.endpoint, resource_name=cfg.resource_name,
            options=api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True),
        )
        try:
            with grpc.insecure_channel("unix:" + cfg.kubelet_socket) as channel:
                api_pb2_grpc.RegistrationStub(channel).Register(request, timeout=cfg.register_timeout,
                                                                wait_for_ready=True)
        except grpc.RpcError as e:
            self._backoff = min(MAX_BACKOFF, max(self._backoff * 2, cfg.poll_interval))
            self._retry_at = time.monotonic() + self._backoff
            self._refused_by = inode
            log.warning("registering %s with kubelet at %s failed: %s %s (retrying in %.1fs)", cfg.resource_name,
                        cfg.kubelet_socket, e.code(), e.details(), self._backoff)
            self._set_registered(False)
            return False
        self._backoff = 0.0
        self._refused_by = None
        self._kubelet_inode = inode
        self.registrations += 1
        self._set_registered(True)
        log.info("registered %s (%d slots) with kubelet", cfg.resource_name, cfg.slots)
        return True

    def tick(self) -> None:
        """One watcher step: health, own socket, kubelet socket. Public so tests can drive it."""
        self._refresh_health()
        cfg = self.config
        if _inode(cfg.plugin_socket) != self._own_inode:
            log.warning("device plugin socket %s was removed; serving on a new one", cfg.plugin_socket)
            self._unserve()
            self._serve()
            self._set_registered(False)
        kubelet = _inode(cfg.kubelet_socket)
        if kubelet is None:
            self._set_registered(False)
        elif not self._registered or kubelet != self._kubelet_inode:
            if kubelet == self._refused_by and time.monotonic() < self._retry_at:
                return  # the same kubelet refused us recently
            self.register()

    def _watch(self) -> None:
        while not self._stopping.wait(self.config.poll_interval):
            try:
                self.tick()
            except Exception:  # keep watching: the next tick retries
                log.exception("device plugin watcher step failed")

    def start(self) -> DevicePlugin:
        """Serve, then register (retried by the watcher if kubelet is not there yet)."""
        self._stopping.clear()
        self._refresh_health()
        self._serve()
        self._set_registered(False)
        self.register()
        self._watcher = threading.Thread(target=self._watch, name="devrep-kube-watch", daemon=True)
        self._watcher.start()
        return self

    def stop(self) -> None:
        """End streams, stop serving and remove our socket (kubelet then marks the devices gone)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._watcher is not None:
            self._watcher.join(timeout=self.config.poll_interval + 10.0)
            self._watcher = None
        self._health.enter_graceful_shutdown()
        self._unserve()
        self._registered = False

    def __enter__(self) -> DevicePlugin:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
