"""Maps a CPU replica's exported fd in another process (test_engine).

``python readonly_fd.py FD``: maps FD read-only and checks its first and last byte are 42; then tries a writable
shared mapping and prints ``read-only ok`` if that is refused with PermissionError.
"""

from __future__ import annotations

import mmap
import sys


def main(fd: int) -> None:
    m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    assert m[0] == 42 and m[-1] == 42
    try:
        mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except PermissionError:
        print("read-only ok")


if __name__ == "__main__":
    main(int(sys.argv[1]))
