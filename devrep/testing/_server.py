"""A real devrep server in this process, for tests: ``serve_in_process`` (and the ``devrep_server`` pytest
fixture in ``devrep.testing.pytest_plugin``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..service import DevrepServer


@contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A fresh directory with a short path (Unix socket paths are limited to 107 bytes, pytest's ``tmp_path`` can
    be longer), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="drt-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def serve_in_process(*, cpu_devices: int = 4, **options: Any) -> Iterator[DevrepServer]:
    """A real devrep server -- gRPC and the fd side channel, built by ``devrep.service.build_server`` -- on a Unix
    socket in a fresh temporary directory, served by threads of this process. Yields the started server:
    ``connect(server.address)`` reaches it; ``server.registry``, ``server.tokens``, ``server.fd_socket_path``
    are there for tests that look inside. Stopped (sessions closed, replicator closed) and the directory removed
    on exit.

    ``options`` go to ``build_server`` (``quota=``, ``tokens=``, ``max_lease_s=``, ...); without ``replicator=``
    the server replicates to ``cpu_devices`` CPU devices. Fast (no process to start), but a writer in this
    process cannot use sync tracking against it: its faults would be handled by a thread of the same process
    (``Client`` then picks explicit tracking for ``"auto"``).
    """
    from ..engine import Replicator
    from ..service import build_server

    with short_tmpdir() as tmp:
        if options.get("replicator") is None:
            options["replicator"] = Replicator(cpu_devices=cpu_devices)
        server = build_server(f"unix:{tmp}/devrep.sock", **options)
        server.start()
        try:
            yield server
        finally:
            server.stop(1.0)
