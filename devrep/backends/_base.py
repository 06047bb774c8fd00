"""The one interface every device backend implements (CPU, NUMA, OpenCL, CUDA), and the layer that checks it.

As in psutil (a public layer that validates, a private per-platform part that does the work): ``Backend``'s public
methods are the whole contract and check every argument once, then call a private hook (``_allocate``, ``_free``,
``_copy_runs``, ``_hash_pages``, ``_read``, ``_export``, ``_close``, ...) that a backend module implements. A hook
only ever sees:

* a device index in ``[0, device_count())`` on an open backend;
* live buffers this backend allocated (a registry, not a flag on the buffer: a freed buffer or one from another
  backend instance never reaches a hook);
* page runs as a contiguous ``(n, 2)`` int64 array, ``count > 0``, sorted, non-overlapping, inside the host array,
  whose bytes every target buffer covers; page lists inside the buffer; byte ranges inside the buffer;
* byte counts already reserved against the device's capacity (released again if the hook raises).

So the compiled copy and hash loops (numba on the CPU, OpenCL and CUDA kernels) never see an index that reaches
outside their arrays, and every backend refuses the same bad input with the same error class:
``InvalidArgumentError`` (bad sizes, runs, ranges, freed or foreign buffers), ``UnknownDeviceError`` (a device
index that does not exist), ``ResourceExhaustedError`` (past the device's capacity), ``BackendError`` (the backend
was closed). Validation is whole-array numpy, once per call: O(runs), never per page.
"""

from __future__ import annotations

import operator
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE, RunArray, check_page_multiple
from ..errors import BackendError, InvalidArgumentError, ResourceExhaustedError, UnknownDeviceError
from ..model import ExportKind


@dataclass(eq=False)
class DeviceBuffer:
    """A block of one device's memory holding a replica's pages at the host's offsets."""

    device: str
    """Full device name, e.g. ``"cpu:0"``."""
    index: int
    nbytes: int
    handle: Any = field(repr=False)
    """Backend-private (a mapped array, a ``cl.Buffer``, a CuPy allocation...)."""
    freed: bool = False


@dataclass(frozen=True)
class ExportHandle:
    """What another process needs to map a buffer read-only.

    ``kind`` (an ``ExportKind``) is ``FD`` (CPU backend: a sealed memfd; ``payload`` is the fd number, owned by
    the buffer: dup it before passing it on), ``CUDA_FD`` (CUDA VMM: ``payload`` is an fd from
    ``cuMemExportToShareableHandle``, owned by the buffer; ``nbytes`` is the size to map, a multiple of
    ``granularity``; readers map it read-only), ``CUDA_IPC`` (``payload`` is the 64-byte ``cudaIpcMemHandle_t``),
    or ``NONE`` (the device memory cannot be shared across processes).
    ``gpu_uuid`` (CUDA kinds) names the GPU, so a reader with other ``CUDA_VISIBLE_DEVICES`` finds it.
    """

    kind: ExportKind
    payload: int | bytes
    nbytes: int
    device: str
    gpu_uuid: str = ""
    granularity: int = 0


Progress = Callable[[int], None]
"""Called with the number of bytes just copied."""

HostArray = npt.NDArray[np.uint8]
_COUNTER_LIMIT = 1 << 32
"""The device compare kernels count mismatches in 32 bits: longer arrays are compared on the host."""


def check_runs(runs: npt.ArrayLike, npages: int) -> RunArray:
    """Validate page runs ``[first, count]`` against ``npages`` pages; returns them as a contiguous ``(n, 2)``
    int64 array. Runs must lie inside ``[0, npages)``, have ``count > 0``, and be sorted by ``first`` without
    overlapping (touching is fine). Overlapping or unsorted runs would let a packed batch land on the wrong pages
    (the staged paths scatter page k of a batch to the k-th listed page) and copy pages twice, so they are
    refused here, once."""
    try:
        arr = np.ascontiguousarray(np.asarray(runs, dtype=np.int64).reshape(-1, 2))
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"page runs must be an (n, 2) array of [first, count] integers: {exc}") from exc
    if not arr.size:
        return arr
    first, count = arr[:, 0], arr[:, 1]
    if (first < 0).any() or (count <= 0).any() or (first > npages - count).any():  # no int64 overflow
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


