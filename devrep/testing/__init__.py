"""Test doubles for the parts of devrep that need hardware this machine may not have.

``devrep.testing.fake_cuda`` fakes the slice of the CuPy API and of the CUDA driver's VMM calls that the CUDA
backend and client use, with host memory standing in for GPU memory and every stream / event / synchronize
call recorded. The backend and client take these by injection (``load_backend("cuda", cupy_module=...,
vmm=...)``), so their host-side logic (ordering, error mapping, cleanup) is tested without a GPU. They are
not a GPU simulator: kernels run as numpy code at launch, and streams run nothing asynchronously.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def random_host(npages: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """``npages`` pages of seeded random bytes in page-aligned memory (what a backend's ``copy_runs`` takes)."""
    from .._pages import PAGE_SIZE
    from ..backends._staging import aligned_empty

    host = aligned_empty(npages * PAGE_SIZE)
    host[:] = np.random.default_rng(seed).integers(0, 256, host.size, dtype=np.uint8)
    return host
