"""Host memory that devrep replicates: private memory it creates, a memfd handed over, a file mapped read-only,
or a caller's buffer.

Every source is exposed as one page-aligned, page-multiple ``uint8`` array (a file's last partial page
reads as zeros, exactly as the kernel maps it), so backends never see a misaligned or ragged buffer.
Mappings are made with libc ``mmap`` so the array can cover the whole last page; the mapping is
unmapped when the last array that views it is garbage-collected, never under a live reader.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ._pages import PAGE_SIZE, check_page_multiple, pages_for
from .errors import (
    AlignmentError,
    DevrepError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from .linux._libc import MADV_POPULATE_WRITE, madvise, open_libc
from .linux.cgroup import read_memory_room

_libc = open_libc()  # its own handle: the argtypes below are this module's
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value

# fcntl seals (linux/fcntl.h); Python exposes some of them only on recent versions.
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE, F_SEAL_FUTURE_WRITE = 0x1, 0x2, 0x4, 0x8, 0x10


class _Mapping:
    """Owns one ``mmap`` of ``length`` bytes; unmapped when garbage-collected."""

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length

    def __del__(self) -> None:
        if self.address:
            _libc.munmap(self.address, self.length)
            self.address = 0


def _map(length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> npt.NDArray[np.uint8]:
    """``mmap`` of ``length`` bytes (a page multiple) as a uint8 array that keeps the mapping alive."""
    address = _libc.mmap(None, length, prot, flags, fd, offset)
    if address in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        if err in (errno.ENOMEM, errno.ENOSPC):
            raise ResourceExhaustedError(f"mmap of {length} bytes failed: {os.strerror(err)}")
        raise DevrepError(f"mmap of {length} bytes failed: {os.strerror(err)}")
    holder = (ctypes.c_uint8 * length).from_address(address)
    holder._devrep_mapping = _Mapping(address, length)  # type: ignore[attr-defined]
    return np.frombuffer(memoryview(holder).cast("B"), dtype=np.uint8)


def map_fd(fd: int, length: int, *, writable: bool, offset: int = 0) -> npt.NDArray[np.uint8]:
    """``MAP_SHARED`` mapping of ``fd`` as a uint8 array of ``length`` bytes (rounded up to whole pages).

    The array keeps the mapping alive; a read-only mapping yields a read-only array.
    """
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    array = _map(pages_for(length) * PAGE_SIZE, prot, mmap.MAP_SHARED, fd, offset)
    if not writable:
        array.flags.writeable = False
    return array


def memfd_create(name: str, nbytes: int, *, sealable: bool = True, allocate: bool = True) -> int:
    """A memfd of ``nbytes`` (close-on-exec). Pages are allocated up front so ENOSPC shows here, unless
    ``allocate=False`` (the caller sets a memory policy first, then calls ``allocate_pages``)."""
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    fd = os.memfd_create(name[:200] or "devrep", flags)
    try:
        os.ftruncate(fd, nbytes)
        if allocate:
            allocate_pages(fd, nbytes, f"memfd {name!r}")
    except BaseException:
        os.close(fd)
        raise
    return fd


ROOM_MARGIN = 32 << 20
"""Kept free beyond a request: what the process itself still needs while it copies (page tables, buffers)."""


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` -> bytes per field (``"MemAvailable: 123 kB"`` -> ``{"MemAvailable": 125952}``)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def memory_room() -> tuple[int, str] | None:
    """How many bytes this process can still allocate before the kernel starts killing processes, and what
    limits it: the machine (``MemAvailable``, which counts reclaimable cache as free) or this process's cgroup
    (``devrep.linux.cgroup.read_memory_room``), whichever is less, plus free swap (a limit is never made stricter
    than the kernel's: with swap, memory past the limit is swapped out rather than killed for). None when
    neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            info = parse_meminfo(f.read())
    except OSError:
        info = {}
    swap = info.get("SwapFree", 0)
    rooms = []
    if "MemAvailable" in info:
        rooms.append((info["MemAvailable"] + swap, "available memory (MemAvailable + SwapFree)"))
    cgroup_room = read_memory_room()
    if cgroup_room is not None:
        rooms.append((cgroup_room + swap, "this process's cgroup memory limit"))
    return min(rooms) if rooms else None


def ensure_room(nbytes: int, what: str) -> None:
    """Refuse to allocate ``nbytes`` of host memory for ``what`` when it cannot fit (``memory_room``, less
    ``ROOM_MARGIN``): past a limit the kernel does not fail the allocation, it kills a process, possibly this
    one (measured: a daemon in a 600 MiB cgroup killed by one client's 1 GiB replicate). A guard, not a
    reservation: two allocations racing may still overcommit."""
    room = memory_room()
    if room is not None and nbytes + ROOM_MARGIN > room[0]:
        raise ResourceExhaustedError(
            f"{what}: {nbytes} bytes do not fit in {room[1]}: {max(0, room[0] - ROOM_MARGIN)} bytes can be "
            f"allocated now (a {ROOM_MARGIN >> 20} MiB margin kept free)")


def allocate_pages(fd: int, nbytes: int, what: str = "shared memory") -> None:
    """Allocate a memfd's first ``nbytes`` now (``fallocate``, which follows a shared policy set by ``mbind``),
    after ``ensure_room``: ``ResourceExhaustedError`` when they cannot fit."""
    ensure_room(nbytes, what)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            raise ResourceExhaustedError(f"cannot allocate {nbytes} bytes of shared memory: {exc}") from exc
        raise


def add_seals(fd: int, seals: int) -> None:
    fcntl.fcntl(fd, F_ADD_SEALS, seals)


def buffer_address(array: npt.NDArray[Any]) -> int:
    return int(array.__array_interface__["data"][0])


@dataclass(eq=False)
class HostMemory:
    """A region's host pages. ``array`` covers whole pages; ``nbytes`` is the logical size."""

    kind: str
    """``"anonymous"`` (``create_region``), ``"memfd"`` (handed over), ``"file"`` or ``"buffer"``."""
    array: npt.NDArray[np.uint8]
    nbytes: int
    fd: int | None = None
    path: Path | None = None
    private: bool = False
    """Every page is private anonymous memory of this process, whose write access comes back when a write
    protection is lifted (see ``create_private``); shared pages take a minor fault on their next write instead."""
    _keepalive: Any = field(default=None, repr=False)

    @property
    def npages(self) -> int:
        return self.array.nbytes // PAGE_SIZE

    @property
    def address(self) -> int:
        return buffer_address(self.array)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # A regular file can be truncated by anyone who may write it, and touching a mapped page past the new end
    # of file is a SIGBUS that kills the process. So devrep never reads a file region through its mapping:
    # it reads with pread, where a shrunk file is a short read and a clear error.
    @property
    def guarded(self) -> bool:
        return self.kind == "file"

    def _shrank(self) -> FailedPreconditionError:
        assert self.fd is not None
        return FailedPreconditionError(
            f"{self.path} shrank to {os.fstat(self.fd).st_size} bytes under its replicas "
            f"(registered with {self.nbytes}); re-register the file"
        )

    def _pread_into(self, out: npt.NDArray[np.uint8], offset: int, *, zeroed: bool = False) -> None:
        """Fill ``out`` with the file's bytes at ``offset`` (zeros past the logical end, as the mapping reads).

        ``zeroed``: ``out`` is fresh zero memory, so holes of a sparse file are skipped (never touched).
        """
        assert self.fd is not None
        want = max(0, min(out.nbytes, self.nbytes - offset))
        if zeroed:
            for start, stop in _data_segments(self.fd, offset, offset + want):
                pread_full(self.fd, out[start - offset:stop - offset], start, on_eof=self._shrank)
            # A hole past a new end of file reads as one: only the size says the file shrank.
            if want and os.fstat(self.fd).st_size < offset + want:
                raise self._shrank()
        else:
            pread_full(self.fd, out[:want], offset, on_eof=self._shrank)
            out[want:] = 0

    def staging_bytes(self, runs: npt.NDArray[np.int64]) -> int:
        """The most memory ``read_runs`` of ``runs`` can touch: their size, at most the file's allocated blocks
        (holes leave the staging pages untouched)."""
        size = int(np.asarray(runs, dtype=np.int64).reshape(-1, 2)[:, 1].sum()) * PAGE_SIZE
        if self.fd is not None:
            with contextlib.suppress(OSError):
                size = min(size, os.fstat(self.fd).st_blocks * 512)
        return size

    def read_runs(self, runs: npt.NDArray[np.int64], staging: npt.NDArray[np.uint8]) -> None:
        """pread the page runs into ``staging`` (fresh zero memory, page-aligned, region-sized) at the same
        offsets. Holes are left untouched, so a sparse file costs memory only for its data."""
        for first, count in np.asarray(runs, dtype=np.int64).reshape(-1, 2).tolist():
            a, b = first * PAGE_SIZE, (first + count) * PAGE_SIZE
            self._pread_into(staging[a:b], a, zeroed=True)

    def hash_pages(self) -> npt.NDArray[np.uint64]:
        """XXH64 of every page; file regions are read with pread in chunks (see ``guarded``)."""
        from .hashing import hash_pages

        if not self.guarded:
            return hash_pages(self.array)
        chunk_pages = 8192
        bounce = anonymous(min(self.npages, chunk_pages) * PAGE_SIZE)
        out = np.empty(self.npages, dtype=np.uint64)
        for first in range(0, self.npages, chunk_pages):
            count = min(chunk_pages, self.npages - first)
            view = bounce[: count * PAGE_SIZE]
            self._pread_into(view, first * PAGE_SIZE)
            out[first:first + count] = hash_pages(view)
        return out


MAX_IO = 0x7FFFF000
"""Linux moves at most this many bytes in one read/pread/preadv (``MAX_RW_COUNT``), whatever the file."""


def pread_full(fd: int, out: npt.NDArray[np.uint8], offset: int, *,
               on_eof: Callable[[], BaseException]) -> None:
    """Read exactly ``out.nbytes`` bytes at ``offset``, looping over short reads (one ``preadv`` returns at most
    ``MAX_IO`` bytes, and may return less for other reasons). End of file before that (a read of 0 bytes)
    raises ``on_eof()``: the file is shorter than the caller knows."""
    view = out.data.cast("B")
    done, want = 0, out.nbytes
    while done < want:
        try:
            got = os.preadv(fd, [view[done:done + MAX_IO]], offset + done)
        except InterruptedError:  # pragma: no cover - Python retries EINTR itself (PEP 475)
            continue
        if got == 0:
            raise on_eof()
        done += got


def _data_segments(fd: int, start: int, stop: int) -> Iterator[tuple[int, int]]:
    """``[a, b)`` byte ranges of ``[start, stop)`` that may hold data (``SEEK_DATA``/``SEEK_HOLE``); the whole
    range where the file system cannot tell."""
    pos = start
    while pos < stop:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only holes (or end of file) from pos on
                return
            yield pos, stop  # no SEEK_DATA support: read it all
            return
        if data >= stop:
            return
        yield data, min(hole, stop)
        pos = hole


def anonymous(nbytes: int) -> npt.NDArray[np.uint8]:
    """Page-aligned private anonymous memory (pages are allocated on first touch)."""
    return np.frombuffer(mmap.mmap(-1, pages_for(nbytes) * PAGE_SIZE, flags=mmap.MAP_PRIVATE), dtype=np.uint8)


def create_private(name: str, nbytes: int) -> HostMemory:
    """A buffer of private anonymous memory that devrep creates for its owner (``Replicator.create_region``).

    Why private and not a memfd: un-protecting a page of a private mapping gives write access back at once, while a
    shared (memfd) page stays read-only until its next write takes a minor fault, one per page: a sync-mode writer
    pays less than half as much here (bench W1; docs/tracking.md, "Writer cost"). Private memory is also what a ``fork``
    expects: a child's writes go to its own copies, never silently past the parent's tracking. The pages are
    allocated up front (``MADV_POPULATE_WRITE``) so a lack of memory shows here as ``ResourceExhaustedError``, not
    later as a fault. ``nbytes`` need not be a page multiple: the buffer holds whole pages and ``nbytes`` is the
    logical size, exactly as a client's ``create_region`` through the service does.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise InvalidArgumentError(f"region size must be a positive integer, got {nbytes!r}")
    size = pages_for(nbytes) * PAGE_SIZE
    ensure_room(size, f"region {name!r}")
    array = _map(size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        madvise(buffer_address(array), size, MADV_POPULATE_WRITE, f"allocating {size} bytes for region {name!r}")
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            raise ResourceExhaustedError(f"cannot allocate {size} bytes for region {name!r}: {exc.strerror}") from exc
        if exc.errno != errno.EINVAL:
            raise DevrepError(str(exc)) from exc
        array[::PAGE_SIZE] = 0  # a kernel before 5.14: touch every page instead
    return HostMemory("anonymous", array, nbytes, private=True)


def seal_against_shrinking(fd: int) -> None:
    """Make sure nobody can truncate ``fd`` under its replicas (a SIGBUS for every reader of the mapping)."""
    try:
        add_seals(fd, F_SEAL_SHRINK)
        return
    except OSError:
        pass
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & F_SEAL_SHRINK:
        raise InvalidArgumentError(
            "the memory object cannot be sealed against shrinking (F_SEAL_SHRINK), so it could be truncated under "
            "its replicas; pass a memfd created with MFD_ALLOW_SEALING (or use register_file for files)"
        )


def adopt_fd(fd: int, nbytes: int | None = None, *, writable: bool = False) -> HostMemory:
    """Map a memfd someone handed over (a client's); it gets sealed against shrinking. The caller keeps
    ownership of ``fd`` until this returns (``Replicator.register_fd`` closes it on failure)."""
    seal_against_shrinking(fd)
    size = os.fstat(fd).st_size
    if nbytes is None:
        nbytes = size
    if nbytes <= 0:
        raise InvalidArgumentError(f"cannot replicate an empty memory object (size {nbytes})")
    if nbytes > size:
        raise InvalidArgumentError(f"requested {nbytes} bytes but the memory object holds only {size}")
    return HostMemory("memfd", map_fd(fd, nbytes, writable=writable), nbytes, fd=fd)


def map_file(path: str | os.PathLike[str]) -> HostMemory:
    """Map an existing regular file read-only."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFoundError(f"no such file: {p}") from exc
    except IsADirectoryError as exc:
        raise InvalidArgumentError(f"{p} is a directory, not a regular file") from exc
    try:
        st = os.fstat(fd)
        if not os.path.isfile(p) or st.st_size == 0:
            raise InvalidArgumentError(
                f"{p} is empty or not a regular file; devrep replicates regular files of at least one byte"
            )
        array = map_fd(fd, st.st_size, writable=False)
    except BaseException:
        os.close(fd)
        raise
    return HostMemory("file", array, st.st_size, fd=fd, path=p.resolve())


def map_file_fd(fd: int, path: Path | None) -> HostMemory:
    """Map the regular file open on ``fd`` read-only, taking ownership of ``fd`` (closed on failure too).

    The server maps a client's file through the fd the client (or its credentials) opened, never by re-opening a
    name; ``path`` is only what messages and the file tracker call it."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise InvalidArgumentError(
                f"{path or 'the fd'} is empty or not a regular file; devrep replicates regular files of at least "
                "one byte")
        array = map_fd(fd, st.st_size, writable=False)
    except BaseException:
        os.close(fd)
        raise
    return HostMemory("file", array, st.st_size, fd=fd, path=path)


def wrap_buffer(obj: Any) -> HostMemory:
    """Any buffer of the calling process: it must be C-contiguous, page-aligned and a page multiple."""
    try:
        view = memoryview(obj)
    except TypeError as exc:
        raise InvalidArgumentError(f"{type(obj).__name__} does not expose the buffer protocol") from exc
    if not view.c_contiguous:
        raise InvalidArgumentError("the buffer must be C-contiguous")
    array = np.frombuffer(view.cast("B"), dtype=np.uint8) if view.nbytes else np.empty(0, np.uint8)
    check_page_multiple("buffer length", array.nbytes)
    if buffer_address(array) % PAGE_SIZE:
        raise AlignmentError(
            f"buffer address {buffer_address(array):#x} is not page-aligned; "
            "allocate it with mmap or devrep.create_region()"
        )
    ro = array.view()
    ro.flags.writeable = False
    private = bool(array.nbytes) and private_anonymous(read_maps(), buffer_address(array), array.nbytes)
    return HostMemory("buffer", ro, array.nbytes, private=private, _keepalive=obj)


def read_maps() -> str:
    """This process's ``/proc/self/maps`` ("" where it cannot be read: nothing is then known to be private)."""
    try:
        with open("/proc/self/maps") as maps:
            return maps.read()
    except OSError:
        return ""


def private_anonymous(maps: str, address: int, length: int) -> bool:
    """Whether ``[address, address + length)`` lies wholly in private anonymous mappings, according to ``maps``
    (the text of ``/proc/PID/maps``: ``start-end perms offset dev inode [name]`` per line, sorted by address)."""
    want, end = address, address + length
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        low, _, high = fields[0].partition("-")
        start, stop = int(low, 16), int(high, 16)
        if stop <= want:
            continue
        if start > want or not fields[1].endswith("p") or fields[4] != "0":
            return False  # a hole, a shared mapping, or a file behind the pages
        want = stop
        if want >= end:
            return True
    return False
