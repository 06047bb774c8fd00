"""Host-side helpers shared by the OpenCL and CUDA backends: run checks, page packing, aligned buffers."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE, RunArray, pages_from_runs
from .._warmup import kernels
from ..errors import InvalidArgumentError
from ._base import DeviceBuffer


def gather_pages(src: npt.NDArray[np.uint8], pages: npt.NDArray[np.int64], dst: npt.NDArray[np.uint8]) -> None:
    """Pack ``src``'s pages ``pages`` back to back into ``dst`` (both threads of the host work on it)."""
    if pages.size:
        pages = np.ascontiguousarray(pages, dtype=np.int64)
        if pages.min() < 0 or int(pages.max()) * PAGE_SIZE + PAGE_SIZE > src.size or pages.size * PAGE_SIZE > dst.size:
            # The compiled gather copies raw memory: nothing outside either array may reach it.
            raise InvalidArgumentError(f"cannot gather {pages.size} pages (max {int(pages.max())}) of a "
                                       f"{src.size}-byte array into {dst.size} bytes")
        kernels().gather(src, pages, dst)


def aligned_empty(nbytes: int) -> npt.NDArray[np.uint8]:
    """A page-aligned uint8 array backed by an anonymous mapping (numpy's own arrays start 16 B into a page,
    which puts large copies on the wrong side of glibc's alignment cliff, see shared/limits.md)."""
    size = max(PAGE_SIZE, -(-nbytes // PAGE_SIZE) * PAGE_SIZE)
    return np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)[:nbytes]


def check_runs(runs: npt.ArrayLike, npages: int) -> RunArray:
    """Validate page runs ``[first, count]`` against ``npages`` pages; returns them as a contiguous ``(n, 2)``
    int64 array. Shared by every backend's copy (CPU, NUMA, OpenCL, CUDA): runs must lie inside
    ``[0, npages)``, have ``count > 0``, and be sorted by ``first`` without overlapping (touching is fine).
    Overlapping or unsorted runs would let a packed batch land on the wrong pages (the staged paths scatter
    page k of a batch to the k-th listed page) and copy pages twice, so they are refused here, once."""
    arr = np.ascontiguousarray(np.asarray(runs, dtype=np.int64).reshape(-1, 2))
    if not arr.size:
        return arr
    first, count = arr[:, 0], arr[:, 1]
    if (first < 0).any() or (count <= 0).any() or (first + count > npages).any():
        raise InvalidArgumentError(f"page runs must be [first, count] with count > 0 inside [0, {npages})")
    if arr.shape[0] > 1:
        bad = np.flatnonzero(first[1:] < first[:-1] + count[:-1])
        if bad.size:
            k = int(bad[0])
            raise InvalidArgumentError(
                f"page runs must be sorted and must not overlap: run {k + 1} {arr[k + 1].tolist()} starts before "
                f"run {k} {arr[k].tolist()} ends"
            )
    return arr


def check_copy(host: npt.NDArray[np.uint8], runs: RunArray, targets: list[DeviceBuffer]) -> RunArray:
    """Validate a ``copy_runs`` call; returns the runs as a contiguous ``(n, 2)`` int64 array."""
    if host.dtype != np.uint8 or host.ndim != 1 or host.nbytes % PAGE_SIZE:
        raise InvalidArgumentError(
            f"host memory must be a 1-d uint8 array of whole pages, got {host.dtype} shape {host.shape}"
        )
    runs = check_runs(runs, host.nbytes // PAGE_SIZE)
    for t in targets:
        if t.freed:
            raise InvalidArgumentError(f"buffer on {t.device} was freed")
        if t.nbytes < host.nbytes:
            raise InvalidArgumentError(
                f"buffer on {t.device} holds {t.nbytes} bytes, less than the host's {host.nbytes}"
            )
    return runs


def check_pages(pages: npt.ArrayLike, npages: int, device: str) -> npt.NDArray[np.int64]:
    out = np.ascontiguousarray(np.asarray(pages, dtype=np.int64).reshape(-1))
    if out.size and (out.min() < 0 or out.max() >= npages):
        raise InvalidArgumentError(f"page index out of range [0, {npages}) for the buffer on {device}")
    return out


def check_range(buffer: DeviceBuffer, offset: int, nbytes: int | None) -> int:
    """Validate a ``read`` range; returns the byte count."""
    if buffer.freed:
        raise InvalidArgumentError(f"buffer on {buffer.device} was freed")
    if nbytes is None:
        nbytes = buffer.nbytes - offset
    if offset < 0 or nbytes < 0 or offset + nbytes > buffer.nbytes:
        raise InvalidArgumentError(
            f"read of {nbytes} bytes at offset {offset} is outside the {buffer.nbytes}-byte buffer on {buffer.device}"
        )
    return nbytes


def page_batches(runs: RunArray, batch_pages: int) -> Iterator[npt.NDArray[np.int64]]:
    """The runs' page indices in order, at most ``batch_pages`` at a time."""
    pages = pages_from_runs(runs)
    for start in range(0, pages.size, batch_pages):
        yield pages[start:start + batch_pages]
