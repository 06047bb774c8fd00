"""Host-side helpers shared by the OpenCL and CUDA backends: page packing, aligned buffers (the checks of their
arguments are ``Backend``'s, in ``_base.py``)."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE, RunArray, pages_from_runs
from .._warmup import kernels
from ..errors import InvalidArgumentError


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


def page_batches(runs: RunArray, batch_pages: int) -> Iterator[npt.NDArray[np.int64]]:
    """The runs' page indices in order, at most ``batch_pages`` at a time."""
    pages = pages_from_runs(runs)
    for start in range(0, pages.size, batch_pages):
        yield pages[start:start + batch_pages]
