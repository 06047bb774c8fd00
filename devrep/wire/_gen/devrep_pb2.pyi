from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrackingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRACKING_MODE_UNSPECIFIED: _ClassVar[TrackingMode]
    TRACKING_MODE_EXPLICIT: _ClassVar[TrackingMode]
    TRACKING_MODE_SYNC: _ClassVar[TrackingMode]
    TRACKING_MODE_ASYNC: _ClassVar[TrackingMode]
    TRACKING_MODE_FILE: _ClassVar[TrackingMode]
TRACKING_MODE_UNSPECIFIED: TrackingMode
TRACKING_MODE_EXPLICIT: TrackingMode
TRACKING_MODE_SYNC: TrackingMode
TRACKING_MODE_ASYNC: TrackingMode
TRACKING_MODE_FILE: TrackingMode

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "devices", "sessions", "regions", "leases", "host_bytes", "tracking_modes", "quota", "session_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRACKING_MODES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    version: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    sessions: int
    regions: int
    leases: int
    host_bytes: int
    tracking_modes: _containers.RepeatedScalarFieldContainer[str]
    quota: Quota
    session_id: str
    def __init__(self, version: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., sessions: _Optional[int] = ..., regions: _Optional[int] = ..., leases: _Optional[int] = ..., host_bytes: _Optional[int] = ..., tracking_modes: _Optional[_Iterable[str]] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("max_bytes", "max_regions", "used_bytes", "used_regions")
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REGIONS_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_REGIONS_FIELD_NUMBER: _ClassVar[int]
    max_bytes: int
    max_regions: int
    used_bytes: int
    used_regions: int
    def __init__(self, max_bytes: _Optional[int] = ..., max_regions: _Optional[int] = ..., used_bytes: _Optional[int] = ..., used_regions: _Optional[int] = ...) -> None: ...

class MemfdSource(_message.Message):
    __slots__ = ("fd_ticket", "nbytes", "writer_base")
    FD_TICKET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    WRITER_BASE_FIELD_NUMBER: _ClassVar[int]
    fd_ticket: str
    nbytes: int
    writer_base: int
    def __init__(self, fd_ticket: _Optional[str] = ..., nbytes: _Optional[int] = ..., writer_base: _Optional[int] = ...) -> None: ...

class FileSource(_message.Message):
    __slots__ = ("path", "fd_ticket")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FD_TICKET_FIELD_NUMBER: _ClassVar[int]
    path: str
    fd_ticket: str
    def __init__(self, path: _Optional[str] = ..., fd_ticket: _Optional[str] = ...) -> None: ...

class RegisterRegionRequest(_message.Message):
    __slots__ = ("name", "memfd", "file", "tracking", "block_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMFD_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    TRACKING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    memfd: MemfdSource
    file: FileSource
    tracking: TrackingMode
    block_size: int
    def __init__(self, name: _Optional[str] = ..., memfd: _Optional[_Union[MemfdSource, _Mapping]] = ..., file: _Optional[_Union[FileSource, _Mapping]] = ..., tracking: _Optional[_Union[TrackingMode, str]] = ..., block_size: _Optional[int] = ...) -> None: ...

class RegisterRegionResponse(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: Region
    def __init__(self, region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class UnregisterRegionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterRegionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRegionsRequest(_message.Message):
    __slots__ = ("all",)
    ALL_FIELD_NUMBER: _ClassVar[int]
    all: bool
    def __init__(self, all: _Optional[bool] = ...) -> None: ...

class ListRegionsResponse(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[Region]
    def __init__(self, regions: _Optional[_Iterable[_Union[Region, _Mapping]]] = ...) -> None: ...

class DescribeRegionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DescribeRegionResponse(_message.Message):
    __slots__ = ("region",)
    REGION_FIELD_NUMBER: _ClassVar[int]
    region: Region
    def __init__(self, region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("device", "valid_pages", "generation", "leases", "buffers", "nbytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VALID_PAGES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    valid_pages: int
    generation: int
    leases: int
    buffers: int
    nbytes: int
    def __init__(self, device: _Optional[str] = ..., valid_pages: _Optional[int] = ..., generation: _Optional[int] = ..., leases: _Optional[int] = ..., buffers: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class RegionStats(_message.Message):
    __slots__ = ("invalidations", "pages_invalidated", "syncs", "pages_copied", "bytes_copied", "host_bytes_read", "sync_seconds", "verifies", "pages_verified", "verify_mismatches", "resyncs", "lease_waits")
    INVALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    PAGES_INVALIDATED_FIELD_NUMBER: _ClassVar[int]
    SYNCS_FIELD_NUMBER: _ClassVar[int]
    PAGES_COPIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_COPIED_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    SYNC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VERIFIES_FIELD_NUMBER: _ClassVar[int]
    PAGES_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    LEASE_WAITS_FIELD_NUMBER: _ClassVar[int]
    invalidations: int
    pages_invalidated: int
    syncs: int
    pages_copied: int
    bytes_copied: int
    host_bytes_read: int
    sync_seconds: float
    verifies: int
    pages_verified: int
    verify_mismatches: int
    resyncs: int
    lease_waits: int
    def __init__(self, invalidations: _Optional[int] = ..., pages_invalidated: _Optional[int] = ..., syncs: _Optional[int] = ..., pages_copied: _Optional[int] = ..., bytes_copied: _Optional[int] = ..., host_bytes_read: _Optional[int] = ..., sync_seconds: _Optional[float] = ..., verifies: _Optional[int] = ..., pages_verified: _Optional[int] = ..., verify_mismatches: _Optional[int] = ..., resyncs: _Optional[int] = ..., lease_waits: _Optional[int] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("name", "kind", "nbytes", "npages", "block_size", "tracking", "generation", "replicas", "stats", "failed", "owner", "read_only", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NPAGES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRACKING_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    nbytes: int
    npages: int
    block_size: int
    tracking: str
    generation: int
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    stats: RegionStats
    failed: str
    owner: str
    read_only: bool
    path: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., nbytes: _Optional[int] = ..., npages: _Optional[int] = ..., block_size: _Optional[int] = ..., tracking: _Optional[str] = ..., generation: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., stats: _Optional[_Union[RegionStats, _Mapping]] = ..., failed: _Optional[str] = ..., owner: _Optional[str] = ..., read_only: _Optional[bool] = ..., path: _Optional[str] = ...) -> None: ...

class ShareRegionRequest(_message.Message):
    __slots__ = ("name", "grantee", "revoke")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRANTEE_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    name: str
    grantee: str
    revoke: bool
    def __init__(self, name: _Optional[str] = ..., grantee: _Optional[str] = ..., revoke: _Optional[bool] = ...) -> None: ...

class ShareRegionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("name", "devices", "timeout_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    timeout_ms: int
    def __init__(self, name: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class SyncReport(_message.Message):
    __slots__ = ("region", "generation", "pages_copied", "bytes_copied", "host_bytes_read", "runs", "seconds", "devices")
    REGION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PAGES_COPIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_COPIED_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    region: str
    generation: int
    pages_copied: int
    bytes_copied: int
    host_bytes_read: int
    runs: int
    seconds: float
    devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, region: _Optional[str] = ..., generation: _Optional[int] = ..., pages_copied: _Optional[int] = ..., bytes_copied: _Optional[int] = ..., host_bytes_read: _Optional[int] = ..., runs: _Optional[int] = ..., seconds: _Optional[float] = ..., devices: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicateResponse(_message.Message):
    __slots__ = ("bytes_copied", "report", "bytes_total")
    BYTES_COPIED_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    bytes_copied: int
    report: SyncReport
    bytes_total: int
    def __init__(self, bytes_copied: _Optional[int] = ..., report: _Optional[_Union[SyncReport, _Mapping]] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("name", "devices", "timeout_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    timeout_ms: int
    def __init__(self, name: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("report",)
    REPORT_FIELD_NUMBER: _ClassVar[int]
    report: SyncReport
    def __init__(self, report: _Optional[_Union[SyncReport, _Mapping]] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("name", "device", "fresh", "timeout_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FRESH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    fresh: bool
    timeout_ms: int
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., fresh: _Optional[bool] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("lease_id", "generation", "invalid_runs", "nbytes", "device", "export_kind", "cuda_ipc_handle", "buffer_nbytes", "gpu_uuid", "granularity")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    INVALID_RUNS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_KIND_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_HANDLE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_NBYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_UUID_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    generation: int
    invalid_runs: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    device: str
    export_kind: str
    cuda_ipc_handle: bytes
    buffer_nbytes: int
    gpu_uuid: str
    granularity: int
    def __init__(self, lease_id: _Optional[int] = ..., generation: _Optional[int] = ..., invalid_runs: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., device: _Optional[str] = ..., export_kind: _Optional[str] = ..., cuda_ipc_handle: _Optional[bytes] = ..., buffer_nbytes: _Optional[int] = ..., gpu_uuid: _Optional[str] = ..., granularity: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    def __init__(self, lease_id: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("name", "offset", "length", "runs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    length: int
    runs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., runs: _Optional[_Iterable[int]] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("name", "devices", "resync")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    name: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    resync: bool
    def __init__(self, name: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., resync: _Optional[bool] = ...) -> None: ...

class VerifyReport(_message.Message):
    __slots__ = ("device", "pages_checked", "mismatched_runs", "resynced", "stale_pages")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PAGES_CHECKED_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_RUNS_FIELD_NUMBER: _ClassVar[int]
    RESYNCED_FIELD_NUMBER: _ClassVar[int]
    STALE_PAGES_FIELD_NUMBER: _ClassVar[int]
    device: str
    pages_checked: int
    mismatched_runs: _containers.RepeatedScalarFieldContainer[int]
    resynced: bool
    stale_pages: int
    def __init__(self, device: _Optional[str] = ..., pages_checked: _Optional[int] = ..., mismatched_runs: _Optional[_Iterable[int]] = ..., resynced: _Optional[bool] = ..., stale_pages: _Optional[int] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[VerifyReport]
    def __init__(self, reports: _Optional[_Iterable[_Union[VerifyReport, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("names", "coalesce_ms")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    COALESCE_MS_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    coalesce_ms: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., coalesce_ms: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "region", "generation", "runs", "device", "pages", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    region: str
    generation: int
    runs: _containers.RepeatedScalarFieldContainer[int]
    device: str
    pages: int
    message: str
    def __init__(self, kind: _Optional[str] = ..., region: _Optional[str] = ..., generation: _Optional[int] = ..., runs: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ..., pages: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("events", "dropped")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    dropped: int
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., dropped: _Optional[int] = ...) -> None: ...
