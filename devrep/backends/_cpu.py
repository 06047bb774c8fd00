"""CPU backend: each "device" is host RAM; a replica is a sealed memfd another process can map read-only.

The embedded default, and the reference the other backends are tested against.
"""

from __future__ import annotations

import os

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE, RunArray, split_runs
from .._warmup import kernels
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
from ..model import ExportKind
from ._base import Backend, DeviceBuffer, ExportHandle, HostArray, Progress
from ._copypool import CopyPool

# Copies at least this long go through one numpy copy (glibc memcpy with non-temporal stores past its
# threshold); shorter runs are batched through a compiled loop so thousands of scattered pages cost one call.
_LARGE_RUN_BYTES = 1 << 20
# Progress is reported per batch; large enough that each memcpy stays above glibc's non-temporal threshold.
_PROGRESS_BATCH_PAGES = (256 << 20) // PAGE_SIZE
# Scattered pages are copied by this thread and up to three more (see ``_copypool`` for why threads of our own).
_POOL = CopyPool()


def _copy_page_runs(src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8], runs: RunArray) -> None:
    """Copy page runs between two page-aligned byte arrays at equal offsets. ``Backend.copy_runs`` checked the
    runs against both arrays: the compiled loop copies raw memory, so it must never be called with others."""
    large = runs[:, 1] * PAGE_SIZE >= _LARGE_RUN_BYTES
    for first, count in runs[large].tolist():
        a, b = first * PAGE_SIZE, (first + count) * PAGE_SIZE
        np.copyto(dst[a:b], src[a:b])
    small = runs[~large]
    if small.shape[0]:
        _POOL.copy(kernels().scatter, src, dst, np.ascontiguousarray(small))


class CpuBackend(Backend):
    """``cpu:0`` .. ``cpu:{devices-1}``; ``capacity`` bytes per device (``None``: limited by RAM only)."""

    name = "cpu"

    def __init__(self, devices: int = 4, capacity: int | None = None) -> None:
        super().__init__()
        self._devices = devices
        self._capacity_bytes = capacity

    def device_count(self) -> int:
        return self._devices

    def _describe(self, index: int) -> str:
        return f"cpu:{index} (host RAM, sealed memfd)"

    def _capacity(self, index: int) -> int | None:
        return self._capacity_bytes

    def _place(self, index: int, array: npt.NDArray[np.uint8]) -> None:
        """Hook run on a new buffer's writable mapping before any of its pages exists (``NumaBackend`` binds the
        memfd to the device's node here). Nothing to do for plain host RAM."""

    def _allocate(self, index: int, nbytes: int) -> DeviceBuffer:
        fd = memfd_create(f"devrep-replica-{self.name}{index}", nbytes, allocate=False)
        try:
            array = map_fd(fd, nbytes, writable=True)
            self._place(index, array)
            # Every page now, so a full memory shows here and not as a SIGBUS (or an OOM kill) later.
            allocate_pages(fd, nbytes, f"a replica on {self.name}:{index}")
            # Later mappings (the readers') can only be read-only; ours stays writable.
            add_seals(fd, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return DeviceBuffer(f"{self.name}:{index}", index, nbytes, (fd, array))

    def _free(self, buffer: DeviceBuffer) -> None:
        fd, _array = buffer.handle
        os.close(fd)
        buffer.handle = (-1, None)  # the mapping goes with the last array that views it

    @staticmethod
    def _array(buffer: DeviceBuffer) -> npt.NDArray[np.uint8]:
        array: npt.NDArray[np.uint8] = buffer.handle[1]
        return array

    def _copy_runs(self, host: HostArray, runs: RunArray, targets: list[DeviceBuffer],
                   progress: Progress | None) -> None:
        first, rest = self._array(targets[0]), [self._array(t) for t in targets[1:]]
        for batch in split_runs(runs, _PROGRESS_BATCH_PAGES) if progress else [runs]:
            _copy_page_runs(host, first, batch)
            for dst in rest:  # fan-out: host pages are read once, the copies come from the first replica
                _copy_page_runs(first, dst, batch)
            if progress:
                progress(int(batch[:, 1].sum()) * PAGE_SIZE)

    def _hash_pages(self, buffer: DeviceBuffer, pages: npt.NDArray[np.int64] | None) -> npt.NDArray[np.uint64]:
        return hash_pages(self._array(buffer), pages)

    def _read(self, buffer: DeviceBuffer, offset: int, nbytes: int) -> HostArray:
        return self._array(buffer)[offset:offset + nbytes].copy()

    def _export(self, buffer: DeviceBuffer) -> ExportHandle:
        fd, _ = buffer.handle
        return ExportHandle(ExportKind.FD, fd, buffer.nbytes, buffer.device)

    def _host_view(self, buffer: DeviceBuffer) -> HostArray:
        view = self._array(buffer).view()
        view.flags.writeable = False
        return view
