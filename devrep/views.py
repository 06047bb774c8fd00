"""Typed, read-only views of a leased replica: ``lease.numpy(dtype, shape, offset)`` and ``lease.torch(...)``.

A replica is bytes; these helpers put a dtype and a shape on a byte range of it without copying where the replica
is host memory (CPU replicas: numpy over the mapping; torch through DLPack over that numpy view) or GPU memory
(CUDA replicas: torch through DLPack over a CuPy view). Only where the replica can be neither (OpenCL devices),
``numpy()`` / ``torch()`` return a host copy of the range.

Read-only: numpy views are flagged read-only; torch has no read-only tensors, so a torch view of a CPU replica is
taken over a read-only mapping (``PROT_READ``) and a write through it is a segmentation fault (SIGSEGV): the process
dies. Take a writable copy with ``array.copy()`` / ``tensor.clone()``. CUDA memory has no such protection: do not
write through a CUDA view (the next sync overwrites it, and other readers see your write until then).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import FailedPreconditionError, InvalidArgumentError

Shape = int | Sequence[int]


def check_layout(nbytes: int, itemsize: int, alignment: int, shape: Shape, offset: int, what: str
                 ) -> tuple[tuple[int, ...], int, int]:
    """Validate a typed view of ``nbytes`` bytes: ``(shape, offset, bytes)``, or ``InvalidArgumentError`` saying
    what does not fit (negative dimensions, an offset outside the lease or not aligned for the dtype, a view
    running past the end)."""
    try:
        dims = (operator.index(shape),) if not isinstance(shape, Sequence) else tuple(operator.index(d) for d in shape)
        offset = operator.index(offset)
    except TypeError:
        raise InvalidArgumentError(f"{what}: shape must be an int or a sequence of ints and offset an int, got "
                                   f"shape={shape!r}, offset={offset!r}") from None
    if any(d < 0 for d in dims):
        raise InvalidArgumentError(f"{what}: shape {list(dims)} has a negative dimension")
    if offset < 0:
        raise InvalidArgumentError(f"{what}: offset {offset} is negative")
    if offset % alignment:
        raise InvalidArgumentError(f"{what}: offset {offset} is not a multiple of the dtype's alignment "
                                   f"({alignment} bytes)")
    size = math.prod(dims) * itemsize
    if offset + size > nbytes:
        raise InvalidArgumentError(f"{what}: {list(dims)} x {itemsize} bytes at offset {offset} ends at byte "
                                   f"{offset + size}, past the end of the {nbytes}-byte lease")
    return dims, offset, size


def numpy_dtype(dtype: Any, what: str) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise InvalidArgumentError(f"{what}: {dtype!r} is not a numpy dtype ({exc})") from None
    if dt.hasobject or dt.itemsize == 0:
        raise InvalidArgumentError(f"{what}: dtype {dt} cannot view raw bytes (object or zero-size)")
    return dt


def numpy_view(data: npt.NDArray[np.uint8], nbytes: int, dtype: Any, shape: Shape, offset: int = 0,
               *, base: int = 0) -> npt.NDArray[Any]:
    """``dtype``/``shape`` view of bytes ``[offset, offset + size)`` of a lease of ``nbytes`` bytes, read-only.

    ``data`` holds the lease's bytes from byte ``base`` on (the whole lease, or just the range for a host copy).
    """
    dt = numpy_dtype(dtype, "numpy view")
    dims, offset, size = check_layout(nbytes, dt.itemsize, dt.alignment, shape, offset, "numpy view")
    view = data[offset - base:offset - base + size].view(dt).reshape(dims)
    view.flags.writeable = False
    return view


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise FailedPreconditionError(f"torch views need PyTorch, which is not installed ({exc}): pip install torch "
                                      f"(or use numpy())") from exc
    return torch


def torch_dtype(dtype: Any) -> Any:
    """A ``torch.dtype`` from a torch dtype, its name (``"bfloat16"``) or anything numpy takes (``np.float32``)."""
    torch = _torch()
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    dt = numpy_dtype(dtype, "torch view")
    try:
        return torch.from_numpy(np.empty(0, dt)).dtype
    except TypeError as exc:
        raise InvalidArgumentError(f"torch view: torch has no dtype for {dt} ({exc})") from None


def torch_view(source: Any, nbytes: int, dtype: Any, shape: Shape, offset: int = 0, *, base: int = 0) -> Any:
    """A ``torch.Tensor`` of ``dtype``/``shape`` over bytes ``[offset, offset + size)`` of a lease, zero-copy
    through DLPack. ``source`` is a 1-D uint8 array (numpy or CuPy) holding the lease from byte ``base`` on."""
    torch = _torch()
    tdt = torch_dtype(dtype)
    dims, offset, size = check_layout(nbytes, tdt.itemsize, tdt.itemsize, shape, offset, "torch view")
    raw = source[offset - base:offset - base + size]
    # A read-only numpy array exports with DLPack >= 1.0's read-only flag, which torch accepts without copying.
    tensor = torch.from_dlpack(raw)
    return tensor.view(tdt).reshape(dims)
