"""Regions, replicas and leases: the coherence rules live here (see README, "Coherence rules").

Per-page state, all whole-array numpy:

* ``gen``   uint32 per page: the region generation at which the page was last invalidated;
* ``valid`` uint16 per page: bit ``s`` set when replica slot ``s``'s readable buffer holds the page as
  the host had it at that generation (so at most 16 replicas per region);
* ``lag``   uint16 per page: bit ``s`` set when slot ``s``'s spare buffer differs from its readable one.

That is 8 bytes per 4 KiB page whatever the number of replicas (see ``Region.metadata_bytes``).

Torn pages are impossible by construction: a sync never writes a buffer that has a lease on it. A replica
has one buffer until a sync finds it leased; then it gets a second, the sync writes the new pages there
(catching up the pages the spare missed, tracked by ``lag``) and flips which buffer new acquires get. The
old buffer becomes the spare once its readers release it. A sync that finds both buffers leased waits for
the spare's readers, bounded by its timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from . import numa
from ._pages import (
    PAGE_SIZE,
    PageArray,
    RunArray,
    byte_range_to_pages,
    runs_from_mask,
    runs_from_pages,
    widen_to_blocks,
)
from .backends import Backend, DeviceBuffer, ExportHandle
from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseTimeoutError,
    NotFoundError,
    ResourceExhaustedError,
)
from .memory import HostMemory, anonymous, map_fd
from .model import (
    Event,
    ExportKind,
    Listener,
    ProgressCallback,
    RegionInfo,
    RegionStats,
    ReplicaInfo,
    SyncReport,
    VerifyReport,
)
from .tracking import Tracker

if TYPE_CHECKING:
    from .backends import Progress as CopyProgress

log = logging.getLogger(__name__)

MAX_REPLICAS = 16
DEFAULT_TIMEOUT = 30.0


@dataclass(eq=False)
class _Plan:
    """What one sync writes for one replica: ``pages`` into buffer ``target``."""

    replica: Replica
    target: int
    pages: PageArray
    stale_in_front: npt.NDArray[np.bool_] = field(default_factory=lambda: np.empty(0, bool))
    """Per entry of ``pages``: stale in the readable buffer when the generations were snapshot."""


class Replica:
    """A region's read-only copy on one device (one or two device buffers, see the module doc)."""

    def __init__(self, region: Region, device: str, backend: Backend, index: int, slot: int) -> None:
        self.region = region
        self.device = device
        self.backend = backend
        self.index = index
        self.slot = slot
        self.bit = np.uint16(1 << slot)
        self.buffers: list[DeviceBuffer | None] = [None, None]
        self.leases = [0, 0]
        self.busy = [False, False]
        self.front = 0
        self.generation = 0
        self.valid_pages = 0
        self.closed = False

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if b is not None)

    def _free_unleased(self) -> None:
        for i, buf in enumerate(self.buffers):
            if buf is not None and self.leases[i] == 0 and not self.busy[i]:
                self.backend.free(buf)
                self.buffers[i] = None


