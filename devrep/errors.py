"""Exception types, and the one table that maps each of them to a gRPC status.

Import rule: this module is a leaf. It imports only the standard library -- never ``grpc``, ``numpy`` or another
devrep module -- so every layer can raise from it (the sync-mode fault helper process included) and loading it
costs nothing. Statuses are therefore status *names* (``"NOT_FOUND"``), the spelling of ``grpc.StatusCode``
members and of the side channel's ``code`` field.

``STATUS_OF`` (below the classes) is the only place where an error meets a status; everything else derives from it
(the idea of httpcore's ``_exceptions.py``: errors are mapped at one seam, from one table):

* the server: ``devrep.service.status.abort`` ends a gRPC call (a servicer method's error, or the token
  interceptor's refusal) with ``status_name(exc)``, and ``wire.sidechannel.error_reply`` sends it as ``code``; both
  also send the class name (trailing metadata ``devrep-error``, the side channel's ``class``);
* the client: ``error_from_status(status, class_name, message)`` raises that very class when it is a devrep class of
  that status (``AlignmentError``, not just ``InvalidArgumentError``), else the status's default class;
* the CLI: ``devrep.cli.EXIT_CODES`` maps status names to exit codes.

The statuses and what provokes them are documented in docs/api.md (Status codes).
"""

from __future__ import annotations


class _StatusName:
    """``cls.grpc_code`` / ``exc.grpc_code``: the status name ``STATUS_OF`` gives the class (read-only, derived)."""

    def __get__(self, obj: object, owner: type[BaseException]) -> str:  # owner: the class, also for instance access
        return status_name(owner)


class DevrepError(Exception):
    """Base class of every error devrep raises on purpose."""

    grpc_code = _StatusName()


class InvalidArgumentError(DevrepError, ValueError):
    """A size, offset, alignment, name or option is not acceptable."""


class AlignmentError(InvalidArgumentError):
    """An address or length is not a multiple of the page (or block) size."""


class NotFoundError(DevrepError, KeyError):
    """An unknown region, replica, device or file."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownDeviceError(NotFoundError):
    """A device name that no backend provides (e.g. ``cpu:9`` or ``cuda:0`` without a GPU)."""


class AlreadyExistsError(DevrepError):
    """A region or replica with that name already exists."""


class PermissionDeniedError(DevrepError):
    """The caller may not touch that region."""


class UnauthenticatedError(PermissionDeniedError):
    """No token, or a token the server does not know."""


class ServiceUnavailableError(DevrepError, ConnectionError):
    """The server cannot be reached (not running, wrong address, shutting down)."""


class ResourceExhaustedError(DevrepError):
    """Device memory, a quota or a replica slot ran out."""


class FailedPreconditionError(DevrepError):
    """The object is not in a state that allows the call (closed, failed region, ...)."""


class UnsupportedModeError(FailedPreconditionError):
    """A tracking mode cannot protect this memory or is not available on this kernel."""


class LeaseTimeoutError(DevrepError, TimeoutError):
    """A sync or acquire waited longer than its timeout for readers or writers."""


class DeadlineExceededError(DevrepError, TimeoutError):
    """A call's own gRPC deadline passed before the server answered (a slow or stuck server, a lost connection),
    as opposed to ``LeaseTimeoutError``, which the server raises when a sync or acquire waited too long."""


class ProtocolError(InvalidArgumentError):
    """A malformed side-channel packet (not JSON, too large, too many fds; see ``devrep.wire.sidechannel``)."""


class SocketInUseError(DevrepError):
    """Another live server answers on the socket path, or the path cannot be judged safe to replace (``devrep
    serve`` exits 1; raised by ``devrep.service.sockets``)."""


class BackendError(DevrepError):
    """A device backend failed (kernel build, driver error); the message names the device."""


class BackendUnavailableError(BackendError, FailedPreconditionError):
    """A backend's optional package or driver is missing on this host (e.g. CuPy for ``cuda:N``): a precondition
    the operator can fix (the message says what to install), not a bug."""


STATUS_OF: dict[type[DevrepError], str] = {
    # For each status, the FIRST class listed is its default: the class the client raises when the server names
    # no class, or one it does not know, with that status.
    DevrepError: "INTERNAL",                      # a bug; the server logs it
    BackendError: "INTERNAL",
    SocketInUseError: "INTERNAL",                 # `devrep serve` cannot start: exit 1, never sent to a client
    InvalidArgumentError: "INVALID_ARGUMENT",
    AlignmentError: "INVALID_ARGUMENT",
    ProtocolError: "INVALID_ARGUMENT",
    NotFoundError: "NOT_FOUND",
    UnknownDeviceError: "NOT_FOUND",
    AlreadyExistsError: "ALREADY_EXISTS",
    PermissionDeniedError: "PERMISSION_DENIED",
    UnauthenticatedError: "UNAUTHENTICATED",      # a PermissionDeniedError, with its own status
    ResourceExhaustedError: "RESOURCE_EXHAUSTED",
    FailedPreconditionError: "FAILED_PRECONDITION",
    UnsupportedModeError: "FAILED_PRECONDITION",
    BackendUnavailableError: "FAILED_PRECONDITION",  # a BackendError the operator can fix: not INTERNAL
    # A DEADLINE_EXCEEDED the server did not name is the call's own gRPC deadline (the transport gave up), so the
    # default is DeadlineExceededError; the server names LeaseTimeoutError when a sync or acquire waited too long.
    DeadlineExceededError: "DEADLINE_EXCEEDED",
    LeaseTimeoutError: "DEADLINE_EXCEEDED",
    ServiceUnavailableError: "UNAVAILABLE",
}
"""Every devrep error class -> its gRPC status name (documented in docs/api.md, Status codes)."""

DEFAULT_CLASS: dict[str, type[DevrepError]] = {}
"""Status name -> the class raised for it when the server names none: the first of that status in ``STATUS_OF``."""
for _cls, _status in STATUS_OF.items():
    DEFAULT_CLASS.setdefault(_status, _cls)
del _cls, _status

_BY_NAME: dict[str, type[DevrepError]] = {cls.__name__: cls for cls in STATUS_OF}


def status_name(error: BaseException | type[BaseException]) -> str:
    """The gRPC status name of an error (or error class): that of the nearest class in its MRO that ``STATUS_OF``
    lists (so a subclass defined elsewhere, say in a user's code, gets its base's status);
    ``INTERNAL`` for anything that is not a devrep error (a bug)."""
    cls = error if isinstance(error, type) else type(error)
    for base in cls.__mro__:
        status = STATUS_OF.get(base)
        if status is not None:
            return status
    return "INTERNAL"


def error_class(status: str, class_name: str | None = None) -> type[DevrepError]:
    """The most specific class for a status the server sent: the class it named (``devrep-error`` / ``class``) when
    that is a devrep class of this status, else the status's default class (``DEFAULT_CLASS``), else
    ``DevrepError`` (a status devrep does not document, e.g. ``UNKNOWN``)."""
    named = _BY_NAME.get(class_name or "")
    if named is not None and STATUS_OF[named] == status:
        return named
    return DEFAULT_CLASS.get(status, DevrepError)


def error_from_status(status: str, class_name: str | None, message: str) -> DevrepError:
    """The inverse of ``status_name``: the exception the client raises for ``status`` + ``class_name``."""
    return error_class(status, class_name)(message)
