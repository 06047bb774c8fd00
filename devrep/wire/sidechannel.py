"""The fd side channel's wire format, shared by the server and the client.

A ``SOCK_SEQPACKET`` Unix socket beside the gRPC socket. Each packet is one UTF-8 JSON object of at most
``MAX_MESSAGE`` bytes, optionally carrying file descriptors (``SCM_RIGHTS``, at most ``MAX_FDS``).
Requests have an ``op``; replies are ``{"ok": true, ...}`` or ``{"ok": false, "code": <grpc status name>,
"error": <message>}``. SEQPACKET keeps message boundaries, so a truncated or oversized packet is detected
(``MSG_TRUNC``/``MSG_CTRUNC``) instead of desynchronising the stream.

Ops (see docs/api.md): ``hello`` (first; returns the session token), ``put_fds`` (hand over fds, returns a
ticket that ``RegisterRegion`` names), ``lease_fd`` (the memfd of a CPU replica you hold a lease on), ``bye``.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..errors import DevrepError, ProtocolError, status_name

MAX_MESSAGE = 64 * 1024
MAX_FDS = 4
# Plain ints: ``int & socket.MSG_CTRUNC`` goes through IntFlag's operators and builds an enum member, a few us
# per packet on the hot acquire/release path (bench S2).
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_TRUNC = int(socket.MSG_TRUNC)
# Built once: ``json.dumps`` with any non-default option builds a new encoder per call, and ``json.loads`` of
# bytes sniffs the encoding in Python first (the wire is UTF-8).
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()
# Room for MAX_FDS descriptors in one SCM_RIGHTS message, computed once (``socket.recv_fds`` recomputes it and
# builds an array per packet).
_FD_BYTES = array.array("i").itemsize
_ANCILLARY_SPACE = socket.CMSG_LEN(MAX_FDS * _FD_BYTES)

OK: dict[str, Any] = {"ok": True}
"""The plain success reply (a release, a bye). ``send`` writes it from prebuilt bytes; never mutate it."""
_OK_BYTES = _ENCODER.encode(OK).encode()


def side_channel_path(grpc_socket: str | os.PathLike[str]) -> Path:
    """``/run/devrep/devrep.sock`` -> ``/run/devrep/devrep.fd.sock``."""
    path = Path(grpc_socket)
    return path.with_name(f"{path.stem}.fd.sock" if path.suffix == ".sock" else f"{path.name}.fd.sock")


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    if message is OK and not fds:
        sock.sendall(_OK_BYTES)
        return
    data = _ENCODER.encode(message).encode()
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"side-channel message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One packet: ``(message, fds)``; ``(None, [])`` at end of stream.

    The caller owns the returned fds, even when this raises ``ProtocolError`` it has closed them.
    """
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE + 1, _ANCILLARY_SPACE)
    fds = _fds_of(ancillary) if ancillary else []
    if not data and not fds:
        return None, []
    try:
        if flags & _MSG_CTRUNC:
            raise ProtocolError(f"too many file descriptors in one message (at most {MAX_FDS})")
        if flags & _MSG_TRUNC or len(data) > MAX_MESSAGE:
            raise ProtocolError(f"side-channel message larger than {MAX_MESSAGE} bytes")
        try:
            message = _DECODER.decode(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"side-channel message is not JSON: {exc}") from None
        except RecursionError:  # [[[[...]]]]: 64 KiB nest far deeper than the parser's recursion limit
            raise ProtocolError("side-channel message nests too deeply") from None
        if not isinstance(message, dict):
            raise ProtocolError("side-channel message must be a JSON object")
    except BaseException:
        close_fds(fds)
        raise
    return message, fds


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of the ``SCM_RIGHTS`` messages in ``ancillary`` (as ``socket.recv_fds`` parses them)."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % _FD_BYTES])
    return list(fds)


def error_reply(exc: BaseException) -> dict[str, Any]:
    """The reply for a failed op: the status ``devrep.errors.STATUS_OF`` gives ``exc`` and, for a devrep error, its
    class name (so the client raises exactly this class: ``devrep.errors.error_from_status``)."""
    reply: dict[str, Any] = {"ok": False, "code": status_name(exc), "error": str(exc) or type(exc).__name__}
    if isinstance(exc, DevrepError):
        reply["class"] = type(exc).__name__
    return reply
