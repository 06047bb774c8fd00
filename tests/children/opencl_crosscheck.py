"""OpenCL hashes from the installed package's kernels against xxhash (test_wheel; copied next to, and run by, the
wheel's virtualenv, outside this checkout).

``python opencl_crosscheck.py``: copies 37 random pages to a portable-platform OpenCL buffer, checks the device
hashes equal xxhash's; prints the kernels directory, then the device description.
"""

from __future__ import annotations

import numpy as np
import xxhash

from devrep.backends import load_backend
from devrep.backends._kernels import kernels_dir
from devrep.backends._staging import aligned_empty


def main() -> None:
    backend = load_backend("opencl", platform="portable")
    npages = 37
    host = aligned_empty(npages * 4096)
    host[:] = np.random.default_rng(7).integers(0, 256, host.size, dtype=np.uint8)
    buf = backend.allocate(0, host.nbytes)
    backend.copy_runs(host, np.array([[0, npages]]), [buf])
    want = [xxhash.xxh64_intdigest(host[p * 4096:(p + 1) * 4096].tobytes()) for p in range(npages)]
    got = backend.hash_pages(buf).tolist()
    assert got == want, (got[:4], want[:4])
    print(kernels_dir())
    print(backend.describe(0))
    backend.close()


if __name__ == "__main__":
    main()
