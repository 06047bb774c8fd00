"""``file`` mode: regular files have no page protection a writer could trip, so watch and diff instead.

inotify (``IN_MODIFY``/``IN_CLOSE_WRITE``, plus ``IN_ATTRIB``/``IN_MOVE_SELF``/``IN_DELETE_SELF`` and the
directory for replacement by rename) says *that* the file changed; polling ``fstat`` catches writes through
``mmap`` (which emit no inotify event but update mtime). On a change, every page is rehashed (XXH64) and
exactly the pages whose hash differs from the previous hash are reported: the region maps the file
``MAP_SHARED``, so the mapping already shows the new bytes and the old hashes are the only record of
what the replicas hold.

A region has a fixed size and maps one inode. If the file changes size, or the path now names another
file (replaced by rename), the region fails with the reason (``Region.fail``) and every page is reported
stale; re-register the file to follow it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from pathlib import Path

import numpy as np
from inotify_simple import INotify
from inotify_simple import flags as IN

from .._pages import PageArray, RunArray, pages_from_runs
from ..errors import DevrepError, FailedPreconditionError, InvalidArgumentError, UnsupportedModeError
from ..memory import HostMemory
from . import TRACKERS, Notify, Tracker, TrackingMode

log = logging.getLogger(__name__)

_FILE_MASK = IN.MODIFY | IN.CLOSE_WRITE | IN.ATTRIB | IN.MOVE_SELF | IN.DELETE_SELF
_DIR_MASK = IN.CREATE | IN.MOVED_TO | IN.DELETE | IN.MOVED_FROM


def _signature(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileTracker(Tracker):
    """Watches the region's file; ``poll_interval`` seconds between ``fstat`` polls (mmap writers)."""

    mode = TrackingMode.FILE

    def __init__(self, *, poll_interval: float = 0.5) -> None:
        if poll_interval <= 0:
            raise InvalidArgumentError(f"poll_interval must be positive seconds, got {poll_interval}")
        self.poll_interval = poll_interval
        self._lock = threading.Lock()
        self._host: HostMemory | None = None
        self._path: Path | None = None
        self._hashes = np.empty(0, dtype=np.uint64)
        self._sig: tuple[int, int, int, int, int] | None = None
        self._inotify: INotify | None = None
        self._pending = False
        self._armed: PageArray | None = None  # pages a sync is copying; any change meanwhile makes them suspect
        self._failed: str | None = None
        self._reported_failure = False
        self._stop_r, self._stop_w = -1, -1
        self._wake = -1
        self._thread: threading.Thread | None = None
        self.rehashes = 0
        self.closed = False

    def attach(self, host: HostMemory, notify: Notify) -> None:
        if self._host is not None:
            raise FailedPreconditionError("a FileTracker tracks one region; make a new one")
        if host.kind != "file" or host.fd is None or host.path is None:
            raise UnsupportedModeError(
                f"tracking='file' watches regular files registered with register_file; this region is "
                f"{host.kind!r} memory: use 'sync', 'async' or 'explicit'")
        self._host, self._path = host, host.path
        self._sig = _signature(os.fstat(host.fd))
        self._hashes = host.hash_pages()
        inotify = INotify(nonblocking=True)
        try:
            inotify.add_watch(self._path, _FILE_MASK)
            inotify.add_watch(self._path.parent, _DIR_MASK)
        except OSError as exc:
            inotify.close()
            raise UnsupportedModeError(f"tracking='file': cannot watch {self._path}: {exc}") from exc
        self._inotify = inotify
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._watch, args=(notify,), name="devrep-file-watch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ change detection (lock held)
    def _drain_locked(self) -> None:
        assert self._inotify is not None and self._path is not None
        for event in self._inotify.read(timeout=0):
            if event.name and event.name != self._path.name:
                continue  # another file in the same directory
            self._pending = True

    def _check_locked(self) -> bool:
        """True when the file may have changed since the last rehash; sets ``_failed`` if the region can no
        longer follow it."""
        assert self._host is not None and self._host.fd is not None and self._path is not None
        self._drain_locked()
        if self._failed is not None:
            return False
        st = os.fstat(self._host.fd)
        assert self._sig is not None
        if st.st_size != self._host.nbytes:
            self._failed = (f"{self._path} changed size from {self._host.nbytes} to {st.st_size} bytes; "
                            "a file region has a fixed size: re-register it")
            return False
        try:
            current = os.stat(self._path)
            if (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
                self._failed = f"{self._path} was replaced by another file; re-register it to follow the new one"
                return False
        except FileNotFoundError:
            self._failed = f"{self._path} was removed or renamed; re-register the new file"
            return False
        return self._pending or _signature(st) != self._sig

    # ------------------------------------------------------------------ watcher thread
    def _watch(self, notify: Notify) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        told_failure = False
        while True:
            events = dict(poller.poll(int(self.poll_interval * 1000)))
            if self._stop_r in events:
                return
            if self._wake in events:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
            with self._lock:
                if self.closed:
                    return
                try:
                    changed = self._check_locked()
                except OSError as exc:
                    self._failed = f"cannot stat {self._path}: {exc}"
                    changed = False
                failed = self._failed
            try:
                if changed or (failed and not told_failure):
                    notify()
                if failed and not told_failure:
                    told_failure = True
                    if self.on_failure is not None:
                        self.on_failure(failed)
            except DevrepError as exc:
                log.debug("file watch notify: %s", exc)

    # ------------------------------------------------------------------ tracker API
    def collect(self) -> PageArray:
        with self._lock:
            if self._host is None or self.closed:
                return np.empty(0, dtype=np.int64)
            try:
                changed = self._check_locked()
            except OSError as exc:
                self._failed = f"cannot stat {self._path}: {exc}"
                changed = False
            if self._failed is not None:
                if self._reported_failure:
                    return np.empty(0, dtype=np.int64)
                self._reported_failure = True
                os.eventfd_write(self._wake, 1)  # the watcher fails the region (we hold its lock here)
                return np.arange(self._host.npages, dtype=np.int64)
            if not changed:
                return np.empty(0, dtype=np.int64)
            # Clear before hashing: a write during the hash sets them again and is rehashed next time.
            self._pending = False
            assert self._host.fd is not None
            self._sig = _signature(os.fstat(self._host.fd))
            try:
                hashes = self._host.hash_pages()
            except FailedPreconditionError as exc:  # shrank between the size check and the read
                self._failed = str(exc)
                self._reported_failure = True
                os.eventfd_write(self._wake, 1)
                return np.arange(self._host.npages, dtype=np.int64)
            self.rehashes += 1
            pages = np.flatnonzero(hashes != self._hashes).astype(np.int64)
            self._hashes = hashes
            if self._armed is not None:
                # The file changed while a sync copied these pages: a page may have been copied mid-change and
                # then changed back (same hash as before), so every page in flight is suspect.
                pages = np.union1d(pages, self._armed)
                self._armed = None
            return pages

    def rearm(self, runs: RunArray) -> None:
        if self._failed is not None:
            raise FailedPreconditionError(f"file tracking stopped: {self._failed}")
        with self._lock:
            self._armed = pages_from_runs(runs)

    def settle(self) -> None:
        with self._lock:
            self._armed = None

    def close(self) -> None:
        with self._lock:
            self.closed = True
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with self._lock:
            if self._inotify is not None:
                self._inotify.close()
                self._inotify = None
            for fd in (self._stop_r, self._stop_w, self._wake):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._stop_r = self._stop_w = self._wake = -1


TRACKERS[TrackingMode.FILE] = FileTracker