class Lease:
    """A reader's hold on one replica buffer: nothing writes that buffer until ``release()``.

    ``generation`` is the region generation the replica reflects; ``invalid_runs`` lists the pages that were
    stale at acquire time (empty for a fresh acquire).
    """

    def __init__(self, replica: Replica, buffer_index: int, generation: int, invalid_runs: RunArray) -> None:
        self.replica = replica
        self._buffer_index = buffer_index
        self.generation = generation
        self.invalid_runs = invalid_runs
        self.released = False
        self._readonly: npt.NDArray[np.uint8] | None = None

    @property
    def device(self) -> str:
        return self.replica.device

    @property
    def buffer(self) -> DeviceBuffer:
        if self.released:
            raise FailedPreconditionError("lease already released")
        buf = self.replica.buffers[self._buffer_index]
        if buf is None:
            raise FailedPreconditionError(f"the replica on {self.device} has no buffer any more")
        return buf

    @property
    def nbytes(self) -> int:
        return self.replica.region.nbytes

    @property
    def array(self) -> Any:
        """The replica as a read-only array: numpy (CPU, zero-copy), CuPy (CUDA) or a host copy (OpenCL).

        Its length is the region's logical size.
        """
        return self.replica.backend.device_array(self.buffer)[: self.nbytes]

    def read(self, offset: int = 0, nbytes: int | None = None) -> npt.NDArray[np.uint8]:
        """Copy bytes of the replica back to host memory."""
        if nbytes is None:
            nbytes = self.nbytes - offset
        return self.replica.backend.read(self.buffer, offset, nbytes)

    def _host_readonly(self) -> npt.NDArray[np.uint8] | None:
        """The replica through a read-only (``PROT_READ``) mapping of its memfd, where it is host memory shared by
        fd (CPU): a write through a torch view then faults instead of corrupting the replica. ``None`` for device
        memory."""
        if self._readonly is None:
            buffer = self.buffer
            backend = self.replica.backend
            if backend.host_view(buffer) is None:
                return None
            handle = backend.export(buffer)
            if handle.kind == ExportKind.FD and isinstance(handle.payload, int):
                self._readonly = map_fd(handle.payload, buffer.nbytes, writable=False)[: self.nbytes]
            else:  # host memory without an fd: numpy's read-only flag is all the protection there is
                self._readonly = backend.host_view(buffer)
        else:
            _ = self.buffer  # raises once released
        return self._readonly

    def numpy(self, dtype: Any, shape: int | Sequence[int], offset: int = 0) -> npt.NDArray[Any]:
        """Bytes ``[offset, offset + size)`` of the replica as a read-only numpy array of ``dtype`` and ``shape``.

        Zero-copy for host-memory replicas (CPU); a host copy of just that range for device replicas (CUDA, OpenCL).
        ``InvalidArgumentError`` for a bad dtype or shape, a misaligned offset or a range past the end. Valid until
        ``release()``; ``.copy()`` gives a writable array of your own."""
        from .views import check_layout, numpy_dtype, numpy_view

        host = self._host_readonly()
        if host is not None:
            return numpy_view(host, self.nbytes, dtype, shape, offset)
        dt = numpy_dtype(dtype, "numpy view")
        _, start, size = check_layout(self.nbytes, dt.itemsize, dt.alignment, shape, offset, "numpy view")
        return numpy_view(self.read(start, size), self.nbytes, dt, shape, start, base=start)

    def torch(self, dtype: Any, shape: int | Sequence[int], offset: int = 0) -> Any:
        """Bytes ``[offset, offset + size)`` of the replica as a ``torch.Tensor`` of ``dtype`` (a torch dtype, its
        name such as ``"bfloat16"``, or a numpy dtype) and ``shape``, zero-copy through DLPack: a CPU tensor over a
        read-only mapping (writing it kills the process with SIGSEGV; ``.clone()`` gives a writable copy), or a
        CUDA tensor over the GPU replica (unprotected: never write it). OpenCL replicas give a host copy. Needs
        PyTorch (``FailedPreconditionError`` otherwise)."""
        from .views import _torch, check_layout, torch_dtype, torch_view

        _torch()
        host = self._host_readonly()
        if host is not None:
            return torch_view(host, self.nbytes, dtype, shape, offset)
        if self.replica.backend.name == "cuda":  # the array is CuPy's: a CUDA tensor, zero-copy
            return torch_view(self.array, self.nbytes, dtype, shape, offset)
        # device memory torch cannot address (OpenCL): a host copy of the range
        tdt = torch_dtype(dtype)
        _, start, size = check_layout(self.nbytes, tdt.itemsize, tdt.itemsize, shape, offset, "torch view")
        copy = self.read(start, size)
        copy.flags.writeable = False
        return torch_view(copy, self.nbytes, tdt, shape, start, base=start)

    def export(self) -> ExportHandle:
        return self.replica.backend.export(self.buffer)

    def release(self, *, local_readers: bool = True) -> None:
        """End the lease. ``local_readers=False``: no work of this process reads the buffer (the service releasing
        a remote client's lease, whose client already waited for its own GPU work), so skip waiting for it."""
        if not self.released:
            self.released = True
            buffer = self.replica.buffers[self._buffer_index]
            try:
                if buffer is not None and local_readers:  # GPU kernels queued on it before now finish before a sync
                    self.replica.backend.release_reader(buffer)
            finally:
                self.replica.region._release(self.replica, self._buffer_index)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if not getattr(self, "released", True):
            self.release()


