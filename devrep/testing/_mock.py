"""``MockTransport``: a ``Client`` that talks to a function instead of a server (after httpx's ``MockTransport``).

Test the client's own logic -- request building, error mapping, lease construction, timeouts -- without a server::

    from devrep.client import Client
    from devrep.testing import MockRpcError, MockTransport
    from devrep.wire._gen import devrep_pb2 as pb

    def handler(request):
        if request.method == "Ping":
            return pb.PingResponse(session_id="s1")
        raise MockRpcError("NOT_FOUND", f"no region {request.message.name!r}", error_class="NotFoundError")

    client = Client("unix:/nowhere.sock", token="t", transport=MockTransport(handler))

Failures travel the same seam as a real server's: ``MockRpcError`` (a ``grpc.RpcError``) and side-channel error
replies are mapped by the code ``GrpcTransport`` and ``SideChannelTransport`` use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import grpc

from ..client._errors import _translate
from ..client._transport import NO_SIDE_CHANNEL, Metadata, Reply, Stream, Transport, check_side_reply
from ..errors import FailedPreconditionError
from ..wire import ERROR_CLASS_KEY


@dataclass(frozen=True)
class MockRequest:
    """One request as the handler sees it."""

    kind: Literal["unary", "stream", "side"]
    method: str
    """The RPC's name (``"Acquire"``), or the side-channel ``op`` (``"put_fds"``)."""
    message: Any
    """The request protobuf, or the side-channel dict."""
    timeout: float | None
    metadata: Metadata = ()
    fds: tuple[int, ...] = ()
    """The fds sent with a side-channel request (valid during the handler call only: the client closes them)."""


Handler = Callable[[MockRequest], Any]


class MockRpcError(grpc.RpcError):
    """A failed gRPC call as a server reports it: a status name, details and (optionally) the devrep class name
    the server adds as ``devrep-error`` trailing metadata. Raise it from a handler."""

    def __init__(self, code: str | grpc.StatusCode, details: str = "", *, error_class: str | None = None) -> None:
        super().__init__(details)
        self._code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode[code]
        self._details = details
        self._trailing: Metadata = ((ERROR_CLASS_KEY, error_class),) if error_class else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Metadata:
        return self._trailing


class _MockStream(Stream):
    def __init__(self, produce: Callable[[], Iterable[Any]], ends: Collection[str]) -> None:
        self._ends = frozenset(ends)
        self._cancelled = threading.Event()
        self._error: grpc.RpcError | None = None
        self._messages: Iterable[Any] = ()
        try:  # like a real call, a refusal surfaces in wait_ready() or the iteration, not when starting it
            self._messages = produce()
        except grpc.RpcError as exc:
            self._error = exc

    def _raise(self, exc: grpc.RpcError) -> NoReturn:
        raise _translate(exc) from None

    def __iter__(self) -> Iterator[Any]:
        if self._error is not None:
            if self._error.code().name in self._ends:
                return
            self._raise(self._error)
        try:
            for message in self._messages:
                if self._cancelled.is_set():
                    return
                yield message
        except grpc.RpcError as exc:
            if exc.code().name in self._ends:
                return
            self._raise(exc)

    def wait_ready(self) -> None:
        if self._error is not None:
            self._raise(self._error)

    def cancel(self) -> None:
        self._cancelled.set()


class MockTransport(Transport):
    """A ``Transport`` that answers every request with ``handler(MockRequest)``.

    What the handler returns: for a unary call, the response message (or a ``Reply`` to add trailing metadata);
    for a stream, an iterable of messages (a generator may raise ``MockRpcError`` midway); for a side-channel
    request (only with ``side_channel=True``), the reply dict (``{"ok": true, ...}``, or an error reply
    ``{"ok": false, "code": ..., "class": ..., "error": ...}``) or ``(reply, fds)``, whose fds pass to the client.
    A handler fails a gRPC call by raising ``MockRpcError``. ``requests`` records every request, in order.
    """

    def __init__(self, handler: Handler, *, side_channel: bool = False) -> None:
        self.handler = handler
        self.side_channel = side_channel
        self.requests: list[MockRequest] = []
        self.closed = False

    def _handle(self, request: MockRequest) -> Any:
        self.requests.append(request)
        return self.handler(request)

    def unary(self, method: str, request: Any, *, timeout: float, metadata: Metadata) -> Reply:
        try:
            answer = self._handle(MockRequest("unary", method, request, timeout, tuple(metadata)))
        except grpc.RpcError as exc:
            raise _translate(exc) from None
        return answer if isinstance(answer, Reply) else Reply(answer)

    def stream(self, method: str, request: Any, *, timeout: float | None, metadata: Metadata,
               ends: Collection[str] = ()) -> Stream:
        return _MockStream(lambda: self._handle(MockRequest("stream", method, request, timeout, tuple(metadata))),
                           ends)

    def call(self, message: dict[str, Any], fds: Sequence[int] = (), *, timeout: float | None = None
             ) -> tuple[dict[str, Any], list[int]]:
        if not self.side_channel:  # as GrpcTransport: a client without one (TCP) hears this
            raise FailedPreconditionError(NO_SIDE_CHANNEL)
        answer = self._handle(MockRequest("side", str(message.get("op")), message, timeout, (), tuple(fds)))
        reply, got = answer if isinstance(answer, tuple) else (answer, [])
        return check_side_reply(reply, list(got)), list(got)

    def close(self) -> None:
        self.closed = True
