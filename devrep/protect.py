"""The writer's side of write tracking: open a userfaultfd, register a range of this process's memory and
write-protect it, turning kernel errors into devrep errors that say what to do instead.

The service does this for memory it maps itself (``devrep.tracking``); a client does it for its own memory and
hands the fds over (``prepare_sync_client`` / ``prepare_async_client``), so this module sits in the host layer:
it imports only the Linux layer, ``devrep.memory`` and the leaves, never the tracking machinery.
"""

from __future__ import annotations

import errno
import functools
import os
from typing import Any

import numpy as np

from ._pages import PAGE_SIZE
from .errors import AlignmentError, InvalidArgumentError, UnsupportedModeError
from .linux.pagemap import PagemapScanner
from .linux.uffd import Feature, RegisterMode, Userfaultfd
from .memory import buffer_address

# Wanted for write-protecting: shmem/memfd pages, and never-touched pages of anonymous memory.
WP_FEATURES = Feature.WP_HUGETLBFS_SHMEM | Feature.WP_UNPOPULATED


def uffd_unavailable_reason(exc: OSError) -> str:
    if exc.errno == errno.EPERM:
        return ("userfaultfd is not permitted: run as root or with CAP_SYS_PTRACE, set "
                "vm.unprivileged_userfaultfd=1, or grant read-write access to /dev/userfaultfd")
    if exc.errno == errno.ENOSYS:
        return "this kernel was built without userfaultfd (CONFIG_USERFAULTFD)"
    return f"userfaultfd failed: {exc}"


@functools.cache
def supported_features() -> Feature:
    """Features this kernel's userfaultfd offers (probed once with a throwaway fd; the API call is once-only)."""
    with Userfaultfd() as probe:
        return probe.api(Feature.NONE)


def open_uffd(mode: str, wanted: Feature, required: Feature = Feature.NONE) -> Userfaultfd:
    """A userfaultfd with the API done; ``UnsupportedModeError`` (with the reason) when it cannot work."""
    try:
        supported = supported_features()
        missing = required & ~supported
        if missing:
            raise UnsupportedModeError(
                f"tracking='{mode}' needs userfaultfd features {missing!r}, which this kernel "
                f"({os.uname().release}) lacks; use 'explicit'{', file' if mode != 'file' else ''} instead"
            )
        uffd = Userfaultfd()
    except OSError as exc:
        raise UnsupportedModeError(f"tracking='{mode}' is unavailable: {uffd_unavailable_reason(exc)}; "
                                   "use tracking='explicit' (or 'file' for files)") from exc
    try:
        uffd.api((wanted | required) & supported)
    except OSError as exc:
        uffd.close()
        raise UnsupportedModeError(f"tracking='{mode}': UFFDIO_API failed: {exc}") from exc
    return uffd


REGISTER_FAILURES = {
    errno.EBUSY: "the range is already registered with another userfaultfd",
    errno.EINVAL: "the range is not all mapped memory a userfaultfd can write-protect (anonymous or shmem/memfd; "
                  "shmem needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM)",
    errno.ENOMEM: "the range is not fully mapped",
    errno.EFAULT: "the range is outside the process's address space",
}
"""Why ``UFFDIO_REGISTER`` refused a range, by errno: the writer (``register_wp``) and the server checking a
client's userfaultfd (``devrep.service.sidechannel``) say it the same way."""


def register_failure(exc: OSError) -> str:
    return REGISTER_FAILURES.get(exc.errno or 0, f"UFFDIO_REGISTER failed ({exc.strerror})")


def register_wp(uffd: Userfaultfd, mode: str, address: int, length: int) -> None:
    """Register ``[address, address+length)`` for write-protect tracking and protect all of it."""
    try:
        uffd.register(address, length, RegisterMode.WP)
    except OSError as exc:
        raise UnsupportedModeError(f"tracking='{mode}' cannot register {length} bytes at {address:#x}: "
                                   f"{register_failure(exc)}; use tracking='explicit'") from exc
    try:
        uffd.writeprotect(address, length, True)
    except OSError as exc:
        uffd.unregister(address, length)
        raise UnsupportedModeError(f"tracking='{mode}': write-protecting the range failed: {exc}") from exc


def address_and_length(target: Any, length: int | None) -> tuple[int, int]:
    """``(address, length)`` of a page-aligned buffer (anything with the buffer protocol) or a raw address."""
    if isinstance(target, int):
        if length is None:
            raise InvalidArgumentError("a raw address needs a length")
        address = target
    else:
        array = np.frombuffer(memoryview(target).cast("B"), dtype=np.uint8)
        address = buffer_address(array)
        length = array.nbytes if length is None else length
    if address % PAGE_SIZE:
        raise AlignmentError(f"address {address:#x} is not page-aligned")
    if length <= 0 or length % PAGE_SIZE:
        raise AlignmentError(f"length must be a positive multiple of the page size ({PAGE_SIZE}), got {length}")
    return address, length
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


def prepare_sync_client(target: Any, length: int | None = None) -> int:
    """In the writing (client) process: a userfaultfd with ``target`` (a page-aligned buffer, or an address
    with ``length``) registered and fully write-protected. Send the fd to the service, then close it here:
    until the service handles faults, a write to the range blocks."""
    address, length = address_and_length(target, length)
    uffd = open_uffd("sync", WP_FEATURES)
    try:
        register_wp(uffd, "sync", address, length)
    except BaseException:
        uffd.close()
        raise
    return uffd.detach()


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
