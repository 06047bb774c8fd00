"""Replica and lease state: ``Replica`` (a region's buffers on one device, their lease counts, the spare and the
flip) and ``Lease`` (a reader's hold on one buffer). The owning ``Region`` holds its lock around every change."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .._pages import RunArray
from ..backends import Backend, DeviceBuffer, ExportHandle
from ..errors import FailedPreconditionError
from ..memory import map_fd
from ..model import ExportKind
from ._state import MAX_SLOTS, PageState, slot_bit

if TYPE_CHECKING:
    from ._region import Region

MAX_REPLICAS = MAX_SLOTS


class Replica:
    """A region's read-only copy on one device: one or two device buffers (see ``devrep.region``), their lease
    counts and which one readers get. The region's lock guards every field."""

    def __init__(self, region: Region, pages: PageState, device: str, backend: Backend, index: int,
                 slot: int) -> None:
        self.region = region
        self._pages = pages
        self.device = device
        self.backend = backend
        self.index = index
        self.slot = slot
        self.bit = slot_bit(slot)
        self.buffers: list[DeviceBuffer | None] = [None, None]
        self.leases = [0, 0]
        self.busy = [False, False]
        """Per buffer: a sync is copying into it (no new lease on it, no other sync writes it)."""
        self.front = 0
        """The buffer new leases get (the readable one); the other, when allocated, is the spare."""
        self.generation = 0
        self.closed = False

    @property
    def valid_pages(self) -> int:
        """Pages valid in the readable buffer (0 once removed or failed)."""
        return 0 if self.closed else self._pages.valid_pages(self.slot)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if b is not None)

    @property
    def spare(self) -> int:
        return 1 - self.front

    def has_spare(self) -> bool:
        return self.buffers[self.spare] is not None

    def wants_spare(self) -> bool:
        """Readers hold the readable buffer and there is no spare to write instead."""
        return bool(self.leases[self.front]) and not self.has_spare() and not self.closed

    def install_spare(self, buffer: DeviceBuffer) -> bool:
        """Take ``buffer`` as the spare unless one appeared meanwhile (or the replica went); ``False``: the caller
        keeps (and frees) it."""
        if self.has_spare() or self.closed:
            return False
        self.buffers[self.spare] = buffer
        self._pages.spare_added(self.slot)
        return True

    def writable_buffer(self) -> int | None:
        """The buffer a sync may write now: the readable one when unleased, else an unleased spare; ``None`` when
        readers hold both (or the only one)."""
        if self.leases[self.front] == 0:
            return self.front
        if self.has_spare() and self.leases[self.spare] == 0:
            return self.spare
        return None

    def lease(self) -> int:
        """Count a new reader of the readable buffer; returns its index."""
        self.leases[self.front] += 1
        return self.front

    def release(self, buffer_index: int) -> None:
        self.leases[buffer_index] -= 1
        if self.closed:
            self.free_unleased()

    def free_unleased(self) -> None:
        """Free the buffers no reader or copy holds (a removed replica's memory goes as its users let go)."""
        for i, buf in enumerate(self.buffers):
            if buf is not None and self.leases[i] == 0 and not self.busy[i]:
                self.backend.free(buf)
                self.buffers[i] = None


def free_slot(replicas: Iterable[Replica]) -> int | None:
    """The lowest replica slot none of ``replicas`` uses (``None``: all ``MAX_REPLICAS`` taken)."""
    used = {r.slot for r in replicas}
    return next((s for s in range(MAX_REPLICAS) if s not in used), None)


