"""Kubelet device plugin (API v1beta1) advertising devrep as a schedulable resource.

Every node advertises ``slots`` devices of ``resource_name`` (default ``devrep.io/replica``); a pod that
asks for ``devrep.io/replica: 1`` gets, from ``Allocate``:

* a read-only bind mount of the devrep socket *directory* (a bind-mounted socket file would go stale
  when the service recreates its socket);
* ``DEVREP_ADDRESS``: the service socket's path inside the container;
* ``DEVREP_TOKEN``: a fresh token, published to a ``TokenSink`` the service reads (see ``tokens.py``);
* with ``dev_userfaultfd``, the device ``/dev/userfaultfd`` (Linux 6.1+), so the container can create a
  userfaultfd without any capability and without the ``userfaultfd(2)`` syscall (see docs/kubernetes.md).

Life cycle: serve on ``<plugin_dir>/<endpoint>`` first, then ``Registration.Register`` with kubelet on
``<plugin_dir>/kubelet.sock``. A watcher thread follows the plugin directory with inotify: a new
``kubelet.sock`` (kubelet restarted: it wipes the directory and forgets plugins) makes it register again at once,
and our socket being deleted makes it serve on a new one. Every ``poll_interval`` seconds it also checks whether
the service accepts connections (device health) and, every ``pod_resources_interval`` seconds and on every
``Allocate``, which pods still hold devices (kubelet's PodResources API): tokens of pods that are gone are revoked.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import selectors
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
from inotify_simple import INotify
from inotify_simple import flags as IN

from ..errors import InvalidArgumentError
from ._gen import api_pb2, api_pb2_grpc
from .podresources import PodKey, PodResources
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
DEV_USERFAULTFD = "/dev/userfaultfd"

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
    """Device health checks (connecting to the service socket); kubelet restarts are seen at once by inotify."""
    register_timeout: float = 10.0
    extra_envs: dict[str, str] = field(default_factory=dict)
    pod_resources_socket: str | None = None
    """Kubelet's PodResources socket; ``None``: no pod tracking, a token is revoked when its slot is reused."""
    pod_resources_interval: float = 10.0
    """Longest time between two PodResources ``List`` calls (one also runs on every ``Allocate``)."""
    pending_grace: float = 600.0
    """How long a token that no listed pod holds stays valid: kubelet lists a pod once it is admitted, but not a
    pod whose only devrep user is a plain init container (see docs/kubernetes.md)."""
    dev_userfaultfd: str | None = None
    """Host path of ``/dev/userfaultfd`` to hand to every container (``None``: none)."""

    def check(self) -> None:
        if not _RESOURCE.fullmatch(self.resource_name):
            raise InvalidArgumentError(f"bad resource name {self.resource_name!r}: expected <domain>/<name>")
        if not 1 <= self.slots <= 4096:
            raise InvalidArgumentError(f"slots must be 1..4096, not {self.slots}")
        if "/" in self.endpoint or not self.endpoint.endswith(".sock") or self.endpoint == KUBELET_SOCKET:
            raise InvalidArgumentError(f"bad endpoint {self.endpoint!r}: a socket file name ending in .sock")
        if min(self.poll_interval, self.register_timeout, self.pod_resources_interval, self.pending_grace) <= 0:
            raise InvalidArgumentError(
                "poll_interval, register_timeout, pod_resources_interval and pending_grace must be positive")
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
        self._token_slots: dict[str, list[str]] = {}
        self._token_pod: dict[str, PodKey] = {}
        """Tokens a PodResources ``List`` tied to a pod: revoked when that pod no longer holds their slots."""
        self._token_born: dict[str, float] = {}
        self._pod_resources = (PodResources(config.pod_resources_socket, config.resource_name)
                               if config.pod_resources_socket else None)
        self._next_reconcile = 0.0
        self._reconcile_lock = threading.Lock()
        self._wake_r = self._wake_w = -1
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
        now = time.monotonic()
        for label, token in existing().items():
            if not label.startswith(LABEL_PREFIX):
                continue
            slot_part = label[len(LABEL_PREFIX):].partition(".")[0]  # kube-<slot>+<slot>.<nonce>
            slots = [s for s in slot_part.split("+") if s in self._slot_node]
            if not slots:  # slots from a larger configuration: nobody can get them again, revoke now
                self.tokens.remove(token)
                continue
            # Pending until the next PodResources List ties it to the pod that still holds its slots.
            self._token_slots[token] = slots
            self._token_born[token] = now

    def _revoke(self, token: str) -> None:
        """Forget ``token`` and take it from the sink (the server ends its session). Caller holds ``_cond``."""
        self._token_slots.pop(token, None)
        self._token_pod.pop(token, None)
        self._token_born.pop(token, None)
        self.tokens.remove(token)

    def tokens_by_pod(self) -> dict[str, PodKey | None]:
        """token -> the pod a PodResources List tied it to (``None``: pending). For tests and debugging."""
        with self._cond:
            return {t: self._token_pod.get(t) for t in self._token_slots}

    def reconcile(self, holdings: dict[PodKey, set[str]] | None = None) -> bool:
        """Revoke the tokens of pods that are gone; False when kubelet's PodResources did not answer.

        A pending token (allocated, or adopted after a restart) is tied to the listed pod whose devices include all
        its slots: slots are exclusive between live pods, and within a pod kubelet reuses an init container's
        devices for the app containers, so init and app tokens of one pod tie to it together. A tied token is
        revoked once its pod is no longer listed or no longer holds its slots (a new pod with the same name); a
        pending one after ``pending_grace`` seconds if no listed pod holds its slots."""
        # One at a time: an older List applied after a newer one could revoke a token the newer one tied to a pod.
        with self._reconcile_lock:
            asked = time.monotonic()
            self._next_reconcile = asked + self.config.pod_resources_interval
            if holdings is None:
                if self._pod_resources is None:
                    return False
                holdings = self._pod_resources.holdings()
                if holdings is None:
                    return False  # kubelet unreachable: nobody is known to be gone
            self._apply(holdings, asked)
            return True

    def _apply(self, holdings: dict[PodKey, set[str]], asked: float) -> None:
        now = time.monotonic()
        with self._cond:
            for token, slots in list(self._token_slots.items()):
                held = set(slots)
                pod = self._token_pod.get(token)
                if pod is not None:
                    if not held <= holdings.get(pod, set()):
                        log.info("pod %s/%s no longer holds %s: revoking its token", *pod, "+".join(slots))
                        self._revoke(token)
                    continue
                if self._token_born.get(token, 0.0) > asked:
                    continue  # allocated after kubelet answered: the answer cannot know its pod yet
                owner = next((p for p, ids in holdings.items() if held <= ids), None)
                if owner is not None:
                    self._token_pod[token] = owner
                elif now - self._token_born.get(token, now) > self.config.pending_grace:
                    log.info("no pod holds %s after %.0fs: revoking its token", "+".join(slots),
                             self.config.pending_grace)
                    self._revoke(token)

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
        with self._cond:
            in_use = {s for slots in self._token_slots.values() for s in slots}
        # Same NUMA node first, then slots with no live token (keeps older tokens valid longer).
        rest.sort(key=lambda d: (bool(nodes) and self._slot_node[d] not in nodes, d in in_use,
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
        # Pods that went away since the last List lose their tokens now. A slot being handed out again is no sign
        # of that: kubelet gives an init container's slot to the same pod's app containers.
        tracked = self.reconcile()
        with self._cond:
            if not tracked:
                # Without pod tracking (not configured, or kubelet did not answer): kubelet only hands out a slot it
                # considers free, so whoever held it before is gone. This revokes a pod's init-container token
                # when its app container gets the slot: the reason to give the plugin the PodResources socket.
                for old in [t for t, held in self._token_slots.items() if set(held) & set(slots)]:
                    self._revoke(old)
            # A nonce keeps the labels of one slot's init- and app-container tokens apart.
            self.tokens.add(token, f"{LABEL_PREFIX}{'+'.join(slots)}.{secrets.token_hex(4)}")
            self._token_slots[token] = slots
            self._token_born[token] = time.monotonic()
        cfg = self.config
        envs = {
            **cfg.extra_envs,
            "DEVREP_ADDRESS": os.path.join(cfg.container_socket_dir, cfg.socket_name),
            "DEVREP_TOKEN": token,
            "DEVREP_SLOTS": ",".join(slots),
        }
        mount = api_pb2.Mount(container_path=cfg.container_socket_dir, host_path=cfg.socket_dir, read_only=True)
        devices = []
        if cfg.dev_userfaultfd:
            devices.append(api_pb2.DeviceSpec(container_path=DEV_USERFAULTFD, host_path=cfg.dev_userfaultfd,
                                              permissions="rw"))
        return api_pb2.ContainerAllocateResponse(envs=envs, mounts=[mount], devices=devices)

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

    def _watch_dir(self, inotify: INotify) -> int | None:
        """Watch the plugin directory for sockets appearing and going (None while it does not exist)."""
        try:
            return inotify.add_watch(self.config.plugin_dir, IN.CREATE | IN.DELETE | IN.MOVED_TO | IN.MOVED_FROM
                                     | IN.DELETE_SELF | IN.MOVE_SELF)
        except OSError:
            return None

    def _watch(self) -> None:
        """Tick when kubelet's or our socket is created or removed (inotify: a kubelet restart is seen at once),
        every ``poll_interval`` for device health, and run ``reconcile`` every ``pod_resources_interval``."""
        cfg = self.config
        with INotify() as inotify, selectors.DefaultSelector() as sel:
            sel.register(inotify.fileno(), selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            wd = self._watch_dir(inotify)
            next_tick = time.monotonic() + cfg.poll_interval
            while not self._stopping.is_set():
                now = time.monotonic()
                deadline = min(next_tick, self._next_reconcile) if self._pod_resources else next_tick
                ready = sel.select(timeout=max(0.0, deadline - now))
                if self._stopping.is_set():
                    return
                changed = False
                if any(key.fd == inotify.fileno() for key, _ in ready):
                    for event in inotify.read(timeout=0):
                        changed = True
                        if event.mask & IN.IGNORED:  # the directory itself went away
                            wd = None
                if wd is None:
                    wd = self._watch_dir(inotify)
                    changed = changed or wd is not None
                try:
                    now = time.monotonic()
                    if changed or now >= next_tick:
                        next_tick = now + cfg.poll_interval
                        self.tick()
                    if self._pod_resources is not None and time.monotonic() >= self._next_reconcile:
                        self.reconcile()  # kubelet unreachable: tried again after pod_resources_interval
                except Exception:  # keep watching: the next event or tick retries
                    log.exception("device plugin watcher step failed")

    def start(self) -> DevicePlugin:
        """Serve, then register (retried by the watcher if kubelet is not there yet)."""
        self._stopping.clear()
        self._refresh_health()
        self._serve()
        self._set_registered(False)
        self.register()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._watcher = threading.Thread(target=self._watch, name="devrep-kube-watch", daemon=True)
        self._watcher.start()
        return self

    def stop(self) -> None:
        """End streams, stop serving and remove our socket (kubelet then marks the devices gone)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self._watcher is not None:
            os.write(self._wake_w, b"x")  # wakes the watcher's select at once
            self._watcher.join(timeout=10.0)
            self._watcher = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        self._health.enter_graceful_shutdown()
        self._unserve()
        self._registered = False

    def __enter__(self) -> DevicePlugin:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
