"""Probes run as uid 65534 (``nobody``) against a root-owned install (test_field_nonroot).

``python nonroot_probe.py premise``: prints the uid, whether the package's ``__pycache__`` is usable as a numba
cache and whether the user cache directory is.
``python nonroot_probe.py hash``: prints the xxh64 (through the numba kernel) of page 2 of three 0..255 pages.
``python nonroot_probe.py hash-uncached``: prints whether numba caching is on, then the hash of a zero page.

Each imports only what its probe needs (inside it), as the one-line programs it replaces did.
"""

from __future__ import annotations

import sys


def premise() -> None:
    import os
    import pathlib

    import devrep._numba_cache as c

    p = pathlib.Path(c.__file__).parent / "__pycache__"
    print(os.getuid(), c._usable(p), c._usable(c._user_cache_dir()))


def hash_page() -> None:
    import numpy as np

    from devrep.hashing import hash_pages

    print(int(hash_pages(np.tile(np.arange(4096, dtype=np.uint8), 3))[2]))


def hash_uncached() -> None:
    import numpy as np

    import devrep._numba_cache as c
    from devrep.hashing import hash_pages

    print(c.NUMBA_CACHE, int(hash_pages(np.zeros(4096, np.uint8))[0]))


if __name__ == "__main__":
    {"premise": premise, "hash": hash_page, "hash-uncached": hash_uncached}[sys.argv[1]]()
