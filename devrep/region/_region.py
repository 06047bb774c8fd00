"""``Region``: the coordinating facade. It holds the region lock and wires the parts together: the per-page state
(``_state``), the replicas and leases (``_replicas``), sync planning and copying (``_plan``) and verify
(``_verify``); the coherence rules it keeps are in the package doc (``devrep.region``)."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from .. import numa
from .._pages import PAGE_SIZE, PageArray, RunArray, byte_range_to_pages, runs_from_pages, widen_to_blocks
from ..backends import Backend, DeviceBuffer
from ..errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseTimeoutError,
    NotFoundError,
    ResourceExhaustedError,
)
from ..memory import HostMemory, anonymous, ensure_room
from ..model import (
    Event,
    EventKind,
    Listener,
    ProgressCallback,
    RegionInfo,
    RegionStats,
    ReplicaInfo,
    SyncReport,
    VerifyReport,
)
from ..tracking import Tracker
from . import _plan, _verify
from ._replicas import MAX_REPLICAS, Lease, Replica, free_slot
from ._state import PageState

log = logging.getLogger("devrep.region")

DEFAULT_TIMEOUT = 30.0


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
        self.page_state = PageState(self.npages)
        self._replicas: dict[str, Replica] = {}
        # Re-entrant: a Lease collected by the GC releases itself, possibly on a thread that holds this lock.
        self._cond = threading.Condition(threading.RLock())
        # One sync at a time (syncs triggered by a stale acquire included): the tracker's rearm/settle pairs
        # describe one copy in flight.
        self._sync_lock = threading.Lock()
        self.stats = RegionStats()
        self.failed: str | None = None
        self.closed = False
        tracker.on_failure = self.fail
        tracker.block_pages = self._pages_per_block
        tracker.attach(host, self.collect)

    # ------------------------------------------------------------------ properties
    @property
    def lock(self) -> threading.Condition:
        """The region lock (a condition on a re-entrant lock): guards the page state, replicas and leases."""
        return self._cond

    @property
    def generation(self) -> int:
        return self.page_state.generation

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
        return self.page_state.metadata_bytes

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

    def _check_replica_live(self, rep: Replica) -> None:
        """After a wait on the lock: the region's own end (unregistered, failed) comes first, since a region that
        fails or closes also closes every replica; only then a replica removed on its own."""
        self._check_open()
        if rep.closed:
            raise NotFoundError(f"region {self.name!r}: the replica on {rep.device} was removed")

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
            self._emit([Event(EventKind.INVALIDATE, self.name, generation, runs_from_pages(pages))])
        return generation

    def _invalidate_locked(self, pages: PageArray) -> int:
        if pages.size == 0:
            return self.generation
        generation = self.page_state.invalidate(pages)
        self.stats.invalidations += 1
        self.stats.pages_invalidated += int(pages.size)
        return generation

    def _collect_locked(self) -> list[Event]:
        pages = self.tracker.collect()
        if len(pages) == 0:
            return []
        pages = widen_to_blocks(pages, self.npages, self._pages_per_block)
        generation = self._invalidate_locked(pages)
        return [Event(EventKind.INVALIDATE, self.name, generation, runs_from_pages(pages))]

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
                replica = Replica(self, self.page_state, device, backend, index, slot)
                replica.buffers[0] = buffer
                self.page_state.reset_slot(slot)
                self._replicas[device] = replica
        except BaseException:
            backend.free(buffer)
            raise
        self._emit([Event(EventKind.REPLICA_ADDED, self.name, self.generation, device=device)])
        return replica

    def _check_new_replica(self, device: str) -> int:
        """The free slot a new replica on ``device`` would take."""
        if device in self._replicas:
            raise AlreadyExistsError(f"region {self.name!r} already has a replica on {device}")
        slot = free_slot(self._replicas.values())
        if slot is None:
            raise ResourceExhaustedError(f"region {self.name!r} already has {MAX_REPLICAS} replicas")
        return slot

    def remove_replica(self, device: str) -> None:
        """Drop a replica. Device memory is freed now, or when its last reader releases."""
        with self._cond:
            replica = self._replica(device)
            del self._replicas[device]
            replica.closed = True
            self.page_state.reset_slot(replica.slot)
            replica.free_unleased()
            self._cond.notify_all()
        self._emit([Event(EventKind.REPLICA_REMOVED, self.name, self.generation, device=device)])

    def _release(self, replica: Replica, buffer_index: int) -> None:
        """A lease ended (``Lease.release``). Takes only the region lock, which no sync holds across a copy or a
        tracker's rearm, so a reader never waits for either."""
        with self._cond:
            replica.release(buffer_index)
            self._cond.notify_all()

    def invalid_runs(self, device: str) -> RunArray:
        with self._cond:
            events = self._collect_locked()
            runs = self.page_state.invalid_runs(self._replica(device).slot)
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
        with self._one_sync(deadline):
            report, _ = self._sync(devices, deadline, progress, start)
        assert report is not None
        return report

    @contextlib.contextmanager
    def _one_sync(self, deadline: float | None) -> Iterator[None]:
        """Hold the sync lock (waiting at most until ``deadline``)."""
        timeout = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._sync_lock.acquire(timeout=timeout):
            raise LeaseTimeoutError(f"region {self.name!r}: another sync did not finish within {timeout:.3g}s")
        try:
            yield
        finally:
            self._sync_lock.release()

    def _prepare_spares(self, devices: Sequence[str] | None) -> set[str]:
        """Allocate a spare buffer, outside the region lock, for each replica whose readable buffer is leased.

        A device too full for a spare is fine: the sync then waits for the readers instead. Returns those devices.
        """
        no_room: set[str] = set()
        with self._cond:
            targets = [self._replica(d) for d in devices] if devices is not None else list(self._replicas.values())
            wanted = [r for r in targets if r.wants_spare()]
        for rep in wanted:
            spare: DeviceBuffer | None
            try:
                spare = rep.backend.allocate(rep.index, self.npages * PAGE_SIZE)
            except ResourceExhaustedError:
                no_room.add(rep.device)
                continue
            with self._cond:
                if rep.install_spare(spare):
                    spare = None
            if spare is not None:
                rep.backend.free(spare)
        return no_room

    def _sync(self, devices: Sequence[str] | None, deadline: float | None, progress: ProgressCallback | None,
              start: float, *, lease_on: Replica | None = None) -> tuple[SyncReport | None, Lease | None]:
        """One sync, under the sync lock. Three steps: plan (region lock held), rearm and copy (region lock
        free: readers acquire and release meanwhile), commit (region lock held).

        ``lease_on``: a stale fresh acquire's sync of that one replica. It plans without collecting first (the
        acquire collected an instant ago; a write since then is caught by the collect after the copy), returns
        ``(None, lease)`` at once if another sync made the replica fresh meanwhile, and otherwise takes the lease
        in the commit's lock hold if the replica is then fresh (``None``: written during the copy, try again).
        So such an acquire calls ``collect()`` twice when no write interferes.
        """
        no_room = self._prepare_spares(devices)
        events: list[Event] = []
        plans: list[_plan.Plan] = []
        lease: Lease | None = None
        state = self.page_state
        try:
            with self._cond:
                if lease_on is None:
                    events += self._collect_locked()
                else:
                    lease = self._lease_locked(lease_on, deadline, fresh=True)
                    if lease is not None:
                        return None, lease
                targets = [self._replica(d) for d in devices] if devices is not None else list(self._replicas.values())
                for rep in targets:
                    plans.append(self._plan_locked(rep, deadline, rep.device in no_room))
                # Planning may have waited (lock released): take every snapshot now, in one lock hold.
                snap = _plan.take_snapshot(state, plans)
            self._emit(events)
            union_runs = snap.runs
            if len(union_runs):
                # Off the region lock (see "Rearm off the region lock" in devrep.tracking): a write from here on
                # faults and is recorded, so the collect after the copy invalidates what it may have torn.
                host_read = _plan.rearm_and_copy(plans, snap, self._source, self.name, progress, self.tracker.rearm,
                                                 self.tracker.rearm_overlaps_copy)
            else:
                host_read = _plan.copy_plans(plans, snap, self._source, self.name, progress)
            with self._cond:
                events = self._collect_locked()
                if len(union_runs):
                    self.tracker.settle()
                seconds = time.perf_counter() - start
                copied, synced = _plan.commit(state, plans, snap, self.name, seconds)
                events += synced
                plans = []
                self.stats.syncs += 1
                self.stats.pages_copied += copied
                self.stats.bytes_copied += copied * PAGE_SIZE
                self.stats.host_bytes_read += host_read
                self.stats.sync_seconds += seconds
                if lease_on is not None:  # in the commit's lock hold: nothing can make it stale in between
                    lease = self._lease_locked(lease_on, deadline, fresh=True)
                self._cond.notify_all()
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        finally:
            if plans:  # failed midway: no page was marked valid; let readers and the next sync in
                with self._cond:
                    _plan.abandon(plans)
                    self._cond.notify_all()
        self._emit(events)
        report = SyncReport(self.name, snap.generation, copied, copied * PAGE_SIZE, host_read, len(union_runs),
                            seconds, [r.device for r in targets])
        return report, lease

    def _wait_locked(self, deadline: float | None, what: str) -> None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise LeaseTimeoutError(f"region {self.name!r}: {what}")
        self._cond.wait(remaining)

    def _plan_locked(self, rep: Replica, deadline: float | None, no_room: bool = False) -> _plan.Plan:
        """Pick the buffer a sync writes for ``rep`` (waiting for readers if they hold every buffer) and the
        pages it needs. Marks that buffer busy."""
        while (target := rep.writable_buffer()) is None:
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
            self._check_replica_live(rep)
        return _plan.plan_replica(self.page_state, rep, target)

    def _source(self, runs: RunArray) -> npt.NDArray[np.uint8]:
        """The host pages to copy ``runs`` from: the mapping, or for a file region a staging copy read with
        pread (see ``HostMemory.guarded``)."""
        if not self.host.guarded:
            return self.host.array
        # Only the runs' pages get touched (freed after the copy), but they are on top of the replica's own memory.
        ensure_room(self.host.staging_bytes(runs), f"region {self.name!r}: staging its file's pages")
        staging = anonymous(self.host.array.nbytes)
        try:
            self.host.read_runs(runs, staging)
        except FailedPreconditionError as exc:
            self.fail(str(exc))
            raise
        return staging

    # ------------------------------------------------------------------ acquire
    def _lease_locked(self, rep: Replica, deadline: float | None, fresh: bool) -> Lease | None:
        """Lease ``rep``'s readable buffer once no copy into it is in flight; ``None`` if ``fresh`` and stale."""
        while rep.busy[rep.front]:
            self._wait_locked(deadline, f"on {rep.device}: a sync is still copying")
        self._check_replica_live(rep)
        state = self.page_state
        if fresh and not state.fully_valid(rep.slot):
            return None
        invalid = state.invalid_runs(rep.slot)
        buffer_index = rep.lease()
        return Lease(rep, buffer_index, rep.generation if invalid.size else self.generation, invalid)

    def acquire(self, device: str, *, fresh: bool = True, timeout: float | None = DEFAULT_TIMEOUT) -> Lease:
        """Lease the replica on ``device`` for reading.

        ``fresh=True`` returns only when every page is valid (syncing as needed), else raises
        ``LeaseTimeoutError`` after ``timeout`` seconds. ``fresh=False`` returns at once (after any copy into
        the readable buffer in flight) with ``Lease.invalid_runs`` listing the stale pages.

        ``device`` may be ``numa:local`` (the NUMA replica on the calling thread's node, else the nearest one)
        or ``numa:near:N`` (the same for node ``N``); ``Lease.device`` names the replica picked.

        A stale fresh acquire syncs only its own replica and takes the lease in the lock hold that commits the
        copy (see ``_sync``).
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
                rep = self._replica(device)
                lease = self._lease_locked(rep, deadline, fresh)
            self._emit(events)
            if lease is not None:
                return lease
            if deadline is not None and deadline - time.monotonic() <= 0:
                raise LeaseTimeoutError(
                    f"region {self.name!r} on {device}: still stale after {timeout}s (writes keep arriving)"
                )
            start = time.perf_counter()
            with self._one_sync(deadline):
                _, lease = self._sync([device], deadline, None, start, lease_on=rep)
            if lease is not None:
                return lease

    def _pick_numa(self, alias: str) -> str:
        """The device of the NUMA replica nearest to the node ``alias`` names (see ``devrep.numa``)."""
        from ..backends._numa import NumaBackend

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
        return _verify.verify(self, devices, resync, deadline)

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
                rep.free_unleased()
            self.page_state.reset_all()
            self._cond.notify_all()
        self._emit([Event(EventKind.REGION_FAILED, self.name, self.generation, message=reason)])

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
            self._emit([Event(EventKind.REGION_REMOVED, self.name, self.generation)])

    def __repr__(self) -> str:
        return f"<Region {self.name!r} {self.nbytes} B, {len(self._replicas)} replicas, {self.tracker.mode}>"


_REGION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,254}")


def check_region_name(name: str) -> str:
    if not isinstance(name, str) or not _REGION_NAME.fullmatch(name):  # compiled once: every acquire checks it
        raise InvalidArgumentError(
            f"bad region name {name!r}: 1-255 characters of letters, digits and ._:/- , starting with a letter or digit"
        )
    return name
