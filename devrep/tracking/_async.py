"""``async`` mode: ``UFFD_FEATURE_WP_ASYNC`` + ``PAGEMAP_SCAN``. Writers never stall: the kernel clears a
page's write protection itself on the first write and marks it written; every epoch (and on every
``collect()``: sync, acquire, verify) one PAGEMAP_SCAN with ``PM_SCAN_WP_MATCHING`` returns the written pages
and re-protects them in the same walk, so a write after the scan is seen by the next one.

Needs Linux 6.7+ (WP_ASYNC and PAGEMAP_SCAN). Service use: ``AsyncTracker.remote(uffd_fd, pagemap_fd, ...)``
with the client's userfaultfd and its own ``/proc/self/pagemap`` fd (``prepare_async_client``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from typing import Any

import numpy as np

from .._pages import PAGE_SHIFT, PAGE_SIZE, PageArray, RunArray
from ..errors import DevrepError, FailedPreconditionError, InvalidArgumentError, UnsupportedModeError
from ..kernel.pagemap import PageCategory, PagemapScanner, ScanFlag
from ..kernel.uffd import Feature, Userfaultfd
from ..memory import HostMemory
from . import TRACKERS, Notify, Tracker
from ._setup import WP_FEATURES, address_and_length, check_host, open_uffd, register_wp

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 0.05
_SCAN_FLAGS = ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC


def check_pagemap_scan(pagemap_fd: int) -> None:
    """``UnsupportedModeError`` unless this kernel has PAGEMAP_SCAN (Linux 6.7+)."""
    try:
        PagemapScanner(pagemap_fd, 1).scan(0, PAGE_SIZE)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
            raise UnsupportedModeError(
                f"tracking='async' needs the PAGEMAP_SCAN ioctl (Linux 6.7+); kernel {os.uname().release} "
                "lacks it; use 'sync' or 'explicit'") from exc
        raise


def ranges_to_pages(ranges: np.ndarray[Any, np.dtype[np.uint64]], base: int, npages: int) -> PageArray:
    """``[start, end)`` byte ranges (as PAGEMAP_SCAN returns them) to sorted page indices of the region."""
    if len(ranges) == 0:
        return np.empty(0, dtype=np.int64)
    first = ((ranges[:, 0].astype(np.int64) - base) >> PAGE_SHIFT).clip(0, npages)
    last = ((ranges[:, 1].astype(np.int64) - base) >> PAGE_SHIFT).clip(0, npages)
    counts = last - first
    if len(ranges) == 1 or (counts == 1).all():
        return first if (counts == 1).all() else np.arange(first[0], last[0], dtype=np.int64)
    offsets = np.repeat(first - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return np.arange(int(counts.sum()), dtype=np.int64) + offsets


class AsyncTracker(Tracker):
    """Asynchronous write tracking; ``interval`` seconds between epochs (``None``: only on collect)."""

    mode = "async"

    def __init__(self, *, interval: float | None = DEFAULT_INTERVAL) -> None:
        if interval is not None and interval <= 0:
            raise InvalidArgumentError(f"epoch interval must be positive seconds or None, got {interval}")
        self.interval = interval
        self._remote: tuple[int, int, int, int] | None = None
        self._uffd: Userfaultfd | None = None
        self._pagemap = -1
        self._scanner: PagemapScanner | None = None
        self._base = 0
        self._npages = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.epochs = 0
        self.closed = False

    def __del__(self) -> None:
        if getattr(self, "_remote", None) is not None:
            self.close()

    @classmethod
    def remote(cls, uffd_fd: int, pagemap_fd: int, writer_base: int, length: int, **options: Any) -> AsyncTracker:
        """Track another process's mapping: ``uffd_fd`` and ``pagemap_fd`` (its ``/proc/self/pagemap``) come
        from ``prepare_async_client`` in the writer; the tracker owns both fds from now on."""
        address_and_length(writer_base, length)
        tracker = cls(**options)
        tracker._remote = (uffd_fd, pagemap_fd, writer_base, length)
        return tracker

    def attach(self, host: HostMemory, notify: Notify) -> None:
        if self._scanner is not None:
            raise FailedPreconditionError("an AsyncTracker tracks one region; make a new one")
        self._npages = host.npages
        length = host.npages * PAGE_SIZE
        if self._remote is not None:
            uffd_fd, pagemap_fd, base, remote_length = self._remote
            self._remote = None
            self._uffd, self._pagemap, self._base = Userfaultfd(uffd_fd), pagemap_fd, base
            if remote_length != length:
                self.close()
                raise InvalidArgumentError(f"the writer registered {remote_length} bytes but the region maps {length}")
        else:
            check_host(self.mode, host)
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            try:
                check_pagemap_scan(self._pagemap)
                self._uffd = open_uffd(self.mode, WP_FEATURES, Feature.WP_ASYNC)
                register_wp(self._uffd, self.mode, host.address, length)
            except BaseException:
                self.close()
                raise
            self._base = host.address
        self._scanner = PagemapScanner(self._pagemap)
        if self.interval is not None:
            self._thread = threading.Thread(target=self._epochs, args=(notify,), name="devrep-async-epoch",
                                            daemon=True)
            self._thread.start()

    def _epochs(self, notify: Notify) -> None:
        assert self.interval is not None
        while not self._stop.wait(self.interval):
            try:
                notify()
            except DevrepError as exc:
                log.debug("async epoch: %s", exc)

    def scan(self) -> PageArray:
        """Written pages since the last scan, re-protecting them (one PAGEMAP_SCAN walk)."""
        with self._lock:
            if self._scanner is None or self.closed:
                return np.empty(0, dtype=np.int64)
            try:
                ranges = self._scanner.scan(self._base, self._base + self._npages * PAGE_SIZE, flags=_SCAN_FLAGS,
                                            category_mask=PageCategory.WRITTEN, return_mask=PageCategory.WRITTEN)
            except OSError as exc:
                # The writer's mapping is gone (client exited) or the kernel refused: nothing is tracked now.
                raise FailedPreconditionError(f"async write tracking failed: PAGEMAP_SCAN: {exc}") from exc
            self.epochs += 1
        return ranges_to_pages(ranges, self._base, self._npages)

    def collect(self) -> PageArray:
        return self.scan()

    def rearm(self, runs: RunArray) -> None:
        """Nothing to do: the scan in ``collect()`` (run by sync just before this) re-protected every page it
        reported, atomically with reporting it."""

    def close(self) -> None:
        """Stop tracking; also closes ``remote`` fds that were never attached."""
        self.closed = True
        if self._remote is not None:
            os.close(self._remote[0])
            os.close(self._remote[1])
            self._remote = None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with self._lock:
            if self._uffd is not None:
                with contextlib.suppress(OSError):
                    self._uffd.unregister(self._base, self._npages * PAGE_SIZE)
                self._uffd.close()
                self._uffd = None
            if self._pagemap >= 0:
                os.close(self._pagemap)
                self._pagemap = -1
            self._scanner = None


def prepare_async_client(target: Any, length: int | None = None) -> tuple[int, int]:
    """In the writing (client) process: ``(uffd_fd, pagemap_fd)`` for ``target`` (a page-aligned buffer, or an
    address with ``length``), registered with WP_ASYNC and fully protected. Send both to the service, then close
    them here. Writes never block in this mode."""
    address, length = address_and_length(target, length)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        check_pagemap_scan(pagemap)
        uffd = open_uffd("async", WP_FEATURES, Feature.WP_ASYNC)
        try:
            register_wp(uffd, "async", address, length)
        except BaseException:
            uffd.close()
            raise
    except BaseException:
        os.close(pagemap)
        raise
    return uffd.detach(), pagemap


TRACKERS["async"] = AsyncTracker
