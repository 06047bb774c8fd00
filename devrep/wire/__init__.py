"""What the server and its clients share on the wire, and nothing else: the generated gRPC stubs
(``devrep.wire._gen``, from ``protos/devrep/v1/devrep.proto``), the fd side channel's packet format
(:mod:`devrep.wire.sidechannel`), the metadata keys both sides read, and how an address names a socket.

Layer rule (see ``devrep/__init__.py``): this package imports only the standard library, grpc/protobuf and
``devrep.errors``. ``devrep.service`` and ``devrep.client`` both build on it and never on each other.
"""

from __future__ import annotations

import os
from pathlib import Path

ERROR_CLASS_KEY = "devrep-error"
"""Trailing metadata key carrying the devrep error class name (e.g. ``AlignmentError``): the status code alone
cannot tell a subclass from its base, so the client maps the name back (docs/api.md, status codes)."""

HOLDER_KEY = "x-devrep-holder"
"""Metadata naming the client process (connection) that holds gRPC-acquired leases (the server's ``holder_of``)."""

HOLDER_TTL_KEY = "x-devrep-holder-ttl-ms"
"""Trailing metadata of ``Acquire``: how long a silent holder keeps its leases (``devrep serve --holder-timeout-s``)."""


def default_socket_path() -> Path:
    """``/run/devrep/devrep.sock`` as root, else ``$XDG_RUNTIME_DIR/devrep/devrep.sock`` (or /tmp/devrep-<uid>)."""
    if os.geteuid() == 0:
        return Path("/run/devrep/devrep.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "devrep" if runtime else Path(f"/tmp/devrep-{os.geteuid()}")
    return base / "devrep.sock"


def default_address() -> str:
    """``DEVREP_ADDRESS`` or the default Unix socket."""
    return os.environ.get("DEVREP_ADDRESS") or f"unix:{default_socket_path()}"


def unix_path(address: str) -> Path | None:
    """The socket path of a ``unix:`` address (or a bare path), else ``None`` (TCP)."""
    if address.startswith("unix://"):
        return Path(address[len("unix://"):])
    if address.startswith("unix:"):
        return Path(address[len("unix:"):])
    if address.startswith("/") or address.startswith("."):
        return Path(address)
    return None


__all__ = ["ERROR_CLASS_KEY", "HOLDER_KEY", "HOLDER_TTL_KEY", "default_address", "default_socket_path", "unix_path"]
