"""Shared setup of the userfaultfd-based modes: which memory they can protect, opening and registering a
userfaultfd, and turning kernel errors into devrep errors that say what to do instead."""

from __future__ import annotations

import errno
import functools
import os
from typing import Any

import numpy as np

from .._pages import PAGE_SIZE
from ..errors import AlignmentError, InvalidArgumentError, UnsupportedModeError
from ..kernel.uffd import Feature, RegisterMode, Userfaultfd
from ..memory import HostMemory, buffer_address

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
                f"tracking={mode!r} needs userfaultfd features {missing!r}, which this kernel "
                f"({os.uname().release}) lacks; use 'explicit'{', file' if mode != 'file' else ''} instead"
            )
        uffd = Userfaultfd()
    except OSError as exc:
        raise UnsupportedModeError(f"tracking={mode!r} is unavailable: {uffd_unavailable_reason(exc)}; "
                                   "use tracking='explicit' (or 'file' for files)") from exc
    try:
        uffd.api((wanted | required) & supported)
    except OSError as exc:
        uffd.close()
        raise UnsupportedModeError(f"tracking={mode!r}: UFFDIO_API failed: {exc}") from exc
    return uffd


def check_host(mode: str, host: HostMemory) -> None:
    """Reject memory whose writers do not write through a mapping of this process."""
    if host.kind == "file":
        raise UnsupportedModeError(
            f"tracking={mode!r} cannot protect a regular file ({host.path}): its writers use write(2) from "
            "other processes, which no page protection here sees; use tracking='file' or 'explicit'"
        )
    if host.kind == "memfd" and not host.array.flags.writeable:
        raise UnsupportedModeError(
            f"tracking={mode!r} on a memory object handed over by another process protects nothing: the "
            f"writer writes through its own mapping. Have the writer set up the userfaultfd "
            f"(prepare_{mode}_client) and use {mode.capitalize()}Tracker.remote(...), or use 'explicit'"
        )


def register_wp(uffd: Userfaultfd, mode: str, address: int, length: int) -> None:
    """Register ``[address, address+length)`` for write-protect tracking and protect all of it."""
    try:
        uffd.register(address, length, RegisterMode.WP)
    except OSError as exc:
        why = {
            errno.EBUSY: "the range is already registered with another userfaultfd",
            errno.EINVAL: "the range is not one mapping of memory userfaultfd can write-protect "
                          "(anonymous or shmem/memfd)",
            errno.ENOMEM: "the range is not fully mapped",
        }.get(exc.errno or 0, str(exc))
        raise UnsupportedModeError(f"tracking={mode!r} cannot register {length} bytes at {address:#x}: {why}; "
                                   "use tracking='explicit'") from exc
    try:
        uffd.writeprotect(address, length, True)
    except OSError as exc:
        uffd.unregister(address, length)
        raise UnsupportedModeError(f"tracking={mode!r}: write-protecting the range failed: {exc}") from exc


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