class Region:
    """A named range of host memory and its replicas. Create through ``Replicator``."""

    def __init__(
        self,
        name: str,
        host: HostMemory,
        tracker: Tracker,
        resolve: Callable[[str], tuple[Backend, int]],
        *,
        block_size: int = PAGE_SIZE,
        listeners: Sequence[Listener] = (),
    ) -> None:
        self.name = name
        self.host = host
        self.tracker = tracker
        self.block_size = block_size
        self._pages_per_block = block_size // PAGE_SIZE
        self._resolve = resolve
        self._listeners = listeners
        self.npages = host.npages
        self.generation = 0
        self._gen = np.zeros(self.npages, dtype=np.uint32)
        self._valid = np.zeros(self.npages, dtype=np.uint16)
        self._lag = np.zeros(self.npages, dtype=np.uint16)
        self._replicas: dict[str, Replica] = {}
        # Re-entrant: a Lease collected by the GC releases itself, possibly on a thread that holds this lock.
        self._cond = threading.Condition(threading.RLock())
        self._sync_lock = threading.Lock()
        self.stats = RegionStats()
        self.failed: str | None = None
        self.closed = False
        tracker.on_failure = self.fail
        tracker.block_pages = self._pages_per_block
        tracker.attach(host, self.collect)

    # ------------------------------------------------------------------ properties
    @property
    def nbytes(self) -> int:
        return self.host.nbytes

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """The host pages (writable for a region devrep created, read-only otherwise), logical length."""
        return self.host.array[: self.nbytes]

    @property
    def devices(self) -> list[str]:
        return list(self._replicas)

    @property
    def metadata_bytes(self) -> int:
        """Persistent per-page state, all replicas included."""
        return self._gen.nbytes + self._valid.nbytes + self._lag.nbytes

    def _emit(self, events: Iterable[Event]) -> None:
        for event in events:
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:  # a broken watcher must not break syncs or writers
                    log.exception("listener failed on %s event of region %r", event.kind, self.name)

    def _replica(self, device: str) -> Replica:
        try:
            return self._replicas[device]
        except KeyError:
            raise NotFoundError(f"region {self.name!r} has no replica on {device!r} (has: {self.devices})") from None

    def _check_open(self) -> None:
        if self.closed:
            raise FailedPreconditionError(f"region {self.name!r} was unregistered")
        if self.failed:
            raise FailedPreconditionError(f"region {self.name!r} failed: {self.failed}")

    # ------------------------------------------------------------------ invalidation
    def invalidate(self, offset: int = 0, length: int | None = None) -> int:
        """Mark the bytes ``[offset, offset+length)`` (whole blocks) stale everywhere. Returns the new generation."""
        if length is None:
            length = max(0, self.nbytes - offset)
        pages = byte_range_to_pages(offset, length, self.npages, self._pages_per_block)
        return self._invalidate(pages)

    def invalidate_pages(self, pages: npt.ArrayLike) -> int:
        """Mark pages (widened to whole blocks) stale in every replica and bump their generation. Idempotent."""
        pages = widen_to_blocks(np.asarray(pages, dtype=np.int64).reshape(-1), self.npages, self._pages_per_block)
        return self._invalidate(pages)

    def _invalidate(self, pages: PageArray) -> int:
        with self._cond:
            generation = self._invalidate_locked(pages)
        if pages.size:
            self._emit([Event("invalidate", self.name, generation, runs_from_pages(pages))])
        return generation

    def _invalidate_locked(self, pages: PageArray) -> int:
        if pages.size == 0:
            return self.generation
        self.generation += 1
        self._gen[pages] = np.uint32(self.generation & 0xFFFFFFFF)
        before = self._valid[pages]
        for rep in self._replicas.values():
            rep.valid_pages -= int(np.count_nonzero(before & rep.bit))
        self._valid[pages] = 0
        self.stats.invalidations += 1
        self.stats.pages_invalidated += int(pages.size)
        return self.generation

    def _collect_locked(self) -> list[Event]:
        pages = self.tracker.collect()
        if len(pages) == 0:
            return []
        pages = widen_to_blocks(pages, self.npages, self._pages_per_block)
        generation = self._invalidate_locked(pages)
        return [Event("invalidate", self.name, generation, runs_from_pages(pages))]

    def collect(self) -> None:
        """Pull writes the tracker has seen into the page state (done implicitly by sync/acquire/verify)."""
        with self._cond:
            events = self._collect_locked()
        self._emit(events)

    # ------------------------------------------------------------------ replicas
    def add_replica(self, device: str) -> Replica:
        """Allocate an (all-stale) replica on ``device``; ``sync()`` fills it."""
        self._check_open()
        backend, index = self._resolve(device)
        with self._cond:
            self._check_new_replica(device)
        # Allocate before publishing: a sync or acquire never sees a replica without memory.
        buffer = backend.allocate(index, self.npages * PAGE_SIZE)
        try:
            with self._cond:
                slot = self._check_new_replica(device)
                replica = Replica(self, device, backend, index, slot)
                replica.buffers[0] = buffer
                self._valid &= ~replica.bit
                self._lag &= ~replica.bit
                self._replicas[device] = replica
        except BaseException:
            backend.free(buffer)
            raise
        self._emit([Event("replica_added", self.name, self.generation, device=device)])
        return replica

    def _check_new_replica(self, device: str) -> int:
        """The free slot a new replica on ``device`` would take."""
        if device in self._replicas:
            raise AlreadyExistsError(f"region {self.name!r} already has a replica on {device}")
        used = {r.slot for r in self._replicas.values()}
        free = [s for s in range(MAX_REPLICAS) if s not in used]
        if not free:
            raise ResourceExhaustedError(f"region {self.name!r} already has {MAX_REPLICAS} replicas")
        return free[0]

    def remove_replica(self, device: str) -> None:
        """Drop a replica. Device memory is freed now, or when its last reader releases."""
        with self._cond:
            replica = self._replica(device)
            del self._replicas[device]
            replica.closed = True
            replica.valid_pages = 0
            self._valid &= ~replica.bit
            self._lag &= ~replica.bit
            replica._free_unleased()
            self._cond.notify_all()
        self._emit([Event("replica_removed", self.name, self.generation, device=device)])

    def _release(self, replica: Replica, buffer_index: int) -> None:
        with self._cond:
            replica.leases[buffer_index] -= 1
            if replica.closed:
                replica._free_unleased()
            self._cond.notify_all()

    def invalid_runs(self, device: str) -> RunArray:
        with self._cond:
            events = self._collect_locked()
            runs = runs_from_mask((self._valid & self._replica(device).bit) == 0)
        self._emit(events)
        return runs

    # ------------------------------------------------------------------ sync
    def sync(
        self,
        devices: Sequence[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        progress: ProgressCallback | None = None,
    ) -> SyncReport:
        """Copy every stale page to the replicas (all, or ``devices``), coalesced into runs.

        A page invalidated again while its copy was in flight stays stale (generation check). Waits at most
        ``timeout`` seconds for readers holding both buffers of a replica (``LeaseTimeoutError``).
        """
        self._check_open()
        if timeout is not None and timeout < 0:
            raise InvalidArgumentError(f"timeout must be >= 0 or None, got {timeout}")
        deadline = None if timeout is None else time.monotonic() + timeout
        start = time.perf_counter()
        if not self._sync_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise LeaseTimeoutError(f"region {self.name!r}: another sync did not finish within {timeout}s")
        try:
            return self._sync(devices, deadline, progress, start)
        finally:
            self._sync_lock.release()

    def _prepare_spares(self, devices: Sequence[str] | None) -> set[str]:
        """Allocate a spare buffer, outside the region lock, for each replica whose readable buffer is leased.

        A device too full for a spare is fine: the sync then waits for the readers instead. Returns those devices.
        """
        no_room: set[str] = set()
        with self._cond:
            targets = [self._replica(d) for d in devices] if devices is not None else list(self._replicas.values())
            wanted = [r for r in targets if r.leases[r.front] and r.buffers[1 - r.front] is None and not r.closed]
        for rep in wanted:
            spare: DeviceBuffer | None
            try:
                spare = rep.backend.allocate(rep.index, self.npages * PAGE_SIZE)
            except ResourceExhaustedError:
                no_room.add(rep.device)
                continue
            with self._cond:
                if rep.buffers[1 - rep.front] is None and not rep.closed:
                    rep.buffers[1 - rep.front] = spare
                    self._lag |= rep.bit  # a new spare holds nothing
                    spare = None
            if spare is not None:
                rep.backend.free(spare)
        return no_room

    def _sync(
        self, devices: Sequence[str] | None, deadline: float | None, progress: ProgressCallback | None, start: float
    ) -> SyncReport:
        no_room = self._prepare_spares(devices)
        events: list[Event] = []
        plans: list[_Plan] = []
        try:
            with self._cond:
                events += self._collect_locked()
                targets = [self._replica(d) for d in devices] if devices is not None else list(self._replicas.values())
                for rep in targets:
                    plans.append(self._plan_locked(rep, deadline, rep.device in no_room))
                # Planning may have waited (lock released): take every snapshot now, in one lock hold.
                for plan in plans:
                    plan.stale_in_front = (self._valid[plan.pages] & plan.replica.bit) == 0
                union = self._union([p.pages for p in plans])
                snapshot = self._gen[union].copy()
                generation = self.generation
                union_runs = runs_from_pages(union)
                if union.size:
                    self.tracker.rearm(union_runs)
            self._emit(events)
            host_read = self._copy(plans, progress)
            events = []
            with self._cond:
                events += self._collect_locked()
                if union.size:
                    self.tracker.settle()
                unchanged = self._gen[union] == snapshot
                seconds = time.perf_counter() - start
                copied = 0
                for plan in plans:
                    rep, pages = plan.replica, plan.pages
                    rep.busy[plan.target] = False
                    if rep.closed:
                        rep._free_unleased()
                        continue
                    kept = unchanged if pages is union else unchanged[np.searchsorted(union, pages)]
                    fresh = pages[kept]
                    if plan.target != rep.front:
                        # Flip to the spare. The old buffer now differs from the new one exactly where it was stale
                        # at the snapshot, and where the host changed during the copy.
                        self._lag &= ~rep.bit
                        self._lag[pages[plan.stale_in_front | ~kept]] |= rep.bit
                        rep.front = plan.target
                    elif rep.buffers[1 - plan.target] is not None:
                        self._lag[pages] |= rep.bit
                    newly = fresh[(self._valid[fresh] & rep.bit) == 0]
                    rep.valid_pages += int(newly.size)
                    self._valid[fresh] |= rep.bit
                    rep.generation = generation
                    copied += int(pages.size)
                    if fresh.size:
                        events.append(Event("sync", self.name, generation, runs_from_pages(fresh), device=rep.device,
                                            nbytes=int(pages.size) * PAGE_SIZE, seconds=seconds))
                plans = []
                self.stats.syncs += 1
                self.stats.pages_copied += copied
                self.stats.bytes_copied += copied * PAGE_SIZE
                self.stats.host_bytes_read += host_read
                self.stats.sync_seconds += seconds
                self._cond.notify_all()
        finally:
            if plans:  # failed midway: no page was marked valid; let readers and the next sync in
                with self._cond:
                    for plan in plans:
                        plan.replica.busy[plan.target] = False
                        if plan.replica.closed:
                            plan.replica._free_unleased()
                    self._cond.notify_all()
        self._emit(events)
        return SyncReport(self.name, generation, copied, copied * PAGE_SIZE, host_read, len(union_runs), seconds,
                          [r.device for r in targets])

    def _wait_locked(self, deadline: float | None, what: str) -> None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise LeaseTimeoutError(f"region {self.name!r}: {what}")
        self._cond.wait(remaining)

    def _plan_locked(self, rep: Replica, deadline: float | None, no_room: bool = False) -> _Plan:
        """Pick the buffer a sync writes for ``rep`` and the pages it needs. Marks that buffer busy."""
        while True:
            if rep.leases[rep.front] == 0:
                target = rep.front
                break
            target = 1 - rep.front
            if rep.buffers[target] is not None and rep.leases[target] == 0:
                break
            self.stats.lease_waits += 1
            try:
                self._wait_locked(deadline, f"on {rep.device}: every replica buffer is held by readers; release "
                                  "leases or raise the sync timeout")
            except LeaseTimeoutError as exc:
                if no_room:  # the wait was only needed because the device is full
                    raise ResourceExhaustedError(
                        f"region {self.name!r}: {rep.device} has no room for a second buffer while readers hold "
                        "the first, and they did not release it in time"
                    ) from exc
                raise
            if rep.closed:
                raise NotFoundError(f"region {self.name!r}: the replica on {rep.device} was removed")
        stale = (self._valid & rep.bit) == 0
        if target != rep.front:
            stale |= (self._lag & rep.bit) != 0
        rep.busy[target] = True
        return _Plan(rep, target, np.flatnonzero(stale).astype(np.int64))

    def _source(self, runs: RunArray) -> npt.NDArray[np.uint8]:
        """The host pages to copy ``runs`` from: the mapping, or for a file region a staging copy read with
        pread (see ``HostMemory.guarded``)."""
        if not self.host.guarded:
            return self.host.array
        staging = anonymous(self.host.array.nbytes)  # only the runs' pages get touched; freed after the copy
        try:
            self.host.read_runs(runs, staging)
        except FailedPreconditionError as exc:
            self.fail(str(exc))
            raise
        return staging

    def _union(self, page_sets: list[PageArray]) -> PageArray:
        if not page_sets:
            return np.empty(0, np.int64)
        if all(p is page_sets[0] or np.array_equal(p, page_sets[0]) for p in page_sets):
            return page_sets[0]
        mask = np.zeros(self.npages, dtype=bool)
        for pages in page_sets:
            mask[pages] = True
        return np.flatnonzero(mask)

    def _copy(self, plans: list[_Plan], progress: ProgressCallback | None) -> int:
        """Run the copies, one backend call per group of replicas that need the same pages (fan-out)."""
        groups: dict[tuple[int, bytes], list[_Plan]] = {}
        for plan in plans:
            if plan.pages.size:
                groups.setdefault((id(plan.replica.backend), plan.pages.tobytes()), []).append(plan)
        total = sum(int(plan.pages.size) for plan in plans) * PAGE_SIZE
        done = 0
        if progress:
            progress(0, total)
        host_read = 0
        for members in groups.values():
            first = members[0]
            buffers = [plan.replica.buffers[plan.target] for plan in members]
            if any(b is None for b in buffers):
                raise FailedPreconditionError(f"region {self.name!r}: a replica buffer vanished during sync")
            runs = runs_from_pages(first.pages)
            group_end = done + len(members) * int(first.pages.size) * PAGE_SIZE
            report: CopyProgress | None = None
            if progress:
                # Backends report host bytes read (once per fan-out call); each such byte landed in every member.
                def report(nbytes: int, _k: int = len(members), _end: int = group_end) -> None:
                    nonlocal done
                    done = min(done + nbytes * _k, _end)
                    progress(done, total)
            first.replica.backend.copy_runs(self._source(runs), runs, [b for b in buffers if b is not None],
                                            report)
            host_read += int(first.pages.size) * PAGE_SIZE
            if progress and done != group_end:
                done = group_end
                progress(done, total)
        return host_read

    # ------------------------------------------------------------------ acquire
    def _lease_locked(self, rep: Replica, deadline: float | None, fresh: bool) -> Lease | None:
        """Lease ``rep``'s readable buffer once no copy into it is in flight; ``None`` if ``fresh`` and stale."""
        while rep.busy[rep.front]:
            self._wait_locked(deadline, f"on {rep.device}: a sync is still copying")
        if rep.closed:
            raise NotFoundError(f"region {self.name!r}: the replica on {rep.device} was removed")
        self._check_open()
        if fresh and rep.valid_pages != self.npages:
            return None
        invalid = (runs_from_mask((self._valid & rep.bit) == 0) if rep.valid_pages < self.npages
                   else np.empty((0, 2), np.int64))
        rep.leases[rep.front] += 1
        return Lease(rep, rep.front, rep.generation if invalid.size else self.generation, invalid)

    def acquire(self, device: str, *, fresh: bool = True, timeout: float | None = DEFAULT_TIMEOUT) -> Lease:
        """Lease the replica on ``device`` for reading.

        ``fresh=True`` returns only when every page is valid (syncing as needed), else raises
        ``LeaseTimeoutError`` after ``timeout`` seconds. ``fresh=False`` returns at once (after any copy into
        the readable buffer in flight) with ``Lease.invalid_runs`` listing the stale pages.

        ``device`` may be ``numa:local`` (the NUMA replica on the calling thread's node, else the nearest one)
        or ``numa:near:N`` (the same for node ``N``); ``Lease.device`` names the replica picked.
        """
        self._check_open()
        if numa.is_alias(device):
            device = self._pick_numa(device)
        if timeout is not None and timeout < 0:
            raise InvalidArgumentError(f"timeout must be >= 0 or None, got {timeout}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                events = self._collect_locked()
                lease = self._lease_locked(self._replica(device), deadline, fresh)
            self._emit(events)
            if lease is not None:
                return lease
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise LeaseTimeoutError(
                    f"region {self.name!r} on {device}: still stale after {timeout}s (writes keep arriving)"
                )
            self.sync([device], timeout=remaining)

    def _pick_numa(self, alias: str) -> str:
        """The device of the NUMA replica nearest to the node ``alias`` names (see ``devrep.numa``)."""
        from .backends._numa import NumaBackend

        numa.alias_node(alias)  # a malformed alias is an error even when the region has no NUMA replica
        with self._cond:
            candidates = [r for r in self._replicas.values() if isinstance(r.backend, NumaBackend)]
        if not candidates:
            raise NotFoundError(f"region {self.name!r} has no NUMA replica to serve {alias!r} (has: {self.devices})")
        backend = candidates[0].backend  # a replicator has one NumaBackend
        assert isinstance(backend, NumaBackend)
        return f"numa:{backend.pick(alias, [r.index for r in candidates])}"

    # ------------------------------------------------------------------ verify
    def verify(self, devices: Sequence[str] | None = None, *, resync: bool = True,
               timeout: float | None = DEFAULT_TIMEOUT) -> list[VerifyReport]:
        """Hash host and replica pages; pages valid in the leased buffer and not written since whose hashes differ
        are marked stale (counted) and, with ``resync``, copied again."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        targets = list(devices) if devices is not None else self.devices
        held: list[tuple[Lease, npt.NDArray[np.uint32], npt.NDArray[np.bool_]]] = []
        reports: list[tuple[Replica, RunArray, int]] = []
        try:
            for device in targets:
                with self._cond:
                    events = self._collect_locked()
                    lease = self._lease_locked(self._replica(device), deadline, fresh=False)
                    assert lease is not None
                    # Snapshot in the same lock hold as the lease: these bits describe the leased buffer.
                    held.append((lease, self._gen.copy(), (self._valid & lease.replica.bit) != 0))
                self._emit(events)
            try:
                host_hashes = self.host.hash_pages()
            except FailedPreconditionError as exc:
                self.fail(str(exc))
                raise
            device_hashes = [lease.replica.backend.hash_pages(lease.buffer) for lease, _, _ in held]
            events = []
            with self._cond:
                events += self._collect_locked()
                for (lease, gen_at_lease, valid_at_lease), dev_hashes in zip(held, device_hashes, strict=True):
                    rep = lease.replica
                    checked = valid_at_lease & (self._gen == gen_at_lease)
                    bad = rep.backend.compare(host_hashes, dev_hashes)
                    bad = bad[checked[bad]]
                    still_valid = bad[(self._valid[bad] & rep.bit) != 0]
                    rep.valid_pages -= int(still_valid.size)
                    self._valid[bad] &= ~rep.bit
                    if rep.buffers[1 - rep.front] is not None:
                        self._lag[bad] |= rep.bit  # the spare may hold the same bad copy
                    runs = runs_from_pages(bad)
                    self.stats.verifies += 1
                    self.stats.pages_verified += int(np.count_nonzero(checked))
                    self.stats.verify_mismatches += int(bad.size)
                    reports.append((rep, runs, int(np.count_nonzero(checked))))
                    if bad.size:
                        events.append(Event("verify", self.name, self.generation, runs, device=rep.device))
            self._emit(events)
        finally:
            for lease, _, _ in held:
                lease.release()
        mismatched = [rep.device for rep, runs, _ in reports if len(runs) and not rep.closed]
        if resync and mismatched:
            self.sync(mismatched, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            with self._cond:
                self.stats.resyncs += 1
        return [VerifyReport(self.name, rep.device, checked, runs, bool(resync and len(runs)), self.npages - checked)
                for rep, runs, checked in reports]

    # ------------------------------------------------------------------ describe / close
    def describe(self) -> RegionInfo:
        with self._cond:
            events = self._collect_locked()
            replicas = [
                ReplicaInfo(r.device, r.valid_pages, r.generation, sum(r.leases),
                            sum(b is not None for b in r.buffers), r.nbytes)
                for r in self._replicas.values()
            ]
            info = RegionInfo(self.name, self.host.kind, self.nbytes, self.npages, self.block_size,
                              self.tracker.mode, self.generation, replicas, RegionStats(**vars(self.stats)),
                              self.failed)
        self._emit(events)
        return info

    def fail(self, reason: str) -> None:
        """Mark the region unusable (e.g. its memory was truncated under it), free its replicas' device memory and
        tell watchers.

        A failed region can never be synced or acquired again, so its replica buffers are freed now (one a reader
        or an in-flight copy still holds goes when they let go), not when the region is unregistered. The
        replicas stay listed (all pages stale, no buffers) until then.
        """
        with self._cond:
            self.failed = reason
            for rep in self._replicas.values():
                rep.closed = True  # nothing writes or leases it again; its last buffers go on release
                rep.valid_pages = 0
                rep._free_unleased()
            self._valid[:] = 0
            self._lag[:] = 0
            self._cond.notify_all()
        self._emit([Event("region_failed", self.name, self.generation, message=reason)])

    def close(self) -> None:
        """Stop tracking (releasing every write protection), drop replicas, unmap host memory."""
        if self.closed:
            return
        try:
            self.tracker.close()
        finally:
            # Break the region <-> tracker cycle so the host mapping goes by reference counting the moment the
            # last user lets go, not whenever the cyclic GC runs (a closed session's memory must leave at once).
            self.tracker.on_failure = None
            for device in list(self._replicas):
                self.remove_replica(device)
            self.closed = True
            self.host.close()
            self._emit([Event("region_removed", self.name, self.generation)])

    def __repr__(self) -> str:
        return f"<Region {self.name!r} {self.nbytes} B, {len(self._replicas)} replicas, {self.tracker.mode}>"


def check_region_name(name: str) -> str:
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}", name):
        raise InvalidArgumentError(
            f"bad region name {name!r}: 1-255 characters of letters, digits and ._:/- , starting with a letter or digit"
        )
    return name
