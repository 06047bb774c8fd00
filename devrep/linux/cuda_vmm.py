"""CUDA virtual memory management (VMM): replicas that another process maps read-only from a file descriptor.

A replica is physical GPU memory made with ``cuMemCreate`` (requesting ``CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR``),
mapped read-write in the server, and exported once with ``cuMemExportToShareableHandle`` as an fd. The fd goes to
readers over the side channel (SCM_RIGHTS, like CPU replica memfds), which works across PID namespaces (pods),
unlike classic ``cudaIpc*`` handles. A reader imports it (``cuMemImportFromShareableHandle``), reserves an address
range, maps it and grants its device **read-only** access (``cuMemSetAccess`` with
``CU_MEM_ACCESS_FLAGS_PROT_READ``): its kernels cannot write the replica.

Every driver call goes through the small ``VmmDriver`` interface: ``CudaBindingsDriver`` implements it with
NVIDIA's ``cuda-python`` bindings (``cuda.bindings.driver``, published for CUDA 12 and 13), and
``devrep.testing.fake_cuda.FakeVmmDriver`` with host memory, so the allocate / export / import / map / unmap
sequences and their error handling are tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, DevrepError, FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError

INSTALL_HINT = ("pip install devrep[cuda12] or devrep[cuda13] (CuPy, NVRTC and cuda-bindings for your driver's CUDA "
                "major version, which nvidia-smi shows)")

# CUresult codes that mean something to a caller (cuda.h); the rest become BackendError.
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_INVALID_DEVICE = 101
CUDA_ERROR_INVALID_HANDLE = 400
CUDA_ERROR_NOT_SUPPORTED = 801


class CudaDriverError(Exception):
    """A CUDA driver call returned ``code`` (``name`` is the ``CUresult`` name, e.g. ``CUDA_ERROR_OUT_OF_MEMORY``)."""

    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.call = call
        self.code = code
        self.name = name


def devrep_error(exc: CudaDriverError, what: str) -> DevrepError:
    """The devrep error for a failed driver call: out of memory -> ``ResourceExhaustedError``, not supported ->
    ``FailedPreconditionError``, a bad value or handle (e.g. an fd that is not a CUDA allocation) ->
    ``InvalidArgumentError``, anything else -> ``BackendError``. The message names the call and the CUresult."""
    message = f"{what}: {exc}"
    if exc.code == CUDA_ERROR_OUT_OF_MEMORY:
        return ResourceExhaustedError(message)
    if exc.code == CUDA_ERROR_NOT_SUPPORTED:
        return FailedPreconditionError(message)
    if exc.code in (CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_INVALID_HANDLE, CUDA_ERROR_INVALID_DEVICE):
        return InvalidArgumentError(message)
    return BackendError(message)


class VmmDriver(ABC):
    """The CUDA driver calls devrep's VMM sharing needs, on device ordinals and plain integers."""

    @abstractmethod
    def device_count(self) -> int:
        """Devices this process sees (after ``CUDA_VISIBLE_DEVICES``)."""

    @abstractmethod
    def device_uuid(self, ordinal: int) -> str:
        """``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` (as ``nvidia-smi -L`` prints it)."""

    @abstractmethod
    def fd_sharing(self, ordinal: int) -> tuple[bool, str]:
        """Whether the device supports VMM with POSIX fd handles, and why not."""

    @abstractmethod
    def granularity(self, ordinal: int) -> int:
        """Minimum allocation granularity (sizes and mapping offsets are multiples of it)."""

    @abstractmethod
    def create(self, ordinal: int, size: int) -> int:
        """``cuMemCreate`` of ``size`` bytes on the device, exportable as a POSIX fd; returns the handle."""

    @abstractmethod
    def export_fd(self, handle: int) -> int:
        """``cuMemExportToShareableHandle``: a new fd (owned by the caller)."""

    @abstractmethod
    def import_fd(self, fd: int) -> int:
        """``cuMemImportFromShareableHandle``: a handle for the memory behind ``fd`` (the fd stays the caller's)."""

    @abstractmethod
    def reserve(self, size: int, alignment: int) -> int:
        """``cuMemAddressReserve``: a virtual address range."""

    @abstractmethod
    def map(self, ptr: int, size: int, handle: int) -> None:
        """``cuMemMap`` the whole allocation at ``ptr``."""

    @abstractmethod
    def set_access(self, ptr: int, size: int, ordinal: int, read_only: bool) -> None:
        """``cuMemSetAccess`` for the device: ``PROT_READ`` or ``PROT_READWRITE``."""

    @abstractmethod
    def unmap(self, ptr: int, size: int) -> None:
        """``cuMemUnmap``."""

    @abstractmethod
    def address_free(self, ptr: int, size: int) -> None:
        """``cuMemAddressFree``."""

    @abstractmethod
    def release(self, handle: int) -> None:
        """``cuMemRelease`` (the memory goes when no mapping and no handle is left)."""