class Lease:
    """A reader's hold on one replica buffer: nothing writes that buffer until ``release()``.

    ``generation`` is the region generation the replica reflects; ``invalid_runs`` lists the pages that were
    stale at acquire time (empty for a fresh acquire).
    """

    def __init__(self, replica: Replica, buffer_index: int, generation: int, invalid_runs: RunArray) -> None:
        self.replica = replica
        self._buffer_index = buffer_index
        self.generation = generation
        self.invalid_runs = invalid_runs
        self.released = False
        self._readonly: npt.NDArray[np.uint8] | None = None

    @property
    def device(self) -> str:
        return self.replica.device

    @property
    def buffer(self) -> DeviceBuffer:
        if self.released:
            raise FailedPreconditionError("lease already released")
        buf = self.replica.buffers[self._buffer_index]
        if buf is None:
            raise FailedPreconditionError(f"the replica on {self.device} has no buffer any more")
        return buf

    @property
    def nbytes(self) -> int:
        return self.replica.region.nbytes

    @property
    def array(self) -> Any:
        """The replica as a read-only array: numpy (CPU, zero-copy), CuPy (CUDA) or a host copy (OpenCL).

        Its length is the region's logical size.
        """
        return self.replica.backend.device_array(self.buffer)[: self.nbytes]

    def read(self, offset: int = 0, nbytes: int | None = None) -> npt.NDArray[np.uint8]:
        """Copy bytes of the replica back to host memory."""
        if nbytes is None:
            nbytes = self.nbytes - offset
        return self.replica.backend.read(self.buffer, offset, nbytes)

    def _host_readonly(self) -> npt.NDArray[np.uint8] | None:
        """The replica through a read-only (``PROT_READ``) mapping of its memfd, where it is host memory shared by
        fd (CPU): a write through a torch view then faults instead of corrupting the replica. ``None`` for device
        memory."""
        if self._readonly is None:
            buffer = self.buffer
            backend = self.replica.backend
            if backend.host_view(buffer) is None:
                return None
            handle = backend.export(buffer)
            if handle.kind == ExportKind.FD and isinstance(handle.payload, int):
                self._readonly = map_fd(handle.payload, buffer.nbytes, writable=False)[: self.nbytes]
            else:  # host memory without an fd: numpy's read-only flag is all the protection there is
                self._readonly = backend.host_view(buffer)
        else:
            _ = self.buffer  # raises once released
        return self._readonly

    def numpy(self, dtype: Any, shape: int | Sequence[int], offset: int = 0) -> npt.NDArray[Any]:
        """Bytes ``[offset, offset + size)`` of the replica as a read-only numpy array of ``dtype`` and ``shape``.

        Zero-copy for host-memory replicas (CPU); a host copy of just that range for device replicas (CUDA, OpenCL).
        ``InvalidArgumentError`` for a bad dtype or shape, a misaligned offset or a range past the end. Valid until
        ``release()``; ``.copy()`` gives a writable array of your own."""
        from ..views import check_layout, numpy_dtype, numpy_view

        host = self._host_readonly()
        if host is not None:
            return numpy_view(host, self.nbytes, dtype, shape, offset)
        dt = numpy_dtype(dtype, "numpy view")
        _, start, size = check_layout(self.nbytes, dt.itemsize, dt.alignment, shape, offset, "numpy view")
        return numpy_view(self.read(start, size), self.nbytes, dt, shape, start, base=start)

    def torch(self, dtype: Any, shape: int | Sequence[int], offset: int = 0) -> Any:
        """Bytes ``[offset, offset + size)`` of the replica as a ``torch.Tensor`` of ``dtype`` (a torch dtype, its
        name such as ``"bfloat16"``, or a numpy dtype) and ``shape``, zero-copy through DLPack: a CPU tensor over a
        read-only mapping (writing it kills the process with SIGSEGV; ``.clone()`` gives a writable copy), or a
        CUDA tensor over the GPU replica (unprotected: never write it). OpenCL replicas give a host copy. Needs
        PyTorch (``FailedPreconditionError`` otherwise)."""
        from ..views import _torch, check_layout, torch_dtype, torch_view

        _torch()
        host = self._host_readonly()
        if host is not None:
            return torch_view(host, self.nbytes, dtype, shape, offset)
        if self.replica.backend.name == "cuda":  # the array is CuPy's: a CUDA tensor, zero-copy
            return torch_view(self.array, self.nbytes, dtype, shape, offset)
        # device memory torch cannot address (OpenCL): a host copy of the range
        tdt = torch_dtype(dtype)
        _, start, size = check_layout(self.nbytes, tdt.itemsize, tdt.itemsize, shape, offset, "torch view")
        copy = self.read(start, size)
        copy.flags.writeable = False
        return torch_view(copy, self.nbytes, tdt, shape, start, base=start)

    def export(self) -> ExportHandle:
        return self.replica.backend.export(self.buffer)

    def release(self, *, local_readers: bool = True) -> None:
        """End the lease. ``local_readers=False``: no work of this process reads the buffer (the service releasing
        a remote client's lease, whose client already waited for its own GPU work), so skip waiting for it."""
        if not self.released:
            self.released = True
            buffer = self.replica.buffers[self._buffer_index]
            try:
                if buffer is not None and local_readers:  # GPU kernels queued on it before now finish before a sync
                    self.replica.backend.release_reader(buffer)
            finally:
                self.replica.region._release(self.replica, self._buffer_index)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        if not getattr(self, "released", True):
            self.release()
