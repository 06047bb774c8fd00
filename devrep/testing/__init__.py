"""Test doubles for the parts of devrep that need hardware this machine may not have.

``devrep.testing.fake_cuda`` fakes the slice of the CuPy API and of the CUDA driver's VMM calls that the CUDA
backend and client use, with host memory standing in for GPU memory and every stream / event / synchronize
call recorded. The backend and client take these by injection (``load_backend("cuda", cupy_module=...,
vmm=...)``), so their host-side logic (ordering, error mapping, cleanup) is tested without a GPU. They are
not a GPU simulator: kernels run as numpy code at launch, and streams run nothing asynchronously.

For the client and the service:

- ``MockTransport`` (with ``MockRequest``, ``MockRpcError``): a ``Client`` whose requests a function answers, to
  test the client without a server (``Client(address, transport=MockTransport(handler))``);
- ``serve_in_process(**build_server_options)``: a real server (gRPC + fd side channel) in this process on a
  temporary Unix socket; ``devrep.testing.pytest_plugin`` wraps it as the ``devrep_server`` and
  ``devrep_client`` fixtures.

Importing this package is cheap: each of these loads its module (and grpc, numpy, the server) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from ._server import serve_in_process, short_tmpdir

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from ._mock import MockRequest, MockRpcError, MockTransport

_LAZY = {"MockTransport": "._mock", "MockRequest": "._mock", "MockRpcError": "._mock"}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


def random_host(npages: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    """``npages`` pages of seeded random bytes in page-aligned memory (what a backend's ``copy_runs`` takes)."""
    import numpy as np

    from .._pages import PAGE_SIZE
    from ..backends._staging import aligned_empty

    host = aligned_empty(npages * PAGE_SIZE)
    host[:] = np.random.default_rng(seed).integers(0, 256, host.size, dtype=np.uint8)
    return host


__all__ = ["MockRequest", "MockRpcError", "MockTransport", "random_host", "serve_in_process", "short_tmpdir"]
