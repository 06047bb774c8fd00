"""PAGEMAP_SCAN (Linux 6.7+) on a ``/proc/<pid>/pagemap`` fd, through ctypes; constants from linux/fs.h."""

from __future__ import annotations

import ctypes
import enum
import errno
import os

import numpy as np
import numpy.typing as npt

from ._libc import IOWR, _ioctl_prepared


class PageCategory(enum.IntFlag):
    NONE = 0
    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7


class ScanFlag(enum.IntFlag):
    NONE = 0
    WP_MATCHING = 1 << 0
    CHECK_WPASYNC = 1 << 1


class PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


class PmScanArg(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


PAGEMAP_SCAN = IOWR(ord("f"), 16, ctypes.sizeof(PmScanArg))
DEFAULT_VEC_LEN = 4096


_NOTHING = np.empty((0, 2), dtype=np.uint64)
_NOTHING.flags.writeable = False  # returned by every scan that finds nothing: an idle region costs no allocation


class PagemapScanner:
    """Reusable PAGEMAP_SCAN caller: one output vector; ``scan`` returns an ``(n, 2)`` uint64 array of
    ``[start, end)`` byte ranges.

    ``pagemap_fd`` is not owned (the caller opens and closes it).
    """

    def __init__(self, pagemap_fd: int, vec_len: int = DEFAULT_VEC_LEN) -> None:
        self.fd = pagemap_fd
        self.vec = (PageRegion * vec_len)()
        self.view = np.frombuffer(memoryview(self.vec).cast("B"), dtype=np.uint64).reshape(vec_len, 3)
        self.arg = PmScanArg()
        self._settings: tuple[int, ...] = ()  # the flags and masks ``arg`` holds (set again only when they change)
        # The ioctl's arguments as ready ctypes objects (``_ioctl_prepared`` skips the per-call conversion).
        self._call = (ctypes.c_int(pagemap_fd), ctypes.c_ulong(PAGEMAP_SCAN),
                      ctypes.c_void_p(ctypes.addressof(self.arg)))

    def configure(
        self,
        *,
        flags: ScanFlag = ScanFlag.NONE,
        category_mask: PageCategory = PageCategory.WRITTEN,
        category_inverted: PageCategory = PageCategory.NONE,
        category_anyof_mask: PageCategory = PageCategory.NONE,
        return_mask: PageCategory = PageCategory.WRITTEN,
    ) -> None:
        """Set the flags and masks every ``run`` uses (``scan`` sets them and runs)."""
        arg = self.arg
        settings = (int(flags), int(category_inverted), int(category_mask), int(category_anyof_mask),
                    int(return_mask))
        if settings != self._settings:
            arg.size = ctypes.sizeof(PmScanArg)
            arg.vec = ctypes.addressof(self.vec)
            arg.vec_len = len(self.vec)
            arg.max_pages = 0
            (arg.flags, arg.category_inverted, arg.category_mask, arg.category_anyof_mask,
             arg.return_mask) = settings
            self._settings = settings

    def run(self, start: int, end: int) -> npt.NDArray[np.uint64]:
        """Every range in ``[start, end)`` whose pages match the configured masks; with ``WP_MATCHING`` they are
        re-protected in the same walk (written-and-reprotected atomically per page). A scan that finds nothing
        returns one shared read-only empty array.

        Lean on purpose: an idle async region is scanned twice a second, a thousand of them in one loop, so the
        per-scan Python counts (bench A1). The kernel writes back only ``walk_end``; the rest of the argument block
        is set by ``configure``."""
        if not self._settings:
            self.configure()
        arg, call = self.arg, self._call
        chunks: list[npt.NDArray[np.uint64]] = []
        vec_len = len(self.vec)
        pos = start
        while pos < end:
            arg.start = pos
            arg.end = end
            arg.walk_end = 0
            n = _ioctl_prepared(*call)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, f"PAGEMAP_SCAN: {os.strerror(err)}")
            if n:
                chunks.append(self.view[:n, :2].copy())
            # walk_end is stale on some 6.x kernels when the kernel's internal buffer fills mid-walk (see
            # shared/limits.md): the walk may have gone past it. Only a full user vector means more may follow,
            # and then resume after both what was reported and what walk_end claims.
            if n < vec_len:
                break
            pos = max(int(arg.walk_end), int(self.view[n - 1, 1]))
        if not chunks:
            return _NOTHING
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def scan(
        self,
        start: int,
        end: int,
        *,
        flags: ScanFlag = ScanFlag.NONE,
        category_mask: PageCategory = PageCategory.WRITTEN,
        category_inverted: PageCategory = PageCategory.NONE,
        category_anyof_mask: PageCategory = PageCategory.NONE,
        return_mask: PageCategory = PageCategory.WRITTEN,
    ) -> npt.NDArray[np.uint64]:
        """``configure`` with these flags and masks, then ``run``."""
        self.configure(flags=flags, category_mask=category_mask, category_inverted=category_inverted,
                       category_anyof_mask=category_anyof_mask, return_mask=return_mask)
        return self.run(start, end)


def pagemap_scan(pagemap_fd: int, start: int, end: int, **kwargs: object) -> npt.NDArray[np.uint64]:
    """One-shot ``PagemapScanner(pagemap_fd).scan(start, end, **kwargs)``."""
    return PagemapScanner(pagemap_fd).scan(start, end, **kwargs)  # type: ignore[arg-type]
