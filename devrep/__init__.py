"""devrep: never-stale read-only replicas of host memory in device memory.

In-process use::

    import devrep
    with devrep.Replicator() as rep:
        region = rep.create_region("table", 64 << 20)
        rep.replicate("table", ["cpu:0", "cpu:1"])
        ...

As a client of the ``devrep serve`` daemon::

    client = devrep.connect()          # DEVREP_ADDRESS, or the default socket

``import devrep`` is cheap: every public name below loads its module on first use (as CuPy does), so a
client does not pay for the engine and numba, and the sync-mode fault helper (``devrep.tracking._handler``,
a separate process) imports only the standard library and ``devrep.linux``.

Layers
------
The package is a stack. A module imports only from its own layer or from the layers its row names, never
upwards and never in a cycle; ``tests/test_layers.py`` walks every import statement (AST, function-level
imports too) and fails on a violation. ``_LAYERS`` below is that rule as data, written once::

    tools     cli, demo, doctor, kube, testing, this facade   anything below
    service   service/, metrics             (gRPC server)       engine and below, wire
    client    client/                       (gRPC client)       host, linux, wire, leaf -- never service/engine
    engine    region, engine                (coherence)         backends/tracking and below
    devices   backends/, tracking/          (copy, detect)      host and below
    host      memory, numa, protect, views, hashing, ...        linux, leaf
    linux     linux/                        (ctypes syscalls)   leaf
    wire      wire/                         (stubs, packets)    leaf
    leaf      errors, _pages, sizes, model, _console, _signals  nothing of devrep

Why this order: a write's signal starts at the bottom (a kernel event read by ``linux``) and climbs to the
service, so each layer can be tested with only the ones below it running; the client shares with the server
exactly what crosses the wire (``wire``, ``model``, ``errors``) and so never loads the engine or numba.
Importing a parent package (``from .. import __version__``) is not an edge: Python has imported it already.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr

# errors is a leaf module (standard library only) that every layer raises from: loading it eagerly is free.
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

__version__ = "0.1.0"

# The layer rule (see the module docstring): layer -> (its modules, the layers it may import besides itself).
# A module belongs to the layer of its longest listed prefix.
_LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "leaf": (("devrep.errors", "devrep._pages", "devrep.sizes", "devrep.model", "devrep._console", "devrep._lazy",
              "devrep._signals"), ()),
    "wire": (("devrep.wire",), ("leaf",)),
    "linux": (("devrep.linux",), ("leaf",)),
    "host": (("devrep.memory", "devrep.numa", "devrep.protect", "devrep.views", "devrep.hashing", "devrep._jit",
              "devrep._numba_cache", "devrep._warmup", "devrep.safetensors_io"), ("leaf", "linux")),
    "devices": (("devrep.backends", "devrep.tracking"), ("leaf", "linux", "host")),
    "engine": (("devrep.region", "devrep.engine"), ("leaf", "linux", "host", "devices")),
    "service": (("devrep.service", "devrep.metrics"), ("leaf", "wire", "linux", "host", "devices", "engine")),
    "client": (("devrep.client",), ("leaf", "wire", "linux", "host")),
    "tools": (("devrep", "devrep.cli", "devrep.demo", "devrep.doctor", "devrep.kube", "devrep.testing"),
              ("leaf", "wire", "linux", "host", "devices", "engine", "service", "client")),
}

# Public name -> the module (relative to this package) that defines it, imported on first access.
_LAZY = {
    "PAGE_SIZE": "._pages",
    "Backend": ".backends",
    "DeviceBuffer": ".backends",
    "ExportHandle": ".backends",
    "Replicator": ".engine",
    "Event": ".model",
    "Lease": ".region",
    "Region": ".region",
    "RegionInfo": ".model",
    "RegionStats": ".model",
    "Replica": ".region",
    "SyncReport": ".model",
    "VerifyReport": ".model",
    "Client": ".client",
    "connect": ".client",
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from ._pages import PAGE_SIZE
    from .backends import Backend, DeviceBuffer, ExportHandle
    from .client import Client, connect
    from .engine import Replicator
    from .model import Event, RegionInfo, RegionStats, SyncReport, VerifyReport
    from .region import Lease, Region, Replica


# ``import devrep`` then ``devrep.tracking.X`` worked while this module imported everything eagerly: submodules too.
__getattr__ = lazy_getattr(__name__, _LAZY, globals(), submodules=True)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
