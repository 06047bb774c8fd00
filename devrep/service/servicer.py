"""``devrep.v1.DevrepService``: each RPC checks its session and arguments, then calls the ``Replicator``."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np

from .. import __version__, numa
from .._pages import PAGE_SIZE, RunArray, check_block_size, pages_for, pages_from_runs
from ..backends import ExportHandle
from ..engine import Replicator
from ..errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnsupportedModeError,
)
from ..model import Event, RegionInfo, SyncReport, TrackingMode
from ..region import DEFAULT_TIMEOUT, Lease, Region, check_region_name
from ..tracking import TRACKERS, Tracker, _register_kernel_trackers, make_tracker
from ..wire import HOLDER_KEY, HOLDER_TTL_KEY
from ..wire._gen import devrep_pb2 as pb
from ..wire._gen import devrep_pb2_grpc as pb_grpc
from ..wire.sidechannel import close_fds
from .fileaccess import check_file_fd, kernel_path, open_as_peer
from .limits import Limiter, holding
from .sessions import Session, SessionRegistry, view_name
from .sidechannel import check_writer_mapping
from .status import streaming, unary
from .watch import MAX_RUNS_PER_MESSAGE, WatchHub

MODES = {
    pb.TRACKING_MODE_UNSPECIFIED: TrackingMode.AUTO,
    pb.TRACKING_MODE_EXPLICIT: TrackingMode.EXPLICIT,
    pb.TRACKING_MODE_SYNC: TrackingMode.SYNC,
    pb.TRACKING_MODE_ASYNC: TrackingMode.ASYNC,
    pb.TRACKING_MODE_FILE: TrackingMode.FILE,
}
AUTO_BY_FDS = {1: TrackingMode.EXPLICIT, 2: TrackingMode.SYNC, 3: TrackingMode.ASYNC}
"""``auto`` (TRACKING_MODE_UNSPECIFIED) on a memfd: the mode the client prepared fds for (memfd, +uffd for sync,
+uffd+pagemap for async). The client prepares the strongest mode this server lists and its kernel and privileges
allow (sync > async > explicit); should the server then be unable to run it, auto falls back to explicit."""
MAX_LIST = 64
MAX_RUNS_IN = 1_000_000
MAX_BLOCK_SIZE = 1 << 30
"""Largest ``block_size``: invalidating one block materialises its page numbers (8 bytes a page), so 2^37 cost
0.5 GiB of server memory per Invalidate and 2^40 got the server OOM-killed; 1 GiB blocks cost 2 MiB."""
MAX_TIMEOUT_MS = 3_600_000
"""Largest ``timeout_ms`` (one hour, as on the side channel): beyond it a wait overflowed the thread API."""
PROGRESS_INTERVAL = 0.05


def available_modes() -> list[str]:
    _register_kernel_trackers()
    return [str(mode) for mode in sorted(TRACKERS)]


MAX_HOLDER_LEN = 128


def holder_of(context: grpc.ServicerContext) -> str | None:
    """The ``x-devrep-holder`` id of a call: a client that takes leases over plain gRPC names itself with a random id
    and repeats it on a call (e.g. ``Ping``) at least every holder TTL; leases it acquired with that id are released
    once it falls silent for the TTL (its process died or its connection broke). See docs/api.md."""
    for key, value in context.invocation_metadata() or ():
        if key == HOLDER_KEY and isinstance(value, str):
            if not 0 < len(value) <= MAX_HOLDER_LEN:
                raise InvalidArgumentError(f"{HOLDER_KEY} must be 1..{MAX_HOLDER_LEN} characters")
            return value
    return None


def token_of(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-devrep-token" and isinstance(value, str):
            return value.strip()
    return None


MAX_NAME = 200
"""Longest region name over the service: the server keys it as ``<session id>/<name>``, which must stay within
the engine's 255 characters."""


def check_name(name: str) -> str:
    if not name:
        raise InvalidArgumentError("name is required")
    if len(name) > MAX_NAME:
        raise InvalidArgumentError(f"region names are at most {MAX_NAME} characters over the service, got {len(name)}")
    return check_region_name(name)


def check_devices(devices: Any, *, required: bool) -> list[str]:
    devices = list(devices)
    if required and not devices:
        raise InvalidArgumentError("devices is required (e.g. ['cpu:0'])")
    if len(devices) > MAX_LIST:
        raise InvalidArgumentError(f"at most {MAX_LIST} devices per call, got {len(devices)}")
    return devices


