"""Every numba kernel devrep runs on host memory, in one module that only ``devrep._warmup.kernels()`` imports.

Importing numba costs ~0.2 s and loading the compiled kernels more, so nothing imports this module at start:
``hash_pages``, the CPU backend's copy loop and the staging gather reach it through ``kernels()``, which also
makes sure each kernel's first (compiling) call is made on throwaway arrays (see ``devrep._warmup``). ``devrep
serve`` calls ``kernels()`` from a thread once it is serving, so the first replicate does not wait either.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_cache import NUMBA_CACHE
from ._pages import PAGE_SIZE

# ---------------------------------------------------------------------------------------------- copies


@intrinsic
def _memcpy(typingctx: Any, dst: Any, dst_offset: Any, src: Any, src_offset: Any, nbytes: Any) -> tuple[Any, Any]:
    """``memcpy(dst.data + dst_offset, src.data + src_offset, nbytes)`` inside compiled code (LLVM's memcpy
    intrinsic, which calls glibc's for sizes like these). numba's own ``dst[a:b] = src[c:d]`` copies byte-wise
    with overlap checks: 2.7 us per 4 KiB page here against 0.7 us for memcpy (benchmark P3o). Callers check
    every bound first: this is raw memory."""
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        dst_value, dst_off, src_value, src_off, count = args
        d = context.make_array(signature.args[0])(context, builder, dst_value)
        s = context.make_array(signature.args[2])(context, builder, src_value)
        cgutils.raw_memcpy(builder, builder.gep(d.data, [dst_off]), builder.gep(s.data, [src_off]), count, 1)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=NUMBA_CACHE, nogil=True)
def scatter(src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8], runs: npt.NDArray[np.int64]) -> None:
    """Page runs ``[first, count]`` of ``src`` to the same offsets of ``dst``. One thread: the CPU backend shares
    a scattered copy out between threads itself (``devrep.backends._copypool``), which numba's ``prange`` did not
    speed up here."""
    for k in range(runs.shape[0]):
        offset = runs[k, 0] * PAGE_SIZE
        _memcpy(dst, offset, src, offset, runs[k, 1] * PAGE_SIZE)  # type: ignore[call-arg]  # numba intrinsic


@numba.njit(parallel=True, cache=NUMBA_CACHE, nogil=True)
def gather(src: npt.NDArray[np.uint8], pages: npt.NDArray[np.int64], dst: npt.NDArray[np.uint8]) -> None:
    """Pages ``pages`` of ``src`` packed back to back into ``dst``."""
    for k in numba.prange(pages.shape[0]):
        _memcpy(dst, k * PAGE_SIZE, src, pages[k] * PAGE_SIZE, PAGE_SIZE)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------------- XXH64

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
def hash_pages(words: npt.NDArray[np.uint64], pages: npt.NDArray[np.int64], out: npt.NDArray[np.uint64]) -> None:
    """XXH64 (seed 0) of pages ``pages`` of ``words`` (the buffer viewed as uint64) into ``out``."""
    for k in numba.prange(pages.shape[0]):
        out[k] = _xxh64_page(words, pages[k] * _WORDS)
