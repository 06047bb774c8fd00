"""Page hash: XXH64 with seed 0 of each 4 KiB page, bit-identical to ``xxhash.xxh64_intdigest(page)``.

Compiled with numba (one thread per core, ``prange`` over pages; the kernel is in ``devrep._jit``, loaded on first
use); the spec every backend follows is in
``devrep/kernels/README.md``. Pages are always whole: a region's last partial page is hashed zero-padded, as
it is stored in every replica.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ._pages import PAGE_SIZE
from ._warmup import kernels


def hash_pages(buffer: npt.NDArray[np.uint8], pages: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.uint64]:
    """XXH64 of the given pages (all pages when ``None``) of a page-aligned, page-multiple byte buffer."""
    if buffer.nbytes % PAGE_SIZE:
        raise ValueError(f"buffer length {buffer.nbytes} is not a multiple of the page size")
    words = buffer.reshape(-1).view(np.uint64)
    total = buffer.nbytes // PAGE_SIZE
    if pages is None:
        pages = np.arange(total, dtype=np.int64)
    else:
        pages = np.ascontiguousarray(pages, dtype=np.int64)
        if pages.size and (pages.min() < 0 or pages.max() >= total):
            raise ValueError(f"page index out of range [0, {total})")
    out = np.empty(pages.shape[0], dtype=np.uint64)
    if pages.size:
        kernels().hash_pages(words, pages, out)
    return out
