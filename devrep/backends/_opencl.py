"""OpenCL backend (pyopencl): runs for real on PoCL's CPU device in CI, and on any GPU/CPU OpenCL driver.

Devices are every GPU, CPU and accelerator device of every platform (or of the platforms chosen with the
``platform`` option or ``DEVREP_OPENCL_PLATFORM``), numbered ``opencl:0..`` in platform order. All devices
of one platform share one context, so fan-out to a second device of that platform is a device-side copy.

Data path (kernels in ``devrep/kernels/devrep.cl``, spec in ``devrep/kernels/README.md``):

* runs of at least 8 MiB: one host->device transfer each, straight into place;
* shorter runs on host-unified devices (CPU drivers such as PoCL): the region's host pages are wrapped as a
  ``CL_MEM_USE_HOST_PTR`` buffer (zero-copy) and one ``copy_pages`` kernel per batch gathers the dirty pages
  straight into the replica; no staging copy, no memcpy alignment cliff;
* other devices: dirty pages are packed into a mapped ``CL_MEM_ALLOC_HOST_PTR`` staging buffer (pinned where
  the driver supports it), unmapped (one host->device transfer) and placed by one ``scatter_pages`` kernel.

Further targets in the same context are filled from the first one on the device. Page hashes and the hash
comparison run on the device.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE, RunArray, check_page_multiple
from ..errors import BackendError, InvalidArgumentError, ResourceExhaustedError, UnknownDeviceError
from ..memory import ensure_room
from ..model import ExportKind
from ._base import Backend, DeviceBuffer, ExportHandle, HostArray, Progress
from ._kernels import bitcode_stamp, kernel_source, kernels_dir
from ._staging import gather_pages, page_batches

PLATFORM_ENV = "DEVREP_OPENCL_PLATFORM"


def _bitcode_digest() -> str:
    try:
        return hashlib.sha256((kernels_dir() / "pocl" / "STAMP").read_bytes()).hexdigest()[:16]
    except OSError:
        return "none"


VARIANT_ENV = "DEVREP_POCL_VARIANT"
_VARIANTS = ("sse2", "avx2", "avx512")


def _cpu_variant() -> str:
    """PoCL's kernel-library name for this CPU's instruction set (which prebuilt bitcode can run here).

    ``$DEVREP_POCL_VARIANT`` may choose a lower one (``sse2``, ``avx2``) than the CPU supports.
    """
    forced = os.environ.get(VARIANT_ENV)
    if forced in _VARIANTS:
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    have = set(flags)
    if {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd"} <= have:  # x86-64-v4
        return "avx512"
    if {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"} <= have:  # x86-64-v3
        return "avx2"
    return "sse2"


# PoCL keys its kernel cache by program hash, but programs created from bitcode get an empty hash, so a
# changed bitcode (or another variant of it) would silently reuse the old compiled kernels. One cache
# directory per bitcode version and variant avoids that; it must be set before PoCL initialises (the first
# platform query in this process).
os.environ.setdefault(
    "POCL_CACHE_DIR",
    str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "devrep"
        / f"pocl-{_bitcode_digest()}-{_cpu_variant()}"),
)

import pyopencl as cl  # noqa: E402 - after POCL_CACHE_DIR

_PAGE_WORDS = PAGE_SIZE // 8
_LOCAL = 64  # work-group size of every kernel launch (fixed, so PoCL compiles each kernel once)
# Hash kernels (devrep/kernels/README.md): on GPUs and accelerators one page per work-item, so a launch has a
# work-item per page and a large device fills; on CPU devices four pages per work-item (hash_all4/hash_list4),
# which keeps two multiply chains in flight per core and hashes 1.05-1.9x faster on PoCL than one page would.


def hash_geometry(device_type: int) -> tuple[int, str]:
    """``(pages per work-item, kernel-name suffix)`` of the hash kernels for an OpenCL device type."""
    return (4, "4") if device_type & cl.device_type.CPU else (1, "")


_OOM = {-4, -5, -6, -61}  # MEM_OBJECT_ALLOCATION_FAILURE, OUT_OF_RESOURCES, OUT_OF_HOST_MEMORY, INVALID_BUFFER_SIZE
_DIRECT_RUN_BYTES = 8 << 20  # a run this long is copied with its own transfer rather than packed
_DEVICE_TYPES = {
    "all": cl.device_type.GPU | cl.device_type.CPU | cl.device_type.ACCELERATOR,
    "gpu": cl.device_type.GPU,
    "cpu": cl.device_type.CPU,
    "accelerator": cl.device_type.ACCELERATOR,
}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(eq=False)
class _Context:
    platform: Any
    context: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    program: Any = None
    kernels: dict[str, Any] = field(default_factory=dict)
    staging: Any = None
    source: str = ""
    """How the program was built: ``"source"`` or the bitcode file's name."""


