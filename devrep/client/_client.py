"""The client: gRPC for calls, the fd side channel for memfds and replica fds (see docs/api.md)."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from .. import errors
from .._pages import PAGE_SIZE, RunArray, pages_for
from ..memory import F_SEAL_GROW, F_SEAL_SHRINK, add_seals, map_fd, memfd_create
from ..region import Event, RegionInfo, RegionStats, ReplicaInfo, SyncReport, VerifyReport
from ..service import protocol
from ..service._gen import devrep_pb2 as pb
from ..service._gen import devrep_pb2_grpc as pb_grpc
from ..service.server import default_address, unix_path
from ..service.servicer import HOLDER_KEY, HOLDER_TTL_KEY
from ..service.sessions import UnauthenticatedError
from ..service.status import ERROR_CLASS_KEY

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``."""

MODES = {"auto": pb.TRACKING_MODE_UNSPECIFIED, "explicit": pb.TRACKING_MODE_EXPLICIT, "sync": pb.TRACKING_MODE_SYNC,
         "async": pb.TRACKING_MODE_ASYNC, "file": pb.TRACKING_MODE_FILE}


class ServiceUnavailableError(errors.DevrepError, ConnectionError):
    """The server cannot be reached (not running, wrong address, shutting down)."""

    grpc_code = "UNAVAILABLE"


