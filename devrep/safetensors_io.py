"""safetensors files as dicts of named, read-only, zero-copy numpy arrays over a replica (or any byte buffer).

The format (public, https://github.com/huggingface/safetensors): an 8-byte little-endian header length ``N``,
``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then
the tensor bytes; offsets count from the end of the header. We parse it ourselves so the arrays can view the
replica's mapping directly (no copy, no dependency).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ._pages import PAGE_SIZE, RunArray, runs_from_pages
from .errors import InvalidArgumentError

MAX_HEADER = 100 * 1024 * 1024  # what the reference implementation accepts

# safetensors dtype -> numpy dtype. Types numpy lacks (bfloat16, float8) come back as raw unsigned integers of
# the same width; reinterpret them with ml_dtypes or your framework.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"), "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"), "I16": np.dtype("<i2"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype("<u1"), "F8_E5M2": np.dtype("<u1"),
}
# safetensors dtype -> torch dtype name (torch has all of them, bfloat16 and float8 included).
TORCH_DTYPES: dict[str, str] = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "F16": "float16",
    "BF16": "bfloat16", "U32": "uint32", "I32": "int32", "F32": "float32", "U64": "uint64", "I64": "int64",
    "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset in the file."""
    end: int

    def pages(self) -> RunArray:
        """The file pages holding this tensor, as one run (empty for an empty tensor)."""
        if self.end <= self.begin:
            return np.empty((0, 2), np.int64)
        first, last = self.begin // PAGE_SIZE, (self.end - 1) // PAGE_SIZE
        return np.array([[first, last - first + 1]], np.int64)


def parse_header(data: npt.NDArray[np.uint8] | bytes | memoryview, size: int | None = None
                 ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``({name: TensorInfo}, metadata)``; ``InvalidArgumentError`` naming the problem for a malformed file.

    ``data`` holds the file, or at least its header when ``size`` (the file's length) is given."""
    buf = memoryview(cast(Any, data)).cast("B")
    size = buf.nbytes if size is None else size
    if size < 8:
        raise InvalidArgumentError(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > MAX_HEADER or 8 + n > min(size, buf.nbytes):
        raise InvalidArgumentError(f"not a safetensors file: header length {n} does not fit in {size} bytes")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgumentError("safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise InvalidArgumentError(f"safetensors tensor {name!r}: bad entry ({exc})") from None
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"safetensors tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(end, int)) or not 0 <= begin <= end or base + end > size:
            raise InvalidArgumentError(f"safetensors tensor {name!r}: data_offsets {[begin, end]} outside the file")
        if any(d < 0 for d in shape) or math.prod(shape) * DTYPES[dtype].itemsize != end - begin:
            raise InvalidArgumentError(f"safetensors tensor {name!r}: shape {list(shape)} of {dtype} does not "
                                       f"match its {end - begin} bytes")
        tensors[name] = TensorInfo(name, dtype, shape, base + begin, base + end)
    return tensors, metadata


def tensors_from_buffer(data: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[Any]]:
    """Every tensor as a numpy view into ``data`` (a uint8 array holding the whole file); read-only if it is."""
    infos, _ = parse_header(data)
    out = {}
    for name, t in infos.items():
        raw = data[t.begin:t.end]
        out[name] = raw.view(DTYPES[t.dtype]).reshape(t.shape)
    return out


def changed_pages(infos: dict[str, TensorInfo], names: list[str]) -> RunArray:
    """Coalesced page runs that hold the named tensors."""
    pages = [np.arange(r[0], r[0] + r[1]) for t in names for r in infos[t].pages()]
    return runs_from_pages(np.unique(np.concatenate(pages))) if pages else np.empty((0, 2), np.int64)


class SafetensorsLease:
    """A leased replica of a safetensors file: a read-only mapping ``{name: array}`` (``model[name]`` is
    ``model.numpy(name)``), plus ``model.torch(name)``. Views are zero-copy over CPU replicas (see ``devrep.views``:
    a write through a torch view of a CPU replica raises SIGSEGV; ``.copy()`` / ``.clone()`` for a writable copy).
    Release it (or use ``with``) when done; the views must not be used afterwards."""

    def __init__(self, lease: Any) -> None:
        self.lease = lease
        nbytes = int(lease.nbytes)
        head = lease.numpy(np.uint8, min(8, nbytes))
        n = struct.unpack("<Q", head.tobytes())[0] if head.size == 8 else 0
        header = lease.numpy(np.uint8, min(8 + min(n, MAX_HEADER), nbytes)) if head.size == 8 else head
        self.infos, self.metadata = parse_header(header, size=nbytes)

    @property
    def generation(self) -> int:
        return int(self.lease.generation)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in this safetensors file") from None

    def numpy(self, name: str) -> npt.NDArray[Any]:
        """Tensor ``name`` as a read-only numpy array (bfloat16 / float8 as raw unsigned integers, see ``DTYPES``)."""
        t = self._info(name)
        dtype = DTYPES[t.dtype]
        if t.begin % dtype.alignment:  # writers normally align tensors; numpy can view unaligned data anyway
            raw = self.lease.numpy(np.uint8, t.end - t.begin, t.begin)
            return cast(npt.NDArray[Any], raw.view(dtype).reshape(t.shape))
        return cast(npt.NDArray[Any], self.lease.numpy(dtype, t.shape, t.begin))

    def torch(self, name: str) -> Any:
        """Tensor ``name`` as a ``torch.Tensor`` of its real dtype (bfloat16 and float8 included), zero-copy."""
        t = self._info(name)
        return self.lease.torch(TORCH_DTYPES[t.dtype], t.shape, t.begin)

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self.numpy(name)

    def __iter__(self) -> Any:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def keys(self) -> Any:
        return self.infos.keys()

    def items(self) -> Any:
        return ((name, self.numpy(name)) for name in self.infos)

    def release(self) -> None:
        self.lease.release()

    def __enter__(self) -> SafetensorsLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
