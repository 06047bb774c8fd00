"""CPU backend: each "device" is host RAM; a replica is a sealed memfd another process can map read-only.

The embedded default, and the reference the other backends are tested against.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE, RunArray, split_runs
from .._warmup import kernels
from ..errors import InvalidArgumentError, ResourceExhaustedError
from ..hashing import hash_pages
from ..memory import (
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SHRINK,
    add_seals,
    allocate_pages,
    map_fd,
    memfd_create,
)
from ._base import Backend, DeviceBuffer, ExportHandle, Progress
from ._staging import check_range, check_runs

# Copies at least this long go through one numpy copy (glibc memcpy with non-temporal stores past its
# threshold); shorter runs are batched through a compiled loop so thousands of scattered pages cost one call.
_LARGE_RUN_BYTES = 1 << 20
# Progress is reported per batch; large enough that each memcpy stays above glibc's non-temporal threshold.
_PROGRESS_BATCH_PAGES = (256 << 20) // PAGE_SIZE


_PARALLEL_MIN_PAGES = 8192


def copy_page_runs(src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8], runs: RunArray) -> None:
    """Copy page runs between two page-aligned byte arrays at equal offsets."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    if len(runs) and src.size != dst.size:
        raise InvalidArgumentError(f"cannot copy page runs between arrays of {src.size} and {dst.size} bytes")
    # The compiled loop copies raw memory: a run outside the arrays must never reach it (the shared check also
    # refuses overlapping or unsorted runs, as every backend does).
    runs = check_runs(runs, dst.size // PAGE_SIZE)
    large = runs[:, 1] * PAGE_SIZE >= _LARGE_RUN_BYTES
    for first, count in runs[large].tolist():
        a, b = first * PAGE_SIZE, (first + count) * PAGE_SIZE
        np.copyto(dst[a:b], src[a:b])
    small = runs[~large]
    if small.shape[0]:
        small = np.ascontiguousarray(small)
        jit = kernels()
        scatter = jit.scatter_parallel if int(small[:, 1].sum()) >= _PARALLEL_MIN_PAGES else jit.scatter_serial
        scatter(src, dst, small)


class CpuBackend(Backend):
    """``cpu:0`` .. ``cpu:{devices-1}``; ``capacity`` bytes per device (``None``: limited by RAM only)."""

    name = "cpu"

    def __init__(self, devices: int = 4, capacity: int | None = None) -> None:
        self._devices = devices
        self._capacity = capacity
        self._in_use = [0] * devices
        self._lock = threading.Lock()

    def device_count(self) -> int:
        return self._devices

    def describe(self, index: int) -> str:
        return f"cpu:{index} (host RAM, sealed memfd)"

    def _place(self, index: int, array: npt.NDArray[np.uint8]) -> None:
        """Hook run on a new buffer's writable mapping before any of its pages exists (``NumaBackend`` binds the
        memfd to the device's node here). Nothing to do for plain host RAM."""

    def allocate(self, index: int, nbytes: int) -> DeviceBuffer:
        self._check_index(index)
        with self._lock:
            if self._capacity is not None and self._in_use[index] + nbytes > self._capacity:
                raise ResourceExhaustedError(
                    f"{self.name}:{index} is full: {self._in_use[index]} of {self._capacity} bytes in use, "
                    f"{nbytes} more requested"
                )
            self._in_use[index] += nbytes
        try:
            fd = memfd_create(f"devrep-replica-{self.name}{index}", nbytes, allocate=False)
            try:
                array = map_fd(fd, nbytes, writable=True)
                self._place(index, array)
                allocate_pages(fd, nbytes)  # every page now, so a full memory shows here and not as a SIGBUS later
                # Later mappings (the readers') can only be read-only; ours stays writable.
                add_seals(fd, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            with self._lock:
                self._in_use[index] -= nbytes
            raise
        return DeviceBuffer(f"{self.name}:{index}", index, nbytes, (fd, array))

    def free(self, buffer: DeviceBuffer) -> None:
        if buffer.freed:
            return
        buffer.freed = True
        fd, _array = buffer.handle
        os.close(fd)
        buffer.handle = (-1, None)  # the mapping goes with the last array that views it
        with self._lock:
            self._in_use[buffer.index] -= buffer.nbytes

    @staticmethod
    def _array(buffer: DeviceBuffer) -> npt.NDArray[np.uint8]:
        array: npt.NDArray[np.uint8] | None = buffer.handle[1]
        if array is None:
            raise ValueError(f"buffer on {buffer.device} was freed")
        return array

    def copy_runs(
        self,
        host: npt.NDArray[np.uint8],
        runs: RunArray,
        targets: Sequence[DeviceBuffer],
        progress: Progress | None = None,
    ) -> None:
        if not targets:
            return
        first, rest = self._array(targets[0]), [self._array(t) for t in targets[1:]]
        for batch in split_runs(runs, _PROGRESS_BATCH_PAGES) if progress else [runs]:
            copy_page_runs(host, first, batch)
            for dst in rest:  # fan-out: host pages are read once, the copies come from the first replica
                copy_page_runs(first, dst, batch)
            if progress:
                progress(int(np.asarray(batch)[:, 1].sum()) * PAGE_SIZE)

    def hash_pages(self, buffer: DeviceBuffer, pages: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.uint64]:
        return hash_pages(self._array(buffer), pages)

    def read(self, buffer: DeviceBuffer, offset: int = 0, nbytes: int | None = None) -> npt.NDArray[np.uint8]:
        nbytes = check_range(buffer, offset, nbytes)
        return self._array(buffer)[offset:offset + nbytes].copy()

    def export(self, buffer: DeviceBuffer) -> ExportHandle:
        fd, _ = buffer.handle
        return ExportHandle("fd", fd, buffer.nbytes, buffer.device)

    def host_view(self, buffer: DeviceBuffer) -> npt.NDArray[np.uint8]:
        view = self._array(buffer).view()
        view.flags.writeable = False
        return view

    def bytes_in_use(self, index: int) -> int:
        self._check_index(index)
        return self._in_use[index]
