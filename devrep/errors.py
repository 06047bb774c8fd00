"""Exception types. Each maps to one documented gRPC status in the service (``grpc_code``); the service also sends
the class name (trailing metadata ``devrep-error``, the side channel's ``class``), so the client raises the same
class the server did (``AlignmentError``, not just ``InvalidArgumentError``)."""

from __future__ import annotations


class DevrepError(Exception):
    """Base class of every error devrep raises on purpose."""

    grpc_code = "INTERNAL"


class InvalidArgumentError(DevrepError, ValueError):
    """A size, offset, alignment, name or option is not acceptable."""

    grpc_code = "INVALID_ARGUMENT"


class AlignmentError(InvalidArgumentError):
    """An address or length is not a multiple of the page (or block) size."""


class NotFoundError(DevrepError, KeyError):
    """An unknown region, replica, device or file."""

    grpc_code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownDeviceError(NotFoundError):
    """A device name that no backend provides (e.g. ``cpu:9`` or ``cuda:0`` without a GPU)."""


class AlreadyExistsError(DevrepError):
    """A region or replica with that name already exists."""

    grpc_code = "ALREADY_EXISTS"


class PermissionDeniedError(DevrepError):
    """The caller may not touch that region."""

    grpc_code = "PERMISSION_DENIED"


class UnauthenticatedError(PermissionDeniedError):
    """No token, or a token the server does not know."""

    grpc_code = "UNAUTHENTICATED"


class ServiceUnavailableError(DevrepError, ConnectionError):
    """The server cannot be reached (not running, wrong address, shutting down)."""

    grpc_code = "UNAVAILABLE"


class ResourceExhaustedError(DevrepError):
    """Device memory, a quota or a replica slot ran out."""

    grpc_code = "RESOURCE_EXHAUSTED"


class FailedPreconditionError(DevrepError):
    """The object is not in a state that allows the call (closed, failed region, ...)."""

    grpc_code = "FAILED_PRECONDITION"


class UnsupportedModeError(FailedPreconditionError):
    """A tracking mode cannot protect this memory or is not available on this kernel."""


class LeaseTimeoutError(DevrepError, TimeoutError):
    """A sync or acquire waited longer than its timeout for readers or writers."""

    grpc_code = "DEADLINE_EXCEEDED"


class DeadlineExceededError(DevrepError, TimeoutError):
    """A call's own gRPC deadline passed before the server answered (a slow or stuck server, a lost connection),
    as opposed to ``LeaseTimeoutError``, which the server raises when a sync or acquire waited too long."""

    grpc_code = "DEADLINE_EXCEEDED"


class BackendError(DevrepError):
    """A device backend failed (kernel build, driver error); the message names the device."""

    grpc_code = "INTERNAL"


class BackendUnavailableError(BackendError, FailedPreconditionError):
    """A backend's optional package or driver is missing on this host (e.g. CuPy for ``cuda:N``): a precondition
    the operator can fix (the message says what to install), not a bug."""

    grpc_code = "FAILED_PRECONDITION"
