"""The client: gRPC for calls, the fd side channel for memfds and replica fds (see docs/api.md)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from .. import errors, numa
from .._pages import PAGE_SIZE, pages_for
from ..errors import ServiceUnavailableError, UnauthenticatedError
from ..memory import F_SEAL_GROW, F_SEAL_SHRINK, add_seals, map_fd, memfd_create
from ..model import Event, ExportKind, RegionInfo, RegionStats, ReplicaInfo, SyncReport, TrackingMode, VerifyReport
from ..wire import HOLDER_KEY, default_address, unix_path
from ..wire import sidechannel as protocol
from ..wire._gen import devrep_pb2 as pb
from ..wire._gen import devrep_pb2_grpc as pb_grpc
from ._errors import NO_SERVER_HINT
from ._transport import GrpcTransport, LeaseGrant, SideChannelTransport, Stream, Transport, _exists, _runs

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``."""

MODES = {TrackingMode.AUTO: pb.TRACKING_MODE_UNSPECIFIED, TrackingMode.EXPLICIT: pb.TRACKING_MODE_EXPLICIT,
         TrackingMode.SYNC: pb.TRACKING_MODE_SYNC, TrackingMode.ASYNC: pb.TRACKING_MODE_ASYNC,
         TrackingMode.FILE: pb.TRACKING_MODE_FILE}


SCHEMES = ("unix:", "dns:", "ipv4:", "ipv6:", "unix-abstract:", "vsock:")
_CUDA_KINDS = (ExportKind.CUDA_IPC, ExportKind.CUDA_FD)  # replicas in GPU memory, opened with to_cupy()


def check_address(address: str) -> str:
    """Refuse an address gRPC cannot use, with the reason (instead of a connection that never succeeds)."""
    if not isinstance(address, str) or not address.strip():
        raise errors.InvalidArgumentError("empty server address: use unix:/path/to/devrep.sock or HOST:PORT")
    scheme, sep, _ = address.partition(":")
    if unix_path(address) is not None or address.startswith(SCHEMES):
        return address
    if sep and "/" in address.partition(":")[2][:2]:   # e.g. garbage://x, http://host
        raise errors.InvalidArgumentError(
            f"unsupported server address {address!r}: scheme {scheme!r} is not one devrep can dial; use "
            "unix:/path/to/devrep.sock, a socket path, or HOST:PORT (TCP)")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.InvalidArgumentError(
            f"bad server address {address!r}: expected unix:/path/to/devrep.sock, a socket path, or HOST:PORT "
            "with a port in 1..65535")
    return address


def _report(r: pb.SyncReport) -> SyncReport:
    return SyncReport(r.region, r.generation, r.pages_copied, r.bytes_copied, r.host_bytes_read, r.runs, r.seconds,
                      list(r.devices))


@dataclass(frozen=True)
class RegionDescription(RegionInfo):
    """``RegionInfo`` plus what the service knows: the owner's label, whether it is shared read-only, the path."""

    owner: str = ""
    read_only: bool = False
    path: str = ""


def _region(r: pb.Region) -> RegionDescription:
    s = r.stats
    stats = RegionStats(**{f: getattr(s, f) for f in vars(RegionStats())})
    return RegionDescription(
        r.name, r.kind, r.nbytes, r.npages, r.block_size, r.tracking, r.generation,
        [ReplicaInfo(x.device, x.valid_pages, x.generation, x.leases, x.buffers, x.nbytes) for x in r.replicas],
        stats, r.failed or None, owner=r.owner, read_only=r.read_only, path=r.path)


@dataclass(frozen=True)
class ServerInfo:
    version: str
    devices: list[str]
    sessions: int
    regions: int
    leases: int
    host_bytes: int
    tracking_modes: list[str]
    session_id: str
    quota_bytes: int
    quota_regions: int
    used_bytes: int
    used_regions: int