_ERRORS: dict[grpc.StatusCode, type[errors.DevrepError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.LeaseTimeoutError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
}
_BY_NAME: dict[str, type[errors.DevrepError]] = {code.name: cls for code, cls in _ERRORS.items()}


def _error_classes() -> dict[str, type[errors.DevrepError]]:
    """Every class the server may name in ``devrep-error`` / the side channel's ``class``."""
    found = {value.__name__: value for value in vars(errors).values()
             if isinstance(value, type) and issubclass(value, errors.DevrepError)}
    for cls in (UnauthenticatedError, ServiceUnavailableError):
        found[cls.__name__] = cls
    return found


_CLASSES = _error_classes()


def error_class(code_name: str, class_name: str | None) -> type[errors.DevrepError]:
    """The most specific class for a status: the class the server named when it belongs to that status, else the
    status's class. A DEADLINE_EXCEEDED the server did not name is the call's own gRPC deadline (transport), not a
    lease timeout."""
    named = _CLASSES.get(class_name or "")
    if named is not None and named.grpc_code == code_name:
        return named
    if code_name == "DEADLINE_EXCEEDED":
        return errors.DeadlineExceededError
    return _BY_NAME.get(code_name, errors.DevrepError)


NO_SERVER_HINT = ("start one with `devrep serve` (as root: `sudo devrep serve`), or point DEVREP_ADDRESS (or "
                  "--address) at the running server's socket")
SCHEMES = ("unix:", "dns:", "ipv4:", "ipv6:", "unix-abstract:", "vsock:")


def _denied_hint(path: Path) -> str:
    return (f"permission denied connecting to {path}: this user may not use the devrep socket; run the server with "
            "`devrep serve --socket-group <group>` and join that group (or use a token), see docs/api.md")


def _exists(path: Path) -> bool:
    """Whether the side-channel socket is there; a directory this user cannot search is a permission problem,
    not a missing server."""
    try:
        os.stat(path)
    except PermissionError:
        raise errors.PermissionDeniedError(_denied_hint(path)) from None
    except OSError:
        return False
    return True


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


def _translate(exc: grpc.RpcError) -> errors.DevrepError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    class_name = next((str(v) for k, v in trailing or () if k == ERROR_CLASS_KEY), None)
    cls = error_class(code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN", class_name)
    message = exc.details() if hasattr(exc, "details") else str(exc)
    if cls is errors.DeadlineExceededError and class_name is None:
        message = f"the devrep server did not answer within the call's deadline ({message})"
    elif cls is ServiceUnavailableError and class_name is None:  # nobody answered at the address
        message = f"{message}; {NO_SERVER_HINT}"
    err = cls(message)
    err.status = code  # type: ignore[attr-defined]
    return err


def _runs(flat: Sequence[int]) -> RunArray:
    return np.asarray(flat, dtype=np.int64).reshape(-1, 2)


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


class _SideChannel:
    """The client end of the fd side channel (one per Client; requests are serialized)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except PermissionError:
            self.sock.close()
            raise errors.PermissionDeniedError(_denied_hint(path)) from None
        except OSError as exc:
            self.sock.close()
            raise ServiceUnavailableError(f"cannot connect to the devrep fd side channel {path}: {exc.strerror}; "
                                          f"{NO_SERVER_HINT}") from None
        self.lock = threading.Lock()
        self.timeout = timeout
        try:
            self.server_pid: int | None = struct.unpack(
                "3i", self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        except OSError:
            self.server_pid = None

    def call(self, message: dict[str, Any], fds: Sequence[int] = (), timeout: float | None = None
             ) -> tuple[dict[str, Any], list[int]]:
        with self.lock:
            try:
                self.sock.settimeout(timeout or self.timeout)
                protocol.send(self.sock, message, list(fds))
                reply, got = protocol.recv(self.sock)
            except (OSError, TimeoutError) as exc:
                raise ServiceUnavailableError(f"devrep side channel failed: {exc}") from None
        if reply is None:
            raise ServiceUnavailableError("the devrep server closed the side channel")
        if not reply.get("ok"):
            protocol.close_fds(got)
            cls = error_class(str(reply.get("code")), str(reply.get("class") or ""))
            raise cls(str(reply.get("error")))
        return reply, got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class ClientLease:
    """A read lease on a replica. ``array`` is a read-only numpy view of a CPU replica (zero-copy: the replica's
    memfd mapped into this process); ``to_cupy()`` opens a CUDA replica through IPC. The replica stays as it is
    until ``release()`` (or leaving the ``with`` block); do not use the arrays after that."""

    def __init__(self, client: Client, name: str, reply: pb.AcquireResponse | dict[str, Any], fd: int = -1) -> None:
        self._client = client
        self.region = name
        if isinstance(reply, dict):  # from the side channel's one-round-trip acquire
            reply = pb.AcquireResponse(
                lease_id=reply["lease"], generation=reply["generation"], invalid_runs=reply["invalid_runs"],
                nbytes=reply["nbytes"], device=reply["device"], export_kind=reply["export_kind"],
                buffer_nbytes=reply["buffer_nbytes"], cuda_ipc_handle=bytes.fromhex(reply["cuda_ipc_handle"]))
            self._via_side_channel = True
        else:
            self._via_side_channel = False
        self.lease_id = reply.lease_id
        self.generation = reply.generation
        self.invalid_runs = _runs(reply.invalid_runs)
        self.device = reply.device
        self.nbytes = reply.nbytes
        self.export_kind = reply.export_kind
        self.cuda_ipc_handle = bytes(reply.cuda_ipc_handle)
        self._buffer_nbytes = reply.buffer_nbytes or pages_for(reply.nbytes) * PAGE_SIZE
        self._array: npt.NDArray[np.uint8] | None = None
        self._ipc_opened = False
        self.released = False
        if fd >= 0:
            self._array = map_fd(fd, self._buffer_nbytes, writable=False)[: self.nbytes]

    def _map(self) -> None:
        _, fds = self._client._side().call({"op": "lease_fd", "lease": self.lease_id})
        try:
            if len(fds) != 1:
                raise errors.DevrepError(f"expected one replica fd, got {len(fds)}")
            self._array = map_fd(fds[0], self._buffer_nbytes, writable=False)[: self.nbytes]
        finally:
            protocol.close_fds(fds)

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """The replica bytes, read-only (CPU replicas)."""
        if self.released:
            raise errors.FailedPreconditionError("lease already released")
        if self._array is None:
            if self.export_kind != "fd":
                raise errors.FailedPreconditionError(
                    f"replica on {self.device} exports {self.export_kind!r}; use to_cupy() for CUDA replicas")
            self._map()
        assert self._array is not None
        return self._array

    def to_cupy(self) -> Any:
        """The replica as a CuPy uint8 array in this process (CUDA IPC, zero-copy). CuPy has no read-only arrays:
        do not write it (the next sync would overwrite it anyway). Valid until ``release()``.

        Kernels run asynchronously: when ``release()`` is called, kernels already queued on this process's streams
        (CuPy's, or a DLPack consumer's such as torch's) may still be reading the buffer, and once the server hears
        of the release its next sync may overwrite it. So ``release()`` first waits for all work this process has
        queued on the replica's GPU (``cudaDeviceSynchronize``), then tells the server: release costs as much as
        finishing that work. Do not queue work on the array after releasing."""
        if self.export_kind != "cuda_ipc":
            raise errors.FailedPreconditionError(f"replica on {self.device} is not a CUDA replica")
        if self.released:
            raise errors.FailedPreconditionError("lease already released")
        import cupy  # optional dependency: devrep[cuda]

        index = int(self.device.partition(":")[2])
        ptr = self._client._ipc_open(self.cuda_ipc_handle, index)
        self._ipc_opened = True
        with cupy.cuda.Device(index):
            mem = cupy.cuda.UnownedMemory(ptr, self._buffer_nbytes, self, device_id=index)
            return cupy.ndarray((self.nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(mem, 0))

    def __dlpack__(self, **kwargs: Any) -> Any:
        if self.export_kind == "cuda_ipc":
            return self.to_cupy().__dlpack__(**kwargs)
        kwargs.setdefault("max_version", (1, 0))  # DLPack >= 1.0 can flag the tensor read-only
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        if self.export_kind == "cuda_ipc":
            return self.to_cupy().__dlpack_device__()
        return self.array.__dlpack_device__()

    def release(self) -> None:
        """End the lease: the server may then sync (overwrite) this buffer. For a CUDA replica opened in this
        process, first wait until the GPU has finished every kernel queued here (see ``to_cupy``)."""
        if not self.released:
            self.released = True
            self._array = None
            try:
                if self._ipc_opened:
                    self._wait_for_gpu_readers()
                    self._client._ipc_close(self.cuda_ipc_handle)
            finally:  # a failed wait means the context is dead: no kernel of ours reads the buffer any more
                if self._via_side_channel and self._client._sc is not None:
                    self._client._sc.call({"op": "release", "lease": self.lease_id})
                else:
                    self._client._call(self._client._stub.Release, pb.ReleaseRequest(lease_id=self.lease_id))

    def _wait_for_gpu_readers(self) -> None:
        # The whole device, not only CuPy's current stream: DLPack consumers (torch) read on their own streams.
        import cupy

        with cupy.cuda.Device(int(self.device.partition(":")[2])):
            cupy.cuda.runtime.deviceSynchronize()

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
    """Iterator of ``devrep.Event`` from a Watch stream. ``cancel()`` (or ``close()``) ends it."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.dropped = 0

    def __iter__(self) -> Iterator[Event]:
        try:
            for message in self._call:
                self.dropped += message.dropped
                for e in message.events:
                    yield Event(e.kind, e.region, e.generation, _runs(e.runs), e.device or None,
                                message=e.message)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise _translate(exc) from None

    def batches(self) -> Iterator[list[Event]]:
        """One list per message (the server's coalesced batches)."""
        try:
            for message in self._call:
                self.dropped += message.dropped
                yield [Event(e.kind, e.region, e.generation, _runs(e.runs), e.device or None, message=e.message)
                       for e in message.events]
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise _translate(exc) from None

    def cancel(self) -> None:
        self._call.cancel()

    close = cancel

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client:
    """A session with a devrep server. Create with ``connect()``; close with ``close()`` (or ``with``): closing
    ends the session, which unregisters its regions and releases its leases."""

    def __init__(self, address: str, *, token: str | None = None, label: str | None = None,
                 fd_socket: str | os.PathLike[str] | None = None, timeout: float = 10.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = check_address(address)
        self.timeout = timeout
        self._ipc: dict[bytes, list[int]] = {}
        self._ipc_lock = threading.Lock()
        self._closed = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._modes: set[str] | None = None
        self._mappings: dict[str, npt.NDArray[np.uint8]] = {}
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        target = f"unix:{unix_path(address)}" if unix_path(address) is not None else address
        self._channel = (grpc.secure_channel(target, credentials, options) if credentials
                         else grpc.insecure_channel(target, options))
        self._stub = pb_grpc.DevrepServiceStub(self._channel)
        sock = unix_path(address)
        fd_path = Path(fd_socket) if fd_socket else (
            Path(os.environ["DEVREP_FD_SOCKET"]) if os.environ.get("DEVREP_FD_SOCKET")
            else protocol.side_channel_path(sock) if sock else None)
        self._fd_path = fd_path
        self._sc: _SideChannel | None = None
        token = token or os.environ.get("DEVREP_TOKEN") or None
        try:
            if fd_path is not None and _exists(fd_path):
                self._sc = _SideChannel(fd_path, timeout)
                hello: dict[str, Any] = {"op": "hello", "label": label or f"pid{os.getpid()}"}
                if token:
                    hello["token"] = token
                reply, _ = self._sc.call(hello)
                token = str(reply["token"])
                self.session_id = str(reply["session"])
            elif fd_path is not None and sock is not None and not token:
                raise ServiceUnavailableError(f"no devrep server at {address} (no side channel {fd_path}); "
                                              f"{NO_SERVER_HINT}")
            if not token:
                raise UnauthenticatedError(f"{address} has no fd side channel here: set DEVREP_TOKEN to a "
                                           "pre-authorized token")
            # The holder id names this process's gRPC-acquired leases: the server releases them when this client
            # stops calling for the holder TTL (it died), see _heartbeat.
            self._holder = secrets.token_hex(16)
            self._metadata = (("authorization", f"Bearer {token}"), (HOLDER_KEY, self._holder))
            self.token = token
            self.session_id = self._call(self._stub.Ping, pb.PingRequest()).session_id
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ CUDA IPC
    def _ipc_open(self, handle: bytes, index: int) -> int:
        """Open a CUDA IPC handle once per process (a second cudaIpcOpenMemHandle of the same handle fails);
        reference-counted across leases of the same replica buffer."""
        import cupy

        with self._ipc_lock:
            entry = self._ipc.get(handle)
            if entry is None:
                with cupy.cuda.Device(index):
                    ptr = int(cupy.cuda.runtime.ipcOpenMemHandle(handle))
                entry = self._ipc[handle] = [ptr, index, 0]
            entry[2] += 1
            return entry[0]

    def _ipc_close(self, handle: bytes) -> None:
        import cupy

        with self._ipc_lock:
            entry = self._ipc.get(handle)
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] == 0:
                del self._ipc[handle]
                with cupy.cuda.Device(entry[1]):
                    cupy.cuda.runtime.deviceSynchronize()  # no kernel may still read it
                    cupy.cuda.runtime.ipcCloseMemHandle(entry[0])

    # ------------------------------------------------------------------ plumbing
    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    def _side(self) -> _SideChannel:
        if self._sc is None:
            raise errors.FailedPreconditionError(
                "this client has no fd side channel (TCP address): memfd regions and CPU replica mappings need "
                "the server's Unix socket on this host")
        return self._sc

    def _put_fds(self, kind: str, fds: Sequence[int]) -> str:
        reply, _ = self._side().call({"op": "put_fds", "kind": kind}, fds)
        return str(reply["ticket"])

    # ------------------------------------------------------------------ server
    def ping(self) -> str:
        return str(self._call(self._stub.Ping, pb.PingRequest()).session_id)

    def stats(self) -> ServerInfo:
        """Server-wide counters, the devices, tracking modes and this session's quota use."""
        r = self._call(self._stub.GetServerInfo, pb.GetServerInfoRequest())
        return ServerInfo(r.version, list(r.devices), r.sessions, r.regions, r.leases, r.host_bytes,
                          list(r.tracking_modes), r.session_id, r.quota.max_bytes, r.quota.max_regions,
                          r.quota.used_bytes, r.quota.used_regions)

    # ------------------------------------------------------------------ regions
    def create_region(self, name: str, nbytes: int, *, tracking: str = "auto", block_size: int = 0
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
        reply = self._call(self._stub.RegisterRegion, pb.RegisterRegionRequest(
            name=name, memfd=pb.MemfdSource(fd_ticket=ticket, nbytes=nbytes, writer_base=writer_base),
            tracking=MODES[tracking], block_size=block_size))
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
        if self._sc is not None and self._sc.server_pid == os.getpid():
            return [], 0
        for mode in ("sync", "async"):
            if mode in self._modes:
                try:
                    return _remote_tracking_setup(mode, array)
                except (errors.UnsupportedModeError, OSError):
                    continue  # e.g. no userfaultfd for this user: try the next mode
        return [], 0

    def register_file(self, name: str, path: str | os.PathLike[str], *, tracking: str = "file",
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
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise errors.NotFoundError(f"no such file: {p}") from None
            except OSError as exc:
                raise errors.PermissionDeniedError(f"cannot open {p}: {exc.strerror}") from None
            try:
                ticket = self._put_fds("file", [fd])
            finally:
                os.close(fd)
        reply = self._call(self._stub.RegisterRegion, pb.RegisterRegionRequest(
            name=name, file=pb.FileSource(path=str(p), fd_ticket=ticket), tracking=MODES[tracking],
            block_size=block_size))
        return RegionHandle(self, name, None, _region(reply.region))

    def unregister(self, name: str) -> None:
        self._call(self._stub.UnregisterRegion, pb.UnregisterRegionRequest(name=name))
        self._mappings.pop(name, None)

    def list_regions(self) -> list[RegionDescription]:
        return [_region(r) for r in self._call(self._stub.ListRegions, pb.ListRegionsRequest()).regions]

    def describe(self, name: str) -> RegionDescription:
        return _region(self._call(self._stub.DescribeRegion, pb.DescribeRegionRequest(name=name)).region)

    def share(self, name: str, with_: str = "*", *, revoke: bool = False) -> None:
        """Let other sessions acquire and watch ``name`` read-only: ``with_`` is ``"*"``, ``"uid:<n>"`` or
        ``"label:<label>"``."""
        self._call(self._stub.ShareRegion, pb.ShareRegionRequest(name=name, grantee=with_, revoke=revoke))

    # ------------------------------------------------------------------ replication
    def replicate(self, name: str, devices: Sequence[str], *, progress: Progress | None = None,
                  timeout: float | None = None) -> SyncReport:
        """Create the missing replicas on ``devices`` and bring all up to date; ``progress(done, total)``."""
        request = pb.ReplicateRequest(name=name, devices=list(devices),
                                      timeout_ms=int(timeout * 1000) if timeout else 0)
        try:
            for message in self._stub.Replicate(request, metadata=self._metadata,
                                                timeout=(timeout or 30.0) + self.timeout):
                if message.HasField("report"):
                    if progress:
                        progress(message.report.bytes_copied, message.bytes_total)
                    return _report(message.report)
                if progress:
                    progress(message.bytes_copied, message.bytes_total)
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        raise errors.DevrepError("Replicate ended without a report")

    def sync(self, name: str, devices: Sequence[str] = (), *, timeout: float | None = None) -> SyncReport:
        reply = self._call(self._stub.Sync, pb.SyncRequest(name=name, devices=list(devices),
                                                           timeout_ms=int(timeout * 1000) if timeout else 0),
                           timeout=(timeout or 30.0) + self.timeout)
        return _report(reply.report)

    def acquire(self, name: str, device: str, *, fresh: bool = True, timeout: float | None = None) -> ClientLease:
        """Lease the replica; ``fresh=True`` waits (bounded by ``timeout``) until every page is valid.

        Over a local socket the whole acquire is one side-channel round trip that also carries the replica fd;
        otherwise it is the gRPC ``Acquire``.
        """
        if self._sc is not None:
            message = {"op": "acquire", "name": name, "device": device, "fresh": fresh,
                       "timeout_ms": int(timeout * 1000) if timeout else 0}
            reply, fds = self._sc.call(message, timeout=(timeout or 30.0) + self.timeout)
            try:
                lease = ClientLease(self, name, reply, fds[0] if fds else -1)
            finally:
                protocol.close_fds(fds)
            return lease
        try:
            reply, call = self._stub.Acquire.with_call(pb.AcquireRequest(
                name=name, device=device, fresh=fresh, timeout_ms=int(timeout * 1000) if timeout else 0),
                metadata=self._metadata, timeout=(timeout or 30.0) + self.timeout)
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        ttl_ms = next((int(v) for k, v in call.trailing_metadata() or () if k == HOLDER_TTL_KEY), 0)
        if ttl_ms > 0:
            self._start_heartbeat(ttl_ms / 1000)
        return ClientLease(self, name, reply)

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
                self._call(self._stub.Ping, pb.PingRequest(), timeout=max(1.0, ttl / 2))

    def invalidate(self, name: str, offset: int = 0, length: int | None = None, *,
                   runs: npt.ArrayLike | None = None) -> int:
        """Report host writes (explicit tracking): a byte range, or page ``runs`` ([first, count] rows)."""
        request = pb.InvalidateRequest(name=name, offset=offset, length=length or 0)
        if runs is not None:
            request.runs.extend(np.asarray(runs, dtype=np.int64).reshape(-1).tolist())
        return int(self._call(self._stub.Invalidate, request).generation)

    def verify(self, name: str, devices: Sequence[str] = (), *, resync: bool = True) -> list[VerifyReport]:
        reply = self._call(self._stub.Verify, pb.VerifyRequest(name=name, devices=list(devices), resync=resync),
                           timeout=max(self.timeout, 120.0))
        return [VerifyReport(name, r.device, r.pages_checked, _runs(r.mismatched_runs), r.resynced)
                for r in reply.reports]

    def watch(self, names: Sequence[str] | str = (), *, coalesce_ms: int = 2) -> EventStream:
        """Events of the named regions (all visible ones when empty) until ``cancel()``. Every event after this
        returns is delivered (unless the stream falls ``MAX_QUEUE`` events behind: ``EventStream.dropped``)."""
        if isinstance(names, str):
            names = [names]
        call = self._stub.Watch(pb.WatchRequest(names=list(names), coalesce_ms=coalesce_ms), metadata=self._metadata)
        try:
            call.initial_metadata()  # the server sends it once the watcher is registered: no event is missed after
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        return EventStream(call)

    def acquire_safetensors(self, name: str, device: str, *, fresh: bool = True) -> Any:
        """A replicated safetensors file as ``{tensor name: read-only numpy array}`` (zero-copy views)."""
        from ..safetensors_io import SafetensorsLease

        return SafetensorsLease(self.acquire(name, device, fresh=fresh))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """End the session (its regions and leases go) and close the connection."""
        self._closed.set()
        self._mappings.clear()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5)
            self._heartbeat_thread = None
        if self._sc is not None:
            with contextlib.suppress(errors.DevrepError):
                self._sc.call({"op": "bye"})
            self._sc.close()
            self._sc = None
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remote_tracking_setup(mode: str, array: npt.NDArray[np.uint8]) -> tuple[list[int], int]:
    """Client half of sync/async tracking: a userfaultfd registered on (and write-protecting) this process's
    mapping of the memfd, plus ``/proc/self/pagemap`` for async. Returns ``(fds, writer_base)``."""
    from ..memory import buffer_address

    if mode == "sync":
        from ..tracking._sync import prepare_sync_client

        return [prepare_sync_client(array)], buffer_address(array)
    from ..tracking._async import prepare_async_client

    uffd, pagemap = prepare_async_client(array)
    return [uffd, pagemap], buffer_address(array)


def connect(address: str | None = None, *, token: str | None = None, label: str | None = None,
            timeout: float = 10.0, credentials: grpc.ChannelCredentials | None = None) -> Client:
    """Open a session with the devrep server at ``address`` (default: ``DEVREP_ADDRESS``, else the default socket).

    ``token`` (default ``DEVREP_TOKEN``) is a pre-authorized token; without one the side channel issues one.
    Raises ``ServiceUnavailableError`` when no server answers.
    """
    return Client(address or default_address(), token=token, label=label, timeout=timeout, credentials=credentials)
