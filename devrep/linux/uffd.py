"""userfaultfd(2) through ctypes, in the style of ``inotify_simple``: flags as ``IntFlag``, one object per fd.

Constants missing from Debian 12's 6.1 headers (``WP_UNPOPULATED``, ``WP_ASYNC``) are defined here from
linux/userfaultfd.h. Structures are plain little-endian ``__u64`` fields, so ctypes layouts match the kernel's.
"""

from __future__ import annotations

import array
import ctypes
import enum
import errno
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ._libc import IO, IOR, IOWR, SYS_USERFAULTFD, _ioctl_prepared, check, ioctl, libc

try:  # the rearm loop in C (devrep/linux/_wp.c), built with the package wherever a C compiler was at hand
    from . import _wp
except ImportError:  # pragma: no cover - a build without a compiler; the Python loop below does the same calls
    _wp = None  # type: ignore[assignment]

REARM_LOOP = "python" if _wp is None else "c"
"""Which loop ``Userfaultfd.protect_page_runs`` runs: ``"c"`` (``devrep.linux._wp``) or ``"python"`` (ctypes)."""

UFFD_API = 0xAA
_O_CLOEXEC = os.O_CLOEXEC
_O_NONBLOCK = os.O_NONBLOCK
UFFD_USER_MODE_ONLY = 1
DEV_USERFAULTFD = "/dev/userfaultfd"


class Feature(enum.IntFlag):
    NONE = 0
    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


class RegisterMode(enum.IntFlag):
    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class WriteProtectMode(enum.IntFlag):
    WP = 1 << 0
    DONTWAKE = 1 << 1


class Event(enum.IntEnum):
    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class PagefaultFlag(enum.IntFlag):
    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


MSG_SIZE = 32  # struct uffd_msg: u8 event, 7 bytes reserved, 24-byte union

UFFDIO_API = IOWR(UFFD_API, 0x3F, ctypes.sizeof(_Api))
UFFDIO_REGISTER = IOWR(UFFD_API, 0x00, ctypes.sizeof(_Register))
UFFDIO_UNREGISTER = IOR(UFFD_API, 0x01, ctypes.sizeof(_Range))
UFFDIO_WAKE = IOR(UFFD_API, 0x02, ctypes.sizeof(_Range))
UFFDIO_WRITEPROTECT = IOWR(UFFD_API, 0x06, ctypes.sizeof(_WriteProtect))
USERFAULTFD_IOC_NEW = IO(UFFD_API, 0x00)


@dataclass(frozen=True)
class FaultEvent:
    """One ``uffd_msg``: ``event`` kind; for a page fault, ``address`` and ``flags``."""

    event: int
    flags: int
    address: int

    @property
    def is_wp(self) -> bool:
        return self.event == Event.PAGEFAULT and bool(self.flags & PagefaultFlag.WP)


def parse_events(data: bytes) -> list[FaultEvent]:
    out = []
    for off in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
        flags = int.from_bytes(data[off + 8 : off + 16], "little")
        address = int.from_bytes(data[off + 16 : off + 24], "little")
        out.append(FaultEvent(data[off], flags, address))
    return out


