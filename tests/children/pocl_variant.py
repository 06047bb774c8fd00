"""One prebuilt PoCL bitcode variant, forced in its own process (test_kernels_build).

``DEVREP_POCL_VARIANT=<variant> python pocl_variant.py``: builds the OpenCL program from the bitcode (whether or
not this PoCL could build the source), copies runs of 13 random pages, checks the device hashes against xxhash
(copied pages) and the zero page (the rest) and ``compare`` against zeros; prints the program's source name
(``devrep-<variant>.bc``).
"""

from __future__ import annotations

import numpy as np
import xxhash

from devrep.backends import load_backend
from devrep.backends._opencl import OpenCLBackend
from devrep.backends._staging import aligned_empty


def main() -> None:
    b = load_backend("opencl", platform="portable")
    assert isinstance(b, OpenCLBackend)
    d = b._devices[0]
    # the bitcode path, whether or not this PoCL could build the source
    d.ctx.program, d.ctx.source = b._build_bitcode(d.ctx, d.ctx.context.devices, "opencl:0", "(test)")
    host = aligned_empty(13 * 4096)
    host[:] = np.random.default_rng(2).integers(0, 256, host.size, dtype=np.uint8)
    buf = b.allocate(0, host.nbytes)
    b.copy_runs(host, np.array([[0, 2], [5, 8]]), [buf])
    want = [xxhash.xxh64_intdigest(host[p * 4096:(p + 1) * 4096].tobytes()) if p < 2 or p >= 5
            else xxhash.xxh64_intdigest(bytes(4096)) for p in range(13)]
    assert b.hash_pages(buf).tolist() == want
    assert b.compare(np.array(want, np.uint64), np.zeros(13, np.uint64)).tolist() == list(range(13))
    print(d.ctx.source)


if __name__ == "__main__":
    main()