class ClientLease(LeaseGrant):
    """A read lease on a replica: the ``LeaseGrant`` fields (``lease_id``, ``generation``, ``invalid_runs``,
    ``device``, ``nbytes``, ``export_kind``, ...) plus this process's view of it. ``array`` is a read-only numpy
    view of a CPU replica (zero-copy: the replica's memfd mapped into this process); ``to_cupy()`` opens a CUDA
    replica through IPC. The replica stays as it is until ``release()`` (or leaving the ``with`` block); do not
    use the arrays after that."""

    def __init__(self, client: Client, name: str, grant: LeaseGrant, fd: int = -1) -> None:
        super().__init__(**{f.name: getattr(grant, f.name) for f in fields(LeaseGrant)})
        self._client = client
        self.region = name
        self._array: npt.NDArray[np.uint8] | None = None
        self._cuda_key: Any = None  # the client's mapping this lease holds one reference on (CUDA replicas)
        self._cuda_fd = -1  # a CUDA VMM replica's fd until it is mapped
        self.released = False
        if fd >= 0 and self.export_kind == ExportKind.CUDA_FD:
            self._cuda_fd = os.dup(fd)
        elif fd >= 0:
            self._array = map_fd(fd, self.buffer_nbytes, writable=False)[: self.nbytes]

    def _map(self) -> None:
        _, fds = self._client._side().call({"op": "lease_fd", "lease": self.lease_id})
        try:
            if len(fds) != 1:
                raise errors.DevrepError(f"expected one replica fd, got {len(fds)}")
            self._array = map_fd(fds[0], self.buffer_nbytes, writable=False)[: self.nbytes]
        finally:
            protocol.close_fds(fds)

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """The replica bytes, read-only (CPU replicas)."""
        if self.released:
            raise errors.FailedPreconditionError("lease already released")
        if self._array is None:
            if self.export_kind != ExportKind.FD:
                raise errors.FailedPreconditionError(
                    f"replica on {self.device} exports {self.export_kind!r}; use to_cupy() for CUDA replicas")
            self._map()
        assert self._array is not None
        return self._array

    def to_cupy(self) -> Any:
        """The replica as a CuPy uint8 array in this process, zero-copy: a CUDA VMM replica (``export_kind``
        ``"cuda_fd"``) is mapped **read-only** from the fd the server sent; a classic CUDA IPC replica
        (``"cuda_ipc"``, where the GPU or driver cannot share VMM fds) is opened read-write: do not write it (the
        next sync would overwrite it anyway). Either way the GPU is the one with the replica's UUID, whatever
        ``CUDA_VISIBLE_DEVICES`` says here. The mapping is opened once per lease however often this (or
        ``__dlpack__``) is called, and closed by ``release()``; do not use the array after that.

        Kernels run asynchronously: when ``release()`` is called, kernels already queued on this process's streams
        (CuPy's, or a DLPack consumer's such as torch's) may still be reading the buffer, and once the server hears
        of the release its next sync may overwrite it. So ``release()`` first waits for all work this process has
        queued on the replica's GPU (``cudaDeviceSynchronize``), then tells the server: release costs as much as
        finishing that work. Do not queue work on the array after releasing."""
        if self.export_kind not in _CUDA_KINDS:
            raise errors.FailedPreconditionError(f"replica on {self.device} is not a CUDA replica")
        if self.released:
            raise errors.FailedPreconditionError("lease already released")
        cupy = self._client._cuda()
        if self._cuda_key is None:
            self._cuda_key = self._client._cuda_open(self)
        ptr, index = self._client._ipc[self._cuda_key][:2]
        with cupy.cuda.Device(index):
            mem = cupy.cuda.UnownedMemory(ptr, self.buffer_nbytes, self, device_id=index)
            return cupy.ndarray((self.nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))

    def numpy(self, dtype: Any, shape: int | Sequence[int], offset: int = 0) -> npt.NDArray[Any]:
        """Bytes ``[offset, offset + size)`` of the replica as a read-only numpy array of ``dtype`` and ``shape``:
        zero-copy over the read-only mapping for a CPU replica, a host copy of the range for a CUDA replica.
        ``InvalidArgumentError`` for a bad dtype or shape, a misaligned offset or a range past the end. Valid until
        ``release()``; ``.copy()`` gives a writable array of your own."""
        from ..views import check_layout, numpy_dtype, numpy_view

        if self.export_kind != ExportKind.CUDA_IPC:
            return numpy_view(self.array, self.nbytes, dtype, shape, offset)
        dt = numpy_dtype(dtype, "numpy view")
        _, start, size = check_layout(self.nbytes, dt.itemsize, dt.alignment, shape, offset, "numpy view")
        import cupy

        return numpy_view(cupy.asnumpy(self.to_cupy()[start:start + size]), self.nbytes, dt, shape, start,
                          base=start)

    def torch(self, dtype: Any, shape: int | Sequence[int], offset: int = 0) -> Any:
        """Bytes ``[offset, offset + size)`` of the replica as a ``torch.Tensor`` of ``dtype`` (a torch dtype, its
        name such as ``"bfloat16"``, or a numpy dtype) and ``shape``, zero-copy through DLPack. A CPU replica is
        mapped read-only (``PROT_READ``): writing the tensor kills this process with SIGSEGV; ``tensor.clone()``
        gives a writable copy. A CUDA replica gives a CUDA tensor that nothing protects: never write it. Needs
        PyTorch (``FailedPreconditionError`` otherwise)."""
        from ..views import _torch, torch_view

        _torch()
        source = self.to_cupy() if self.export_kind == ExportKind.CUDA_IPC else self.array
        return torch_view(source, self.nbytes, dtype, shape, offset)

    def __dlpack__(self, **kwargs: Any) -> Any:
        if self.export_kind in _CUDA_KINDS:
            return self.to_cupy().__dlpack__(**kwargs)
        kwargs.setdefault("max_version", (1, 0))  # DLPack >= 1.0 can flag the tensor read-only
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        if self.export_kind in _CUDA_KINDS:
            return self.to_cupy().__dlpack_device__()
        return self.array.__dlpack_device__()

    def release(self) -> None:
        """End the lease: the server may then sync (overwrite) this buffer. For a CUDA replica opened in this
        process, first wait until the GPU has finished every kernel queued here (see ``to_cupy``), then drop this
        lease's reference on the mapping (closed when no lease of this client uses it)."""
        if not self.released:
            self.released = True
            self._array = None
            try:
                if self._cuda_key is not None:
                    key, self._cuda_key = self._cuda_key, None
                    self._client._cuda_close(key)  # waits for the GPU before a mapping goes
            finally:  # a failed wait means the context is dead: no kernel of ours reads the buffer any more
                if self._cuda_fd >= 0:
                    os.close(self._cuda_fd)
                    self._cuda_fd = -1
                if self.via_side_channel and self._client._sc is not None:
                    self._client._sc.call({"op": "release", "lease": self.lease_id})
                else:
                    self._client._call("Release", pb.ReleaseRequest(lease_id=self.lease_id))

    def __enter__(self) -> ClientLease:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ServiceUnavailableError):
            self.release()