def _open_fd(user_mode_only: bool) -> int:
    """A new userfaultfd: the syscall first, then ``/dev/userfaultfd`` (root-or-group gated, no sysctl)."""
    flags = _O_CLOEXEC | _O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
    first_error: OSError | None = None
    if SYS_USERFAULTFD is not None:
        fd = libc.syscall(SYS_USERFAULTFD, flags)
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        first_error = OSError(err, f"userfaultfd(2): {os.strerror(err)}")
    try:
        dev = os.open(DEV_USERFAULTFD, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise first_error or exc from None
    try:
        return int(check(libc.ioctl(dev, USERFAULTFD_IOC_NEW, flags), "USERFAULTFD_IOC_NEW"))
    except OSError:
        if first_error is not None:
            raise first_error from None
        raise
    finally:
        os.close(dev)


class Userfaultfd:
    """Owns one userfaultfd (close-on-exec, non-blocking).

    ``fd`` adopts an existing userfaultfd (e.g. received over SCM_RIGHTS) whose API handshake is done.
    """

    def __init__(self, fd: int | None = None, *, user_mode_only: bool = False) -> None:
        self.fd = _open_fd(user_mode_only) if fd is None else fd
        self.features = Feature.NONE
        # Preallocated argument structs: the fault path must not allocate.
        self._wp = _WriteProtect()
        self._range = _Range()

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError("userfaultfd is closed")
        return self.fd

    def api(self, features: Feature = Feature.NONE) -> Feature:
        """UFFDIO_API handshake requesting ``features``; returns every feature the kernel supports."""
        arg = _Api(UFFD_API, int(features), 0)
        ioctl(self.fileno(), UFFDIO_API, arg, "UFFDIO_API")
        self.features = features
        return Feature(arg.features)

    def register(self, address: int, length: int, mode: RegisterMode) -> int:
        """UFFDIO_REGISTER; returns the bitmask of ioctls allowed on the range."""
        arg = _Register(_Range(address, length), int(mode), 0)
        ioctl(self.fileno(), UFFDIO_REGISTER, arg, "UFFDIO_REGISTER")
        return int(arg.ioctls)

    def unregister(self, address: int, length: int) -> None:
        ioctl(self.fileno(), UFFDIO_UNREGISTER, _Range(address, length), "UFFDIO_UNREGISTER")

    def writeprotect(self, address: int, length: int, protect: bool, dontwake: bool = False) -> None:
        """Set (``protect``) or clear write protection; clearing wakes writers blocked on the range unless
        ``dontwake``."""
        wp = self._wp
        wp.range.start = address
        wp.range.len = length
        wp.mode = (WriteProtectMode.WP if protect else 0) | (WriteProtectMode.DONTWAKE if dontwake else 0)
        ioctl(self.fd, UFFDIO_WRITEPROTECT, wp, "UFFDIO_WRITEPROTECT")

    def protect_page_runs(self, base: int, runs: Sequence[int] | memoryview, page_shift: int, npages: int, *,
                          compiled: bool = True) -> None:
        """Write-protect (no wake) page runs of the ``npages`` pages starting at ``base``; ``runs`` is flat:
        ``[first_page, count, first_page, count, ...]`` (e.g. an ``array.array("q")`` straight from a message).
        A run outside ``[0, npages)`` or an odd length is a ``ValueError`` before any page is touched.

        The sync-mode rearm: thousands of short runs. ``devrep.linux._wp`` runs the loop in C with the GIL released
        (about 0.8 us a run here, all of it the kernel's); without it, the loop is as tight as Python allows (one
        prepared ioctl rewritten in place, no per-run call layers or lists), about 1.45 us a run. Both retry EINTR
        as ``_libc.ioctl`` does. The kernel refuses a run outside the registered range (``OSError``).
        ``compiled=False`` takes the Python loop even where the C one is built (tests compare the two)."""
        if compiled and _wp is not None:
            _wp.protect_runs(self.fd, base, _int64_buffer(runs), page_shift, npages)
            return
        if not isinstance(runs, list | array.array):  # e.g. a numpy array: plain ints for the checks and ctypes
            runs = [int(value) for value in runs]
        firsts, counts = runs[0::2], runs[1::2]  # checked in bulk: builtins over the whole sequence
        if len(firsts) != len(counts):
            raise ValueError("rearm runs must be [first, count] pairs")
        if len(firsts) and (min(firsts) < 0 or min(counts) <= 0 or max(map(operator.add, firsts, counts)) > npages):
            raise ValueError(f"a rearm run lies outside the region's {npages} pages")
        words = (ctypes.c_uint64 * 3)()  # struct uffdio_writeprotect: range.start, range.len, mode
        words[2] = int(WriteProtectMode.WP)
        args = (ctypes.c_int(self.fd), ctypes.c_ulong(UFFDIO_WRITEPROTECT), ctypes.c_void_p(ctypes.addressof(words)))
        call = _ioctl_prepared
        pairs = iter(runs)
        for first, count in zip(pairs, pairs, strict=True):
            words[0] = base + (first << page_shift)
            words[1] = count << page_shift
            while call(*args) < 0:
                err = ctypes.get_errno()
                if err != errno.EINTR:
                    raise OSError(err, f"UFFDIO_WRITEPROTECT of pages [{first}, +{count}): {os.strerror(err)}")

    def wake(self, address: int, length: int) -> None:
        rng = self._range
        rng.start = address
        rng.len = length
        ioctl(self.fd, UFFDIO_WAKE, rng, "UFFDIO_WAKE")

    def read_raw(self, max_events: int = 64) -> bytes:
        """Pending messages as raw bytes (``MSG_SIZE`` each); empty when none are waiting."""
        try:
            return os.read(self.fd, MSG_SIZE * max_events)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return b""
            raise

    def read_events(self, max_events: int = 64) -> list[FaultEvent]:
        """Pending events, without blocking."""
        return parse_events(self.read_raw(max_events))

    def detach(self) -> int:
        """Give up ownership of the fd (e.g. after sending it to another process) without closing it."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:  # no fd when __init__ failed (e.g. a user without uffd rights)
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _int64_buffer(runs: Sequence[int] | memoryview) -> memoryview | array.array[int]:
    """``runs`` as a contiguous native int64 buffer for ``_wp.protect_runs``: an ``array("q")`` or an int64 numpy
    array as it is, anything else (a list) copied into an ``array("q")``."""
    try:
        view = memoryview(runs)  # type: ignore[arg-type]  # a list raises TypeError
    except TypeError:
        return array.array("q", runs)
    if view.format in ("q", "l") and view.itemsize == 8 and view.c_contiguous:
        return view
    return array.array("q", runs)
