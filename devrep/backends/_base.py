"""The one interface every device backend implements (CPU, OpenCL, CUDA)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from .._pages import RunArray
from ..errors import UnknownDeviceError


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

    ``kind`` is ``"fd"`` (CPU backend: a sealed memfd; ``payload`` is the fd number, owned by the
    buffer: dup it before passing it on), ``"cuda_fd"`` (CUDA VMM: ``payload`` is an fd from
    ``cuMemExportToShareableHandle``, owned by the buffer; ``nbytes`` is the size to map, a multiple of
    ``granularity``; readers map it read-only), ``"cuda_ipc"`` (``payload`` is the 64-byte
    ``cudaIpcMemHandle_t``), or ``"none"`` (the device memory cannot be shared across processes).
    ``gpu_uuid`` (CUDA kinds) names the GPU, so a reader with other ``CUDA_VISIBLE_DEVICES`` finds it.
    """

    kind: str
    payload: int | bytes
    nbytes: int
    device: str
    gpu_uuid: str = ""
    granularity: int = 0


Progress = Callable[[int], None]
"""Called with the number of bytes just copied."""


class Backend(ABC):
    """A family of devices. Device ``index`` names ``f"{name}:{index}"``."""

    name: ClassVar[str]

    @abstractmethod
    def device_count(self) -> int:
        """Number of usable devices."""

    def describe(self, index: int) -> str:
        """Human-readable name of a device (model, memory)."""
        return f"{self.name}:{index}"

    def _check_index(self, index: int) -> None:
        """``UnknownDeviceError`` naming the device and the ones that exist."""
        count = self.device_count()
        if not 0 <= index < count:
            have = f"{self.name}:0..{self.name}:{count - 1}" if count else f"no {self.name} devices"
            raise UnknownDeviceError(f"no device {self.name}:{index}: this host has {have}")

    @abstractmethod
    def allocate(self, index: int, nbytes: int) -> DeviceBuffer:
        """Device memory for ``nbytes`` (a page multiple). Raises ``UnknownDeviceError`` for a bad index and
        ``ResourceExhaustedError`` when the device is full."""

    @abstractmethod
    def free(self, buffer: DeviceBuffer) -> None:
        """Release a buffer. Idempotent."""

    @abstractmethod
    def copy_runs(
        self,
        host: npt.NDArray[np.uint8],
        runs: RunArray,
        targets: Sequence[DeviceBuffer],
        progress: Progress | None = None,
    ) -> None:
        """Copy the page runs ``[first, count]`` of ``host`` to the same offsets in every target.

        ``host`` is page-aligned and a page multiple. Each host page is read once however many targets
        there are, where the hardware allows (copy to the first, then device-to-device). Returns when
        the data is in place.
        """

    @abstractmethod
    def hash_pages(self, buffer: DeviceBuffer, pages: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.uint64]:
        """XXH64 (seed 0) of each listed page of ``buffer`` (all when ``None``), computed on the device."""

    def compare(self, a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """Indices where two equally long hash arrays differ, ascending."""
        return np.flatnonzero(np.asarray(a) != np.asarray(b)).astype(np.int64)

    @abstractmethod
    def read(self, buffer: DeviceBuffer, offset: int = 0, nbytes: int | None = None) -> npt.NDArray[np.uint8]:
        """Copy bytes back to the host (verification and tests)."""

    @abstractmethod
    def export(self, buffer: DeviceBuffer) -> ExportHandle:
        """A handle another process can map read-only."""

    def host_view(self, buffer: DeviceBuffer) -> npt.NDArray[np.uint8] | None:
        """A zero-copy read-only host array of the buffer, where device memory is host-addressable."""
        return None

    def device_array(self, buffer: DeviceBuffer) -> Any:
        """The buffer as the backend's native read-only array (numpy for CPU, CuPy for CUDA)."""
        view = self.host_view(buffer)
        return view if view is not None else self.read(buffer)

    def release_reader(self, buffer: DeviceBuffer) -> None:  # noqa: B027 - optional hook
        """A lease on ``buffer`` ended in this process. Backends whose device work runs asynchronously make sure
        the next write into the buffer waits for readers queued before the release (CUDA)."""

    def bytes_in_use(self, index: int) -> int:
        """Bytes currently allocated on a device by this backend."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release every resource the backend holds."""
