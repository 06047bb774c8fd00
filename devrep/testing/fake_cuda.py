"""A fake of the CuPy API surface devrep's CUDA backend and client use, and of the CUDA VMM driver calls.

"Device memory" is host memory (numpy arrays whose real addresses serve as device pointers), so copies with
``runtime.memcpy*`` move real bytes and ``read()`` returns what was written. Kernels are the numpy reference
of ``kernels/devrep.cu``, run at launch. Everything that matters for ordering (``Stream.synchronize``,
``Stream.wait_event``, ``Event.record``, ``deviceSynchronize``, launches, copies, allocations, pool frees) is
appended to ``FakeGpu.log`` so tests can assert the order. Failures are injected by setting attributes on the
``FakeGpu`` (``nvrtc_missing``, ``fail_launch``, ``pool_limit``...).

Usage::

    gpu = FakeGpu(total=1 << 30)
    backend = load_backend("cuda", cupy_module=FakeCupy(gpu), vmm=FakeVmmDriver(gpu))
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE
from ..hashing import hash_pages
from ..linux.cuda_vmm import (
    CUDA_ERROR_INVALID_HANDLE,
    CUDA_ERROR_NOT_SUPPORTED,
    CUDA_ERROR_OUT_OF_MEMORY,
    CudaDriverError,
    VmmDriver,
    format_uuid,
)


class OutOfMemoryError(MemoryError):
    """Like ``cupy.cuda.memory.OutOfMemoryError`` (CuPy's pool cannot allocate)."""


class CUDARuntimeError(RuntimeError):
    """Like ``cupy.cuda.runtime.CUDARuntimeError``: ``status`` is the ``cudaError_t``."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"CUDA runtime error {status}")
        self.status = status


@dataclass
class FakeGpu:
    """The state behind one fake CuPy module: devices, memory, and the log of calls."""

    total: int = 1 << 30
    devices: int = 1
    uuids: list[str] = field(default_factory=list)
    name: str = "Fake H200"
    log: list[tuple[Any, ...]] = field(default_factory=list)
    nvrtc_missing: bool = False
    """``RawModule`` raises what CuPy raises when libnvrtc cannot be loaded."""
    compile_error: str = ""
    """``RawModule`` raises a compile error with this log."""
    fail_launch: dict[str, int] = field(default_factory=dict)
    """kernel name -> launch number (1-based, per name) that raises."""
    pool_limit: int | None = None
    """Bytes CuPy's pool may hold before it raises ``OutOfMemoryError``; ``None``: ``free`` decides."""
    pool_cached: int = 0
    """Bytes CuPy's pool holds cached (freed blocks not returned): ``free_all_blocks`` returns them."""
    fd_sharing: bool = True
    """What the VMM attributes say (``FakeVmmDriver.fd_sharing``)."""
    used: int = 0
    current_device: int = 0
    launches: dict[str, int] = field(default_factory=dict)
    memory: dict[int, npt.NDArray[np.uint8]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    aliases: dict[int, npt.NDArray[np.uint8]] = field(default_factory=dict)
    """Virtual addresses a fake VMM mapping put in front of an allocation's bytes."""

    def __post_init__(self) -> None:
        if not self.uuids:
            self.uuids = [format_uuid(bytes([0x10 + i] * 16)) for i in range(self.devices)]
        self._lock = threading.Lock()
        self._current_stream = threading.local()

    @property
    def free(self) -> int:
        return self.total - self.used - self.pool_cached

    def record(self, *entry: Any) -> None:
        with self._lock:
            self.log.append(entry)

    def names(self) -> list[str]:
        return [str(e[0]) for e in self.log]

    # memory
    def malloc(self, nbytes: int, pool: bool) -> int:
        with self._lock:
            limit_hit = pool and self.pool_limit is not None and self.used + nbytes > self.pool_limit
            if nbytes > self.free or limit_hit:
                self.log.append(("oom", nbytes, "pool" if pool else "cudaMalloc"))
                if pool:
                    raise OutOfMemoryError(f"Out of memory allocating {nbytes:,} bytes (fake pool)")
                raise CUDARuntimeError(2, "cudaErrorMemoryAllocation: out of memory")
            array = np.zeros(max(nbytes, 8), dtype=np.uint8)
            ptr = int(array.ctypes.data)
            self.memory[ptr] = array
            self.sizes[ptr] = nbytes
            self.used += nbytes
            self.log.append(("malloc", nbytes, "pool" if pool else "cudaMalloc"))
            return ptr

    def release(self, ptr: int) -> None:
        with self._lock:
            if self.memory.pop(ptr, None) is not None:
                self.used -= self.sizes.pop(ptr)
                self.log.append(("free", ptr))

    def view(self, ptr: int, nbytes: int) -> npt.NDArray[np.uint8]:
        """The bytes at a fake device pointer (inside one allocation)."""
        for table in (self.memory, self.aliases):
            for base, array in list(table.items()):
                if base <= ptr and ptr + nbytes <= base + array.size:
                    return array[ptr - base:ptr - base + nbytes]
        raise CUDARuntimeError(1, f"cudaErrorInvalidValue: {ptr:#x}+{nbytes} is not fake device memory")

    def translate(self, ptr: int, nbytes: int) -> int:
        """A real address for ``nbytes`` at ``ptr`` (fake device memory, a fake VMM mapping, or host memory)."""
        for base, array in list(self.aliases.items()):
            if base <= ptr < base + array.size:
                return int(self.view(ptr, nbytes).ctypes.data)
        return ptr

    @property
    def stream(self) -> FakeStream | None:
        return getattr(self._current_stream, "value", None)


class FakeMemory:
    """``cupy.cuda.memory.Memory``: a plain cudaMalloc (not the pool)."""

    def __init__(self, gpu: FakeGpu, nbytes: int, pool: bool = False) -> None:
        self.gpu = gpu
        self.size = nbytes
        self.ptr = gpu.malloc(nbytes, pool)
        self.device_id = gpu.current_device

    def __del__(self) -> None:
        if hasattr(self, "ptr"):  # not when the allocation itself failed
            self.gpu.release(self.ptr)


class FakeUnownedMemory:
    def __init__(self, ptr: int, size: int, owner: Any, device_id: int = 0) -> None:
        self.ptr, self.size, self.owner, self.device_id = ptr, size, owner, device_id


class FakeMemoryPointer:
    def __init__(self, mem: Any, offset: int) -> None:
        self.mem = mem
        self.ptr = mem.ptr + offset
        self.device_id = getattr(mem, "device_id", 0)


class FakePinned(bytearray):
    """``cupy.cuda.alloc_pinned_memory``'s result: host memory with ``ptr`` and the buffer protocol."""

    def __init__(self, gpu: FakeGpu, nbytes: int) -> None:
        super().__init__(nbytes)
        self._array = np.frombuffer(self, dtype=np.uint8)  # pins the bytearray's storage (no resizing)
        self.ptr = int(self._array.ctypes.data)
        self.size = nbytes
        gpu.record("alloc_pinned", nbytes)


class FakeArray:
    """A 1-d ``cupy.ndarray`` over fake device memory."""

    def __init__(self, gpu: FakeGpu, shape: tuple[int, ...] | int, dtype: Any, memptr: Any = None) -> None:
        self.gpu = gpu
        self.dtype = np.dtype(dtype)
        self.size = int(shape[0] if isinstance(shape, tuple) else shape)
        self.nbytes = self.size * self.dtype.itemsize
        if memptr is None:
            memptr = FakeMemoryPointer(FakeMemory(gpu, self.nbytes, pool=True), 0)
        self.data = memptr

    @property
    def host(self) -> npt.NDArray[Any]:
        """The bytes as a numpy view (a test helper: real CuPy has no such thing)."""
        return self.gpu.view(self.data.ptr, self.nbytes).view(self.dtype)

    def get(self, stream: Any = None) -> npt.NDArray[Any]:
        self.gpu.record("get", self.nbytes, stream)
        return self.host.copy()

    def __getitem__(self, key: slice) -> FakeArray:
        start, stop, step = key.indices(self.size)
        if step != 1:
            raise NotImplementedError("FakeArray supports contiguous slices only")
        mem = FakeUnownedMemory(self.data.ptr + start * self.dtype.itemsize, (stop - start) * self.dtype.itemsize,
                                self)
        return FakeArray(self.gpu, (stop - start,), self.dtype, FakeMemoryPointer(mem, 0))

    def __len__(self) -> int:
        return self.size

    def __dlpack_device__(self) -> tuple[int, int]:
        return (2, int(self.data.device_id))  # kDLCUDA

    def __dlpack__(self, **kwargs: Any) -> tuple[str, int, int]:
        """Not a capsule: a marker naming the pointer, enough for tests of who calls it."""
        return ("fake-dlpack", self.data.ptr, self.nbytes)


class FakeStream(AbstractContextManager["FakeStream"]):
    _count = 0

    def __init__(self, gpu: FakeGpu, non_blocking: bool = False, null: bool = False) -> None:
        self.gpu = gpu
        FakeStream._count += 1
        self.ptr = 0 if null else 0x5000 + FakeStream._count
        self.non_blocking = non_blocking
        self._previous: list[FakeStream | None] = []

    def synchronize(self) -> None:
        self.gpu.record("stream_sync", self.ptr)

    def wait_event(self, event: FakeEvent) -> None:
        self.gpu.record("wait_event", self.ptr, event.id)

    @property
    def done(self) -> bool:
        return True

    def __enter__(self) -> FakeStream:
        self._previous.append(self.gpu.stream)
        self.gpu._current_stream.value = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.gpu._current_stream.value = self._previous.pop()


class FakeEvent:
    _count = 0

    def __init__(self, gpu: FakeGpu, disable_timing: bool = False) -> None:
        self.gpu = gpu
        FakeEvent._count += 1
        self.id = FakeEvent._count
        self.recorded_on: int | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream or self.gpu.stream or FakeStream(self.gpu, null=True)
        self.recorded_on = stream.ptr
        self.gpu.record("event_record", self.id, stream.ptr)

    def synchronize(self) -> None:
        self.gpu.record("event_sync", self.id)

    @property
    def done(self) -> bool:
        return True


class FakeDevice(AbstractContextManager["FakeDevice"]):
    def __init__(self, gpu: FakeGpu, index: int = 0) -> None:
        self.gpu = gpu
        self.id = index
        self._previous: list[int] = []

    def __enter__(self) -> FakeDevice:
        if not 0 <= self.id < self.gpu.devices:
            raise CUDARuntimeError(101, "cudaErrorInvalidDevice")
        self._previous.append(self.gpu.current_device)
        self.gpu.current_device = self.id
        return self

    def __exit__(self, *exc: object) -> None:
        self.gpu.current_device = self._previous.pop()

    def use(self) -> None:
        self.gpu.current_device = self.id


class FakeKernel:
    """A kernel of ``kernels/devrep.cu``, run as numpy at launch."""

    def __init__(self, gpu: FakeGpu, name: str) -> None:
        self.gpu = gpu
        self.name = name

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], *,
                 shared_mem: int = 0, stream: Any = None) -> None:
        gpu = self.gpu
        with gpu._lock:
            n = gpu.launches[self.name] = gpu.launches.get(self.name, 0) + 1
        gpu.record("launch", self.name, grid, block, getattr(stream or gpu.stream, "ptr", 0))
        if gpu.fail_launch.get(self.name) == n:
            raise CUDARuntimeError(700, f"cudaErrorIllegalAddress (injected) in {self.name}")
        a = args
        if self.name == "hash_all":
            data, out, count = a
            out.host[:int(count)] = hash_pages(data.host.view(np.uint8)[:int(count) * PAGE_SIZE])
        elif self.name == "hash_list":
            data, pages, out, count = a
            out.host[:int(count)] = hash_pages(data.host.view(np.uint8), pages.host[:int(count)])
        elif self.name == "compare":
            x, y, out, counter, count = a
            diff = np.flatnonzero(x.host[:int(count)] != y.host[:int(count)])
            out.host[:diff.size] = diff
            counter.host[0] = diff.size
        elif self.name in ("scatter_pages", "copy_pages"):
            src, dst, pages, count = a
            s = src.host.view(np.uint8).reshape(-1, PAGE_SIZE)
            d = dst.host.view(np.uint8).reshape(-1, PAGE_SIZE)
            idx = pages.host[:int(count)]
            if self.name == "scatter_pages":
                d[idx] = s[:idx.size]
            else:
                d[idx] = s[idx]
        else:
            raise NotImplementedError(f"fake kernel {self.name}")


