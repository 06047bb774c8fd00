"""Where the device kernel sources live (shared by the OpenCL and CUDA backends, which must not import each
other's driver packages), and the stamp that ties the prebuilt PoCL bitcode to what it was built from.

The kernels are package data (``devrep/kernels/``: ``devrep.cl``, ``devrep.cu``, ``pocl/*.bc``), so a wheel
carries them and they are found through ``importlib.resources`` wherever devrep is installed. There is one copy
of each file: the one in the package.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from ..errors import BackendError

KERNELS_ENV = "DEVREP_KERNELS_DIR"
POCL_DISTRIBUTION = "pocl-binary-distribution"
BUILD_SCRIPT = "build_pocl_bitcode.sh"


def kernels_dir() -> Traversable:
    """``$DEVREP_KERNELS_DIR`` (for tests and kernel development), else the ``devrep.kernels`` package data."""
    env = os.environ.get(KERNELS_ENV)
    return Path(env) if env else files("devrep") / "kernels"


def kernel_source(override: str | None, filename: str, api: str, devices: str) -> str:
    """The kernel source a backend builds: ``override`` (the ``kernel_source`` option, for tests), else
    ``filename`` from ``kernels_dir()``; an unreadable file is a ``BackendError`` naming ``api`` and ``devices``."""
    if override is not None:
        return override
    try:
        return (kernels_dir() / filename).read_text()
    except OSError as exc:
        raise BackendError(f"cannot read the {api} kernels for {devices}: {exc} (set ${KERNELS_ENV})") from exc


def pocl_version() -> str:
    """The installed PoCL wheel's version, or ``"none"`` when it is not installed."""
    try:
        return importlib.metadata.version(POCL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def bitcode_stamp(directory: Traversable | None = None, pocl: str | None = None) -> str:
    """What ``pocl/STAMP`` must say for bitcode built from ``directory``'s ``devrep.cl`` by its
    ``build_pocl_bitcode.sh`` (which holds every clang / llvm-link flag) against PoCL version ``pocl``.

    A change to any of the three makes the bitcode stale: the backend then refuses it, and
    ``tests/test_kernels_build.py`` fails until the bitcode is rebuilt. ``build_pocl_bitcode.sh`` writes the
    same three lines with ``sha256sum``.
    """
    directory = kernels_dir() if directory is None else directory
    lines = [f"{name} {hashlib.sha256((directory / name).read_bytes()).hexdigest()}"
             for name in ("devrep.cl", BUILD_SCRIPT)]
    lines.append(f"{POCL_DISTRIBUTION} {pocl_version() if pocl is None else pocl}")
    return "\n".join(lines) + "\n"
