"""The client's error seam: a gRPC status (``grpc.RpcError``) or a side-channel error reply becomes the most
specific ``DevrepError`` subclass. Only the transports (``devrep.client._transport``, ``devrep.testing.MockTransport``)
call these, so every error a ``Client`` raises was mapped here, once.

(Moved unchanged out of ``_client.py``: the transports need them and ``_client`` imports the transports, so they
cannot live there without an import cycle.)
"""

from __future__ import annotations

from typing import Any

import grpc

from .. import errors
from ..errors import ServiceUnavailableError, UnauthenticatedError
from ..wire import ERROR_CLASS_KEY

_ERRORS: dict[grpc.StatusCode, type[errors.DevrepError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.LeaseTimeoutError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
}
_BY_NAME: dict[str, type[errors.DevrepError]] = {code.name: cls for code, cls in _ERRORS.items()}


def _error_classes() -> dict[str, type[errors.DevrepError]]:
    """Every class the server may name in ``devrep-error`` / the side channel's ``class``."""
    found = {value.__name__: value for value in vars(errors).values()
             if isinstance(value, type) and issubclass(value, errors.DevrepError)}
    for cls in (UnauthenticatedError, ServiceUnavailableError):
        found[cls.__name__] = cls
    return found


_CLASSES = _error_classes()


def error_class(code_name: str, class_name: str | None) -> type[errors.DevrepError]:
    """The most specific class for a status: the class the server named when it belongs to that status, else the
    status's class. A DEADLINE_EXCEEDED the server did not name is the call's own gRPC deadline (transport), not a
    lease timeout."""
    named = _CLASSES.get(class_name or "")
    if named is not None and named.grpc_code == code_name:
        return named
    if code_name == "DEADLINE_EXCEEDED":
        return errors.DeadlineExceededError
    return _BY_NAME.get(code_name, errors.DevrepError)


NO_SERVER_HINT = ("start one with `devrep serve` (as root: `sudo devrep serve`), or point DEVREP_ADDRESS (or "
                  "--address) at the running server's socket")


def _translate(exc: grpc.RpcError) -> errors.DevrepError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    class_name = next((str(v) for k, v in trailing or () if k == ERROR_CLASS_KEY), None)
    cls = error_class(code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN", class_name)
    message = exc.details() if hasattr(exc, "details") else str(exc)
    if cls is errors.DeadlineExceededError and class_name is None:
        message = f"the devrep server did not answer within the call's deadline ({message})"
    elif cls is ServiceUnavailableError and class_name is None:  # nobody answered at the address
        message = f"{message}; {NO_SERVER_HINT}"
    err = cls(message)
    err.status = code  # type: ignore[attr-defined]
    return err


def side_error(reply: dict[str, Any]) -> errors.DevrepError:
    """The exception for a side-channel error reply ``{"ok": false, "code": ..., "class": ..., "error": ...}``."""
    cls = error_class(str(reply.get("code")), str(reply.get("class") or ""))
    return cls(str(reply.get("error")))
