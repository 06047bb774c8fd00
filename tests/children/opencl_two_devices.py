"""OpenCL fan-out across two devices of one context (test_backend_conformance).

``POCL_DEVICES="pthread pthread" python opencl_two_devices.py``: with and without zero-copy, replicates a random
64-page region to opencl:0 and opencl:1, invalidates 6 pages, syncs (6 pages read from the host once), checks
both replicas equal the host and verify finds no mismatch, then that unregistering frees both devices' buffers;
prints ``ok``.
"""

from __future__ import annotations

import numpy as np

from devrep import Replicator
from devrep._pages import PAGE_SIZE
from devrep.backends import load_backend


def main() -> None:
    for zero_copy in (True, False):
        backend = load_backend("opencl", zero_copy=zero_copy, batch_bytes=16 * PAGE_SIZE)
        assert backend.device_count() == 2, backend.device_count()
        with Replicator(backends={"opencl": backend}) as rep:
            region = rep.create_region("two", 64 * PAGE_SIZE)
            region.array[:] = np.random.default_rng(1).integers(0, 256, region.nbytes, dtype=np.uint8)
            rep.replicate("two", ["opencl:0", "opencl:1"])
            region.array[3 * PAGE_SIZE:9 * PAGE_SIZE] = 9
            region.invalidate(3 * PAGE_SIZE, 6 * PAGE_SIZE)
            assert rep.sync("two")[0].host_bytes_read == 6 * PAGE_SIZE
            for device in ("opencl:0", "opencl:1"):
                with region.acquire(device) as lease:
                    assert np.array_equal(lease.read(), region.array), device
            assert all(r.mismatched_pages == 0 for r in region.verify())
            rep.unregister("two")
            assert backend.bytes_in_use(0) == backend.bytes_in_use(1) == 0
    print("ok")


if __name__ == "__main__":
    main()