class Backend(ABC):
    """A family of devices. Device ``index`` names ``f"{name}:{index}"``.

    Public methods validate and keep the books (live buffers, bytes in use per device, closed or not); a subclass
    implements ``device_count`` and the private hooks, and calls ``super().__init__()`` first.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._books = threading.Lock()  # guards the three fields below; never held across a hook
        self._live: set[DeviceBuffer] = set()  # identity-hashed (DeviceBuffer has eq=False)
        self._used: dict[int, int] = {}
        self._closed = False

    # ------------------------------------------------------------------ checks
    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"the {self.name} backend was closed")

    def _check_index(self, index: int) -> None:
        """``UnknownDeviceError`` naming the device and the ones that exist."""
        count = self.device_count()
        if not isinstance(index, int | np.integer) or not 0 <= index < count:
            have = f"{self.name}:0..{self.name}:{count - 1}" if count else f"no {self.name} devices"
            raise UnknownDeviceError(f"no device {self.name}:{index}: this host has {have}")

    def _check_device(self, index: int) -> int:
        self._check_open()
        self._check_index(index)
        return int(index)

    def _check_live(self, buffer: DeviceBuffer) -> DeviceBuffer:
        """``buffer`` is one this backend allocated and has not freed, and the backend is open."""
        self._check_open()
        if buffer.freed:
            raise InvalidArgumentError(f"buffer on {getattr(buffer, 'device', '?')} was freed")
        if buffer not in self._live:  # a set lookup: no lock needed for a membership test
            raise InvalidArgumentError(
                f"buffer on {getattr(buffer, 'device', '?')} was not allocated by this {self.name} backend"
            )
        return buffer

    # ------------------------------------------------------------------ devices
    @abstractmethod
    def device_count(self) -> int:
        """Number of usable devices."""

    def describe(self, index: int) -> str:
        """Human-readable name of a device (model, memory)."""
        return self._describe(self._check_device(index))

    def _describe(self, index: int) -> str:
        return f"{self.name}:{index}"

    def _label(self, index: int) -> str:
        """The device as error messages name it (``cuda:0 (NVIDIA H100)``); starts with ``name:index``."""
        return f"{self.name}:{index}"

    def _capacity(self, index: int) -> int | None:
        """Bytes devrep may allocate on a device in all (``None``: no limit but the driver's)."""
        return None

    def _device_total(self, index: int) -> int | None:
        """Memory the device has, where a request past it is refused before any driver call (``None``: unknown)."""
        return None

    def bytes_in_use(self, index: int) -> int:
        """Bytes currently allocated on a device by this backend."""
        index = self._check_device(index)
        with self._books:
            return self._used.get(index, 0)

    # ------------------------------------------------------------------ memory
    def allocate(self, index: int, nbytes: int) -> DeviceBuffer:
        """Device memory for ``nbytes`` (a page multiple), zeroed. Raises ``UnknownDeviceError`` for a bad index,
        ``InvalidArgumentError`` for a bad size and ``ResourceExhaustedError`` when the device is full."""
        index = self._check_device(index)
        check_page_multiple("replica size", nbytes)
        nbytes = operator.index(nbytes)
        total = self._device_total(index)
        if total is not None and nbytes > total:
            raise ResourceExhaustedError(f"{self._label(index)} cannot hold {nbytes} bytes: the device has {total}")
        capacity = self._capacity(index)
        with self._books:
            used = self._used.get(index, 0)
            if capacity is not None and used + nbytes > capacity:
                raise ResourceExhaustedError(
                    f"{self._label(index)} is full: {used} of {capacity} bytes in use, {nbytes} more requested"
                )
            self._used[index] = used + nbytes  # reserved before the (slow) driver call, so racing callers see it
        try:
            buffer = self._allocate(index, nbytes)
        except BaseException:
            with self._books:
                self._used[index] -= nbytes
            raise
        with self._books:
            closed = self._closed
            if not closed:
                self._live.add(buffer)
        if closed:  # close() ran during the driver call: it did not see this buffer
            self._release(buffer)
            self._check_open()
        return buffer

    def free(self, buffer: DeviceBuffer) -> None:
        """Release a buffer. Idempotent: freeing a freed buffer does nothing (close() frees every live one).
        ``InvalidArgumentError`` for a buffer this backend did not allocate."""
        with self._books:
            if buffer.freed:
                return
            if buffer not in self._live:
                raise InvalidArgumentError(
                    f"buffer on {getattr(buffer, 'device', '?')} was not allocated by this {self.name} backend"
                )
        self._release(buffer)

    def _release(self, buffer: DeviceBuffer) -> None:
        with self._books:
            if buffer.freed:  # another thread freed it since the caller looked
                return
            buffer.freed = True
            self._live.discard(buffer)
            self._used[buffer.index] -= buffer.nbytes
        self._free(buffer)

    # ------------------------------------------------------------------ copies
    def copy_runs(
        self,
        host: HostArray,
        runs: RunArray,
        targets: Sequence[DeviceBuffer],
        progress: Progress | None = None,
    ) -> None:
        """Copy the page runs ``[first, count]`` of ``host`` to the same offsets in every target.

        ``host`` is a contiguous 1-d uint8 array of whole pages; every target holds at least ``host.nbytes``;
        runs are sorted, non-overlapping, ``count > 0`` and inside ``host``; a target is listed once. Each host
        page is read once however many targets there are, where the hardware allows (copy to the first, then
        device-to-device). Returns when the data is in place.
        """
        self._check_open()
        if not isinstance(host, np.ndarray) or host.dtype != np.uint8 or host.ndim != 1 or host.nbytes % PAGE_SIZE \
                or not host.flags.c_contiguous:
            raise InvalidArgumentError(
                f"host memory must be a contiguous 1-d uint8 array of whole pages, got "
                f"{getattr(host, 'dtype', type(host).__name__)} shape {getattr(host, 'shape', '?')}"
            )
        checked = check_runs(runs, host.nbytes // PAGE_SIZE)
        listed = list(targets)
        for t in listed:
            self._check_live(t)
            if t.nbytes < host.nbytes:
                raise InvalidArgumentError(
                    f"buffer on {t.device} holds {t.nbytes} bytes, less than the host's {host.nbytes}"
                )
        if len({id(t) for t in listed}) != len(listed):
            raise InvalidArgumentError("a target buffer is listed twice")
        if listed and checked.size:
            self._copy_runs(host, checked, listed, progress)

    # ------------------------------------------------------------------ hashes
    def hash_pages(self, buffer: DeviceBuffer, pages: npt.ArrayLike | None = None) -> npt.NDArray[np.uint64]:
        """XXH64 (seed 0) of each listed page of ``buffer`` (all when ``None``; any order, repeats allowed),
        computed on the device."""
        self._check_live(buffer)
        total = buffer.nbytes // PAGE_SIZE
        if pages is None:
            return self._hash_pages(buffer, None) if total else np.empty(0, dtype=np.uint64)
        index = np.ascontiguousarray(np.asarray(pages, dtype=np.int64).reshape(-1))
        if not index.size:
            return np.empty(0, dtype=np.uint64)
        if index.min() < 0 or index.max() >= total:
            raise InvalidArgumentError(f"page index out of range [0, {total}) for the buffer on {buffer.device}")
        return self._hash_pages(buffer, index)

    def compare(self, a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """Indices where two equally long hash arrays differ, ascending."""
        a = np.ascontiguousarray(a, dtype=np.uint64).reshape(-1)
        b = np.ascontiguousarray(b, dtype=np.uint64).reshape(-1)
        if a.shape != b.shape:
            raise InvalidArgumentError(f"cannot compare hash arrays of {a.size} and {b.size} entries")
        self._check_open()
        if a.size == 0 or a.size >= _COUNTER_LIMIT or self.device_count() == 0:
            return _compare_on_host(a, b)
        return self._compare(a, b)

    # ------------------------------------------------------------------ read / export / views
    def read(self, buffer: DeviceBuffer, offset: int = 0, nbytes: int | None = None) -> HostArray:
        """Copy bytes ``[offset, offset + nbytes)`` (to the end when ``None``) back to the host."""
        self._check_live(buffer)
        offset = operator.index(offset)
        nbytes = buffer.nbytes - offset if nbytes is None else operator.index(nbytes)
        if offset < 0 or nbytes < 0 or offset + nbytes > buffer.nbytes:
            raise InvalidArgumentError(
                f"read of {nbytes} bytes at offset {offset} is outside the {buffer.nbytes}-byte buffer on "
                f"{buffer.device}"
            )
        if not nbytes:
            return np.empty(0, dtype=np.uint8)
        return self._read(buffer, offset, nbytes)

    def export(self, buffer: DeviceBuffer) -> ExportHandle:
        """A handle another process can map read-only."""
        return self._export(self._check_live(buffer))

    def host_view(self, buffer: DeviceBuffer) -> HostArray | None:
        """A zero-copy read-only host array of the buffer, where device memory is host-addressable."""
        return self._host_view(self._check_live(buffer))

    def device_array(self, buffer: DeviceBuffer) -> Any:
        """The buffer as the backend's native read-only array (numpy for CPU, CuPy for CUDA)."""
        return self._device_array(self._check_live(buffer))

    def release_reader(self, buffer: DeviceBuffer) -> None:
        """A lease on ``buffer`` ended in this process. Backends whose device work runs asynchronously make sure
        the next write into the buffer waits for readers queued before the release (CUDA). Nothing to do for a
        buffer already freed (close() frees leased buffers too)."""
        if buffer.freed or self._closed:
            return
        self._release_reader(self._check_live(buffer))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free every live buffer and release every resource the backend holds. Idempotent; any later call but
        ``free``, ``release_reader``, ``close`` and ``device_count`` raises ``BackendError``."""
        with self._books:
            if self._closed:
                return
            self._closed = True
            live = list(self._live)
        try:
            for buffer in live:
                self._release(buffer)
        finally:
            self._close()

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _allocate(self, index: int, nbytes: int) -> DeviceBuffer:
        """New zeroed memory; ``nbytes`` is a positive page multiple already reserved against the capacity."""

    @abstractmethod
    def _free(self, buffer: DeviceBuffer) -> None:
        """Give a buffer's memory back (called once per buffer, after the books were updated)."""

    @abstractmethod
    def _copy_runs(self, host: HostArray, runs: RunArray, targets: list[DeviceBuffer],
                   progress: Progress | None) -> None:
        """``copy_runs`` with checked, non-empty ``runs`` and ``targets``."""

    @abstractmethod
    def _hash_pages(self, buffer: DeviceBuffer, pages: npt.NDArray[np.int64] | None) -> npt.NDArray[np.uint64]:
        """Hashes of ``pages`` (checked, non-empty) or of every page (``None``, the buffer has at least one)."""

    @abstractmethod
    def _read(self, buffer: DeviceBuffer, offset: int, nbytes: int) -> HostArray:
        """A host copy of a checked, non-empty byte range."""

    @abstractmethod
    def _export(self, buffer: DeviceBuffer) -> ExportHandle:
        """The buffer's export handle."""

    def _compare(self, a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """``compare`` of two equally long, non-empty contiguous arrays (on the device where it has a kernel)."""
        return _compare_on_host(a, b)

    def _host_view(self, buffer: DeviceBuffer) -> HostArray | None:
        return None

    def _device_array(self, buffer: DeviceBuffer) -> Any:
        view = self._host_view(buffer)
        return view if view is not None else self._read(buffer, 0, buffer.nbytes)

    def _release_reader(self, buffer: DeviceBuffer) -> None:  # noqa: B027 - optional hook
        """See ``release_reader``."""

    def _close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds besides its buffers (already freed): queues, staging memory."""


def _compare_on_host(a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    return np.flatnonzero(a != b).astype(np.int64)