@dataclass(eq=False)
class _Device:
    index: int
    device: Any
    ctx: _Context
    queue: Any

    @property
    def label(self) -> str:
        return f"opencl:{self.index} ({self.device.name.strip()})"

    @property
    def unified(self) -> bool:
        return bool(self.device.host_unified_memory) and bool(self.device.type & cl.device_type.CPU)


class OpenCLBackend(Backend):
    """``opencl:0..``: OpenCL devices.

    Options (all keyword, all optional): ``platform`` (a platform index, or a case-insensitive substring of
    its name or vendor; default ``$DEVREP_OPENCL_PLATFORM``, else every platform), ``device_type`` (``all``,
    ``gpu``, ``cpu``, ``accelerator``), ``capacity`` (bytes per device devrep may allocate; default the
    device's global memory), ``zero_copy`` (use host pages in place on host-unified devices; ``False``
    forces the staging path), ``kernel_source`` (OpenCL C to build instead of ``devrep/kernels/devrep.cl``; for
    tests), ``batch_bytes`` (staging buffer size and progress granularity).
    """

    name = "opencl"

    def __init__(
        self,
        *,
        platform: str | int | None = None,
        device_type: str = "all",
        capacity: int | None = None,
        zero_copy: bool = True,
        kernel_source: str | None = None,
        batch_bytes: int = 64 << 20,
    ) -> None:
        if device_type not in _DEVICE_TYPES:
            raise InvalidArgumentError(f"device_type must be one of {', '.join(_DEVICE_TYPES)}, got {device_type!r}")
        check_page_multiple("batch_bytes", batch_bytes)
        super().__init__()
        self._capacity_bytes = capacity
        self._zero_copy = zero_copy
        self._kernel_source = kernel_source
        self._batch_pages = batch_bytes // PAGE_SIZE
        self._lock = threading.Lock()  # guards _backing
        self._backing: dict[int, npt.NDArray[np.uint8]] = {}  # id(cl.Buffer) -> host memory it wraps
        self._devices: list[_Device] = []
        choice = platform if platform is not None else os.environ.get(PLATFORM_ENV) or None
        for plat in self._platforms(choice):
            try:
                devices = plat.get_devices(device_type=_DEVICE_TYPES[device_type])
            except cl.Error:  # DEVICE_NOT_FOUND: the platform has none of that type
                continue
            if not devices:
                continue
            ctx = _Context(plat, cl.Context(devices))
            for dev in devices:
                self._devices.append(_Device(len(self._devices), dev, ctx, cl.CommandQueue(ctx.context, dev)))

    @staticmethod
    def _platforms(choice: str | int | None) -> list[Any]:
        try:
            platforms = cl.get_platforms()
        except cl.Error:  # PLATFORM_NOT_FOUND_KHR: no OpenCL driver installed
            platforms = []
        if choice is None:
            return list(platforms)
        names = [f"{i}: {p.name.strip()} ({p.vendor.strip()})" for i, p in enumerate(platforms)]
        if isinstance(choice, int) or str(choice).isdigit():
            i = int(choice)
            if 0 <= i < len(platforms):
                return [platforms[i]]
        else:
            want = str(choice).lower()
            picked = [p for p in platforms if want in p.name.lower() or want in p.vendor.lower()]
            if picked:
                return picked
        raise UnknownDeviceError(
            f"no OpenCL platform matches {choice!r} (from the platform option or ${PLATFORM_ENV}); "
            f"platforms here: {'; '.join(names) or 'none'}"
        )

    # ------------------------------------------------------------------ devices
    def device_count(self) -> int:
        return len(self._devices)

    def _describe(self, index: int) -> str:
        d = self._devices[index]
        return (f"opencl:{index} ({d.device.name.strip()}, {d.ctx.platform.name.strip()}, "
                f"{d.device.global_mem_size >> 20} MiB, program from {d.ctx.source or 'not built yet'})")

    def _label(self, index: int) -> str:
        return self._devices[index].label

    def _capacity(self, index: int) -> int:
        if self._capacity_bytes is not None:
            return self._capacity_bytes
        return int(self._devices[index].device.global_mem_size)

    # ------------------------------------------------------------------ program
    def _kernel(self, d: _Device, name: str) -> Any:
        ctx = d.ctx
        if ctx.program is None:
            ctx.program, ctx.source = self._build(ctx)
        if name not in ctx.kernels:
            ctx.kernels[name] = cl.Kernel(ctx.program, name)
        return ctx.kernels[name]

    def _build(self, ctx: _Context) -> tuple[Any, str]:
        devices = ctx.context.devices
        labels = ", ".join(d.label for d in self._devices if d.ctx is ctx)
        source = kernel_source(self._kernel_source, "devrep.cl", "OpenCL", labels)
        try:
            return cl.Program(ctx.context, source).build(options=[f"-DPAGE_WORDS={_PAGE_WORDS}"]), "source"
        except cl.Error as exc:
            log = self._build_log(exc)
            # PoCL with an LLVM older than the CPU cannot build any source here (see build_pocl_bitcode.sh);
            # our own kernels then come from the prebuilt bitcode.
            if self._kernel_source is None and "unknown target CPU" in log and "Portable" in ctx.platform.name:
                return self._build_bitcode(ctx, devices, labels, log)
            raise BackendError(f"OpenCL kernel build failed on {labels}; build log:\n{log}") from exc

    @staticmethod
    def _build_log(exc: Exception) -> str:
        return str(exc).strip()  # pyopencl puts every device's build log in the message

    def _build_bitcode(self, ctx: _Context, devices: list[Any], labels: str, log: str) -> tuple[Any, str]:
        pocl_dir = kernels_dir() / "pocl"
        path = pocl_dir / f"devrep-{_cpu_variant()}.bc"
        try:
            expected = (pocl_dir / "STAMP").read_text()
            bitcode = path.read_bytes()
            actual = bitcode_stamp()
        except OSError as exc:
            raise BackendError(
                f"OpenCL kernel build failed on {labels} and no prebuilt PoCL bitcode is usable ({exc}); "
                f"build log:\n{log}"
            ) from exc
        if expected != actual or PAGE_SIZE != 4096:
            raise BackendError(
                f"OpenCL kernel build failed on {labels}, and the prebuilt PoCL bitcode is stale: it was built "
                f"from\n{expected}but here is\n{actual}(devrep.cl or the build flags changed: run "
                f"devrep/kernels/build_pocl_bitcode.sh; or another PoCL is installed: install the pinned one, "
                f"pip install 'devrep[opencl]'); build log:\n{log}"
            )
        try:
            program = cl.Program(ctx.context, devices, [bitcode] * len(devices)).build()
        except cl.Error as exc:
            raise BackendError(
                f"OpenCL kernel build failed on {labels} from source and from {path.name}; build logs:\n"
                f"{log}\n{self._build_log(exc)}"
            ) from exc
        return program, path.name

    # ------------------------------------------------------------------ memory
    def _allocate(self, index: int, nbytes: int) -> DeviceBuffer:
        d = self._devices[index]
        try:
            buf = self._new_buffer(d, nbytes)
            try:
                # Zero it now: replicas start defined, and a lazily allocating driver fails here, not later.
                cl.enqueue_fill_buffer(d.queue, buf, np.zeros(1, np.uint8), 0, nbytes).wait()
            except BaseException:
                buf.release()
                with self._lock:
                    self._backing.pop(id(buf), None)
                raise
        except cl.Error as exc:
            if exc.code in _OOM:
                raise ResourceExhaustedError(
                    f"{d.label} cannot allocate {nbytes} bytes (largest single buffer "
                    f"{d.device.max_mem_alloc_size} bytes, {self._used.get(index, 0) - nbytes} in use): {exc}"
                ) from exc
            raise BackendError(f"{d.label}: allocating {nbytes} bytes failed: {exc}") from exc
        return DeviceBuffer(f"opencl:{index}", index, nbytes, buf)

    def _new_buffer(self, d: _Device, nbytes: int) -> Any:
        """Replica memory. On a device that works in host memory (PoCL and other CPU drivers) the buffer wraps
        page-aligned memory of ours (``USE_HOST_PTR``): the driver's own allocation starts 128 bytes into a
        page, which puts every long host->replica copy on glibc's misaligned path (about 3x slower than an
        aligned memcpy past its non-temporal threshold on some CPUs; benchmark P2c). Other devices allocate
        their own memory."""
        if not d.unified:
            return cl.Buffer(d.ctx.context, cl.mem_flags.READ_WRITE, nbytes)
        ensure_room(nbytes, f"a replica on {d.label}")  # host memory: past a limit the kernel kills, not fails
        try:  # private anonymous memory, as the driver's own malloc would use; page-aligned by mmap
            backing = np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=np.uint8)
        except OSError as exc:
            raise ResourceExhaustedError(f"{d.label} cannot allocate {nbytes} bytes of host memory: {exc}") from exc
        buf = cl.Buffer(d.ctx.context, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR, hostbuf=backing)
        with self._lock:
            self._backing[id(buf)] = backing  # the driver uses this memory until the buffer is released
        return buf

    def _free(self, buffer: DeviceBuffer) -> None:
        buffer.handle.release()
        with self._lock:
            self._backing.pop(id(buffer.handle), None)  # after the release: the driver no longer uses it
        buffer.handle = None

    # ------------------------------------------------------------------ copies
    def _copy_runs(self, host: HostArray, runs: RunArray, targets: list[DeviceBuffer],
                   progress: Progress | None) -> None:
        groups: dict[int, list[DeviceBuffer]] = {}
        for t in targets:  # one group per context, in the order the targets came
            groups.setdefault(id(self._devices[t.index].ctx), []).append(t)
        long = runs[:, 1] * PAGE_SIZE >= _DIRECT_RUN_BYTES
        for group in groups.values():
            d = self._devices[group[0].index]
            with d.ctx.lock:
                try:
                    self._copy_long(d, host, runs[long], group, progress)
                    if not long.all():
                        if d.unified and self._zero_copy:
                            self._copy_zero(d, host, runs[~long], group, progress)
                        else:
                            self._copy_staged(d, host, runs[~long], group, progress)
                except cl.Error as exc:
                    raise BackendError(f"{d.label}: copying page runs failed: {exc}") from exc
            progress = None  # bytes are reported once, for the first context

    def _pages_buffer(self, d: _Device, pages: npt.NDArray[np.int64]) -> Any:
        return cl.Buffer(d.ctx.context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=pages)

    def _launch_pages(self, d: _Device, kernel: str, src: Any, dst: DeviceBuffer, pages_buf: Any, n: int) -> Any:
        # One work-group per page; its work-items share the page's 16-byte words.
        k = self._kernel(d, kernel)
        k.set_args(src, dst.handle, pages_buf, np.int64(n))
        return cl.enqueue_nd_range_kernel(self._devices[dst.index].queue, k, (n * _LOCAL,), (_LOCAL,))

    def _fan_out(self, d: _Device, first: DeviceBuffer, rest: list[DeviceBuffer], pages_buf: Any, n: int) -> None:
        for t in rest:  # device-side copy from the first replica: the host pages are read once
            self._launch_pages(d, "copy_pages", first.handle, t, pages_buf, n).wait()

    def _copy_zero(self, d: _Device, host: npt.NDArray[np.uint8], runs: RunArray, group: list[DeviceBuffer],
                   progress: Progress | None) -> None:
        src = cl.Buffer(d.ctx.context, cl.mem_flags.READ_ONLY | cl.mem_flags.USE_HOST_PTR, hostbuf=host)
        try:
            for pages in page_batches(runs, self._batch_pages if progress else 1 << 62):
                pages_buf = self._pages_buffer(d, pages)
                try:
                    self._launch_pages(d, "copy_pages", src, group[0], pages_buf, pages.size).wait()
                    self._fan_out(d, group[0], group[1:], pages_buf, pages.size)
                finally:
                    pages_buf.release()
                if progress:
                    progress(int(pages.size) * PAGE_SIZE)
        finally:
            src.release()

    def _staging(self, d: _Device) -> Any:
        ctx = d.ctx
        nbytes = self._batch_pages * PAGE_SIZE
        if ctx.staging is None:
            flags = cl.mem_flags.READ_ONLY | cl.mem_flags.ALLOC_HOST_PTR
            try:
                ctx.staging = cl.Buffer(ctx.context, flags, nbytes)
            except cl.Error as exc:
                raise ResourceExhaustedError(f"{d.label}: no room for a {nbytes}-byte staging buffer: {exc}") from exc
        return ctx.staging

    def _copy_long(self, d: _Device, host: npt.NDArray[np.uint8], runs: RunArray, group: list[DeviceBuffer],
                   progress: Progress | None) -> None:
        """Long runs: one transfer each (the driver's memcpy/DMA beats a kernel on a run this long)."""
        first = group[0]
        step = self._batch_pages * PAGE_SIZE
        for start, count in runs.tolist():
            a, b = start * PAGE_SIZE, (start + count) * PAGE_SIZE
            for lo in range(a, b, step if progress else b - a):  # batched only so progress moves
                hi = min(b, lo + step) if progress else b
                cl.enqueue_copy(d.queue, first.handle, host[lo:hi], dst_offset=lo).wait()
                for t in group[1:]:
                    cl.enqueue_copy(d.queue, t.handle, first.handle, byte_count=hi - lo, src_offset=lo,
                                    dst_offset=lo).wait()
                if progress:
                    progress(hi - lo)

    def _copy_staged(self, d: _Device, host: npt.NDArray[np.uint8], short: RunArray, group: list[DeviceBuffer],
                     progress: Progress | None) -> None:
        first = group[0]
        staging = self._staging(d)
        for pages in page_batches(short, self._batch_pages):
            n = int(pages.size)
            view, _ = cl.enqueue_map_buffer(d.queue, staging, cl.map_flags.WRITE_INVALIDATE_REGION, 0,
                                            (n * PAGE_SIZE,), np.dtype(np.uint8))
            try:
                gather_pages(host, pages, view)
            finally:
                view.base.release(d.queue)  # unmap: the one host->device transfer of this batch
            pages_buf = self._pages_buffer(d, pages)
            try:
                self._launch_pages(d, "scatter_pages", staging, first, pages_buf, n).wait()
                self._fan_out(d, first, group[1:], pages_buf, n)
            finally:
                pages_buf.release()
            if progress:
                progress(n * PAGE_SIZE)

    # ------------------------------------------------------------------ hashes
    def _hash_pages(self, buffer: DeviceBuffer, index: npt.NDArray[np.int64] | None) -> npt.NDArray[np.uint64]:
        d = self._devices[buffer.index]
        n = buffer.nbytes // PAGE_SIZE if index is None else int(index.size)
        out = np.empty(n, dtype=np.uint64)
        with d.ctx.lock:
            try:
                out_buf = cl.Buffer(d.ctx.context, cl.mem_flags.WRITE_ONLY, n * 8)
                try:
                    per_item, suffix = hash_geometry(int(d.device.type))
                    items = _round_up(-(-n // per_item), _LOCAL)
                    if index is None:
                        k = self._kernel(d, "hash_all" + suffix)
                        k.set_args(buffer.handle, out_buf, np.int64(n))
                        cl.enqueue_nd_range_kernel(d.queue, k, (items,), (_LOCAL,))
                    else:
                        pages_buf = self._pages_buffer(d, index)
                        k = self._kernel(d, "hash_list" + suffix)
                        k.set_args(buffer.handle, pages_buf, out_buf, np.int64(n))
                        cl.enqueue_nd_range_kernel(d.queue, k, (items,), (_LOCAL,))
                    cl.enqueue_copy(d.queue, out, out_buf).wait()
                    if index is not None:
                        pages_buf.release()
                finally:
                    out_buf.release()
            except cl.Error as exc:
                raise BackendError(f"{d.label}: page hash failed: {exc}") from exc
        return out

    def _compare(self, a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        d = self._devices[0]
        n = int(a.size)
        count = np.zeros(1, dtype=np.uint32)
        flags = cl.mem_flags
        with d.ctx.lock:
            try:
                bufs = [cl.Buffer(d.ctx.context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=a),
                        cl.Buffer(d.ctx.context, flags.READ_ONLY | flags.COPY_HOST_PTR, hostbuf=b),
                        cl.Buffer(d.ctx.context, flags.WRITE_ONLY, n * 8),
                        cl.Buffer(d.ctx.context, flags.READ_WRITE | flags.COPY_HOST_PTR, hostbuf=count)]
                try:
                    k = self._kernel(d, "compare")
                    k.set_args(*bufs, np.int64(n))
                    cl.enqueue_nd_range_kernel(d.queue, k, (_round_up(n, _LOCAL),), (_LOCAL,))
                    cl.enqueue_copy(d.queue, count, bufs[3]).wait()
                    out = np.empty(int(count[0]), dtype=np.int64)
                    if out.size:
                        cl.enqueue_copy(d.queue, out, bufs[2]).wait()
                finally:
                    for buf in bufs:
                        buf.release()
            except cl.Error as exc:
                raise BackendError(f"{d.label}: hash comparison failed: {exc}") from exc
        out.sort()  # the kernel emits in completion order
        return out

    # ------------------------------------------------------------------ read / export
    def _read(self, buffer: DeviceBuffer, offset: int, nbytes: int) -> HostArray:
        d = self._devices[buffer.index]
        out = np.empty(nbytes, dtype=np.uint8)
        try:
            cl.enqueue_copy(d.queue, out, buffer.handle, src_offset=offset).wait()
        except cl.Error as exc:
            raise BackendError(f"{d.label}: reading {nbytes} bytes back failed: {exc}") from exc
        return out

    def _export(self, buffer: DeviceBuffer) -> ExportHandle:
        # OpenCL has no portable cross-process sharing of device memory.
        return ExportHandle(ExportKind.NONE, 0, buffer.nbytes, buffer.device)

    def _close(self) -> None:
        for d in self._devices:
            d.queue.finish()
            if d.ctx.staging is not None:
                d.ctx.staging.release()
                d.ctx.staging = None
