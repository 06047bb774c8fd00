"""CUDA backend (CuPy): replicas in GPU memory, kernels from ``kernels/devrep.cu`` via ``cupy.RawModule``.

Per device: a copy stream and a hash stream (so a sync's host->device copies overlap verification hashing
of the other buffer), two pinned host staging buffers and two device staging buffers used alternately, so
packing batch k+1 on the host overlaps the DMA and scatter of batch k. Replica buffers are plain
``cudaMalloc`` allocations (not CuPy's pool) so ``export()`` can hand out a CUDA IPC handle for exactly
that buffer.

This module imports without CuPy; the backend then refuses to start, saying what to install.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE, RunArray, check_page_multiple
from ..errors import BackendError, BackendUnavailableError, InvalidArgumentError, ResourceExhaustedError
from ._base import Backend, DeviceBuffer, ExportHandle, Progress
from ._kernels import kernels_dir
from ._staging import check_copy, check_pages, check_range, gather_pages, page_batches

try:
    import cupy
    from cupy.cuda import runtime as cudart
except ImportError as _exc:  # CuPy is the optional extra devrep[cuda]
    cupy = None
    cudart = None
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

_PAGE_WORDS = PAGE_SIZE // 8
_THREADS = 128  # threads per block of every launch
_MAX_BLOCKS = 65535 * 8  # page-copy kernels grid-stride beyond this many blocks
_ERR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation


def _is_oom(exc: BaseException) -> bool:
    return (getattr(exc, "status", None) == _ERR_MEMORY_ALLOCATION or type(exc).__name__ == "OutOfMemoryError"
            or "cudaErrorMemoryAllocation" in str(exc))


@dataclass(eq=False)
class _Device:
    index: int
    name: str
    total: int
    module: Any = None
    copy_stream: Any = None
    hash_stream: Any = None
    pinned: list[Any] = field(default_factory=list)
    pinned_views: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    staging: list[Any] = field(default_factory=list)
    # Copies and hashes take separate locks and streams so a sync's copies overlap another buffer's hashing.
    copy_lock: threading.Lock = field(default_factory=threading.Lock)
    hash_lock: threading.Lock = field(default_factory=threading.Lock)
    init_lock: threading.Lock = field(default_factory=threading.Lock)
    in_use: int = 0

    @property
    def label(self) -> str:
        return f"cuda:{self.index} ({self.name})"


class CudaBackend(Backend):
    """``cuda:0..``: NVIDIA GPUs through CuPy.

    Options (keyword, optional): ``capacity`` (bytes per device devrep may allocate; default the device's
    total memory), ``batch_bytes`` (size of each of the two staging buffers per device, and the progress
    granularity), ``kernel_source`` (CUDA C++ to build instead of ``kernels/devrep.cu``; for tests).
    """

    name = "cuda"

    def __init__(self, *, capacity: int | None = None, batch_bytes: int = 64 << 20,
                 kernel_source: str | None = None) -> None:
        if cupy is None:
            raise BackendUnavailableError(f"the CUDA backend needs CuPy: install devrep[cuda] ({_IMPORT_ERROR})")
        check_page_multiple("batch_bytes", batch_bytes)
        self._capacity = capacity
        self._batch_pages = batch_bytes // PAGE_SIZE
        self._kernel_source = kernel_source
        self._lock = threading.Lock()
        self._live: dict[int, DeviceBuffer] = {}
        self._closed = False
        try:
            count = cudart.getDeviceCount()
        except cudart.CUDARuntimeError:  # no driver or no GPU: a backend with no devices
            count = 0
        self._devices: list[_Device] = []
        for i in range(count):
            props = cudart.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            self._devices.append(_Device(i, name, int(props["totalGlobalMem"])))

    # ------------------------------------------------------------------ devices
    def device_count(self) -> int:
        return len(self._devices)

    def _dev(self, index: int) -> _Device:
        if self._closed:
            raise BackendError("the CUDA backend was closed")
        self._check_index(index)
        return self._devices[index]

    def describe(self, index: int) -> str:
        d = self._dev(index)
        return f"cuda:{index} ({d.name}, {d.total >> 20} MiB)"

    def bytes_in_use(self, index: int) -> int:
        return self._dev(index).in_use

    def _ready(self, d: _Device) -> None:
        """Build the kernels and create the streams of a device on first use (call inside its context)."""
        with d.init_lock:
            if d.module is None:
                self._build(d)

    def _build(self, d: _Device) -> None:
        source = self._kernel_source
        if source is None:
            try:
                source = (kernels_dir() / "devrep.cu").read_text()
            except OSError as exc:
                raise BackendError(f"cannot read the CUDA kernels for {d.label}: {exc}") from exc
        try:
            module = cupy.RawModule(code=source, options=(f"-DPAGE_WORDS={_PAGE_WORDS}",))
            for name in ("hash_all", "hash_list", "compare", "scatter_pages", "copy_pages"):
                module.get_function(name)  # compiles and loads now, so a build error surfaces here
        except Exception as exc:
            raise BackendError(f"CUDA kernel build failed on {d.label}; build log:\n{exc}") from exc
        d.copy_stream = cupy.cuda.Stream(non_blocking=True)
        d.hash_stream = cupy.cuda.Stream(non_blocking=True)
        d.module = module

    @staticmethod
    def _array(buffer: DeviceBuffer, dtype: Any = None, count: int | None = None) -> Any:
        if buffer.freed or buffer.handle is None:
            raise InvalidArgumentError(f"buffer on {buffer.device} was freed")
        dtype = dtype or cupy.uint8
        n = buffer.nbytes // np.dtype(dtype).itemsize if count is None else count
        return cupy.ndarray((n,), dtype=dtype, memptr=buffer.handle)

    # ------------------------------------------------------------------ memory
    def allocate(self, index: int, nbytes: int) -> DeviceBuffer:
        d = self._dev(index)
        check_page_multiple("replica size", nbytes)
        capacity = self._capacity if self._capacity is not None else d.total
        with self._lock:
            if d.in_use + nbytes > capacity:
                raise ResourceExhaustedError(
                    f"{d.label} is full: {d.in_use} of {capacity} bytes in use, {nbytes} more requested"
                )
            d.in_use += nbytes
        try:
            with cupy.cuda.Device(index):
                try:
                    mem = cupy.cuda.memory.Memory(nbytes)  # cudaMalloc, not the pool: IPC-exportable
                    cudart.memset(mem.ptr, 0, nbytes)
                    # cudaMemset runs on the legacy stream, which our non-blocking streams do not wait for.
                    cudart.deviceSynchronize()
                except Exception as exc:
                    if _is_oom(exc):
                        raise ResourceExhaustedError(f"{d.label} cannot allocate {nbytes} bytes: {exc}") from exc
                    raise BackendError(f"{d.label}: allocating {nbytes} bytes failed: {exc}") from exc
        except BaseException:
            with self._lock:
                d.in_use -= nbytes
            raise
        buffer = DeviceBuffer(f"cuda:{index}", index, nbytes, cupy.cuda.MemoryPointer(mem, 0))
        with self._lock:
            self._live[id(buffer)] = buffer
        return buffer

    def free(self, buffer: DeviceBuffer) -> None:
        with self._lock:
            if buffer.freed:
                return
            buffer.freed = True
            self._live.pop(id(buffer), None)
            self._devices[buffer.index].in_use -= buffer.nbytes
        # The allocation goes back to the driver when the last array viewing it (device_array) is dropped.
        buffer.handle = None

    def _staging(self, d: _Device) -> None:
        if d.pinned:
            return
        nbytes = self._batch_pages * PAGE_SIZE
        try:
            for _ in range(2):
                pinned = cupy.cuda.alloc_pinned_memory(nbytes)
                d.pinned.append(pinned)
                d.pinned_views.append(np.frombuffer(pinned, dtype=np.uint8, count=nbytes))
                d.staging.append(cupy.cuda.memory.Memory(nbytes))
        except Exception as exc:
            d.pinned, d.pinned_views, d.staging = [], [], []
            if _is_oom(exc):
                raise ResourceExhaustedError(f"{d.label}: no room for 2 x {nbytes} bytes of staging") from exc
            raise BackendError(f"{d.label}: allocating staging buffers failed: {exc}") from exc

    # ------------------------------------------------------------------ copies
    def copy_runs(
        self,
        host: npt.NDArray[np.uint8],
        runs: RunArray,
        targets: Sequence[DeviceBuffer],
        progress: Progress | None = None,
    ) -> None:
        targets = list(targets)
        runs = check_copy(host, runs, targets)
        if not targets or not runs.size:
            return
        groups: dict[int, list[DeviceBuffer]] = {}
        for t in targets:
            self._dev(t.index)
            groups.setdefault(t.index, []).append(t)
        for index, group in groups.items():
            d = self._dev(index)
            with d.copy_lock, cupy.cuda.Device(index):
                try:
                    self._ready(d)
                    self._staging(d)
                    self._copy_device(d, host, runs, group, progress)
                except (ResourceExhaustedError, BackendError):
                    raise
                except Exception as exc:
                    raise BackendError(f"{d.label}: copying page runs failed: {exc}") from exc
            progress = None  # bytes are reported once, for the first device

    def _copy_device(self, d: _Device, host: npt.NDArray[np.uint8], runs: RunArray, group: list[DeviceBuffer],
                     progress: Progress | None) -> None:
        stream = d.copy_stream
        scatter = d.module.get_function("scatter_pages")
        events: list[Any] = [None, None]
        pending: deque[tuple[Any, int]] = deque()
        for k, pages in enumerate(page_batches(runs, self._batch_pages)):
            slot = k % 2
            if events[slot] is not None:
                events[slot].synchronize()  # the DMA out of this pinned buffer (two batches ago) is done
            n = int(pages.size)
            nbytes = n * PAGE_SIZE
            gather_pages(host, pages, d.pinned_views[slot])  # overlaps the previous batch's DMA and scatter
            first_page = int(pages[0])
            contiguous = int(pages[-1]) - first_page + 1 == n
            if contiguous:  # one run: straight into place, no scatter needed
                dst0 = group[0].handle.ptr + first_page * PAGE_SIZE
                cudart.memcpyAsync(dst0, d.pinned[slot].ptr, nbytes, cudart.memcpyHostToDevice, stream.ptr)
                for t in group[1:]:  # later targets copy from the first one on the device
                    cudart.memcpyAsync(t.handle.ptr + first_page * PAGE_SIZE, dst0, nbytes,
                                       cudart.memcpyDeviceToDevice, stream.ptr)
            else:
                cudart.memcpyAsync(d.staging[slot].ptr, d.pinned[slot].ptr, nbytes, cudart.memcpyHostToDevice,
                                   stream.ptr)
                with stream:
                    index = cupy.asarray(pages)
                    src = cupy.ndarray((nbytes,), cupy.uint8, cupy.cuda.MemoryPointer(d.staging[slot], 0))
                    for t in group:  # every target from the device staging copy: the host is read once
                        scatter((min(n, _MAX_BLOCKS),), (_THREADS,), (src, self._array(t), index, np.int64(n)),
                                stream=stream)
            event = cupy.cuda.Event(disable_timing=True)
            event.record(stream)
            events[slot] = event
            pending.append((event, nbytes))
            while progress and pending and pending[0][0].done:
                progress(pending.popleft()[1])
        stream.synchronize()
        while progress and pending:
            progress(pending.popleft()[1])

    # ------------------------------------------------------------------ hashes
    def hash_pages(self, buffer: DeviceBuffer, pages: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.uint64]:
        d = self._dev(buffer.index)
        total = buffer.nbytes // PAGE_SIZE
        index = None if pages is None else check_pages(pages, total, buffer.device)
        n = total if index is None else int(index.size)
        if n == 0:
            return np.empty(0, dtype=np.uint64)
        with d.hash_lock, cupy.cuda.Device(buffer.index):
            try:
                self._ready(d)
                stream = d.hash_stream
                with stream:
                    data = self._array(buffer, cupy.uint64)
                    out = cupy.empty(n, dtype=cupy.uint64)
                    grid = ((n + _THREADS - 1) // _THREADS,)
                    if index is None:
                        d.module.get_function("hash_all")(grid, (_THREADS,), (data, out, np.int64(n)), stream=stream)
                    else:
                        idx = cupy.asarray(index)
                        d.module.get_function("hash_list")(grid, (_THREADS,), (data, idx, out, np.int64(n)),
                                                           stream=stream)
                    result: npt.NDArray[np.uint64] = out.get(stream=stream)
                    stream.synchronize()
            except (InvalidArgumentError, BackendError):
                raise
            except Exception as exc:
                raise BackendError(f"{d.label}: page hash failed: {exc}") from exc
        return result

    def compare(self, a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        a = np.ascontiguousarray(a, dtype=np.uint64).reshape(-1)
        b = np.ascontiguousarray(b, dtype=np.uint64).reshape(-1)
        if a.shape != b.shape:
            raise InvalidArgumentError(f"cannot compare hash arrays of {a.size} and {b.size} entries")
        if a.size == 0 or a.size >= 1 << 32 or not self._devices:  # the kernel's counter is 32-bit
            return super().compare(a, b)
        d = self._dev(0)
        n = int(a.size)
        with d.hash_lock, cupy.cuda.Device(0):
            try:
                self._ready(d)
                stream = d.hash_stream
                with stream:
                    da, db = cupy.asarray(a), cupy.asarray(b)
                    out = cupy.empty(n, dtype=cupy.int64)
                    count = cupy.zeros(1, dtype=cupy.uint32)
                    d.module.get_function("compare")(((n + _THREADS - 1) // _THREADS,), (_THREADS,),
                                                     (da, db, out, count, np.int64(n)), stream=stream)
                    found = int(count.get(stream=stream)[0])
                    result = cupy.sort(out[:found]).get(stream=stream) if found else np.empty(0, np.int64)
                    stream.synchronize()
            except Exception as exc:
                raise BackendError(f"{d.label}: hash comparison failed: {exc}") from exc
        return np.asarray(result, dtype=np.int64)

    # ------------------------------------------------------------------ read / export
    def read(self, buffer: DeviceBuffer, offset: int = 0, nbytes: int | None = None) -> npt.NDArray[np.uint8]:
        d = self._dev(buffer.index)
        nbytes = check_range(buffer, offset, nbytes)
        out = np.empty(nbytes, dtype=np.uint8)
        if nbytes:
            with cupy.cuda.Device(buffer.index):
                try:
                    cudart.memcpy(out.ctypes.data, buffer.handle.ptr + offset, nbytes, cudart.memcpyDeviceToHost)
                except Exception as exc:
                    raise BackendError(f"{d.label}: reading {nbytes} bytes back failed: {exc}") from exc
        return out

    def export(self, buffer: DeviceBuffer) -> ExportHandle:
        d = self._dev(buffer.index)
        if buffer.freed or buffer.handle is None:
            raise InvalidArgumentError(f"buffer on {buffer.device} was freed")
        with cupy.cuda.Device(buffer.index):
            try:
                handle = bytes(cudart.ipcGetMemHandle(buffer.handle.ptr))
            except Exception as exc:
                raise BackendError(f"{d.label}: cudaIpcGetMemHandle failed: {exc}") from exc
        return ExportHandle("cuda_ipc", handle, buffer.nbytes, buffer.device)

    def device_array(self, buffer: DeviceBuffer) -> Any:
        """A CuPy uint8 array over the replica (zero-copy; DLPack works from it). CuPy has no read-only
        arrays: readers must not write it (a write would be overwritten by the next sync)."""
        self._dev(buffer.index)
        return self._array(buffer)

    def close(self) -> None:
        if self._closed:
            return
        with self._lock:
            live = list(self._live.values())
        for buffer in live:
            self.free(buffer)
        for d in self._devices:
            if d.copy_stream is not None:
                with cupy.cuda.Device(d.index):
                    d.copy_stream.synchronize()
                    d.hash_stream.synchronize()
            d.pinned, d.pinned_views, d.staging = [], [], []
        self._closed = True
