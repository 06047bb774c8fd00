"""Where a servicer's errors become gRPC statuses: the status is the one ``devrep.errors.STATUS_OF`` gives the
error's class (documented in docs/api.md, Status codes); this module only turns its name into a
``grpc.StatusCode`` and aborts the call with it."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from ..errors import DevrepError, status_name
from ..wire import ERROR_CLASS_KEY

log = logging.getLogger("devrep.service")


F = TypeVar("F", bound=Callable[..., Any])


def status_code(exc: BaseException) -> grpc.StatusCode:
    """``devrep.errors.status_name(exc)`` as a ``grpc.StatusCode`` (anything but a devrep error is INTERNAL)."""
    return grpc.StatusCode[status_name(exc)]


def abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    """End the call with ``exc``'s status and message, and its class name in ``devrep-error`` (a devrep error)."""
    code = status_code(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    message = str(exc) or type(exc).__name__
    if not isinstance(exc, DevrepError):
        message = f"internal error in {method}: {type(exc).__name__}: {message}"
    else:
        context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))
    context.abort(code, message)


def unary(fn: F) -> F:
    """Wrap a unary servicer method: devrep errors (and bugs) become a status, never a crash."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:
            if _is_abort(exc, context):
                raise
            abort(context, exc, fn.__name__)

    return wrapper  # type: ignore[return-value]


def streaming(fn: F) -> F:
    """Same for a server-streaming method (a generator)."""

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:
            if _is_abort(exc, context):
                raise
            abort(context, exc, fn.__name__)

    return wrapper  # type: ignore[return-value]


def _is_abort(exc: BaseException, context: grpc.ServicerContext) -> bool:
    # grpcio's abort() raises a bare Exception after recording the status on the context.
    return type(exc) is Exception and context.code() is not None
