"""Device backends behind one interface. ``cpu`` is built in; ``numa``, ``opencl`` and ``cuda`` load on first use."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import BackendUnavailableError, UnknownDeviceError
from ._base import Backend, DeviceBuffer, ExportHandle, Progress
from ._cpu import CpuBackend

__all__ = ["BACKENDS", "Backend", "CpuBackend", "DeviceBuffer", "ExportHandle", "Progress", "load_backend",
           "parse_device"]

# name -> (module, class); modules are imported lazily so a missing optional dependency only matters when used.
BACKENDS: dict[str, tuple[str, str]] = {
    "cpu": ("devrep.backends._cpu", "CpuBackend"),
    "numa": ("devrep.backends._numa", "NumaBackend"),
    "opencl": ("devrep.backends._opencl", "OpenCLBackend"),
    "cuda": ("devrep.backends._cuda", "CudaBackend"),
}


def parse_device(device: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``. Raises ``UnknownDeviceError`` for anything else."""
    kind, sep, index = str(device).partition(":")
    if not sep or kind not in BACKENDS or not index.isdigit():
        raise UnknownDeviceError(
            f"bad device name {device!r}: expected KIND:INDEX with KIND one of {', '.join(BACKENDS)} (e.g. cpu:0)"
        )
    return kind, int(index)


def load_backend(kind: str, **options: Any) -> Backend:
    """Instantiate a backend by name; a missing driver or package is a ``BackendUnavailableError`` (a
    ``BackendError``, FAILED_PRECONDITION in the service) saying what to install."""
    if kind not in BACKENDS:
        raise UnknownDeviceError(f"unknown backend {kind!r}; known: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailableError(f"backend {kind!r} is not available: {exc} (install devrep[{kind}])") from exc
    backend: Backend = getattr(module, class_name)(**options)
    return backend
