"""CUDA backend (CuPy): replicas in GPU memory, kernels from ``devrep/kernels/devrep.cu`` via ``cupy.RawModule``.

Per device: a copy stream and a hash stream (so a sync's host->device copies overlap verification hashing
of the other buffer), two pinned host staging buffers and two device staging buffers used alternately, so
packing batch k+1 on the host overlaps the DMA and scatter of batch k (double buffering with events).

Replica memory, where the driver supports it, is made with the VMM API (``cuMemCreate``, exportable as a POSIX
fd, see ``_cuda_vmm``): ``export()`` hands out that fd (kind ``"cuda_fd"``) and readers map it read-only on the
GPU with the exported UUID, across PID namespaces. Elsewhere (no ``cuda-bindings``, or a device/driver without
POSIX-fd VMM handles) replicas are plain ``cudaMalloc`` allocations exported as classic CUDA IPC handles
(``"cuda_ipc"``, read-write mappings, same PID namespace only). ``devrep doctor`` says which and why.

CuPy and the VMM driver are injectable (``cupy_module=``, ``vmm=``) so ``devrep.testing.fake_cuda`` can stand in
for them in tests. This module imports without CuPy; the backend then refuses to start, saying what to install.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE, RunArray, check_page_multiple
from ..errors import (
    BackendError,
    BackendUnavailableError,
    DevrepError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from ..linux import cuda_vmm as cvmm
from ..model import ExportKind
from ._base import Backend, DeviceBuffer, ExportHandle, HostArray, Progress
from ._kernels import kernel_source
from ._staging import gather_pages, page_batches

T = TypeVar("T")

_PAGE_WORDS = PAGE_SIZE // 8
_THREADS = 256  # threads per block of the hash and compare launches (8 warps)
_COPY_THREADS = 128  # threads per block of the page-copy kernels (one block per page, 16-byte words)
_HASH_PAGES_PER_WARP = 8  # devrep/kernels/devrep.cu: 4 lanes (one per XXH64 accumulator) per page, 8 pages per warp
_BLOCKS_PER_SM = 8  # grid = SMs x this (grid-stride loops cover the rest): fills the device, no more
_ERR_MEMORY_ALLOCATION = 2  # cudaErrorMemoryAllocation
_NAMES = ("hash_all", "hash_list", "compare", "scatter_pages", "copy_pages")


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:  # CuPy is the optional extra devrep[cuda12] / devrep[cuda13]
        raise BackendUnavailableError(f"the CUDA backend needs CuPy: {cvmm.INSTALL_HINT} ({exc})") from exc
    return cupy


def _is_oom(exc: BaseException) -> bool:
    return (isinstance(exc, (MemoryError, ResourceExhaustedError))
            or getattr(exc, "status", None) == _ERR_MEMORY_ALLOCATION or type(exc).__name__ == "OutOfMemoryError"
            or "cudaErrorMemoryAllocation" in str(exc))


def _is_nvrtc_missing(exc: BaseException) -> bool:
    """CuPy could not load the NVRTC library (not a compile error in the source)."""
    text = str(exc).lower()
    return "nvrtc" in text and ("cannot open shared object" in text or "failed to load" in text
                                or isinstance(exc, (ImportError, OSError)))


def default_margin(total: int) -> int:
    """Device memory left to others when no capacity is given: total/32, at least 64 MiB, at most 2 GiB."""
    return int(min(2 << 30, max(64 << 20, total // 32)))


@dataclass(eq=False)
class _Device:
    index: int
    name: str
    total: int
    uuid: str
    sms: int
    capacity: int | None = None
    fd_sharing: bool = False
    sharing_reason: str = ""
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

    @property
    def label(self) -> str:
        return f"cuda:{self.index} ({self.name})"

    def grid(self, blocks: int) -> int:
        return max(1, min(blocks, self.sms * _BLOCKS_PER_SM))


@dataclass(eq=False)
class _BufferState:
    """What a replica buffer holds besides its CuPy pointer: the allocation and the readers' release events."""

    memory: Any  # cupy Memory (cudaMalloc) or cvmm.VmmAllocation
    readers: list[Any] = field(default_factory=list)
    """Events recorded when leases on this buffer were released: a copy into it waits for them first."""


