"""NUMA memory-policy syscalls through ctypes: ``mbind``, ``get_mempolicy``, ``move_pages`` (query mode) and
``getcpu``. glibc wraps none of the first three (libnuma does, but it is one more native dependency for four
calls); constants from linux/mempolicy.h. Errors surface as ``OSError`` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from .._pages import PAGE_SIZE
from ._libc import libc, syscall

# Syscall numbers: x86_64 from asm/unistd_64.h; aarch64 and riscv64 share asm-generic/unistd.h.
_GENERIC = {"mbind": 235, "get_mempolicy": 236, "move_pages": 239, "getcpu": 168}
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"mbind": 237, "get_mempolicy": 239, "move_pages": 279, "getcpu": 309},
    "aarch64": _GENERIC, "arm64": _GENERIC, "riscv64": _GENERIC,
}
SYSCALLS: dict[str, int] | None = _SYSCALLS.get(platform.machine())

# Policy modes (enum mempolicy_mode) and flags.
MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL = 0, 1, 2, 3, 4
MPOL_F_NODE, MPOL_F_ADDR = 1 << 0, 1 << 1  # get_mempolicy flags
MPOL_MF_STRICT, MPOL_MF_MOVE = 1 << 0, 1 << 1  # mbind flags

# Node masks cover this many node ids: the kernel's MAX_NUMNODES is at most 1024 (CONFIG_NODES_SHIFT=10).
MASK_BITS = 1024
_ULONG_BITS = 8 * ctypes.sizeof(ctypes.c_ulong)
_MASK_LONGS = MASK_BITS // _ULONG_BITS
_MOVE_PAGES_BATCH = 1 << 16  # pages per move_pages call: bounds the pointer and status arrays


def _number(name: str) -> int:
    if SYSCALLS is None:
        raise OSError(38, f"{name}: no syscall number known for {platform.machine()} (devrep knows "
                          f"{', '.join(_SYSCALLS)})")  # ENOSYS
    return SYSCALLS[name]


def _mask(nodes: Iterable[int]) -> ctypes.Array[ctypes.c_ulong]:
    mask = (ctypes.c_ulong * _MASK_LONGS)()
    for node in nodes:
        if not 0 <= node < MASK_BITS:
            raise ValueError(f"NUMA node {node} is outside [0, {MASK_BITS})")
        mask[node // _ULONG_BITS] |= 1 << (node % _ULONG_BITS)
    return mask


def _nodes_of(mask: ctypes.Array[ctypes.c_ulong]) -> list[int]:
    return [i * _ULONG_BITS + b for i, word in enumerate(mask) for b in range(_ULONG_BITS) if word >> b & 1]


def mbind(address: int, length: int, mode: int, nodes: Iterable[int], flags: int = 0) -> None:
    """Set the memory policy of ``[address, address + length)`` (page-aligned). On a shared mapping of a memfd the
    policy is the file's (a shared policy): it governs every later allocation of those file pages, by any mapping,
    ``fallocate`` included."""
    mask = _mask(nodes)
    # The kernel reads maxnode - 1 bits (get_nodes() decrements it; libnuma passes size + 1 for the same reason).
    syscall(_number("mbind"), address, length, mode, ctypes.addressof(mask), MASK_BITS + 1, flags, what="mbind")


def get_mempolicy(address: int) -> tuple[int, list[int]]:
    """The policy mode and node list governing the page at ``address`` (``MPOL_F_ADDR``)."""
    mode = ctypes.c_int(0)
    mask = (ctypes.c_ulong * _MASK_LONGS)()
    syscall(_number("get_mempolicy"), ctypes.addressof(mode), ctypes.addressof(mask), MASK_BITS, address,
            MPOL_F_ADDR, what="get_mempolicy")
    return mode.value, _nodes_of(mask)


def page_nodes(address: int, npages: int) -> npt.NDArray[np.int32]:
    """``move_pages(2)`` in query mode (``nodes = NULL``) for ``npages`` pages from ``address``: per page, the node
    holding it, or a negative errno (``-ENOENT``: not mapped in this process, ``-EFAULT``: no mapping there)."""
    status = np.empty(npages, dtype=np.int32)
    for first in range(0, npages, _MOVE_PAGES_BATCH):
        count = min(_MOVE_PAGES_BATCH, npages - first)
        pages = np.uint64(address) + np.arange(first, first + count, dtype=np.uint64) * np.uint64(PAGE_SIZE)
        out = status[first:first + count]
        syscall(_number("move_pages"), 0, count, pages.ctypes.data, None, out.ctypes.data, 0, what="move_pages")
    return status


def getcpu() -> tuple[int, int]:
    """``(cpu, node)`` the calling thread runs on right now (glibc's vDSO-backed wrapper where it has one)."""
    cpu, node = ctypes.c_uint(0), ctypes.c_uint(0)
    if hasattr(libc, "getcpu"):  # glibc 2.29+
        while libc.getcpu(ctypes.byref(cpu), ctypes.byref(node)) < 0:
            err = ctypes.get_errno()
            if err != 4:
                raise OSError(err, f"getcpu: {os.strerror(err)}")
    else:
        syscall(_number("getcpu"), ctypes.addressof(cpu), ctypes.addressof(node), None, what="getcpu")
    return cpu.value, node.value
