"""The few libc entry points the kernel layer calls, with errno kept (ctypes ``use_errno``)."""

from __future__ import annotations

import ctypes
import os
import platform


def open_libc() -> ctypes.CDLL:
    """A new handle on the C library (errno kept). The glibc soname first: ``ctypes.util.find_library`` runs
    ``ldconfig -p`` in a subprocess, which costs ``devrep serve`` milliseconds before it serves (bench S1)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc (musl): ask the loader where libc is
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


libc = open_libc()
libc.syscall.restype = ctypes.c_long
libc.ioctl.restype = ctypes.c_int
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.prctl.restype = ctypes.c_int
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.madvise.restype = ctypes.c_int
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

# userfaultfd(2) syscall numbers; glibc 2.36 has no wrapper.
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "arm64": 282, "riscv64": 282, "ppc64le": 364, "s390x": 355}
SYS_USERFAULTFD: int | None = _SYS_USERFAULTFD.get(platform.machine())

PR_SET_PDEATHSIG = 1
MADV_POPULATE_WRITE = 23  # linux/mman.h (Linux 5.14+)


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """``_IOC`` from asm-generic/ioctl.h (x86_64 and aarch64 share it)."""
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def IO(kind: int, nr: int) -> int:
    return _ioc(0, kind, nr, 0)


def IOR(kind: int, nr: int, size: int) -> int:
    return _ioc(2, kind, nr, size)


def IOWR(kind: int, nr: int, size: int) -> int:
    return _ioc(3, kind, nr, size)


def check(result: int, what: str) -> int:
    """Raise ``OSError`` with errno when a libc call returned -1."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


# The same libc function without ``argtypes``, for a loop that passes ready-made ctypes objects (the sync-mode rearm,
# ``Userfaultfd.protect_page_runs``): it skips the per-call argument conversion, about half the cost of a short
# ioctl issued from Python.
_ioctl_prepared = libc["ioctl"]
_ioctl_prepared.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: ctypes.Structure | ctypes.Array[ctypes.c_char] | None, what: str) -> int:
    """``ioctl`` retrying on EINTR; raises ``OSError`` with errno."""
    pointer = ctypes.addressof(arg) if arg is not None else None
    while True:
        result = libc.ioctl(fd, request, pointer)
        if result >= 0:
            return int(result)
        err = ctypes.get_errno()
        if err != 4:  # EINTR
            raise OSError(err, f"{what}: {os.strerror(err)}")


def syscall(number: int, *args: int | None, what: str) -> int:
    """``syscall(2)`` retrying on EINTR; raises ``OSError`` with errno.

    ``syscall`` is variadic, so every argument is passed as a full machine word (``c_long``; ``None`` is NULL):
    a plain Python int would go through ctypes' default ``int`` conversion and lose the upper 32 bits of an address.
    """
    words = [ctypes.c_long(0 if a is None else a) for a in args]
    while True:
        result = libc.syscall(ctypes.c_long(number), *words)
        if result >= 0:
            return int(result)
        err = ctypes.get_errno()
        if err != 4:  # EINTR
            raise OSError(err, f"{what}: {os.strerror(err)}")


def madvise(address: int, length: int, advice: int, what: str) -> None:
    """``madvise(2)`` retrying on EINTR (``MADV_POPULATE_*`` returns it when a signal arrives part-way; what was
    populated stays, so the retry only finishes the rest); raises ``OSError`` with errno. Releases the GIL."""
    while libc.madvise(address, length, advice) < 0:
        err = ctypes.get_errno()
        if err != 4:  # EINTR
            raise OSError(err, f"{what}: {os.strerror(err)}")
