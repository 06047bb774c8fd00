"""Page hash: XXH64 with seed 0 of each 4 KiB page, bit-identical to ``xxhash.xxh64_intdigest(page)``.

Compiled with numba (one thread per core, ``prange`` over pages); the spec every backend follows is in
``devrep/kernels/README.md``. Pages are always whole: a region's last partial page is hashed zero-padded, as
it is stored in every replica.
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt

from ._numba_cache import NUMBA_CACHE
from ._pages import PAGE_SIZE

_P1 = np.uint64(11400714785074694791)
_P2 = np.uint64(14029467366897019727)
_P3 = np.uint64(1609587929392839161)
_P4 = np.uint64(9650029242287828579)
_WORDS = PAGE_SIZE // 8


@numba.njit(inline="always")
def _rotl(x: np.uint64, r: int) -> np.uint64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(inline="always")
def _round(acc: np.uint64, lane: np.uint64) -> np.uint64:
    acc = acc + lane * _P2
    acc = _rotl(acc, 31)
    return acc * _P1


@numba.njit(inline="always")
def _merge(h: np.uint64, v: np.uint64) -> np.uint64:
    h = h ^ _round(np.uint64(0), v)
    return h * _P1 + _P4


@numba.njit(inline="always")
def _xxh64_page(words: npt.NDArray[np.uint64], base: int) -> np.uint64:
    v1 = _P1 + _P2
    v2 = _P2
    v3 = np.uint64(0)
    v4 = np.uint64(0) - _P1
    for i in range(base, base + _WORDS, 4):
        v1 = _round(v1, words[i])
        v2 = _round(v2, words[i + 1])
        v3 = _round(v3, words[i + 2])
        v4 = _round(v4, words[i + 3])
    h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
    h = _merge(h, v1)
    h = _merge(h, v2)
    h = _merge(h, v3)
    h = _merge(h, v4)
    h = h + np.uint64(PAGE_SIZE)
    h = h ^ (h >> np.uint64(33))
    h = h * _P2
    h = h ^ (h >> np.uint64(29))
    h = h * _P3
    return h ^ (h >> np.uint64(32))


@numba.njit(parallel=True, cache=NUMBA_CACHE, nogil=True)
def _hash_pages(
    words: npt.NDArray[np.uint64], pages: npt.NDArray[np.int64], out: npt.NDArray[np.uint64]
) -> None:
    for k in numba.prange(pages.shape[0]):
        out[k] = _xxh64_page(words, pages[k] * _WORDS)


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
        _hash_pages(words, pages, out)
    return out
