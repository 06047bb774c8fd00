"""Synchronous write-protect fault handling, shared by the helper process and the service's handler thread.

``FaultHandler`` owns the ordering rule of ``devrep.tracking``: for each write-protect fault it marks the
pages it is about to un-protect in the shared dirty map and bumps the fault counter, *then* un-protects them
(which wakes the writer).

Fault-around: a fault un-protects the whole invalidation block around the page (the region invalidates
whole blocks anyway), and a fault exactly where the window of an earlier fault ended (a sequential writer)
doubles that stream's window, up to ``max_window_pages`` (2 MiB by default), like readahead. Random writes
stay at one block, so they cost one fault each and invalidate nothing extra; a sequential fill of a
protected region costs a few dozen faults per 64 MiB instead of one per page. Un-protected pages are
recorded written before they are un-protected, so the rule above still holds for every page of a window.

Populate hints: un-protecting a page does not make it writable for the writer. The kernel leaves a shmem PTE
read-only after ``UFFDIO_WRITEPROTECT`` resolves it (it does not upgrade dirty shared PTEs there), so the
writer still takes one in-kernel minor fault per page of a window -- the same per-page cost async mode pays,
and what bounds W1. Only a thread of the writer's own process can pay that cost ahead of the writer
(``MADV_POPULATE_WRITE``), so for a widened window the handler writes ``(first, count)`` to an optional
hint pipe; the in-process tracker's populate thread faults the window in from its end backwards while the
woken writer works through it from the front. Hints are best effort (dropped when the pipe is full) and only
for windows of at least ``MIN_HINT_PAGES``.

``rearm`` re-protects pages; callers run it and ``handle_pending`` one at a time (the helper
process does both from one thread; the service thread and ``rearm`` share a lock).

Run as ``python -m devrep.tracking._handler SOCKFD``: the in-process sync mode's helper. It receives the
userfaultfd, the shared-state memfd and an eventfd over the SOCK_SEQPACKET socket ``SOCKFD`` (SCM_RIGHTS)
and then holds the only reference to the userfaultfd, so if it dies the kernel releases every blocked
writer. It exits when the socket reaches EOF (the owner died or closed the tracker).
"""

from __future__ import annotations

import array
import contextlib
import mmap
import os
import select
import socket
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

from ..linux._libc import MADV_POPULATE_WRITE, madvise
from ..linux.uffd import MSG_SIZE, Event, PagefaultFlag, Userfaultfd

PAGE_SIZE = mmap.PAGESIZE
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

# Shared state layout (one memfd, mapped by both sides): fault counter, notify-pending flag, then one
# byte per page (1 = written since the owner last collected it).
COUNTER_OFFSET = 0
NOTIFY_OFFSET = 8
DIRTY_OFFSET = 64

# Control messages on the socket (owner -> helper), each answered by one ACK.
OP_INIT = b"I"  # + struct INIT (base, npages, bare, block_pages, max_window_pages) with fds [uffd, state, eventfd]
#                 and optionally the write end of the populate-hint pipe (non-blocking)
OP_REARM = b"R"  # + int64 pairs [first_page, count]
OP_STOP = b"S"  # un-protect everything and exit
ACK = b"A"
INIT = struct.Struct("<QQQQQ")
DEFAULT_MAX_WINDOW_PAGES = (2 << 20) // PAGE_SIZE
_STREAMS = 8  # sequential writers followed at once (more are treated as random until one stops)
MAX_MESSAGE = 1 << 16
RUNS_PER_MESSAGE = (MAX_MESSAGE - 1) // 16

_U64 = struct.Struct("<Q")
HINT = struct.Struct("<QQ")  # (first_page, count) of a widened window, on the hint pipe
# Smaller windows get no hint: waking the populate thread costs more than the few faults it would save.
MIN_HINT_PAGES = 32
POPULATE_CHUNK_PAGES = 64  # the populate thread's step (256 KiB): one madvise per step
_MSG_FLAGS_ADDR = struct.Struct("<QQ")