class RegionHandle:
    """A region this client registered. ``array`` is writable for a region it created (``create_region``)."""

    def __init__(self, client: Client, name: str, array: npt.NDArray[np.uint8] | None, info: RegionDescription,
                 keepalive: Any = None) -> None:
        self.client = client
        self.name = name
        self._array = array
        self.info = info
        self._keepalive = keepalive

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        if self._array is None:
            raise errors.FailedPreconditionError(f"region {self.name!r} is a file region: read the file itself")
        return self._array

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def invalidate(self, offset: int = 0, length: int | None = None) -> int:
        return self.client.invalidate(self.name, offset, length)

    def replicate(self, devices: Sequence[str], progress: Progress | None = None) -> SyncReport:
        return self.client.replicate(self.name, devices, progress=progress)

    def acquire(self, device: str, fresh: bool = True, timeout: float | None = None) -> ClientLease:
        return self.client.acquire(self.name, device, fresh=fresh, timeout=timeout)

    def describe(self) -> RegionDescription:
        return self.client.describe(self.name)

    def unregister(self) -> None:
        self.client.unregister(self.name)

    def __repr__(self) -> str:
        return f"<RegionHandle {self.name!r} {self.info.nbytes} B {self.info.tracking}>"


class EventStream:
    """Iterator of ``devrep.Event`` from a Watch stream. ``cancel()`` (or ``close()``) ends it.

    Bounded forms (``Client.watch(max_events=..., timeout=...)``): iteration ends by itself after ``max_events``
    events, or when ``timeout`` seconds have passed since ``watch()`` (the stream's gRPC deadline) — whichever
    comes first — so a script or a docs example never waits forever for an event that does not come."""

    def __init__(self, call: Stream, *, max_events: int | None = None) -> None:
        self._call = call
        self.dropped = 0
        self.max_events = max_events
        self._delivered = 0

    def _messages(self) -> Iterator[Any]:
        for message in self._call:  # a cancelled stream, or a bounded one past its deadline, just ends (see watch)
            self.dropped += message.dropped
            yield message

    def _done(self) -> bool:
        return self.max_events is not None and self._delivered >= self.max_events

    def __iter__(self) -> Iterator[Event]:
        if self._done():
            return
        for message in self._messages():
            for e in message.events:
                self._delivered += 1
                yield Event(e.kind, e.region, e.generation, _runs(e.runs), e.device or None, message=e.message)
                if self._done():
                    self.cancel()
                    return

    def batches(self) -> Iterator[list[Event]]:
        """One list per message (the server's coalesced batches); ``max_events`` counts the events in them (the
        last batch is cut to fit)."""
        if self._done():
            return
        for message in self._messages():
            batch = [Event(e.kind, e.region, e.generation, _runs(e.runs), e.device or None, message=e.message)
                     for e in message.events]
            if self.max_events is not None:
                batch = batch[: self.max_events - self._delivered]
            self._delivered += len(batch)
            yield batch
            if self._done():
                self.cancel()
                return

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client:
    """A session with a devrep server. Create with ``connect()``; close with ``close()`` (or ``with``): closing
    ends the session, which unregisters its regions and releases its leases.

    The session logic lives here; the bytes travel through a ``Transport`` (``devrep.client._transport``): the
    ``SideChannelTransport`` when the address is a local socket with its fd side channel, else a
    ``GrpcTransport`` (which needs a token). ``transport=`` replaces that choice (e.g. with
    ``devrep.testing.MockTransport``); ``address`` is then only checked, not dialed."""

    def __init__(self, address: str, *, token: str | None = None, label: str | None = None,
                 fd_socket: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                 credentials: grpc.ChannelCredentials | None = None, server_uid: int | None = None,
                 transport: Transport | None = None) -> None:
        self.address = check_address(address)
        self.timeout = timeout
        self._ipc: dict[Any, list[Any]] = {}
        self._ipc_lock = threading.Lock()
        self._closed = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._modes: set[str] | None = None
        self._mappings: dict[str, npt.NDArray[np.uint8]] = {}
        sock = unix_path(address)
        fd_path = Path(fd_socket) if fd_socket else (
            Path(os.environ["DEVREP_FD_SOCKET"]) if os.environ.get("DEVREP_FD_SOCKET")
            else protocol.side_channel_path(sock) if sock else None)
        self._fd_path = fd_path
        self.label = ""
        """The session's label as the server knows it (``uid:<uid>/<label>`` for a label chosen in ``hello``, the
        operator's for a pre-authorized token): share with it as ``label:<that>``."""
        token = token or os.environ.get("DEVREP_TOKEN") or None
        if transport is None:
            if fd_path is not None and _exists(fd_path):
                transport = SideChannelTransport(address, fd_path, timeout=timeout, credentials=credentials,
                                                 server_uid=server_uid)
            elif fd_path is not None and sock is not None and not token:
                raise ServiceUnavailableError(f"no devrep server at {address} (no side channel {fd_path}); "
                                              f"{NO_SERVER_HINT}")
            else:  # a token session: checks a Unix socket's owner before the token goes out
                transport = GrpcTransport(address, credentials=credentials, server_uid=server_uid)
        self._transport: Transport = transport
        """What carries this client's requests (``SideChannelTransport`` locally, ``GrpcTransport`` over TCP)."""
        try:
            if transport.side_channel:
                hello: dict[str, Any] = {"op": "hello", "label": label or f"pid{os.getpid()}"}
                if token:
                    hello["token"] = token
                reply, _ = transport.call(hello)
                token = str(reply["token"])
                self.session_id = str(reply["session"])
                self.label = str(reply.get("label", ""))
            if not token:
                raise UnauthenticatedError(f"{address} has no fd side channel here: set DEVREP_TOKEN to a "
                                           "pre-authorized token")
            # The holder id names this process's gRPC-acquired leases: the server releases them when this client
            # stops calling for the holder TTL (it died), see _heartbeat.
            self._holder = secrets.token_hex(16)
            self._metadata = (("authorization", f"Bearer {token}"), (HOLDER_KEY, self._holder))
            self.token = token
            self.session_id = self._call("Ping", pb.PingRequest()).session_id
        except BaseException:
            self.close()
            raise

    @property
    def _sc(self) -> Transport | None:
        """The transport when it has the fd side channel, else ``None``."""
        return self._transport if self._transport.side_channel else None

    @property
    def _stub(self) -> pb_grpc.DevrepServiceStub:
        """The raw gRPC stub (tools and tests that send hand-made requests; calls through it are not mapped)."""
        if not isinstance(self._transport, GrpcTransport):
            raise errors.FailedPreconditionError(f"{type(self._transport).__name__} has no gRPC stub")
        return self._transport.stub

    # ------------------------------------------------------------------ CUDA replicas
    # ``_ipc`` maps a replica buffer (its IPC handle, or ("cuda_fd", st_dev, st_ino) of its VMM fd) to
    # ``[ptr, device ordinal, references, VmmMapping | None]``: each buffer is mapped once per process (a second
    # cudaIpcOpenMemHandle of one handle fails), and each lease holds at most one reference.
    _cupy_module: Any = None
    """CuPy, imported on first use (tests put ``devrep.testing.fake_cuda.FakeCupy`` here)."""
    _vmm_driver: Any = None
    """The CUDA VMM driver (``devrep.linux.cuda_vmm``), loaded on first use of a ``cuda_fd`` replica."""

    def _cuda(self) -> Any:
        if self._cupy_module is None:
            try:
                import cupy
            except ImportError as exc:
                raise errors.FailedPreconditionError(
                    f"CUDA replicas need CuPy in the client: pip install devrep[cuda12] or devrep[cuda13] ({exc})"
                ) from exc
            self._cupy_module = cupy
        return self._cupy_module

    def _vmm(self) -> Any:
        from ..linux import cuda_vmm as _cuda_vmm

        if self._vmm_driver is None:
            driver, why = _cuda_vmm.load_driver()
            if driver is None:
                raise errors.FailedPreconditionError(f"cannot map a CUDA VMM replica: {why}")
            self._vmm_driver = driver
        return self._vmm_driver

    def _gpu_ordinal(self, uuid: str, device: str) -> int:
        """This process's ordinal of the GPU with ``uuid`` (the server's ordinal when the server sent no UUID)."""
        from ..linux import cuda_vmm as _cuda_vmm

        if not uuid:
            return int(device.partition(":")[2])
        if self._vmm_driver is not None or _cuda_vmm.load_driver()[0] is not None:
            return _cuda_vmm.ordinal_for_uuid(self._vmm(), uuid)
        rt = self._cuda().cuda.runtime
        seen = []
        for i in range(rt.getDeviceCount()):
            raw = rt.getDeviceProperties(i).get("uuid")
            u = _cuda_vmm.format_uuid(bytes(raw)) if raw else ""
            if u.lower() == uuid.lower():
                return i
            seen.append(u or f"cuda:{i} (no UUID)")
        raise errors.FailedPreconditionError(
            f"the replica is on GPU {uuid}, which this process does not see (its GPUs: {', '.join(seen) or 'none'}; "
            "check CUDA_VISIBLE_DEVICES / the pod's GPU assignment)")

    def _cuda_open(self, lease: ClientLease) -> Any:
        """Map the lease's replica buffer (once per process) and take one reference; returns the key."""
        from ..linux import cuda_vmm as _cuda_vmm

        cupy = self._cuda()
        index = self._gpu_ordinal(lease.gpu_uuid, lease.device)
        if lease.export_kind == ExportKind.CUDA_FD:
            if lease._cuda_fd < 0:
                _, fds = self._side().call({"op": "lease_fd", "lease": lease.lease_id})
                if len(fds) != 1:
                    protocol.close_fds(fds)
                    raise errors.DevrepError(f"expected one replica fd, got {len(fds)}")
                lease._cuda_fd = fds[0]
            st = os.fstat(lease._cuda_fd)
            key: Any = ("cuda_fd", st.st_dev, st.st_ino)
        else:
            key = lease.cuda_ipc_handle
        with self._ipc_lock:
            entry = self._ipc.get(key)
            if entry is None:
                with cupy.cuda.Device(index):
                    if lease.export_kind == ExportKind.CUDA_FD:
                        cupy.cuda.runtime.deviceSynchronize()  # makes the device's primary context current first
                        granularity = lease.granularity or lease.buffer_nbytes
                        mapping = _cuda_vmm.map_readonly(self._vmm(), lease._cuda_fd, lease.buffer_nbytes,
                                                         granularity, index)
                        entry = [mapping.ptr, index, 0, mapping]
                    else:
                        entry = [int(cupy.cuda.runtime.ipcOpenMemHandle(key)), index, 0, None]
                self._ipc[key] = entry
            entry[2] += 1
        return key

    def _cuda_close(self, key: Any) -> None:
        """Drop one reference; the last one waits for the GPU (no kernel may still read it) and unmaps."""
        with self._ipc_lock:
            entry = self._ipc.get(key)
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] > 0:
                return
            del self._ipc[key]
        self._unmap(entry)

    def _unmap(self, entry: list[Any]) -> None:
        from ..linux import cuda_vmm as _cuda_vmm

        cupy = self._cuda()
        with cupy.cuda.Device(entry[1]):
            try:
                cupy.cuda.runtime.deviceSynchronize()  # kernels of any stream of ours may still read it
            finally:
                if entry[3] is not None:
                    _cuda_vmm.unmap(self._vmm(), entry[3])
                else:
                    cupy.cuda.runtime.ipcCloseMemHandle(entry[0])

    # ------------------------------------------------------------------ plumbing
    def _call(self, method: str | Any, request: Any, timeout: float | None = None) -> Any:
        """One unary call by RPC name (``"Ping"``); the reply message. Callers written against the stub may pass
        its method instead (``client._stub.Ping``)."""
        if not isinstance(method, str):
            method = next(name for name, value in vars(self._stub).items() if value is method)
        return self._transport.unary(method, request, timeout=timeout or self.timeout, metadata=self._metadata).message

    def _side(self) -> Transport:
        """The transport, for side-channel requests (its ``call`` explains when there is no side channel)."""
        return self._transport

    def _put_fds(self, kind: str, fds: Sequence[int]) -> str:
        reply, _ = self._side().call({"op": "put_fds", "kind": kind}, fds)
        return str(reply["ticket"])

    # ------------------------------------------------------------------ server
    def ping(self) -> str:
        return str(self._call("Ping", pb.PingRequest()).session_id)

    def stats(self) -> ServerInfo:
        """Server-wide counters, the devices, tracking modes and this session's quota use."""
        r = self._call("GetServerInfo", pb.GetServerInfoRequest())
        return ServerInfo(r.version, list(r.devices), r.sessions, r.regions, r.leases, r.host_bytes,
                          list(r.tracking_modes), r.session_id, r.quota.max_bytes, r.quota.max_regions,
                          r.quota.used_bytes, r.quota.used_regions)

    # ------------------------------------------------------------------ regions
    def create_region(self, name: str, nbytes: int, *, tracking: str = TrackingMode.AUTO, block_size: int = 0
                      ) -> RegionHandle:
        """A new shared-memory region: this process writes ``handle.array``; the server replicates it.

        ``tracking="auto"`` (default): the strongest mode the server offers and this kernel and privileges allow,
        ``sync`` > ``async`` > ``explicit`` (``handle.info.tracking`` / ``describe()`` says which). ``"explicit"``:
        report writes with ``invalidate``. ``"sync"``/``"async"``: the kernel reports them (needs the
        kernel-tracking helpers on both sides; otherwise ``UnsupportedModeError``).
        """
        if tracking not in ("auto", "explicit", "sync", "async"):
            raise errors.InvalidArgumentError(
                f"memory regions track 'auto', 'explicit', 'sync' or 'async', not {tracking!r}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise errors.InvalidArgumentError(f"nbytes must be a positive integer, got {nbytes!r}")
        size = pages_for(nbytes) * PAGE_SIZE
        fd = memfd_create(f"devrep:{name}", size)
        try:
            add_seals(fd, F_SEAL_SHRINK | F_SEAL_GROW)
            array = map_fd(fd, size, writable=True)
            extra: list[int] = []
            writer_base = 0
            if tracking == "auto":
                extra, writer_base = self._auto_tracking_setup(array)
            elif tracking != "explicit":
                extra, writer_base = _remote_tracking_setup(tracking, array)
            try:
                ticket = self._put_fds("+".join(["memfd", "uffd", "pagemap"][: 1 + len(extra)]), [fd, *extra])
            finally:
                protocol.close_fds(extra)
        finally:
            os.close(fd)
        reply = self._call("RegisterRegion", pb.RegisterRegionRequest(
            name=name, memfd=pb.MemfdSource(fd_ticket=ticket, nbytes=nbytes, writer_base=writer_base),
            tracking=MODES[TrackingMode(tracking)], block_size=block_size))
        # The writer's mapping lives as long as the region (not the handle): sync/async tracking is registered on it,
        # and a handle dropped by the caller must not unmap it under the server's tracker.
        self._mappings[name] = array
        return RegionHandle(self, name, array[:nbytes], _region(reply.region))

    def _auto_tracking_setup(self, array: npt.NDArray[np.uint8]) -> tuple[list[int], int]:
        """For ``tracking="auto"``: prepare the strongest mode the server lists that this process can set up
        (sync, then async); no fds (explicit) when neither works. The server infers the mode from the fds."""
        if self._modes is None:
            self._modes = set(self.stats().tracking_modes)
        # A server in this very process (tests embed one) handles sync faults in a Python thread that a writer
        # faulting with the GIL held would wait for forever, and its async scans of its own pagemap are refused:
        # there, auto is explicit.
        if isinstance(self._transport, SideChannelTransport) and self._transport.server_pid == os.getpid():
            return [], 0
        for mode in ("sync", "async"):
            if mode in self._modes:
                try:
                    return _remote_tracking_setup(mode, array)
                except (errors.UnsupportedModeError, OSError):
                    continue  # e.g. no userfaultfd for this user: try the next mode
        return [], 0

    def register_file(self, name: str, path: str | os.PathLike[str], *, tracking: str = TrackingMode.FILE,
                      block_size: int = 0) -> RegionHandle:
        """Replicate a regular file of this host (read-only). This process opens it to prove it may read it.

        ``tracking="file"`` (default, as in process and ``devrep add``): rewrites are noticed (inotify + page
        hashes), so a fresh acquire never returns old bytes; ``"explicit"`` only when asked for."""
        p = Path(path).resolve()
        if tracking not in ("file", "explicit", "auto"):
            raise errors.InvalidArgumentError(f"file regions track 'file' or 'explicit', not {tracking!r}")
        ticket = ""
        if self._sc is not None:
            try:
                # O_NONBLOCK: a FIFO (or a path swapped for one) must not park this process in open(2)
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
            except FileNotFoundError:
                raise errors.NotFoundError(f"no such file: {p}") from None
            except OSError as exc:
                raise errors.PermissionDeniedError(f"cannot open {p}: {exc.strerror}") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise errors.InvalidArgumentError(f"{p} is not a regular file")
                ticket = self._put_fds("file", [fd])
            finally:
                os.close(fd)
        reply = self._call("RegisterRegion", pb.RegisterRegionRequest(
            name=name, file=pb.FileSource(path=str(p), fd_ticket=ticket), tracking=MODES[TrackingMode(tracking)],
            block_size=block_size))
        return RegionHandle(self, name, None, _region(reply.region))

    def unregister(self, name: str) -> None:
        self._call("UnregisterRegion", pb.UnregisterRegionRequest(name=name))
        self._mappings.pop(name, None)

    def list_regions(self, *, all_sessions: bool = False) -> list[RegionDescription]:
        """This session's regions and those shared with it; ``all_sessions``: every session's (root on the
        server's local socket only, else ``PermissionDeniedError``)."""
        request = pb.ListRegionsRequest(all=all_sessions)
        return [_region(r) for r in self._call("ListRegions", request).regions]

    def describe(self, name: str) -> RegionDescription:
        return _region(self._call("DescribeRegion", pb.DescribeRegionRequest(name=name)).region)

    def share(self, name: str, with_: str = "*", *, revoke: bool = False) -> None:
        """Let other sessions acquire and watch ``name`` read-only: ``with_`` is ``"*"``, ``"uid:<n>"`` or
        ``"label:<label>"``."""
        self._call("ShareRegion", pb.ShareRegionRequest(name=name, grantee=with_, revoke=revoke))

    # ------------------------------------------------------------------ replication
    def replicate(self, name: str, devices: Sequence[str], *, progress: Progress | None = None,
                  timeout: float | None = None) -> SyncReport:
        """Create the missing replicas on ``devices`` and bring all up to date; ``progress(done, total)``."""
        request = pb.ReplicateRequest(name=name, devices=list(devices),
                                      timeout_ms=int(timeout * 1000) if timeout else 0)
        for message in self._transport.stream("Replicate", request, metadata=self._metadata,
                                              timeout=(timeout or 30.0) + self.timeout):
            if message.HasField("report"):
                if progress:
                    progress(message.report.bytes_copied, message.bytes_total)
                return _report(message.report)
            if progress:
                progress(message.bytes_copied, message.bytes_total)
        raise errors.DevrepError("Replicate ended without a report")

    def sync(self, name: str, devices: Sequence[str] = (), *, timeout: float | None = None) -> SyncReport:
        reply = self._call("Sync", pb.SyncRequest(name=name, devices=list(devices),
                                                           timeout_ms=int(timeout * 1000) if timeout else 0),
                           timeout=(timeout or 30.0) + self.timeout)
        return _report(reply.report)

    def acquire(self, name: str, device: str, *, fresh: bool = True, timeout: float | None = None) -> ClientLease:
        """Lease the replica; ``fresh=True`` waits (bounded by ``timeout``) until every page is valid.

        Over a local socket the whole acquire is one side-channel round trip that also carries the replica fd;
        otherwise it is the gRPC ``Acquire``. ``numa:local`` is resolved here, on the calling thread, into
        ``numa:near:<its node>``: the server picks the replica on that node or the nearest one.
        """
        request = pb.AcquireRequest(name=name, device=numa.client_device(device), fresh=fresh,
                                    timeout_ms=int(timeout * 1000) if timeout else 0)
        got = self._transport.acquire(request, metadata=self._metadata, timeout=(timeout or 30.0) + self.timeout)
        try:
            if got.holder_ttl > 0:
                self._start_heartbeat(got.holder_ttl)
            return ClientLease(self, name, got.grant, got.fd)
        finally:
            if got.fd >= 0:
                os.close(got.fd)

    def _start_heartbeat(self, ttl: float) -> None:
        """Keep this process's gRPC leases: a ``Ping`` carrying the holder id every quarter TTL until ``close()``."""
        with self._ipc_lock:  # (any lock of this client: two first gRPC acquires must not start two threads)
            if self._heartbeat_thread is not None or self._closed.is_set():
                return
            self._heartbeat_thread = threading.Thread(target=self._beat, args=(ttl,), name="devrep-lease-heartbeat",
                                                      daemon=True)
            self._heartbeat_thread.start()

    def _beat(self, ttl: float) -> None:
        while not self._closed.wait(max(0.05, ttl / 4)):
            with contextlib.suppress(errors.DevrepError):
                self._call("Ping", pb.PingRequest(), timeout=max(1.0, ttl / 2))

    def invalidate(self, name: str, offset: int = 0, length: int | None = None, *,
                   runs: npt.ArrayLike | None = None) -> int:
        """Report host writes (explicit tracking): a byte range, or page ``runs`` ([first, count] rows)."""
        request = pb.InvalidateRequest(name=name, offset=offset, length=length or 0)
        if runs is not None:
            request.runs.extend(np.asarray(runs, dtype=np.int64).reshape(-1).tolist())
        return int(self._call("Invalidate", request).generation)

    def verify(self, name: str, devices: Sequence[str] = (), *, resync: bool = True) -> list[VerifyReport]:
        reply = self._call("Verify", pb.VerifyRequest(name=name, devices=list(devices), resync=resync),
                           timeout=max(self.timeout, 120.0))
        return [VerifyReport(name, r.device, r.pages_checked, _runs(r.mismatched_runs), r.resynced,
                             r.stale_pages)
                for r in reply.reports]

    def watch(self, names: Sequence[str] | str = (), *, coalesce_ms: int = 2, max_events: int | None = None,
              timeout: float | None = None) -> EventStream:
        """Events of the named regions (all visible ones when empty) until ``cancel()``. Every event after this
        returns is delivered (unless the stream falls ``MAX_QUEUE`` events behind: ``EventStream.dropped``).

        Bounded: the stream ends by itself after ``max_events`` events and/or ``timeout`` seconds (then iteration
        simply stops; no error)."""
        if isinstance(names, str):
            names = [names]
        if max_events is not None and (not isinstance(max_events, int) or max_events <= 0):
            raise errors.InvalidArgumentError(f"max_events must be a positive integer, got {max_events!r}")
        if timeout is not None and not timeout > 0:
            raise errors.InvalidArgumentError(f"timeout must be positive seconds, got {timeout!r}")
        # A cancelled stream just ends; so does a bounded one at its deadline (DEADLINE_EXCEEDED is its normal end).
        ends = {"CANCELLED", "DEADLINE_EXCEEDED"} if timeout is not None else {"CANCELLED"}
        call = self._transport.stream("Watch", pb.WatchRequest(names=list(names), coalesce_ms=coalesce_ms),
                                      metadata=self._metadata, timeout=timeout, ends=ends)
        try:
            call.wait_ready()  # the server sends it once the watcher is registered: no event is missed after
        except errors.DevrepError as exc:
            if exc.grpc_code == "DEADLINE_EXCEEDED" and timeout is not None:
                return EventStream(call, max_events=0)  # the whole timeout passed: nothing to yield
            raise
        return EventStream(call, max_events=max_events)

    def acquire_safetensors(self, name: str, device: str, *, fresh: bool = True) -> Any:
        """A replicated safetensors file as ``{tensor name: read-only numpy array}`` (zero-copy views)."""
        from ..safetensors_io import SafetensorsLease

        return SafetensorsLease(self.acquire(name, device, fresh=fresh))

    # ------------------------------------------------------------------ lifetime
    def server_alive(self, timeout: float = 5.0) -> bool:
        """Whether the server still holds this session, waiting up to ``timeout`` seconds for a sign of the
        contrary (``False`` as soon as there is one).

        Over a local socket the side-channel connection is the session's lifeline: it ends exactly when the server
        stops or dies. Without one (TCP, token sessions) a ping follows the wait: unreachable or an ended session
        is ``False``; a slow answer (a loaded server) is not taken for a dead one."""
        if isinstance(self._transport, SideChannelTransport) and self._transport.side_channel:
            return not self._transport.peer_closed(timeout)
        time.sleep(timeout)
        try:
            self._call("Ping", pb.PingRequest(), timeout=min(self.timeout, 10.0))
        except (ServiceUnavailableError, UnauthenticatedError):
            return False
        except errors.DevrepError:
            pass
        return True

    def close(self) -> None:
        """End the session (its regions and leases go) and close the connection. CUDA replicas still mapped
        here are closed first, after the GPU finished the work this process queued on them."""
        self._closed.set()
        self._mappings.clear()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5)
            self._heartbeat_thread = None
        with self._ipc_lock:
            entries, self._ipc = list(self._ipc.values()), {}
        try:
            for entry in entries:
                # A dead CUDA context has no kernels left to wait for: closing the session must still happen.
                with contextlib.suppress(Exception):
                    self._unmap(entry)
        finally:
            self._close_session()

    def _close_session(self) -> None:
        if self._sc is not None:
            with contextlib.suppress(errors.DevrepError):
                self._sc.call({"op": "bye"})
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remote_tracking_setup(mode: str, array: npt.NDArray[np.uint8]) -> tuple[list[int], int]:
    """Client half of sync/async tracking: a userfaultfd registered on (and write-protecting) this process's
    mapping of the memfd, plus ``/proc/self/pagemap`` for async. Returns ``(fds, writer_base)``."""
    from ..memory import buffer_address

    if mode == "sync":
        from ..protect import prepare_sync_client

        return [prepare_sync_client(array)], buffer_address(array)
    from ..protect import prepare_async_client

    uffd, pagemap = prepare_async_client(array)
    return [uffd, pagemap], buffer_address(array)


def connect(address: str | None = None, *, token: str | None = None, label: str | None = None,
            timeout: float = 10.0, credentials: grpc.ChannelCredentials | None = None,
            server_uid: int | None = None, transport: Transport | None = None) -> Client:
    """Open a session with the devrep server at ``address`` (default: ``DEVREP_ADDRESS``, else the default socket).

    ``token`` (default ``DEVREP_TOKEN``) is a pre-authorized token; without one the side channel issues one.
    The side channel's server must run as root, as this user, or as ``server_uid`` (or a uid in
    ``DEVREP_SERVER_UID``); otherwise ``PermissionDeniedError`` is raised before any token or fd is sent.
    Raises ``ServiceUnavailableError`` when no server answers. ``transport``: talk through this instead of dialing
    ``address`` (e.g. ``devrep.testing.MockTransport``).
    """
    return Client(address or default_address(), token=token, label=label, timeout=timeout, credentials=credentials,
                  server_uid=server_uid, transport=transport)
