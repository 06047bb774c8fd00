"""``sync`` mode: userfaultfd write-protect faults; a host write stalls until every replica of its page is
marked stale (see the ordering rule in ``devrep.tracking``).

In-process use (the writer is this Python process) hands the userfaultfd to a helper process, because a
handler thread here would need the GIL that the blocked writer may hold. The helper records faults in a
shared-memory dirty map and holds the userfaultfd's only reference: if it dies, the kernel releases every
blocked writer. Service use (``SyncTracker.remote``): the writer is a client process, so a thread of the
service handles its faults.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from .._pages import PAGE_SIZE, PageArray, RunArray
from ..errors import DevrepError, FailedPreconditionError, InvalidArgumentError, LeaseTimeoutError
from ..linux.uffd import Userfaultfd
from ..memory import HostMemory
from . import TRACKERS, Notify, Tracker, TrackingMode
from . import _handler as h
from ._setup import WP_FEATURES, address_and_length, check_host, open_uffd, register_wp

log = logging.getLogger(__name__)

_PF_EXITING = 0x4  # linux/sched.h task flag, field 9 of /proc/<pid>/stat


# Re-protecting a page that is already protected costs ~130 ns (a PTE update), one more ioctl ~0.8 us from the C
# loop (~1.4 us from the ctypes fallback): rearm protects across gaps up to this many pages with one call instead
# of two (measured with the ctypes loop on a 1 % rearm of 1 GiB: gaps 8-16 are best, 32 costs 25 % more, 64 80 %
# more; with random pages few gaps are this short, so the exact value matters little).
MERGE_GAP_PAGES = 12


def merge_close_runs(runs: RunArray, gap: int = MERGE_GAP_PAGES) -> RunArray:
    """Sorted ``[first, count]`` runs with gaps of at most ``gap`` pages joined, for ``rearm``.

    Protecting more pages than were copied is always safe: a gap page is either still protected (a no-op) or
    was written and recorded (then it is stale until a later sync copies it, and protecting it only costs
    its next writer one more fault). Un-protecting too much would be the unsafe direction; this never does.
    """
    if len(runs) < 2:
        return runs
    ends = runs[:, 0] + runs[:, 1]
    joined = runs[1:, 0] - ends[:-1] > gap  # True where a new merged run starts
    heads = np.flatnonzero(np.concatenate(([True], joined)))
    tails = np.concatenate((heads[1:] - 1, [len(runs) - 1]))
    return np.stack((runs[heads, 0], ends[tails] - runs[heads, 0]), axis=1)


class _Shared:
    """The owner's view of the shared state: fault counter, notify flag, dirty map."""

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.fd = os.memfd_create("devrep:sync-state", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, h.state_size(npages))
        self.map = mmap.mmap(self.fd, h.state_size(npages))
        self.counter = np.frombuffer(self.map, dtype=np.uint64, count=1, offset=h.COUNTER_OFFSET)
        self.flag = np.frombuffer(self.map, dtype=np.uint8, count=1, offset=h.NOTIFY_OFFSET)
        self.dirty = np.frombuffer(self.map, dtype=np.uint8, count=npages, offset=h.DIRTY_OFFSET)
        # The same bytes padded to whole 8-byte words (the padding lies inside the map and is never set), scanned a
        # word at a time: np.flatnonzero over a byte per page costs ~0.5 ms per GiB region, over words ~8x less.
        self._words = np.frombuffer(self.map, dtype=np.uint8, count=-(-npages // 8) * 8, offset=h.DIRTY_OFFSET)
        self.seen = 0

    def take(self) -> PageArray:
        """Pages recorded since the last call, sorted. Cheap (one load) when nothing faulted."""
        count = int(self.counter[0])
        if count == self.seen:
            return np.empty(0, dtype=np.int64)
        self.seen = count  # read before the map: a fault recorded meanwhile shows now or on the next call
        # Snapshot first: the handler may set more bytes while we scan (those stay set for the next call).
        snapshot = self._words.copy()
        words = np.flatnonzero(snapshot.view(np.uint64))
        if words.size == 0:
            return np.empty(0, dtype=np.int64)
        rows, cols = np.nonzero(snapshot.reshape(-1, 8)[words])  # row-major: the pages come out sorted
        pages = (words[rows] * 8 + cols).astype(np.int64, copy=False)
        self.dirty[pages] = 0
        return pages

    def close(self) -> None:
        del self.counter, self.flag, self.dirty, self._words
        with contextlib.suppress(BufferError):
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SyncTracker(Tracker):
    """Synchronous write tracking. ``SyncTracker()`` for memory this process writes (``create_region``,
    ``register_buffer``); ``SyncTracker.remote(...)`` for a client's memory in the service.

    ``notify_delay`` coalesces bursts of faults into one ``notify()``; ``start_timeout``/``rearm_timeout``
    bound the waits on the helper process. ``fault_around`` (bytes) caps the window a sequential writer's
    fault un-protects (see ``_handler``); ``PAGE_SIZE`` turns widening off (a fault still un-protects its
    whole invalidation block). ``populate`` (in-process use only) faults widened windows in ahead of the writer
    from a thread (``_handler.Populator``).
    """

    mode = TrackingMode.SYNC

    def __init__(self, *, notify_delay: float = 0.002, start_timeout: float = 30.0, rearm_timeout: float = 10.0,
                 fault_around: int = h.DEFAULT_MAX_WINDOW_PAGES * PAGE_SIZE, populate: bool = True,
                 _bare: bool = False) -> None:
        if fault_around < PAGE_SIZE or fault_around % PAGE_SIZE:
            raise InvalidArgumentError(f"fault_around must be a positive multiple of {PAGE_SIZE} bytes, "
                                       f"got {fault_around}")
        self.max_window_pages = fault_around // PAGE_SIZE
        self.notify_delay = notify_delay
        self.start_timeout = start_timeout
        self.rearm_timeout = rearm_timeout
        self._bare = _bare  # benchmark baseline: the handler only un-protects
        self.populate = populate
        self._populator: h.Populator | None = None
        self._remote: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self._shared: _Shared | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._handler: h.FaultHandler | None = None
        self._handler_thread: threading.Thread | None = None
        self._notify_thread: threading.Thread | None = None
        self._eventfd = -1
        self._stat_fd = -1
        self._stop_r, self._stop_w = -1, -1
        self._npages = 0
        self._failed: str | None = None
        self._reported_failure = False
        self.closed = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def remote(cls, uffd_fd: int, writer_base: int, length: int, **options: Any) -> SyncTracker:
        """Handle the faults of another process's mapping ``[writer_base, writer_base+length)`` in a thread.

        ``uffd_fd`` comes from ``prepare_sync_client`` in the writer (API done, range registered and
        write-protected); the tracker takes ownership of it and must then hold its last reference.
        """
        address_and_length(writer_base, length)
        tracker = cls(**options)
        tracker._remote = (uffd_fd, writer_base, length)
        # The service copies from its own mapping of the client's memfd, so its rearm may overlap the copy. Not so
        # in-process: each re-protect would interrupt the copying CPU with a TLB flush (see docs/tracking.md).
        tracker.rearm_overlaps_copy = True
        return tracker

    @property
    def helper_pid(self) -> int | None:
        """The in-process mode's helper process id (``None`` for the service-thread variant)."""
        return self._proc.pid if self._proc is not None else None

    def attach(self, host: HostMemory, notify: Notify) -> None:
        if self._shared is not None:
            raise FailedPreconditionError("a SyncTracker tracks one region; make a new one")
        self._npages = host.npages
        if self._remote is not None:
            uffd_fd, base, length = self._remote
            self._remote = None  # from here on the fd belongs to the fault thread (or is closed below)
            if length != host.npages * PAGE_SIZE:
                os.close(uffd_fd)  # releases the writer, which would otherwise wait for a handler forever
                raise InvalidArgumentError(
                    f"the writer registered {length} bytes but the region maps {host.npages * PAGE_SIZE}")
            self._shared = _Shared(host.npages)
            self._start_thread(Userfaultfd(uffd_fd), base)
        else:
            check_host(self.mode, host)
            uffd = open_uffd(self.mode, WP_FEATURES)
            try:
                register_wp(uffd, self.mode, host.address, host.npages * PAGE_SIZE)
                self._shared = _Shared(host.npages)
                # Private memory needs no populate thread: un-protecting its pages gives write access back at once
                # (measured slower with it: bench W1); shared pages stay read-only until a write fault each.
                self._start_helper(uffd, host.address, populate=self.populate and not host.private)
            except BaseException:
                self._teardown()
                raise
            finally:
                uffd.close()  # the helper holds the last reference (or nobody does, releasing the writers)
        self._eventfd_notify(notify)

    def _start_helper(self, uffd: Userfaultfd, base: int, *, populate: bool) -> None:
        assert self._shared is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "devrep.tracking._handler", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            theirs.close()
        self._stat_fd = os.open(f"/proc/{self._proc.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        init = h.OP_INIT + h.INIT.pack(base, self._npages, int(self._bare), self.block_pages,
                                       self.max_window_pages)
        fds = [uffd.fileno(), self._shared.fd, self._eventfd]
        if populate and not self._bare and self.max_window_pages > self.block_pages:
            self._populator = h.Populator(base)
            fds.append(self._populator.write_fd)
        socket.send_fds(ours, [init], fds)
        if self._populator is not None:
            self._populator.start()
        self._expect_ack(self.start_timeout, "start")

    def _start_thread(self, uffd: Userfaultfd, base: int) -> None:
        assert self._shared is not None
        self._eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._handler = h.FaultHandler(uffd, base, self._npages, self._shared.map, self._eventfd, bare=self._bare,
                                       block_pages=self.block_pages, max_window_pages=self.max_window_pages)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._handler_thread = threading.Thread(target=self._fault_loop, name="devrep-sync-faults", daemon=True)
        self._handler_thread.start()

    def _fault_loop(self) -> None:
        handler = self._handler
        assert handler is not None
        poller = select.poll()
        poller.register(handler.uffd.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._stop_r in events:
                    return
                with self._lock:
                    handler.handle_pending()
        except Exception as exc:  # the kernel releases writers when the fd closes; say why we stopped
            log.exception("sync-mode fault thread failed")
            self._failed = f"the fault-handling thread failed: {exc}"
        finally:
            with self._lock:
                with contextlib.suppress(OSError):
                    handler.release_all()
                handler.uffd.close()

    def _eventfd_notify(self, notify: Notify) -> None:
        if self._stop_r < 0:
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._notify_thread = threading.Thread(target=self._notify_loop, args=(notify,),
                                               name="devrep-sync-notify", daemon=True)
        self._notify_thread.start()

    def _notify_loop(self, notify: Notify) -> None:
        shared = self._shared
        assert shared is not None
        poller = select.poll()
        poller.register(self._eventfd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_r in events:
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._eventfd)
            time.sleep(self.notify_delay)  # let a burst of faults land, then collect them in one go
            shared.flag[0] = 0  # before collecting: a fault recorded after this signals again
            try:
                notify()
            except DevrepError as exc:
                log.debug("notify after faults: %s", exc)

    # ------------------------------------------------------------------ tracker API
    def _helper_exiting(self) -> bool:
        """True once the helper has begun to exit. The kernel sets PF_EXITING before the exiting task closes
        its files, so a helper seen alive here still held the userfaultfd: every write that completed
        before this check was recorded. (``Popen.poll`` only sees the zombie, after the writers were
        released, which leaves a window where an unrecorded write could look tracked.)"""
        try:
            stat = os.pread(self._stat_fd, 1024, 0)
        except OSError:
            return True  # reaped
        fields = stat[stat.rfind(b")") + 2:].split()
        return fields[0] in (b"Z", b"X", b"x") or bool(int(fields[6]) & _PF_EXITING)

    def _check_alive(self) -> None:
        if self._failed is None and self._proc is not None and self._helper_exiting():
            self._proc.poll()
            self._failed = (f"the sync-mode fault handler (pid {self._proc.pid}) exited"
                            f"{'' if self._proc.returncode is None else f' with status {self._proc.returncode}'}"
                            "; writes are no longer tracked")
        if self._failed is None and self._handler_thread is not None and not self._handler_thread.is_alive() \
                and not self.closed:
            self._failed = "the sync-mode fault-handling thread stopped; writes are no longer tracked"

    def collect(self) -> PageArray:
        shared = self._shared
        if shared is None or self.closed:
            return np.empty(0, dtype=np.int64)
        self._check_alive()
        if self._failed is not None and not self._reported_failure:
            # Writes may now land unseen: report every page stale once; rearm() refuses from now on.
            self._reported_failure = True
            shared.take()
            if self.on_failure is not None:  # not from here: collect() runs under the region lock
                threading.Thread(target=self.on_failure, args=(self._failed,), name="devrep-sync-failed",
                                 daemon=True).start()
            return np.arange(self._npages, dtype=np.int64)
        return shared.take()

    def rearm(self, runs: RunArray) -> None:
        runs = merge_close_runs(np.asarray(runs, dtype=np.int64).reshape(-1, 2))
        if self.closed or len(runs) == 0:
            return
        self._check_alive()
        if self._failed is not None:
            raise FailedPreconditionError(f"cannot re-protect pages: {self._failed}")
        if self._handler is not None:  # service thread: serialize with fault handling through the lock
            with self._lock:
                try:
                    self._handler.rearm_flat(np.ascontiguousarray(runs, dtype=np.int64).reshape(-1).data)
                except OSError as exc:
                    if exc.errno == errno.ESRCH:  # the writer's address space is gone
                        self._failed = "the writing process exited; its mapping can no longer be protected"
                        raise FailedPreconditionError(f"{self._failed}; unregister the region") from exc
                    raise DevrepError(f"re-protecting {len(runs)} runs failed: {exc}") from exc
                except ValueError as exc:
                    raise InvalidArgumentError(str(exc)) from exc
            return
        # No populate during the rearm, and none of a window un-protected before it (see ``Populator``).
        paused = self._populator.paused() if self._populator is not None else contextlib.nullcontext()
        with self._lock, paused:
            if self._sock is None:  # closed meanwhile: rearm runs off the region lock, close may win the race
                raise FailedPreconditionError("sync tracking was stopped (the region is being unregistered)")
            for start in range(0, len(runs), h.RUNS_PER_MESSAGE):
                chunk = runs[start:start + h.RUNS_PER_MESSAGE]
                self._send(h.OP_REARM + chunk.astype("<i8").tobytes())
                self._expect_ack(self.rearm_timeout, "re-protect")

    def _send(self, message: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(message)
        except OSError as exc:
            self._failed = f"the sync-mode fault handler is gone ({exc}); writes are no longer tracked"
            raise FailedPreconditionError(self._failed) from exc

    def _expect_ack(self, timeout: float, what: str) -> None:
        assert self._sock is not None
        self._sock.settimeout(timeout)
        try:
            reply = self._sock.recv(h.MAX_MESSAGE)
        except TimeoutError as exc:
            self._failed = f"the sync-mode fault handler did not answer {what} within {timeout}s"
            if self._proc is not None:
                self._proc.kill()  # a hung handler must not keep writers blocked: its exit releases them
            raise LeaseTimeoutError(self._failed) from exc
        except OSError as exc:
            reply = b""
            log.debug("handler socket: %s", exc)
        if reply == h.ACK:
            return
        if reply.startswith(b"E"):
            raise DevrepError(f"the sync-mode fault handler could not {what}: {reply[1:].decode(errors='replace')}")
        self._check_alive()
        self._failed = self._failed or "the sync-mode fault handler closed its socket"
        raise FailedPreconditionError(f"sync tracking {what} failed: {self._failed}")

    def close(self) -> None:
        """Release every protection; blocked writers resume. Also closes a ``remote`` fd never attached
        (call it when registering the region failed, or the client's writes would block forever)."""
        if self.closed:
            return
        self.closed = True
        if self._remote is not None:
            os.close(self._remote[0])
            self._remote = None
        self._teardown()

    def __del__(self) -> None:
        if getattr(self, "_remote", None) is not None:
            self.close()

    def _teardown(self) -> None:
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
        if self._sock is not None:
            with self._lock, contextlib.suppress(OSError, DevrepError):
                if self._proc is not None and self._proc.poll() is None:
                    self._sock.sendall(h.OP_STOP)
                    self._expect_ack(5.0, "stop")
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()  # killing it closes the userfaultfd, which releases every writer
                self._proc.wait(5.0)
        for thread in (self._handler_thread, self._notify_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(5.0)
        if self._populator is not None:  # after the helper exited: its hint pipe is at EOF
            self._populator.close()
        for fd in (self._eventfd, self._stop_r, self._stop_w, self._stat_fd):
            if fd >= 0:
                os.close(fd)
        self._eventfd = self._stop_r = self._stop_w = self._stat_fd = -1
        if self._shared is not None:
            self._shared.close()


TRACKERS[TrackingMode.SYNC] = SyncTracker
