"""The plain data devrep hands out: events, statistics, reports and descriptions of regions and replicas.

Shared by the engine (which fills them), the service (which puts them on the wire) and the client (which
rebuilds them from the wire), so it sits in the bottom layer: standard library and numpy only. Importing it loads
neither numpy nor ``_pages`` (numpy is loaded when an ``Event`` is built without runs): ``TrackingMode`` is used by
``devrep.tracking``, which the sync-mode fault helper process imports, and that helper loads no numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._pages import RunArray

ProgressCallback = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``, the one progress signature of ``sync``/``replicate`` in process and in the
client: bytes written into replicas so far and in all (each replica counts: two replicas of 1 MiB are 2 MiB), so
``0 <= done <= total``; the last call has ``done == total`` (= ``SyncReport.bytes_copied`` unless a page was
written again mid-copy)."""


class TrackingMode(StrEnum):
    """How a region learns that its host pages changed (see ``devrep.tracking`` and docs/api.md). A ``str``: every
    API that takes a mode also takes its plain string (``tracking="sync"``)."""

    EXPLICIT = "explicit"
    """The owner reports what it wrote (``invalidate``): memory the kernel cannot protect, e.g. DMA."""
    SYNC = "sync"
    """userfaultfd write-protect faults: a write is recorded before it lands."""
    ASYNC = "async"
    """UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN: the kernel marks written pages, collected before each decision."""
    FILE = "file"
    """inotify + per-page hashes of a regular file."""
    AUTO = "auto"
    """A request, never a region's mode: the strongest mode available for that source on this host."""


def _no_runs() -> RunArray:
    import numpy as np  # here, not at import: see the module's docstring

    return np.empty((0, 2), np.int64)


class ExportKind(StrEnum):
    """How a replica buffer is shared with another process: ``ExportHandle.kind`` in the engine, ``export_kind``
    on the wire (the values are the wire strings, so a member compares equal to what a client receives).

    ``FD``: a sealed memfd (CPU and NUMA backends), mapped read-only; ``CUDA_FD``: a CUDA VMM allocation exported
    as a POSIX fd (``cuMemExportToShareableHandle``), mapped read-only on the GPU; ``CUDA_IPC``: a classic
    ``cudaIpcMemHandle_t`` (64 bytes, same PID namespace only); ``NONE``: the memory cannot be shared (OpenCL).
    """

    FD = "fd"
    CUDA_FD = "cuda_fd"
    CUDA_IPC = "cuda_ipc"
    NONE = "none"


class EventKind(StrEnum):
    """What an ``Event`` reports. A ``str`` subclass: ``event.kind == "sync"`` and the wire's plain strings keep
    working, and the value is what the gRPC ``Event.kind`` field carries."""

    INVALIDATE = "invalidate"
    """``runs`` went stale in every replica."""
    SYNC = "sync"
    """``runs`` became valid on ``device``."""
    VERIFY = "verify"
    """``runs`` mismatched on ``device`` (marked stale there)."""
    REPLICA_ADDED = "replica_added"
    REPLICA_REMOVED = "replica_removed"
    REGION_REMOVED = "region_removed"
    REGION_FAILED = "region_failed"
    """The region can no longer be used; ``message`` says why."""


@dataclass(frozen=True)
class Event:
    """Something that happened to a region, for watchers and metrics (``kind``: see ``EventKind``).

    A plain string naming a known kind is turned into its ``EventKind`` (events rebuilt from the wire); an unknown
    one (a newer server's) is kept as the string. ``runs`` may be shared with the sync that produced the event and
    with other events (a sync event's runs are read-only): copy it before changing it.
    """

    kind: EventKind
    region: str
    generation: int
    runs: RunArray = field(default_factory=_no_runs)
    device: str | None = None
    nbytes: int = 0
    seconds: float = 0.0
    message: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, EventKind) and self.kind in EventKind._value2member_map_:
            object.__setattr__(self, "kind", EventKind(self.kind))

    @property
    def pages(self) -> int:
        return int(self.runs[:, 1].sum()) if len(self.runs) else 0


Listener = Callable[[Event], None]


@dataclass
class RegionStats:
    invalidations: int = 0
    pages_invalidated: int = 0
    syncs: int = 0
    pages_copied: int = 0
    """Page copies into replicas (a page copied to 3 replicas counts 3)."""
    bytes_copied: int = 0
    host_bytes_read: int = 0
    """Host bytes read by syncs: with fan-out, each dirty page once per sync however many replicas."""
    sync_seconds: float = 0.0
    verifies: int = 0
    pages_verified: int = 0
    verify_mismatches: int = 0
    resyncs: int = 0
    lease_waits: int = 0


@dataclass(frozen=True)
class ReplicaInfo:
    device: str
    valid_pages: int
    generation: int
    leases: int
    buffers: int
    nbytes: int


@dataclass(frozen=True)
class RegionInfo:
    name: str
    kind: str
    nbytes: int
    npages: int
    block_size: int
    tracking: str
    generation: int
    replicas: list[ReplicaInfo]
    stats: RegionStats
    failed: str | None


@dataclass(frozen=True)
class SyncReport:
    region: str
    generation: int
    pages_copied: int
    bytes_copied: int
    host_bytes_read: int
    runs: int
    seconds: float
    devices: list[str]


@dataclass(frozen=True)
class VerifyReport:
    region: str
    device: str
    pages_checked: int
    mismatched: RunArray
    resynced: bool
    stale_pages: int = 0
    """Pages not checked because they were stale (awaiting a sync) or written during the verify: they are
    expected to differ from the host, so they are not mismatches (``pages_checked + stale_pages`` = the region's
    pages)."""

    @property
    def mismatched_pages(self) -> int:
        return int(self.mismatched[:, 1].sum()) if len(self.mismatched) else 0