def runs_in(flat: Any, npages: int) -> RunArray:
    """Validate flattened ``[first, count]`` pairs from a request."""
    values = np.asarray(flat, dtype=np.int64)
    if values.size > 2 * MAX_RUNS_IN:
        raise InvalidArgumentError(f"at most {MAX_RUNS_IN} runs per call")
    if values.size % 2:
        raise InvalidArgumentError("runs must be flattened [first, count] pairs (an even number of values)")
    runs = values.reshape(-1, 2)
    if np.any(runs[:, 0] < 0) or np.any(runs[:, 1] <= 0):
        raise InvalidArgumentError("every run needs first >= 0 and count > 0")
    # first + count could wrap around int64 (and look small): compare without adding.
    if np.any(runs[:, 0] >= npages) or np.any(runs[:, 1] > npages - runs[:, 0]):
        raise InvalidArgumentError(f"a run reaches past the region's {npages} pages")
    return runs


def flat(runs: RunArray) -> list[int]:
    out: list[int] = np.asarray(runs, dtype=np.int64).reshape(-1).tolist()
    return out


def timeout_of(timeout_ms: int, context: grpc.ServicerContext) -> float:
    """The request's timeout, bounded by the RPC deadline (default 30 s)."""
    if not 0 <= timeout_ms <= MAX_TIMEOUT_MS:
        raise InvalidArgumentError(f"timeout_ms must be in [0, {MAX_TIMEOUT_MS}], got {timeout_ms}")
    timeout = timeout_ms / 1000 if timeout_ms else DEFAULT_TIMEOUT
    remaining = context.time_remaining()
    if remaining is not None:
        timeout = min(timeout, max(0.0, remaining - 0.01))
    return timeout


def region_pb(info: RegionInfo, region: Region, owner: str, read_only: bool) -> pb.Region:
    s = info.stats
    return pb.Region(
        name=info.name, kind=info.kind, nbytes=info.nbytes, npages=info.npages, block_size=info.block_size,
        tracking=info.tracking, generation=info.generation, failed=info.failed or "", owner=owner,
        read_only=read_only, path=str(region.host.path or ""),
        replicas=[pb.Replica(device=r.device, valid_pages=r.valid_pages, generation=r.generation, leases=r.leases,
                             buffers=r.buffers, nbytes=r.nbytes) for r in info.replicas],
        stats=pb.RegionStats(**vars(s)),
    )


def report_pb(r: SyncReport) -> pb.SyncReport:
    return pb.SyncReport(region=r.region, generation=r.generation, pages_copied=r.pages_copied,
                         bytes_copied=r.bytes_copied, host_bytes_read=r.host_bytes_read, runs=r.runs,
                         seconds=r.seconds, devices=r.devices)


def remote_tracker(mode: TrackingMode, fds: list[int], writer_base: int, length: int) -> Tracker:
    """A sync/async tracker fed by the client's userfaultfd (and pagemap fd); it owns those fds from now on."""
    _register_kernel_trackers()
    cls = TRACKERS.get(mode)
    remote = getattr(cls, "remote", None) if cls is not None else None
    if remote is None:
        raise UnsupportedModeError(
            f"tracking mode '{mode}' is not available for client regions on this server "
            f"(available: {', '.join(available_modes())}); use explicit mode and Invalidate"
        )
    if not writer_base or writer_base % PAGE_SIZE:
        raise InvalidArgumentError(f"{mode} tracking needs the page-aligned address of the writer's mapping "
                                   f"(memfd.writer_base), got {writer_base:#x}")
    args = [fds[1], writer_base, length] if mode == TrackingMode.SYNC else [fds[1], fds[2], writer_base, length]
    tracker: Tracker = remote(*args)
    return tracker