def ordinal_for_uuid(driver: VmmDriver, uuid: str) -> int:
    """The ordinal of the GPU with this UUID in this process (whatever ``CUDA_VISIBLE_DEVICES`` says), or
    ``FailedPreconditionError`` naming the GPUs it does see."""
    seen = []
    for i in range(driver.device_count()):
        u = driver.device_uuid(i)
        if u.lower() == uuid.lower():
            return i
        seen.append(u)
    raise FailedPreconditionError(
        f"the replica is on GPU {uuid}, which this process does not see (its GPUs: {', '.join(seen) or 'none'}; "
        "check CUDA_VISIBLE_DEVICES / the pod's GPU assignment)")


@dataclass
class VmmAllocation:
    """Physical memory ``handle`` mapped at ``ptr`` (``size`` bytes, a multiple of the granularity) on ``ordinal``;
    ``fd`` is the exported handle once ``export`` ran (-1 before)."""

    ordinal: int
    handle: int
    ptr: int
    size: int
    granularity: int
    fd: int = -1


def round_up(nbytes: int, granularity: int) -> int:
    return -(-nbytes // granularity) * granularity


def _map(driver: VmmDriver, handle: Any, size: int, granularity: int, ordinal: int, *, read_only: bool,
         where: str) -> int:
    """Reserve an address range, map ``handle`` there and grant access on ``ordinal``; on failure undo every step
    (the handle included) and raise the devrep error for it."""
    undo: list[Any] = [lambda: driver.release(handle)]
    try:
        ptr = driver.reserve(size, granularity)
        undo.append(lambda: driver.address_free(ptr, size))
        driver.map(ptr, size, handle)
        undo.append(lambda: driver.unmap(ptr, size))
        driver.set_access(ptr, size, ordinal, read_only=read_only)
    except CudaDriverError as exc:
        _undo(undo)
        raise devrep_error(exc, where) from exc
    return int(ptr)


def allocate(driver: VmmDriver, ordinal: int, nbytes: int) -> VmmAllocation:
    """Create, reserve, map and grant read-write access on ``ordinal``; undoes what it did when a step fails."""
    where = f"cuda:{ordinal}: allocating {nbytes} bytes (VMM)"
    try:
        gran = driver.granularity(ordinal)
        size = round_up(max(nbytes, 1), gran)
        handle = driver.create(ordinal, size)
    except CudaDriverError as exc:
        raise devrep_error(exc, where) from exc
    ptr = _map(driver, handle, size, gran, ordinal, read_only=False, where=where)
    return VmmAllocation(ordinal, handle, ptr, size, gran)


def export(driver: VmmDriver, alloc: VmmAllocation) -> int:
    """The allocation's fd, exported once and owned by the allocation (dup it before passing it on)."""
    if alloc.fd < 0:
        try:
            alloc.fd = driver.export_fd(alloc.handle)
        except CudaDriverError as exc:
            raise devrep_error(exc, f"cuda:{alloc.ordinal}: exporting a replica as an fd") from exc
    return alloc.fd


def free(driver: VmmDriver, alloc: VmmAllocation) -> None:
    """Unmap, free the address range, release the handle and close the exported fd (every step is tried;
    the first failure is raised after the rest ran)."""
    steps = [lambda: driver.unmap(alloc.ptr, alloc.size), lambda: driver.address_free(alloc.ptr, alloc.size),
             lambda: driver.release(alloc.handle)]
    first = _undo(list(reversed(steps)))
    if alloc.fd >= 0:
        with contextlib.suppress(OSError):
            os.close(alloc.fd)
        alloc.fd = -1
    if first is not None:
        raise devrep_error(first, f"cuda:{alloc.ordinal}: freeing a VMM replica")


@dataclass
class VmmMapping:
    """A reader's read-only mapping of an imported replica."""

    ordinal: int
    handle: int
    ptr: int
    size: int


def map_readonly(driver: VmmDriver, fd: int, size: int, granularity: int, ordinal: int) -> VmmMapping:
    """Import ``fd``, map ``size`` bytes (a multiple of ``granularity``) and grant ``ordinal`` read-only access."""
    where = f"cuda:{ordinal}: mapping a shared replica (fd {fd}, {size} bytes) read-only"
    if granularity <= 0 or size <= 0 or size % granularity:
        raise InvalidArgumentError(f"{where}: size {size} is not a positive multiple of granularity {granularity}")
    try:
        handle = driver.import_fd(fd)
    except CudaDriverError as exc:
        raise devrep_error(exc, where) from exc
    ptr = _map(driver, handle, size, granularity, ordinal, read_only=True, where=where)
    return VmmMapping(ordinal, handle, ptr, size)


def unmap(driver: VmmDriver, mapping: VmmMapping) -> None:
    """Undo ``map_readonly`` (every step is tried; the first failure is raised after the rest ran)."""
    steps = [lambda: driver.unmap(mapping.ptr, mapping.size),
             lambda: driver.address_free(mapping.ptr, mapping.size), lambda: driver.release(mapping.handle)]
    first = _undo(list(reversed(steps)))
    if first is not None:
        raise devrep_error(first, f"cuda:{mapping.ordinal}: unmapping a shared replica")


def _undo(steps: list[Any]) -> CudaDriverError | None:
    """Run cleanup steps last-first; returns the first driver error (the others still run)."""
    first: CudaDriverError | None = None
    for step in reversed(steps):
        try:
            step()
        except CudaDriverError as exc:
            first = first or exc
    return first


class CudaBindingsDriver(VmmDriver):
    """``VmmDriver`` on ``cuda.bindings.driver`` (NVIDIA's cuda-python; ``cuda-bindings`` 12.x or 13.x)."""

    def __init__(self) -> None:
        try:
            self._cu: Any = importlib.import_module("cuda.bindings.driver")
        except ImportError as exc:
            raise FailedPreconditionError(
                f"CUDA VMM fd sharing needs NVIDIA's cuda-python bindings (cuda.bindings): {INSTALL_HINT} ({exc})"
            ) from exc
        self._check("cuInit", self._cu.cuInit(0))

    def _check(self, call: str, result: Any) -> Any:
        """cuda.bindings returns ``(CUresult, values...)``: raise on an error, return the value(s)."""
        err, *values = result if isinstance(result, tuple) else (result,)
        code = int(err)
        if code:
            name = getattr(err, "name", "")
            if not name:
                got = self._cu.cuGetErrorName(err)
                name = got[1].decode() if got and int(got[0]) == 0 and got[1] else f"CUresult {code}"
            raise CudaDriverError(call, code, name)
        return values[0] if len(values) == 1 else values

    def _dev(self, ordinal: int) -> Any:
        return self._check("cuDeviceGet", self._cu.cuDeviceGet(ordinal))

    def device_count(self) -> int:
        return int(self._check("cuDeviceGetCount", self._cu.cuDeviceGetCount()))

    def device_uuid(self, ordinal: int) -> str:
        raw = bytes(self._check("cuDeviceGetUuid", self._cu.cuDeviceGetUuid(self._dev(ordinal))).bytes)
        return format_uuid(raw)

    def _attribute(self, name: str, ordinal: int) -> int:
        attr = getattr(self._cu.CUdevice_attribute, name)
        return int(self._check("cuDeviceGetAttribute", self._cu.cuDeviceGetAttribute(attr, self._dev(ordinal))))

    def fd_sharing(self, ordinal: int) -> tuple[bool, str]:
        if not self._attribute("CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED", ordinal):
            return False, "the device or driver does not support CUDA virtual memory management"
        if not self._attribute("CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED", ordinal):
            return False, "the driver cannot export allocations as POSIX file descriptors"
        return True, "cuMemCreate + POSIX fd export supported"

    def _prop(self, ordinal: int) -> Any:
        cu = self._cu
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return prop

    def granularity(self, ordinal: int) -> int:
        flag = self._cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        return int(self._check("cuMemGetAllocationGranularity",
                               self._cu.cuMemGetAllocationGranularity(self._prop(ordinal), flag)))

    def create(self, ordinal: int, size: int) -> int:
        return int(self._check("cuMemCreate", self._cu.cuMemCreate(size, self._prop(ordinal), 0)))

    def export_fd(self, handle: int) -> int:
        kind = self._cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return int(self._check("cuMemExportToShareableHandle",
                               self._cu.cuMemExportToShareableHandle(handle, kind, 0)))

    def import_fd(self, fd: int) -> int:
        kind = self._cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        return int(self._check("cuMemImportFromShareableHandle", self._cu.cuMemImportFromShareableHandle(fd, kind)))

    def reserve(self, size: int, alignment: int) -> int:
        return int(self._check("cuMemAddressReserve", self._cu.cuMemAddressReserve(size, alignment, 0, 0)))

    def map(self, ptr: int, size: int, handle: int) -> None:
        self._check("cuMemMap", self._cu.cuMemMap(ptr, size, 0, handle, 0))

    def set_access(self, ptr: int, size: int, ordinal: int, read_only: bool) -> None:
        cu = self._cu
        desc = cu.CUmemAccessDesc()
        desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = ordinal
        desc.flags = (cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ if read_only
                      else cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        self._check("cuMemSetAccess", cu.cuMemSetAccess(ptr, size, [desc], 1))

    def unmap(self, ptr: int, size: int) -> None:
        self._check("cuMemUnmap", self._cu.cuMemUnmap(ptr, size))

    def address_free(self, ptr: int, size: int) -> None:
        self._check("cuMemAddressFree", self._cu.cuMemAddressFree(ptr, size))

    def release(self, handle: int) -> None:
        self._check("cuMemRelease", self._cu.cuMemRelease(handle))


def format_uuid(raw: bytes) -> str:
    """16 UUID bytes as ``GPU-8-4-4-4-12`` hex, the form ``nvidia-smi -L`` and ``CUDA_VISIBLE_DEVICES`` use."""
    h = bytes(raw[:16]).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def load_driver() -> tuple[VmmDriver | None, str]:
    """The real driver, or ``None`` and why VMM fd sharing is not available in this process."""
    try:
        return CudaBindingsDriver(), ""
    except FailedPreconditionError as exc:
        return None, str(exc)
    except CudaDriverError as exc:
        return None, f"the CUDA driver is not usable: {exc}"
    except Exception as exc:
        return None, f"cuda.bindings failed to load: {type(exc).__name__}: {exc}"
