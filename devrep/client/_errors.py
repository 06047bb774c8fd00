"""The client's error seam: a gRPC status (``grpc.RpcError``) or a side-channel error reply becomes the most
specific ``DevrepError`` subclass. Only the transports (``devrep.client._transport``, ``devrep.testing.MockTransport``)
call these, so every error a ``Client`` raises was mapped here, once.

The mapping itself is ``devrep.errors``' table (``error_from_status``), shared with the server and the CLI; this
module only reads the status, the class the server named and the message off each transport's reply.
"""

from __future__ import annotations

from typing import Any

import grpc

from .. import errors
from ..wire import ERROR_CLASS_KEY


def _server_error(status: str, class_name: str | None, message: str) -> errors.DevrepError:
    """What the server answered (a gRPC status or a side-channel ``code``, the class it named, its message) as the
    exception to raise; ``status`` on it is the ``grpc.StatusCode`` the server sent, on both transports."""
    err = errors.error_from_status(status, class_name, message)
    err.status = grpc.StatusCode.__members__.get(status, grpc.StatusCode.UNKNOWN)  # type: ignore[attr-defined]
    return err


NO_SERVER_HINT = ("start one with `devrep serve` (as root: `sudo devrep serve`), or point DEVREP_ADDRESS (or "
                  "--address) at the running server's socket")


def _translate(exc: grpc.RpcError) -> errors.DevrepError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    class_name = next((str(v) for k, v in trailing or () if k == ERROR_CLASS_KEY), None)
    status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    message = exc.details() if hasattr(exc, "details") else str(exc)
    if class_name is None and status == "DEADLINE_EXCEEDED":  # DeadlineExceededError: the call's own deadline
        message = f"the devrep server did not answer within the call's deadline ({message})"
    elif class_name is None and status == "UNAVAILABLE":  # nobody answered at the address
        message = f"{message}; {NO_SERVER_HINT}"
    return _server_error(status, class_name, message)


def side_error(reply: dict[str, Any]) -> errors.DevrepError:
    """The exception for a side-channel error reply ``{"ok": false, "code": ..., "class": ..., "error": ...}``."""
    return _server_error(str(reply.get("code")), str(reply.get("class") or ""), str(reply.get("error")))
