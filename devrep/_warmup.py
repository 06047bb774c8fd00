"""Compile (or load from numba's cache) every kernel devrep runs on host arrays, on throwaway arrays.

numba keeps the arguments of the call that *compiles* a specialization alive in a reference cycle until Python's
cyclic GC runs. If that first call is a real one, the server keeps a region's or a replica's mapping (hundreds of
MiB of shared memory) after it is freed. The server calls ``compile_kernels()`` before it serves, so the arrays
numba keeps are these few pages. Each kernel is specialized on whether an array is read-only, so both kinds.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ._pages import PAGE_SIZE


def _arrays() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    writable = np.zeros(2 * PAGE_SIZE, dtype=np.uint8)
    readonly = np.zeros(2 * PAGE_SIZE, dtype=np.uint8)
    readonly.flags.writeable = False
    return writable, readonly


def compile_kernels() -> None:
    from .backends._cpu import _scatter_parallel, _scatter_serial
    from .backends._staging import _gather
    from .hashing import hash_pages

    runs = np.array([[0, 1]], dtype=np.int64)
    pages = np.array([0], dtype=np.int64)
    for src in _arrays():
        hash_pages(src)
        for scatter in (_scatter_serial, _scatter_parallel):
            scatter(src, np.zeros(2 * PAGE_SIZE, dtype=np.uint8), runs)
        _gather(src, pages, np.zeros(2 * PAGE_SIZE, dtype=np.uint8))