class CudaBackend(Backend):
    """``cuda:0..``: NVIDIA GPUs through CuPy.

    Options (keyword, optional): ``capacity`` (bytes per device devrep may allocate; default the device's free
    memory when devrep first uses it, minus ``capacity_margin``, default ``default_margin(total)``),
    ``batch_bytes`` (size of each of the two staging buffers per device, and the progress granularity),
    ``kernel_source`` (CUDA C++ to build instead of ``devrep/kernels/devrep.cu``; for tests), ``sharing``
    (``"auto"``: VMM fds where supported, else CUDA IPC; ``"vmm"``: VMM or fail; ``"ipc"``: CUDA IPC only),
    ``release_wait`` (``"device"``: a released lease waits for all work queued on its GPU by this process, any
    stream; ``"stream"``: only for the releasing thread's current stream, without blocking), and for tests
    ``cupy_module`` / ``vmm`` (a ``cupy`` stand-in and a ``_cuda_vmm.VmmDriver``).
    """

    name = "cuda"

    def __init__(self, *, capacity: int | None = None, capacity_margin: int | None = None,
                 batch_bytes: int = 64 << 20, kernel_source: str | None = None, sharing: str = "auto",
                 release_wait: str = "device", cupy_module: Any = None, vmm: cvmm.VmmDriver | None = None) -> None:
        self._cp = cupy_module if cupy_module is not None else _import_cupy()
        self._rt = self._cp.cuda.runtime
        check_page_multiple("batch_bytes", batch_bytes)
        if sharing not in ("auto", "vmm", "ipc"):
            raise InvalidArgumentError(f"sharing must be 'auto', 'vmm' or 'ipc', got {sharing!r}")
        if release_wait not in ("device", "stream"):
            raise InvalidArgumentError(f"release_wait must be 'device' or 'stream', got {release_wait!r}")
        super().__init__()
        self._capacity_bytes = capacity
        self._margin = capacity_margin
        self._batch_pages = batch_bytes // PAGE_SIZE
        self._kernel_source = kernel_source
        self._release_wait = release_wait
        self._lock = threading.Lock()  # guards _state and the readers lists in it
        self._state: dict[int, _BufferState] = {}
        try:
            count = self._rt.getDeviceCount()
        except self._rt.CUDARuntimeError:  # no driver or no GPU: a backend with no devices
            count = 0
        self._vmm: cvmm.VmmDriver | None = None
        self.sharing_reason = ""
        if count and sharing != "ipc":
            self._vmm, self.sharing_reason = (vmm, "") if vmm is not None else _load_vmm()
            if self._vmm is None and sharing == "vmm":
                raise FailedPreconditionError(f"sharing='vmm' but VMM fd sharing is unavailable: {self.sharing_reason}")
        elif sharing == "ipc":
            self.sharing_reason = "sharing='ipc' was asked for"
        self._devices: list[_Device] = []
        for i in range(count):
            props = self._rt.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            uuid = ""
            if self._vmm is not None:
                with contextlib.suppress(cvmm.CudaDriverError):
                    uuid = self._vmm.device_uuid(i)
            if not uuid and isinstance(props.get("uuid"), bytes | bytearray):
                uuid = cvmm.format_uuid(bytes(props["uuid"]))
            d = _Device(i, name, int(props["totalGlobalMem"]), uuid, int(props.get("multiProcessorCount", 0)) or 1)
            if self._vmm is not None:
                try:
                    d.fd_sharing, d.sharing_reason = self._vmm.fd_sharing(i)
                except cvmm.CudaDriverError as exc:
                    d.fd_sharing, d.sharing_reason = False, str(exc)
                if not d.fd_sharing and sharing == "vmm":
                    raise FailedPreconditionError(f"sharing='vmm' but {d.label} cannot: {d.sharing_reason}")
            else:
                d.sharing_reason = self.sharing_reason
            self._devices.append(d)

    # ------------------------------------------------------------------ devices
    def device_count(self) -> int:
        return len(self._devices)

    def _describe(self, index: int) -> str:
        d = self._devices[index]
        share = "VMM fd sharing" if d.fd_sharing else "CUDA IPC sharing"
        return f"cuda:{index} ({d.name}, {d.total >> 20} MiB, {d.uuid or 'no UUID'}, {share})"

    def sharing(self, index: int) -> tuple[ExportKind, str]:
        """``(CUDA_FD | CUDA_IPC, why)`` for a device: how its replicas are exported."""
        d = self._devices[self._check_device(index)]
        return (ExportKind.CUDA_FD if d.fd_sharing else ExportKind.CUDA_IPC), d.sharing_reason

    def _label(self, index: int) -> str:
        return self._devices[index].label

    def _device_total(self, index: int) -> int:
        # Whatever the driver would answer (cuMemCreate may call a request past it an invalid value).
        return self._devices[index].total

    def _capacity(self, index: int) -> int:
        return self._capacity_of(self._devices[index])

    def _ready(self, d: _Device) -> None:
        """Build the kernels and create the streams of a device on first use (call inside its context)."""
        with d.init_lock:
            if d.module is None:
                self._build(d)

    def _build(self, d: _Device) -> None:
        source = kernel_source(self._kernel_source, "devrep.cu", "CUDA", d.label)
        try:
            module = self._cp.RawModule(code=source, options=(f"-DPAGE_WORDS={_PAGE_WORDS}",))
            for name in _NAMES:
                module.get_function(name)  # compiles and loads now, so a build error surfaces here
        except Exception as exc:
            if _is_nvrtc_missing(exc):
                raise FailedPreconditionError(
                    f"{d.label}: CuPy cannot load NVRTC, the CUDA runtime compiler devrep's kernels are built with "
                    f"(a driver-only machine): {cvmm.INSTALL_HINT}, which bring NVRTC as a wheel ({exc})") from exc
            raise BackendError(f"CUDA kernel build failed on {d.label}; build log:\n{exc}") from exc
        d.copy_stream = self._cp.cuda.Stream(non_blocking=True)
        d.hash_stream = self._cp.cuda.Stream(non_blocking=True)
        d.module = module

    def _array(self, buffer: DeviceBuffer, dtype: Any = None, count: int | None = None) -> Any:
        if buffer.freed or buffer.handle is None:
            raise InvalidArgumentError(f"buffer on {buffer.device} was freed")
        dtype = dtype or self._cp.uint8
        n = buffer.nbytes // np.dtype(dtype).itemsize if count is None else count
        return self._cp.ndarray((n,), dtype=dtype, memptr=buffer.handle)

    def _free_cached(self, d: _Device) -> None:
        """Give CuPy's cached (freed but pooled) device and pinned blocks back to the driver."""
        with contextlib.suppress(Exception):
            self._cp.get_default_memory_pool().free_all_blocks()
        with contextlib.suppress(Exception):
            self._cp.get_default_pinned_memory_pool().free_all_blocks()

    def _oom_retry(self, d: _Device, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; on device OOM free CuPy's cached blocks and run it once more; OOM again ->
        ``ResourceExhaustedError``, any other failure -> ``BackendError`` (devrep errors pass through)."""
        for attempt in (1, 2):
            try:
                return fn()
            except Exception as exc:
                if _is_oom(exc):
                    if attempt == 1:
                        self._free_cached(d)
                        continue
                    raise ResourceExhaustedError(
                        f"{d.label}: out of device memory for {what}, even after freeing CuPy's cached blocks: {exc}"
                    ) from exc
                if isinstance(exc, DevrepError):
                    raise
                raise BackendError(f"{d.label}: {what} failed: {exc}") from exc
        raise AssertionError("unreachable")

    def _capacity_of(self, d: _Device) -> int:
        if self._capacity_bytes is not None:
            return self._capacity_bytes
        if d.capacity is None:  # free memory when devrep first allocates here, less a margin for everyone else
            with self._cp.cuda.Device(d.index):
                free, total = self._rt.memGetInfo()
            margin = self._margin if self._margin is not None else default_margin(int(total))
            d.capacity = max(0, int(free) - margin)
        return d.capacity

    # ------------------------------------------------------------------ memory
    def _allocate(self, index: int, nbytes: int) -> DeviceBuffer:
        d = self._devices[index]
        with self._cp.cuda.Device(index):
            state = self._oom_retry(d, f"allocating {nbytes} bytes", lambda: self._new_memory(d, nbytes))
            try:
                memory = state.memory
                ptr = memory.ptr
                self._rt.memset(ptr, 0, nbytes)
                # cudaMemset runs on the legacy stream, which our non-blocking streams do not wait for.
                self._rt.deviceSynchronize()
            except Exception as exc:
                self._drop_memory(d, state)
                raise BackendError(f"{d.label}: zeroing {nbytes} new bytes failed: {exc}") from exc
        if isinstance(memory, cvmm.VmmAllocation):
            owner = self._cp.cuda.UnownedMemory(memory.ptr, memory.size, memory, device_id=index)
            handle = self._cp.cuda.MemoryPointer(owner, 0)
        else:
            handle = self._cp.cuda.MemoryPointer(memory, 0)
        buffer = DeviceBuffer(f"cuda:{index}", index, nbytes, handle)
        with self._lock:
            self._state[id(buffer)] = state
        return buffer

    def _new_memory(self, d: _Device, nbytes: int) -> _BufferState:
        if d.fd_sharing and self._vmm is not None:
            self._rt.deviceSynchronize()  # a runtime call that makes the device's primary context current first
            return _BufferState(cvmm.allocate(self._vmm, d.index, nbytes))
        return _BufferState(self._cp.cuda.memory.Memory(nbytes))  # cudaMalloc, not the pool: IPC-exportable

    def _drop_memory(self, d: _Device, state: _BufferState) -> None:
        if isinstance(state.memory, cvmm.VmmAllocation) and self._vmm is not None:
            cvmm.free(self._vmm, state.memory)
        state.memory = None  # a cudaMalloc allocation goes when the last array viewing it is dropped

    def _free(self, buffer: DeviceBuffer) -> None:
        with self._lock:
            state = self._state.pop(id(buffer), None)
        d = self._devices[buffer.index]
        buffer.handle = None
        if state is None:
            return
        # Kernels queued before a lease was released, and our own copies and hashes, may still read or write the
        # memory: wait for them before it goes back (cuMemUnmap does not wait; a reused cudaMalloc block would
        # be overwritten under them).
        with self._cp.cuda.Device(buffer.index):
            try:
                for event in state.readers:
                    event.synchronize()
                for stream in (d.copy_stream, d.hash_stream):
                    if stream is not None:
                        stream.synchronize()
            finally:
                self._drop_memory(d, state)

    def _release_reader(self, buffer: DeviceBuffer) -> None:
        """A lease on ``buffer`` ended in this process: record an event on the current stream (the next copy
        into the buffer waits for it on the GPU) and, with ``release_wait="device"``, wait until every kernel
        this process queued on the GPU has finished (kernels on other, non-blocking streams included)."""
        with self._lock:
            state = self._state.get(id(buffer))
        if state is None:
            return
        try:
            with self._cp.cuda.Device(buffer.index):
                event = self._cp.cuda.Event(disable_timing=True)
                event.record(self._cp.cuda.get_current_stream())
                with self._lock:
                    state.readers.append(event)
                if self._release_wait == "device":
                    self._rt.deviceSynchronize()
        except Exception as exc:  # a sticky CUDA error: the context is dead, no kernel of ours reads it any more
            raise BackendError(f"cuda:{buffer.index}: waiting for readers of a released lease failed: {exc}") from exc

    def _staging(self, d: _Device) -> None:
        if d.pinned:
            return
        nbytes = self._batch_pages * PAGE_SIZE
        try:
            for _ in range(2):
                pinned = self._cp.cuda.alloc_pinned_memory(nbytes)
                d.pinned.append(pinned)
                d.pinned_views.append(np.frombuffer(pinned, dtype=np.uint8, count=nbytes))
                d.staging.append(self._cp.cuda.memory.Memory(nbytes))
        except Exception:
            d.pinned, d.pinned_views, d.staging = [], [], []
            raise

    # ------------------------------------------------------------------ copies
    def _copy_runs(self, host: HostArray, runs: RunArray, targets: list[DeviceBuffer],
                   progress: Progress | None) -> None:
        groups: dict[int, list[DeviceBuffer]] = {}
        for t in targets:
            groups.setdefault(t.index, []).append(t)
        jobs = [(index, group, progress if k == 0 else None)  # bytes are reported once, for the first device
                for k, (index, group) in enumerate(groups.items())]
        if len(jobs) == 1:
            self._copy_group(*jobs[0], host, runs)
            return
        # Fan-out over several GPUs: one host thread per device (this one does the first), so each device's
        # packing and DMA run alongside the others' instead of one device after another.
        errors: list[BaseException | None] = [None] * len(jobs)

        def work(k: int) -> None:
            try:
                index, group, prog = jobs[k]
                self._copy_group(index, group, prog, host, runs)
            except BaseException as exc:
                errors[k] = exc

        threads = [threading.Thread(target=work, args=(k,), name=f"devrep-cuda-copy-{k}", daemon=True)
                   for k in range(1, len(jobs))]
        for thread in threads:
            thread.start()
        work(0)
        for thread in threads:
            thread.join()
        for exc in errors:
            if exc is not None:
                raise exc

    def _copy_group(self, index: int, group: list[DeviceBuffer], progress: Progress | None,
                    host: npt.NDArray[np.uint8], runs: RunArray) -> None:
        d = self._devices[index]
        with d.copy_lock, self._cp.cuda.Device(index):
            self._ready(d)
            self._oom_retry(d, "allocating staging buffers", lambda: self._staging(d))
            try:
                self._copy_device(d, host, runs, group, progress)
            except BaseException as exc:
                # Transfers queued before the failure still read the pinned buffers (which the next call reuses)
                # and write the targets: let them finish before anything else touches either.
                with contextlib.suppress(Exception):
                    d.copy_stream.synchronize()
                if isinstance(exc, DevrepError) or not isinstance(exc, Exception):
                    raise
                if _is_oom(exc):
                    raise ResourceExhaustedError(f"{d.label}: out of device memory copying page runs: {exc}") from exc
                raise BackendError(f"{d.label}: copying page runs failed: {exc}") from exc

    def _copy_device(self, d: _Device, host: npt.NDArray[np.uint8], runs: RunArray, group: list[DeviceBuffer],
                     progress: Progress | None) -> None:
        cp, rt = self._cp, self._rt
        stream = d.copy_stream
        scatter = d.module.get_function("scatter_pages")
        for t in group:  # the copy stream waits (on the GPU) for kernels still reading released leases
            with self._lock:
                state = self._state.get(id(t))
                readers, state_readers = (list(state.readers), state) if state else ([], None)
            for event in readers:
                stream.wait_event(event)
            if state_readers is not None:
                with self._lock:
                    del state_readers.readers[:len(readers)]
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
                rt.memcpyAsync(dst0, d.pinned[slot].ptr, nbytes, rt.memcpyHostToDevice, stream.ptr)
                for t in group[1:]:  # later targets copy from the first one on the device
                    rt.memcpyAsync(t.handle.ptr + first_page * PAGE_SIZE, dst0, nbytes, rt.memcpyDeviceToDevice,
                                   stream.ptr)
            else:
                rt.memcpyAsync(d.staging[slot].ptr, d.pinned[slot].ptr, nbytes, rt.memcpyHostToDevice, stream.ptr)
                with stream:
                    index = cp.asarray(pages)
                    src = cp.ndarray((nbytes,), cp.uint8, cp.cuda.MemoryPointer(d.staging[slot], 0))
                    for t in group:  # every target from the device staging copy: the host is read once
                        scatter((d.grid(n),), (_COPY_THREADS,), (src, self._array(t), index, np.int64(n)),
                                stream=stream)
            event = cp.cuda.Event(disable_timing=True)
            event.record(stream)
            events[slot] = event
            pending.append((event, nbytes))
            while progress and pending and pending[0][0].done:
                progress(pending.popleft()[1])
        stream.synchronize()
        while progress and pending:
            progress(pending.popleft()[1])

    # ------------------------------------------------------------------ hashes
    def _hash_pages(self, buffer: DeviceBuffer, index: npt.NDArray[np.int64] | None) -> npt.NDArray[np.uint64]:
        d = self._devices[buffer.index]
        n = buffer.nbytes // PAGE_SIZE if index is None else int(index.size)
        cp = self._cp

        def run() -> npt.NDArray[np.uint64]:
            stream = d.hash_stream
            with stream:
                data = self._array(buffer, cp.uint64)
                out = cp.empty(n, dtype=cp.uint64)
                warps = -(-n // _HASH_PAGES_PER_WARP)
                grid = (d.grid(-(-warps * 32 // _THREADS)),)
                if index is None:
                    d.module.get_function("hash_all")(grid, (_THREADS,), (data, out, np.int64(n)), stream=stream)
                else:
                    idx = cp.asarray(index)
                    d.module.get_function("hash_list")(grid, (_THREADS,), (data, idx, out, np.int64(n)),
                                                       stream=stream)
                result: npt.NDArray[np.uint64] = out.get(stream=stream)
                stream.synchronize()
            return result

        with d.hash_lock, cp.cuda.Device(buffer.index):
            self._ready(d)
            return self._oom_retry(d, f"hashing {n} pages", run)

    def _compare(self, a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        d = self._devices[0]
        n = int(a.size)
        cp = self._cp

        def run() -> npt.NDArray[np.int64]:
            stream = d.hash_stream
            with stream:
                da, db = cp.asarray(a), cp.asarray(b)
                out = cp.empty(n, dtype=cp.int64)
                count = cp.zeros(1, dtype=cp.uint32)
                d.module.get_function("compare")((d.grid(-(-n // _THREADS)),), (_THREADS,),
                                                 (da, db, out, count, np.int64(n)), stream=stream)
                found = int(count.get(stream=stream)[0])
                result = out[:found].get(stream=stream) if found else np.empty(0, np.int64)
                stream.synchronize()
            return np.sort(np.asarray(result, dtype=np.int64))  # the kernel appends in no particular order

        with d.hash_lock, cp.cuda.Device(0):
            self._ready(d)
            return self._oom_retry(d, f"comparing {n} hashes", run)

    # ------------------------------------------------------------------ read / export
    def _read(self, buffer: DeviceBuffer, offset: int, nbytes: int) -> HostArray:
        d = self._devices[buffer.index]
        out = np.empty(nbytes, dtype=np.uint8)
        with self._cp.cuda.Device(buffer.index):
            try:
                self._rt.memcpy(out.ctypes.data, buffer.handle.ptr + offset, nbytes, self._rt.memcpyDeviceToHost)
            except Exception as exc:
                raise BackendError(f"{d.label}: reading {nbytes} bytes back failed: {exc}") from exc
        return out

    def _export(self, buffer: DeviceBuffer) -> ExportHandle:
        """``"cuda_fd"`` (VMM: the payload is an fd owned by the buffer, ``nbytes`` the size to map, with the
        granularity and the GPU UUID) or ``"cuda_ipc"`` (the 64-byte ``cudaIpcMemHandle_t``, and the UUID)."""
        d = self._devices[buffer.index]
        with self._lock:
            state = self._state.get(id(buffer))
        memory = state.memory if state is not None else None
        if isinstance(memory, cvmm.VmmAllocation) and self._vmm is not None:
            fd = cvmm.export(self._vmm, memory)
            return ExportHandle(ExportKind.CUDA_FD, fd, memory.size, buffer.device, gpu_uuid=d.uuid,
                                granularity=memory.granularity)
        with self._cp.cuda.Device(buffer.index):
            try:
                handle = bytes(self._rt.ipcGetMemHandle(buffer.handle.ptr))
            except Exception as exc:
                raise BackendError(f"{d.label}: cudaIpcGetMemHandle failed: {exc}") from exc
        return ExportHandle(ExportKind.CUDA_IPC, handle, buffer.nbytes, buffer.device, gpu_uuid=d.uuid)

    def _device_array(self, buffer: DeviceBuffer) -> Any:
        """A CuPy uint8 array over the replica (zero-copy; DLPack works from it). CuPy has no read-only
        arrays: readers must not write it (a write would be overwritten by the next sync)."""
        return self._array(buffer)

    def _close(self) -> None:
        for d in self._devices:
            if d.copy_stream is not None:
                with self._cp.cuda.Device(d.index):
                    d.copy_stream.synchronize()
                    d.hash_stream.synchronize()
            d.pinned, d.pinned_views, d.staging = [], [], []


def _load_vmm() -> tuple[cvmm.VmmDriver | None, str]:
    return cvmm.load_driver()
