"""devrep: never-stale read-only replicas of host memory in device memory.

In-process use::

    import devrep
    with devrep.Replicator() as rep:
        region = rep.create_region("table", 64 << 20)
        rep.replicate("table", ["cpu:0", "cpu:1"])
        ...

As a client of the ``devrep serve`` daemon::

    client = devrep.connect()          # DEVREP_ADDRESS, or the default socket
"""

from ._pages import PAGE_SIZE
from .backends import Backend, DeviceBuffer, ExportHandle
from .engine import Replicator
from .errors import (
    AlignmentError,
    AlreadyExistsError,
    BackendError,
    BackendUnavailableError,
    DeadlineExceededError,
    DevrepError,
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseTimeoutError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnknownDeviceError,
    UnsupportedModeError,
)
from .region import Event, Lease, Region, RegionInfo, RegionStats, Replica, SyncReport, VerifyReport

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The client pulls in grpc and the generated stubs; in-process users should not pay for that.
    if name in ("connect", "Client"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'devrep' has no attribute {name!r}")


__all__ = [
    "PAGE_SIZE",
    "AlignmentError",
    "AlreadyExistsError",
    "Backend",
    "BackendError",
    "BackendUnavailableError",
    "Client",
    "DeadlineExceededError",
    "DeviceBuffer",
    "DevrepError",
    "Event",
    "ExportHandle",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "Lease",
    "LeaseTimeoutError",
    "NotFoundError",
    "PermissionDeniedError",
    "Region",
    "RegionInfo",
    "RegionStats",
    "Replica",
    "Replicator",
    "ResourceExhaustedError",
    "SyncReport",
    "UnknownDeviceError",
    "UnsupportedModeError",
    "VerifyReport",
    "__version__",
    "connect",
]
