"""Page arithmetic and run coalescing, all as whole-array numpy operations."""

from __future__ import annotations

import mmap

import numpy as np
import numpy.typing as npt

from .errors import AlignmentError, InvalidArgumentError

PAGE_SIZE = mmap.PAGESIZE
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

PageArray = npt.NDArray[np.int64]
"""Sorted, unique page indices."""

RunArray = npt.NDArray[np.int64]
"""Shape ``(n, 2)``: ``[first_page, page_count]`` per run, sorted, non-overlapping."""


def pages_for(nbytes: int) -> int:
    """Number of pages that cover ``nbytes`` (the last one may be partial)."""
    return (nbytes + PAGE_SIZE - 1) >> PAGE_SHIFT


def check_block_size(block_size: int) -> int:
    if block_size < PAGE_SIZE or block_size & (block_size - 1):
        raise InvalidArgumentError(
            f"block_size must be a power of two >= the page size ({PAGE_SIZE}), got {block_size}"
        )
    return block_size


def check_page_multiple(what: str, value: int) -> None:
    if value <= 0:
        raise InvalidArgumentError(f"{what} must be positive, got {value}")
    if value % PAGE_SIZE:
        raise AlignmentError(f"{what} must be a multiple of the page size ({PAGE_SIZE}), got {value}")


def byte_range_to_pages(offset: int, length: int, total_pages: int, pages_per_block: int = 1) -> PageArray:
    """Pages touched by ``[offset, offset+length)``, widened to whole blocks and clipped to the region."""
    if offset < 0 or length < 0:
        raise InvalidArgumentError(f"offset and length must be >= 0, got offset={offset} length={length}")
    if length == 0:
        return np.empty(0, dtype=np.int64)
    first = offset >> PAGE_SHIFT
    last = (offset + length - 1) >> PAGE_SHIFT
    if first >= total_pages:
        raise InvalidArgumentError(
            f"range starts at byte {offset}, beyond the region's {total_pages * PAGE_SIZE} bytes"
        )
    first -= first % pages_per_block
    last = min(total_pages - 1, last - last % pages_per_block + pages_per_block - 1)
    return np.arange(first, last + 1, dtype=np.int64)


def sorted_unique(pages: npt.ArrayLike) -> PageArray:
    """``np.unique`` with a fast path for input that is already sorted and unique (the common case)."""
    pages = np.asarray(pages, dtype=np.int64).reshape(-1)
    if pages.size < 2 or bool((pages[1:] > pages[:-1]).all()):
        return pages
    return np.unique(pages)


def widen_to_blocks(pages: PageArray, total_pages: int, pages_per_block: int) -> PageArray:
    """Every page of every block that contains one of ``pages``; sorted and unique."""
    pages = sorted_unique(pages)
    if pages.size and (pages[0] < 0 or pages[-1] >= total_pages):
        raise InvalidArgumentError(f"page index out of range [0, {total_pages})")
    if pages_per_block == 1 or pages.size == 0:
        return pages
    blocks = np.unique(pages // pages_per_block)
    out = (blocks[:, None] * pages_per_block + np.arange(pages_per_block)[None, :]).ravel()
    return out[out < total_pages]


def runs_from_mask(mask: npt.NDArray[np.bool_]) -> RunArray:
    """Coalesce the True entries of a per-page mask into ``[first, count]`` runs."""
    padded = np.concatenate(([False], mask.astype(bool, copy=False), [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).astype(np.int64)


def runs_from_pages(pages: PageArray) -> RunArray:
    """Coalesce sorted unique page indices into runs."""
    pages = np.asarray(pages, dtype=np.int64)
    if pages.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(pages[1:] != pages[:-1] + 1)  # a run ends at each of these entries
    runs = np.empty((breaks.size + 1, 2), dtype=np.int64)
    runs[0, 0] = pages[0]
    runs[1:, 0] = pages[breaks + 1]
    runs[:-1, 1] = pages[breaks] + 1
    runs[-1, 1] = pages[-1] + 1
    runs[:, 1] -= runs[:, 0]  # end -> count
    return runs


def pages_from_runs(runs: RunArray) -> PageArray:
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    if runs.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    counts = runs[:, 1]
    offsets = np.repeat(runs[:, 0] - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return np.arange(int(counts.sum()), dtype=np.int64) + offsets


def split_runs(runs: RunArray, max_pages: int) -> list[RunArray]:
    """Split runs into batches of at most ``max_pages`` pages (for progress reporting)."""
    batches: list[RunArray] = []
    current: list[tuple[int, int]] = []
    budget = max_pages
    for first, count in np.asarray(runs, dtype=np.int64).reshape(-1, 2).tolist():
        while count > 0:
            take = min(count, budget)
            current.append((first, take))
            first += take
            count -= take
            budget -= take
            if budget == 0:
                batches.append(np.array(current, dtype=np.int64))
                current, budget = [], max_pages
    if current:
        batches.append(np.array(current, dtype=np.int64))
    return batches
