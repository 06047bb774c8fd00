"""Where the device kernel sources live (shared by the OpenCL and CUDA backends, which must not import each
other's driver packages)."""

from __future__ import annotations

import os
from pathlib import Path

KERNELS_ENV = "DEVREP_KERNELS_DIR"


def kernels_dir() -> Path:
    """``$DEVREP_KERNELS_DIR``, else the repository's ``kernels/`` (``devrep.cl``, ``devrep.cu``, ``pocl/``)."""
    env = os.environ.get(KERNELS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "kernels"