def state_size(npages: int) -> int:
    return (DIRTY_OFFSET + npages + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


class FaultHandler:
    """Handles write-protect faults on ``[base, base + npages pages)`` of the process that registered ``uffd``.

    ``state`` is the shared map (see the layout above); ``eventfd`` (optional) is signalled once per batch
    of faults while the owner's notify-pending flag is clear. ``bare`` only un-protects the faulting page
    (benchmark baseline). ``block_pages`` is the region's invalidation block; ``max_window_pages`` caps the
    fault-around window of a sequential writer (``block_pages`` or less: no widening). ``hints`` (optional, a
    non-blocking fd) gets a ``HINT`` for every widened window after it is un-protected.
    """

    def __init__(self, uffd: Userfaultfd, base: int, npages: int, state: mmap.mmap, eventfd: int | None = None,
                 *, bare: bool = False, block_pages: int = 1,
                 max_window_pages: int = DEFAULT_MAX_WINDOW_PAGES, hints: int | None = None) -> None:
        if block_pages < 1 or max_window_pages < 1:
            raise ValueError(f"block_pages ({block_pages}) and max_window_pages ({max_window_pages}) must be >= 1")
        self.uffd = uffd
        self.base = base
        self.npages = npages
        self.end = base + npages * PAGE_SIZE
        self.state = state
        self.eventfd = eventfd
        self.bare = bare
        self.block_pages = block_pages
        self.max_window = max(block_pages, max_window_pages - max_window_pages % block_pages)
        self.hints = hints
        self._streams: OrderedDict[int, int] = OrderedDict()  # page where a window ended -> its size
        self.faults = 0
        self.pages_unprotected = 0

    def window(self, page: int) -> tuple[int, int]:
        """``(first, count)``: the pages to record and un-protect for a write fault on ``page``."""
        block = self.block_pages
        first = page - page % block
        previous = self._streams.pop(first, 0)  # a window ended right here: a sequential writer
        size = min(previous * 2, self.max_window) if previous else block
        count = min(size, self.npages - first)
        self._streams[first + count] = size
        if len(self._streams) > _STREAMS:
            self._streams.popitem(last=False)
        return first, count

    def handle_pending(self) -> int:
        """Handle every fault waiting on the userfaultfd; returns how many were handled."""
        data = self.uffd.read_raw()
        handled = 0
        while data:
            state, uffd = self.state, self.uffd
            for off in range(0, len(data), MSG_SIZE):
                if data[off] != Event.PAGEFAULT:
                    continue  # fork/remap/... are not requested; nothing else can arrive
                flags, address = _MSG_FLAGS_ADDR.unpack_from(data, off + 8)
                page_address = address & ~(PAGE_SIZE - 1)
                start, length = page_address, PAGE_SIZE
                hint = None
                if not self.bare and self.base <= page_address < self.end and flags & PagefaultFlag.WP:
                    first, count = self.window((page_address - self.base) >> PAGE_SHIFT)
                    # Record first, then un-protect: the owner must see the pages written before a write lands.
                    state[DIRTY_OFFSET + first:DIRTY_OFFSET + first + count] = b"\x01" * count
                    self.faults += 1
                    self.pages_unprotected += count
                    _U64.pack_into(state, COUNTER_OFFSET, self.faults)
                    start, length = self.base + (first << PAGE_SHIFT), count << PAGE_SHIFT
                    if count > self.block_pages and count >= MIN_HINT_PAGES and self.hints is not None:
                        hint = HINT.pack(first, count)
                try:
                    if flags & PagefaultFlag.WP:
                        uffd.writeprotect(start, length, False)  # clears WP and wakes the writer
                    else:
                        uffd.wake(page_address, PAGE_SIZE)
                except OSError as exc:
                    # The writer unmapped the range or exited meanwhile: nobody is left to wake there, and
                    # one bad range must not stop the handling of every other fault.
                    os.write(2, f"devrep handler: un-protect at {page_address:#x}: {exc}\n".encode())
                    hint = None
                if hint is not None and self.hints is not None:
                    # Full (the populate thread is behind) or its reader is gone: it was only a hint.
                    with contextlib.suppress(OSError):
                        os.write(self.hints, hint)
                handled += 1
            data = self.uffd.read_raw()
        if handled and not self.bare and self.eventfd is not None and state[NOTIFY_OFFSET] == 0:
            state[NOTIFY_OFFSET] = 1
            os.eventfd_write(self.eventfd, 1)
        return handled

    def rearm(self, runs: Iterable[Sequence[int]]) -> None:
        """Write-protect ``[first_page, count]`` runs again (no wake: nobody waits on a writable page)."""
        self.rearm_flat([value for run in runs for value in run])

    def rearm_flat(self, runs: Sequence[int] | memoryview) -> None:
        """``rearm`` of flat ``[first, count, first, count, ...]`` runs (the message format, or a memoryview of int64
        such as the service thread's numpy runs): every run checked against the region, then protected in one loop
        (C where built; see ``Userfaultfd.protect_page_runs``)."""
        self.uffd.protect_page_runs(self.base, runs, PAGE_SHIFT, self.npages)

    def release_all(self) -> None:
        """Un-protect the whole range and wake anyone blocked on it."""
        self.uffd.writeprotect(self.base, self.npages << PAGE_SHIFT, False)


def populate_write(address: int, length: int) -> bool:
    """``madvise(MADV_POPULATE_WRITE)``: fault the range in writable, as a write would, without writing.
    False if the kernel refused (an old kernel, or the range is gone); the caller's writes fault as usual."""
    try:
        madvise(address, length, MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")  # releases the GIL (ctypes)
    except OSError:
        return False
    return True


class Populator:
    """The writer's side of populate hints (see the module docstring): a thread of the writing process that
    reads ``HINT`` records from a pipe and faults each window in from its end backwards while the writer, woken
    by the un-protect, works through it from the front. Give the helper ``write_fd`` (then close it here); the thread
    ends when the helper's end closes.

    A rearm must not meet a populate: ``MADV_POPULATE_WRITE`` on a page the rearm protected again faults like a
    write, and the handler would record it, invalidating a page nobody wrote (seen under load: a page stale right
    after ``replicate``). So the owner wraps each rearm in ``paused()``: no chunk is populated while the pages are
    re-protected, and every hint from before (queued in the pipe, or read but not yet used) is dropped. Hints from
    faults after the rearm name windows un-protected after it, which are safe to populate."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.write_fd, False)  # the handler must never block on a slow populate thread
        os.set_blocking(self.read_fd, False)  # the thread polls; ``paused()`` drains without blocking
        self.pages = 0  # pages populated (counted for tests and benchmarks)
        self._lock = threading.Lock()  # held for each populated chunk, and by ``paused()`` across a rearm
        self._epoch = 0  # bumped by every ``paused()``: hints read before it are stale
        self._thread = threading.Thread(target=self._run, name="devrep-sync-populate", daemon=True)

    def start(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)  # the helper holds it now: EOF here when the helper exits
            self.write_fd = -1
        self._thread.start()

    def _run(self) -> None:
        pending = b""
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        while True:
            try:
                poller.poll()
                with self._lock:  # not during a rearm, which drains what was written before it ends
                    epoch = self._epoch
                    data = os.read(self.read_fd, 64 * HINT.size)  # non-blocking: ``paused()`` may have drained it
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            data = pending + data
            usable = len(data) - len(data) % HINT.size
            pending = data[usable:]
            for off in range(0, usable, HINT.size):
                first, count = HINT.unpack_from(data, off)
                # From the window's end back toward the writer, a chunk at a time: wherever the two meet, the
                # rest is already writable and costs a page-table walk, so the split follows their speeds.
                end = first + count
                while end > first:
                    start = max(first, end - POPULATE_CHUNK_PAGES)
                    with self._lock:
                        if self._epoch != epoch:  # a rearm came in between: these hints may be stale
                            break
                        if not populate_write(self.base + (start << PAGE_SHIFT), (end - start) << PAGE_SHIFT):
                            break
                    self.pages += end - start
                    end = start
                if self._epoch != epoch:
                    pending = b""  # a partial record read before the rearm belongs to a dropped hint
                    break

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Around a rearm: waits for a chunk being populated (at most one ``POPULATE_CHUNK_PAGES`` madvise), keeps
        the thread from starting another, and drops every hint written before the rearm finished (the helper
        writes a fault's hint before it handles a rearm request, so after the rearm's acknowledgement they are all
        in the pipe)."""
        with self._lock:
            self._epoch += 1
            yield
            with contextlib.suppress(OSError):  # BlockingIOError: drained; EOF: the helper is gone
                while os.read(self.read_fd, 64 * HINT.size):
                    pass

    def close(self, timeout: float = 5.0) -> None:
        """After the helper exited (its end of the pipe closed): wait for the thread, close the pipe."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if not self._thread.is_alive() and self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1


def _serve(sock: socket.socket) -> int:
    msg, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not msg.startswith(OP_INIT) or len(fds) not in (3, 4):
        print("devrep handler: bad init message", file=sys.stderr)
        return 2
    uffd_fd, state_fd, event_fd = fds[:3]
    hints = fds[3] if len(fds) == 4 else None
    base, npages, bare, block_pages, max_window_pages = INIT.unpack_from(msg, 1)
    state = mmap.mmap(state_fd, state_size(npages))
    os.close(state_fd)
    uffd = Userfaultfd(uffd_fd)
    handler = FaultHandler(uffd, base, npages, state, event_fd, bare=bool(bare), block_pages=block_pages,
                           max_window_pages=max_window_pages, hints=hints)
    sock.send(ACK)
    poller = select.poll()
    poller.register(uffd_fd, select.POLLIN)
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        for fd, mask in poller.poll():
            if fd == uffd_fd:
                handler.handle_pending()
                continue
            if mask & (select.POLLHUP | select.POLLERR) and not mask & select.POLLIN:
                handler.release_all()
                return 0
            # Faults first, so a rearm never waits behind a blocked writer it could have released.
            handler.handle_pending()
            msg = sock.recv(MAX_MESSAGE)
            if not msg or msg.startswith(OP_STOP):
                handler.release_all()
                if msg:
                    sock.send(ACK)
                return 0
            if msg.startswith(OP_REARM):
                try:
                    flat = array.array("q", msg[1:])  # little-endian int64 pairs (the owner sends "<i8")
                    if sys.byteorder != "little":
                        flat.byteswap()
                    handler.rearm_flat(flat)
                except (OSError, ValueError) as exc:
                    os.write(2, f"devrep handler: rearm failed: {exc}\n".encode())
                    sock.send(b"E" + str(exc).encode()[:1000])
                    continue
                sock.send(ACK)


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[1]))
    try:
        return _serve(sock)
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