class DevrepServicer(pb_grpc.DevrepServiceServicer):
    def __init__(self, replicator: Replicator, registry: SessionRegistry, hub: WatchHub, *,
                 max_streams: int = 16) -> None:
        self.rep = replicator
        self.reg = registry
        self.hub = hub
        self.stopping = threading.Event()
        # Watch streams hold a server thread each: cap them so unary calls always find a free thread.
        self._streams = threading.BoundedSemaphore(max_streams)
        self.max_streams = max_streams
        # Fair sharing (see limits.py): calls that may wait, and watch streams, per session and per uid.
        q = registry.quota
        self._busy = Limiter("waiting calls (RegisterRegion, Replicate, Sync, Acquire, Verify)", q.max_blocking,
                             functools.partial(registry.quota_error, "blocking"))
        self._busy_uid = Limiter("waiting calls (RegisterRegion, Replicate, Sync, Acquire, Verify)", q.max_blocking,
                                 functools.partial(registry.quota_error, "blocking"))
        self._watch_uid = Limiter("watch streams", min(q.max_watchers, max(1, max_streams // 2)),
                                  functools.partial(registry.quota_error, "watchers"))
        self.holder_ttl = 30.0
        """Seconds a gRPC lease holder may stay silent before its leases are released (``DevrepServer``)."""

    # ------------------------------------------------------------------ helpers
    def _session(self, context: grpc.ServicerContext) -> Session:
        session = self.reg.authenticate(token_of(context))
        holder = holder_of(context)
        if holder is not None:
            self.reg.touch_holder(session, holder)  # any authenticated call is the holder's heartbeat
        return session

    def _waiting(self, session: Session) -> contextlib.AbstractContextManager[None]:
        """Hold one of the session's (and its uid's) slots for a call that may wait (``Quota.max_blocking``)."""
        return holding((self._busy, session, f"session {session.label}"),
                       (self._busy_uid, session.principal, _principal_name(session)))

    def _region(self, session: Session, name: str, *, write: bool) -> tuple[Region, bool]:
        """The region ``name`` means to ``session`` (see ``SessionRegistry.resolve``) and whether it owns it."""
        check_name(name)
        key, owned = self.reg.check(session, name, write=write)
        return self.rep.region(key), owned

    @staticmethod
    def _guard_file(region: Region, *, check_only: bool = False) -> None:
        """A file truncated under its mapping makes every read of the lost pages SIGBUS, which would kill the whole
        service: check the size before anything reads the pages, and fail the region instead. (A truncation racing
        with a copy already under way is not caught here; see docs/api.md.)"""
        host = region.host
        if host.kind != "file" or host.fd is None or region.failed:
            return
        size = os.fstat(host.fd).st_size
        if size < region.nbytes:
            region.fail(f"{host.path} shrank from {region.nbytes} to {size} bytes under its replicas; "
                        "re-register the file")
            if check_only:
                return
            raise FailedPreconditionError(f"region {view_name(region.name)!r} failed: {region.failed}")

    def _describe(self, session: Session, region: Region) -> pb.Region:
        self._guard_file(region, check_only=True)
        owned = self.reg.owners.get(region.name) is session
        out = region_pb(region.describe(), region, self.reg.owner_label(region.name), not owned)
        out.name = view_name(region.name)
        return out

    # ------------------------------------------------------------------ RPCs
    @unary
    def Ping(self, request: pb.PingRequest, context: grpc.ServicerContext) -> pb.PingResponse:
        return pb.PingResponse(session_id=self._session(context).id)

    @unary
    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext
                      ) -> pb.GetServerInfoResponse:
        session = self._session(context)
        self.rep.backend("cpu")
        regions = self.rep.regions()
        q = self.reg.quota
        return pb.GetServerInfoResponse(
            version=__version__, devices=self.rep.devices(), sessions=len(self.reg.sessions()),
            regions=len(regions), leases=self.reg.lease_count(), host_bytes=sum(r.nbytes for r in regions),
            tracking_modes=available_modes(), session_id=session.id,
            quota=pb.Quota(max_bytes=q.max_bytes, max_regions=q.max_regions,
                           used_bytes=self.reg.device_bytes(session), used_regions=len(session.regions)))

    @unary
    def RegisterRegion(self, request: pb.RegisterRegionRequest, context: grpc.ServicerContext
                       ) -> pb.RegisterRegionResponse:
        session = self._session(context)
        name = check_name(request.name)
        block_size = request.block_size or PAGE_SIZE
        if not 0 <= request.block_size <= MAX_BLOCK_SIZE:
            raise InvalidArgumentError(f"block_size must be in [0, {MAX_BLOCK_SIZE}], got {request.block_size}")
        check_block_size(block_size)
        if request.tracking not in MODES:
            raise InvalidArgumentError(f"unknown tracking mode {request.tracking}")
        mode = MODES[request.tracking]
        which = request.WhichOneof("source")
        if which is None:
            raise InvalidArgumentError("a region needs a source: memfd (an fd ticket) or file (a path)")
        self.reg.claim(session, name)
        key = self.reg.key(session, name)  # the session's own namespace: no other session's name shows here
        charged = [0, 0]  # (host bytes, fds) reserved for the region by the registration below
        try:
            with self._waiting(session):  # file tracking hashes the whole file: this may take a while
                if which == "memfd":
                    region = self._register_memfd(session, key, request.memfd, mode, block_size, charged)
                else:
                    region = self._register_file(session, key, request.file, mode, block_size, charged)
        except AlreadyExistsError:
            self.reg.unclaim(session, *charged)
            raise AlreadyExistsError(f"you already have a region named {name!r}") from None
        except BaseException:
            self.reg.unclaim(session, *charged)
            raise
        self.reg.adopt(session, key, *charged)
        return pb.RegisterRegionResponse(region=self._describe(session, region))

    def _charge(self, session: Session, charged: list[int], host_bytes: int, fds: int) -> None:
        """Reserve a region's host bytes and fds against the session's quota before the server maps anything."""
        self.reg.charge(session, host_bytes, fds)
        charged[:] = [host_bytes, fds]

    def _register_memfd(self, session: Session, name: str, src: pb.MemfdSource, mode: TrackingMode,
                        block_size: int, charged: list[int]) -> Region:
        if src.nbytes < 0:
            raise InvalidArgumentError(f"nbytes must be >= 0, got {src.nbytes}")
        if not src.fd_ticket:
            raise InvalidArgumentError("memfd.fd_ticket is required (hand the memfd over with put_fds first)")
        fds, pid = self.reg.take_ticket_with_pid(session, src.fd_ticket)
        auto = mode == TrackingMode.AUTO
        try:
            if mode == TrackingMode.FILE:
                raise InvalidArgumentError("file tracking needs a file source, not a memfd")
            if auto:
                mode = AUTO_BY_FDS.get(len(fds), TrackingMode.EXPLICIT)
            need = {TrackingMode.EXPLICIT: 1, TrackingMode.SYNC: 2, TrackingMode.ASYNC: 3}[mode]
            if len(fds) != need:
                raise InvalidArgumentError(f"{mode} tracking needs a ticket of {need} fds "
                                           f"(memfd{'+uffd' if need > 1 else ''}{'+pagemap' if need > 2 else ''}), "
                                           f"this one has {len(fds)}")
            size = os.fstat(fds[0]).st_size
            nbytes = src.nbytes or size
            if nbytes > size:
                raise InvalidArgumentError(f"nbytes {nbytes} exceeds the memfd's size {size}")
            # A sparse memfd costs its owner nothing: count its size at registration (Quota.max_host_bytes).
            self._charge(session, charged, pages_for(nbytes) * PAGE_SIZE, len(fds))
        except BaseException:
            close_fds(fds)
            raise
        tracking: str | Tracker = TrackingMode.EXPLICIT
        if mode != TrackingMode.EXPLICIT:
            try:
                if pid is None:
                    raise FailedPreconditionError("sync/async tracking needs fds sent on the side channel")
                check_writer_mapping(mode, fds, src.writer_base, pages_for(nbytes) * PAGE_SIZE)
                tracking = remote_tracker(mode, fds, src.writer_base, pages_for(nbytes) * PAGE_SIZE)
            except UnsupportedModeError:
                if not auto:
                    close_fds(fds)
                    raise
                close_fds(fds[1:])  # the client's write protection ends with the last uffd reference
                fds = fds[:1]
            except BaseException:
                close_fds(fds)
                raise
        try:
            region = self.rep.register_fd(name, fds[0], nbytes, block_size=block_size, tracking=tracking)
        except BaseException:
            if isinstance(tracking, Tracker):
                with contextlib.suppress(Exception):
                    tracking.close()
            raise
        return region

    def _register_file(self, session: Session, name: str, src: pb.FileSource, mode: TrackingMode, block_size: int,
                       charged: list[int]) -> Region:
        if not src.path:
            raise InvalidArgumentError("file.path is required")
        if not os.path.isabs(src.path) or "\0" in src.path or len(src.path) > 4096:
            raise InvalidArgumentError(f"file.path must be an absolute path, got {src.path!r}")
        if mode in (TrackingMode.SYNC, TrackingMode.ASYNC):
            raise InvalidArgumentError(f"{mode} tracking applies to memory, not files; use file or explicit")
        if mode == TrackingMode.AUTO:  # files: file tracking where this server has it
            _register_kernel_trackers()
            mode = TrackingMode.FILE if TrackingMode.FILE in TRACKERS else TrackingMode.EXPLICIT
        if mode == TrackingMode.FILE:
            _register_kernel_trackers()
            if TrackingMode.FILE not in TRACKERS:
                raise UnsupportedModeError("file tracking is not available on this server (no inotify tracker "
                                           "installed); register with explicit tracking and call Invalidate")
        tracking = mode if mode == TrackingMode.FILE else make_tracker(TrackingMode.EXPLICIT)
        # The server never opens a client-named path with its own privileges (docs/security.md): either the
        # client's own read fd, or the path opened with the session's credentials.
        if src.fd_ticket:
            fds = self.reg.take_ticket(session, src.fd_ticket)
            try:
                check_file_fd(fds[0])
                fd = os.dup(fds[0])
            finally:
                close_fds(fds)
        else:
            fd = open_as_peer(src.path, session.uid, session.gid, session.groups)
        try:
            # The mapping's fd, plus the inotify watch of file tracking; sized from the file actually opened.
            self._charge(session, charged, pages_for(os.fstat(fd).st_size) * PAGE_SIZE,
                         2 if mode == TrackingMode.FILE else 1)
        except BaseException:
            os.close(fd)
            raise
        region = self.rep.register_file_fd(name, fd, kernel_path(fd) or src.path, block_size=block_size,
                                           tracking=tracking)
        return region

    @unary
    def UnregisterRegion(self, request: pb.UnregisterRegionRequest, context: grpc.ServicerContext
                         ) -> pb.UnregisterRegionResponse:
        session = self._session(context)
        region, _ = self._region(session, request.name, write=True)
        self.reg.drop_region(session, region.name)
        return pb.UnregisterRegionResponse()

    @unary
    def ListRegions(self, request: pb.ListRegionsRequest, context: grpc.ServicerContext) -> pb.ListRegionsResponse:
        session = self._session(context)
        if request.all and session.uid != 0:
            raise PermissionDeniedError(
                f"listing every session's regions is for root on the server's local socket; this session is "
                f"{session.describe()}")
        out = []
        names = list(self.reg.owners) if request.all else [name for name, _owned in self.reg.visible(session)]
        for name in names:
            with contextlib.suppress(Exception):
                out.append(self._describe(session, self.rep.region(name)))
        return pb.ListRegionsResponse(regions=out)

    @unary
    def DescribeRegion(self, request: pb.DescribeRegionRequest, context: grpc.ServicerContext
                       ) -> pb.DescribeRegionResponse:
        session = self._session(context)
        region, _ = self._region(session, request.name, write=False)
        return pb.DescribeRegionResponse(region=self._describe(session, region))

    @unary
    def ShareRegion(self, request: pb.ShareRegionRequest, context: grpc.ServicerContext) -> pb.ShareRegionResponse:
        session = self._session(context)
        check_name(request.name)
        if not request.grantee:
            raise InvalidArgumentError("grantee is required: '*', 'uid:<n>' or 'label:<label>'")
        self.reg.share(session, request.name, request.grantee, request.revoke)
        return pb.ShareRegionResponse()

    @streaming
    def Replicate(self, request: pb.ReplicateRequest, context: grpc.ServicerContext
                  ) -> Iterator[pb.ReplicateResponse]:
        session = self._session(context)
        region, _ = self._region(session, request.name, write=True)
        self._guard_file(region)
        devices = check_devices(request.devices, required=True)
        timeout = timeout_of(request.timeout_ms, context)
        for device in devices:
            self.rep.resolve(device)
        new = [d for d in dict.fromkeys(devices) if d not in region.devices]
        with self._waiting(session), self.reg.reserve_bytes(session, len(new) * region.npages * PAGE_SIZE):
            yield from self._replicate(region, devices, timeout, context)

    def _replicate(self, region: Region, devices: list[str], timeout: float, context: grpc.ServicerContext
                   ) -> Iterator[pb.ReplicateResponse]:
        # Progress in the units of the final report: replica bytes, every replica counted (the region's callback).
        latest: list[tuple[int, int]] = []
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["report"] = self.rep.replicate(region.name, devices, timeout=timeout,
                                                       progress=lambda done, total: latest.append((done, total)))
            except BaseException as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="devrep-replicate", daemon=True)
        worker.start()
        sent = (-1, -1)
        while worker.is_alive():
            worker.join(PROGRESS_INTERVAL)
            if latest and latest[-1] != sent and context.is_active():
                sent = latest[-1]
                del latest[:-1]
                yield pb.ReplicateResponse(bytes_copied=sent[0], bytes_total=sent[1])
        if "error" in outcome:
            raise outcome["error"]
        report = outcome["report"]
        # bytes_copied and report share a oneof: the final message's total equals report.bytes_copied.
        yield pb.ReplicateResponse(report=report_pb(report), bytes_total=report.bytes_copied)

    @unary
    def Sync(self, request: pb.SyncRequest, context: grpc.ServicerContext) -> pb.SyncResponse:
        session = self._session(context)
        region, _ = self._region(session, request.name, write=True)
        self._guard_file(region)
        devices = check_devices(request.devices, required=False)
        timeout = timeout_of(request.timeout_ms, context)
        with self._waiting(session):
            report = region.sync(devices or None, timeout=timeout)
        return pb.SyncResponse(report=report_pb(report))

    def acquire_lease(self, session: Session, name: str, device: str, fresh: bool, timeout: float,
                      holder: str | None = None) -> tuple[int, Lease, ExportHandle]:
        """Acquire for the gRPC call and the side channel's one-round-trip ``acquire`` alike."""
        region, _ = self._region(session, name, write=False)
        self._guard_file(region)
        if not device:
            raise InvalidArgumentError("device is required (e.g. 'cpu:0')")
        if device == numa.LOCAL:  # the server's own node says nothing about where the client reads
            raise InvalidArgumentError("numa:local names the caller's NUMA node: the client resolves it (getcpu) and "
                                       "sends numa:near:NODE (devrep.connect() clients do)")
        if len(session.leases) >= self.reg.quota.max_leases:
            raise self.reg.quota_error("leases", f"session holds {len(session.leases)} leases "
                                                 f"(limit {self.reg.quota.max_leases}); release some")
        lease = region.acquire(device, fresh=fresh, timeout=timeout)
        try:
            handle = lease.export()
        except BaseException:
            lease.release()
            raise
        return self.reg.add_lease(session, lease, holder), lease, handle

    @unary
    def Acquire(self, request: pb.AcquireRequest, context: grpc.ServicerContext) -> pb.AcquireResponse:
        session = self._session(context)
        timeout = timeout_of(request.timeout_ms, context)
        holder = holder_of(context)
        with self._waiting(session):
            lease_id, lease, handle = self.acquire_lease(session, request.name, request.device, request.fresh,
                                                         timeout, holder)
        if holder is not None:  # tells the holder how often it must call (Ping) to keep its leases
            context.set_trailing_metadata(((HOLDER_TTL_KEY, str(int(self.holder_ttl * 1000))),))
        return pb.AcquireResponse(
            lease_id=lease_id, generation=lease.generation, invalid_runs=flat(lease.invalid_runs),
            nbytes=lease.nbytes, device=lease.device, export_kind=handle.kind, buffer_nbytes=handle.nbytes,
            cuda_ipc_handle=handle.payload if isinstance(handle.payload, bytes) else b"",
            gpu_uuid=handle.gpu_uuid, granularity=handle.granularity)

    @unary
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        session = self._session(context)
        if request.lease_id == 0:
            raise InvalidArgumentError("lease_id is required")
        self.reg.release(session, request.lease_id)
        return pb.ReleaseResponse()

    @unary
    def Invalidate(self, request: pb.InvalidateRequest, context: grpc.ServicerContext) -> pb.InvalidateResponse:
        session = self._session(context)
        region, _ = self._region(session, request.name, write=True)
        if request.runs:
            generation = region.invalidate_pages(pages_from_runs(runs_in(request.runs, region.npages)))
        else:
            if request.offset < 0 or request.length < 0:
                raise InvalidArgumentError(f"offset and length must be >= 0, got {request.offset}, {request.length}")
            if request.offset >= region.nbytes:
                raise InvalidArgumentError(f"offset {request.offset} is beyond the region's {region.nbytes} bytes")
            generation = region.invalidate(request.offset, request.length or None)
        return pb.InvalidateResponse(generation=generation)

    @unary
    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.VerifyResponse:
        session = self._session(context)
        region, _ = self._region(session, request.name, write=request.resync)
        self._guard_file(region)
        devices = check_devices(request.devices, required=False)
        with self._waiting(session):
            reports = region.verify(devices or None, resync=request.resync)
        return pb.VerifyResponse(reports=[
            pb.VerifyReport(device=r.device, pages_checked=r.pages_checked, mismatched_runs=flat(r.mismatched),
                            resynced=r.resynced, stale_pages=r.stale_pages) for r in reports])

    @streaming
    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.WatchResponse]:
        session = self._session(context)
        if not 0 <= request.coalesce_ms <= 1000:
            raise InvalidArgumentError(f"coalesce_ms must be in [0, 1000], got {request.coalesce_ms}")
        if len(set(request.names)) > MAX_LIST:
            raise InvalidArgumentError(f"at most {MAX_LIST} names per watch")
        names = {self._region(session, name, write=False)[0].name for name in set(request.names)}
        principal = session.principal
        with session.lock:
            if session.watchers >= self.reg.quota.max_watchers:
                raise self.reg.quota_error("watchers", f"session already has {session.watchers} watch streams "
                                                       f"(limit {self.reg.quota.max_watchers})")
            if principal is not None:
                self._watch_uid.acquire(principal, _principal_name(session))
            if not self._streams.acquire(blocking=False):
                if principal is not None:
                    self._watch_uid.release(principal)
                raise self.reg.quota_error("streams", f"the server already serves {self.max_streams} watch streams")
            session.watchers += 1

        def readable(region: str) -> bool:
            # Checked live for every event: a revoked share (or a revoked token, which ends the session) stops
            # the delivery at once, even for a stream that named the region when it was still shared.
            return not session.closed and self.reg.can_read(session, region)

        def accept(event: Event) -> bool:
            return (event.region in names if names else True) and readable(event.region)

        def still_readable(event: Event) -> bool:
            # Queued before a revocation, sent after it: drop it. A region that is gone altogether (its
            # region_removed event) was readable when the event was queued.
            return self.reg.owners.get(event.region) is None or readable(event.region)

        watcher = self.hub.add(accept)
        context.add_callback(watcher.close)
        try:
            context.send_initial_metadata(())
            for events, dropped in watcher.batches((request.coalesce_ms or 2) / 1000):
                if session.closed:
                    raise UnauthenticatedError("session ended (its token was revoked, or its client left)")
                if not context.is_active() or self.stopping.is_set():
                    return
                events = [e for e in events if still_readable(e)]
                if events or dropped:
                    yield from _watch_messages(events, dropped, view_name)
        finally:
            self.hub.remove(watcher)
            self._streams.release()
            if principal is not None:
                self._watch_uid.release(principal)
            with session.lock:
                session.watchers -= 1


def _principal_name(session: Session) -> str:
    return f"uid {session.uid} (all its sessions)" if session.uid is not None else f"session {session.label}"


def _watch_messages(events: list[Event], dropped: int, view: Callable[[str], str] = str
                    ) -> Iterator[pb.WatchResponse]:
    """Pack events into messages of at most ``MAX_RUNS_PER_MESSAGE`` runs (a huge event is split)."""
    out: list[pb.Event] = []
    budget = MAX_RUNS_PER_MESSAGE
    for event in events:
        runs = np.asarray(event.runs, dtype=np.int64).reshape(-1, 2)
        start = 0
        while True:
            part = runs[start:start + budget]
            out.append(pb.Event(kind=event.kind, region=view(event.region), generation=event.generation,
                                runs=flat(part),
                                device=event.device or "", pages=int(part[:, 1].sum()) if len(part) else 0,
                                message=event.message))
            budget -= len(part)
            start += len(part)
            if budget <= 0:
                yield pb.WatchResponse(events=out, dropped=dropped)
                out, budget, dropped = [], MAX_RUNS_PER_MESSAGE, 0
            if start >= len(runs):
                break
    if out:
        yield pb.WatchResponse(events=out, dropped=dropped)