class FakeRawModule:
    def __init__(self, gpu: FakeGpu, code: str = "", options: tuple[str, ...] = ()) -> None:
        self.gpu = gpu
        self.code = code
        gpu.record("raw_module", options)

    def get_function(self, name: str) -> FakeKernel:
        if self.gpu.nvrtc_missing:  # what CuPy 14 says on a driver-only machine
            raise RuntimeError("CuPy failed to load libnvrtc.so.13: OSError: libnvrtc.so.13: cannot open shared "
                               "object file: No such file or directory")
        if self.gpu.compile_error:
            raise type("CompileException", (Exception,), {})(self.gpu.compile_error)
        return FakeKernel(self.gpu, name)


class FakePool:
    def __init__(self, gpu: FakeGpu, kind: str) -> None:
        self.gpu = gpu
        self.kind = kind

    def free_all_blocks(self) -> None:
        self.gpu.record("free_all_blocks", self.kind)
        if self.kind == "device":
            self.gpu.pool_cached = 0


class FakeRuntime:
    """``cupy.cuda.runtime``."""

    memcpyHostToDevice = 1
    memcpyDeviceToHost = 2
    memcpyDeviceToDevice = 3
    CUDARuntimeError = CUDARuntimeError

    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu

    def getDeviceCount(self) -> int:
        return self.gpu.devices

    def getDeviceProperties(self, index: int) -> dict[str, Any]:
        uuid = bytes.fromhex(self.gpu.uuids[index][4:].replace("-", ""))
        return {"name": self.gpu.name.encode(), "totalGlobalMem": self.gpu.total, "multiProcessorCount": 4,
                "uuid": uuid}

    def memGetInfo(self) -> tuple[int, int]:
        return self.gpu.free, self.gpu.total

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        self.gpu.view(ptr, nbytes)[:] = value
        self.gpu.record("memset", nbytes)

    def memsetAsync(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self.gpu.view(ptr, nbytes)[:] = value
        self.gpu.record("memset_async", nbytes, stream)

    def memcpyAsync(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        ctypes.memmove(self.gpu.translate(dst, nbytes), self.gpu.translate(src, nbytes), nbytes)
        self.gpu.record("memcpy_async", kind, nbytes, stream, dst, threading.get_ident())

    def memcpy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        ctypes.memmove(self.gpu.translate(dst, nbytes), self.gpu.translate(src, nbytes), nbytes)
        self.gpu.record("memcpy", kind, nbytes)

    def deviceSynchronize(self) -> None:
        self.gpu.record("device_sync", self.gpu.current_device)

    def ipcGetMemHandle(self, ptr: int) -> bytes:
        return ptr.to_bytes(8, "little") * 8

    def ipcOpenMemHandle(self, handle: bytes) -> int:
        self.gpu.record("ipc_open", handle[:8])
        return int.from_bytes(handle[:8], "little")

    def ipcCloseMemHandle(self, ptr: int) -> None:
        self.gpu.record("ipc_close", ptr)


class FakeCupy:
    """A stand-in for the ``cupy`` module (pass it as ``cupy_module=``)."""

    uint8, uint32, uint64, int64 = np.uint8, np.uint32, np.uint64, np.int64

    def __init__(self, gpu: FakeGpu | None = None) -> None:
        self.gpu = gpu = gpu or FakeGpu()
        runtime = FakeRuntime(gpu)
        self._device_pool = FakePool(gpu, "device")
        self._pinned_pool = FakePool(gpu, "pinned")
        self.cuda = SimpleNamespace(
            runtime=runtime,
            Device=lambda index=0: FakeDevice(gpu, index),
            Stream=lambda non_blocking=False: FakeStream(gpu, non_blocking),
            Event=lambda disable_timing=False, **_: FakeEvent(gpu, disable_timing),
            MemoryPointer=FakeMemoryPointer,
            UnownedMemory=FakeUnownedMemory,
            alloc_pinned_memory=lambda nbytes: FakePinned(gpu, nbytes),
            get_current_stream=lambda: gpu.stream or FakeStream(gpu, null=True),
            memory=SimpleNamespace(Memory=lambda nbytes: FakeMemory(gpu, nbytes), OutOfMemoryError=OutOfMemoryError),
        )
        self.RawModule = lambda code="", options=(): FakeRawModule(gpu, code, options)

    def ndarray(self, shape: tuple[int, ...], dtype: Any, memptr: Any = None) -> FakeArray:
        return FakeArray(self.gpu, shape, dtype, memptr)

    def empty(self, n: int, dtype: Any) -> FakeArray:
        return FakeArray(self.gpu, (n,), dtype)

    def zeros(self, n: int, dtype: Any) -> FakeArray:
        out = FakeArray(self.gpu, (n,), dtype)
        out.host[:] = 0
        return out

    def asarray(self, host: npt.ArrayLike) -> FakeArray:
        src = np.ascontiguousarray(host).reshape(-1)
        out = FakeArray(self.gpu, (src.size,), src.dtype)
        out.host[:] = src
        return out

    def get_default_memory_pool(self) -> FakePool:
        return self._device_pool

    def get_default_pinned_memory_pool(self) -> FakePool:
        return self._pinned_pool


class FakeVmmDriver(VmmDriver):
    """``VmmDriver`` over a ``FakeGpu``: allocations are host memory; exported fds are real memfds (so they
    travel over SCM_RIGHTS); every call is logged as ``("cuMemXxx", ...)``. ``fail`` maps a call name to the
    CUresult it returns next (once)."""

    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu
        self.fail: dict[str, int] = {}
        self.handles: dict[int, npt.NDArray[np.uint8]] = {}
        self.mapped: dict[int, tuple[int, int]] = {}  # ptr -> (handle, size)
        self.access: dict[int, str] = {}
        self.reserved: dict[int, int] = {}
        self._by_inode: dict[int, int] = {}
        self._next = 0x100

    def _call(self, name: str, *args: Any) -> None:
        self.gpu.record(name, *args)
        code = self.fail.pop(name, 0)
        if code:
            names = {CUDA_ERROR_OUT_OF_MEMORY: "CUDA_ERROR_OUT_OF_MEMORY", CUDA_ERROR_NOT_SUPPORTED:
                     "CUDA_ERROR_NOT_SUPPORTED", CUDA_ERROR_INVALID_HANDLE: "CUDA_ERROR_INVALID_HANDLE"}
            raise CudaDriverError(name, code, names.get(code, f"CUDA_ERROR_{code}"))

    def device_count(self) -> int:
        return self.gpu.devices

    def device_uuid(self, ordinal: int) -> str:
        return self.gpu.uuids[ordinal]

    def fd_sharing(self, ordinal: int) -> tuple[bool, str]:
        if self.gpu.fd_sharing:
            return True, "cuMemCreate + POSIX fd export supported (fake)"
        return False, "the driver cannot export allocations as POSIX file descriptors (fake)"

    def granularity(self, ordinal: int) -> int:
        return 2 << 20

    def create(self, ordinal: int, size: int) -> int:
        self._call("cuMemCreate", ordinal, size)
        if size > self.gpu.free:
            self.gpu.record("oom", size, "cuMemCreate")
            raise CudaDriverError("cuMemCreate", CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY")
        self._next += 1
        self.handles[self._next] = np.zeros(size, dtype=np.uint8)
        self.gpu.used += size
        return self._next

    def export_fd(self, handle: int) -> int:
        self._call("cuMemExportToShareableHandle", handle)
        fd = os.memfd_create("fake-cuda-vmm", os.MFD_CLOEXEC)
        self._by_inode[os.fstat(fd).st_ino] = handle
        return fd

    def import_fd(self, fd: int) -> int:
        self._call("cuMemImportFromShareableHandle", fd)
        handle = self._by_inode.get(os.fstat(fd).st_ino)
        if handle is None or handle not in self.handles:
            raise CudaDriverError("cuMemImportFromShareableHandle", CUDA_ERROR_INVALID_HANDLE,
                                  "CUDA_ERROR_INVALID_HANDLE")
        return handle

    def reserve(self, size: int, alignment: int) -> int:
        self._call("cuMemAddressReserve", size, alignment)
        self._next += 1
        ptr = self._next << 32
        self.reserved[ptr] = size
        return ptr

    def map(self, ptr: int, size: int, handle: int) -> None:
        self._call("cuMemMap", ptr, size, handle)
        self.mapped[ptr] = (handle, size)
        self.gpu.aliases[ptr] = self.handles[handle]

    def set_access(self, ptr: int, size: int, ordinal: int, read_only: bool) -> None:
        self._call("cuMemSetAccess", ptr, size, ordinal, "read" if read_only else "readwrite")
        self.access[ptr] = "read" if read_only else "readwrite"

    def unmap(self, ptr: int, size: int) -> None:
        self._call("cuMemUnmap", ptr, size)
        self.mapped.pop(ptr, None)
        self.access.pop(ptr, None)
        self.gpu.aliases.pop(ptr, None)

    def address_free(self, ptr: int, size: int) -> None:
        self._call("cuMemAddressFree", ptr, size)
        self.reserved.pop(ptr, None)

    def release(self, handle: int) -> None:
        self._call("cuMemRelease", handle)
        if all(h != handle for h, _ in self.mapped.values()) and handle in self.handles:
            self.gpu.used -= self.handles.pop(handle).size
