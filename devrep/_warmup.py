"""``kernels()``: the numba kernels (``devrep._jit``), loaded on first use and compiled on throwaway arrays.

numba keeps the arguments of the call that *compiles* a specialization alive in a reference cycle until Python's
cyclic GC runs. If that first call is a real one, the server keeps a region's or a replica's mapping (hundreds of
MiB of shared memory) after it is freed. So the first ``kernels()`` call runs every kernel once on a few pages of
scratch memory, read-only and writable (each kernel is specialized on that), before any caller gets them. It is
also what keeps numba out of ``import devrep...``: ``devrep serve`` reaches SERVING without it and then calls
``compile_kernels()`` from a thread, so the first replicate does not pay for it either (benchmarks S1, S1b).
"""

from __future__ import annotations

import threading
from types import ModuleType

import numpy as np
import numpy.typing as npt

from ._pages import PAGE_SIZE

_lock = threading.Lock()
_loaded: ModuleType | None = None


def _arrays() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    writable = np.zeros(2 * PAGE_SIZE, dtype=np.uint8)
    readonly = np.zeros(2 * PAGE_SIZE, dtype=np.uint8)
    readonly.flags.writeable = False
    return writable, readonly


def kernels() -> ModuleType:
    """``devrep._jit``, every kernel compiled (or loaded from numba's cache) on scratch arrays first."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            from . import _jit

            runs = np.array([[0, 1]], dtype=np.int64)
            pages = np.array([0], dtype=np.int64)
            for src in _arrays():
                _jit.hash_pages(src.view(np.uint64), pages, np.empty(1, dtype=np.uint64))
                _jit.scatter(src, np.zeros(2 * PAGE_SIZE, dtype=np.uint8), runs)
                _jit.gather(src, pages, np.zeros(2 * PAGE_SIZE, dtype=np.uint8))
            _loaded = _jit
    return _loaded


def compile_kernels() -> None:
    """Load the kernels now (``devrep serve`` calls it from a thread once it is serving)."""
    kernels()
