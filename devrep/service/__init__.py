"""The devrep gRPC service: one process per host owning a ``Replicator`` (see docs/api.md).

``build_server(address, ...)`` for in-process use (tests), ``run(...)`` for the daemon (``devrep serve``).
"""

from ..wire import default_address, default_socket_path, unix_path
from .server import DevrepServer, TlsFiles, build_server, run
from .sessions import Quota, TokenStore

__all__ = ["DevrepServer", "Quota", "TlsFiles", "TokenStore", "build_server", "default_address",
           "default_socket_path", "run", "unix_path"]
