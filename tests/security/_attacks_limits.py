"""Attacks on the server's limits (issue 10 items 4, 5, 6, 8, 9), run as uid/gid 65534 by ``run_as_attacker``.

Each function returns plain JSON (codes as gRPC status names) so the test asserts on what the attacker saw.
"""

from __future__ import annotations

import grpc


def _code(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return str(exc.code().name)
    return str(getattr(exc, "grpc_code", type(exc).__name__))


# ---------------------------------------------------------------------- metrics (item 9)
def unknown_methods(address: str, count: int) -> dict[str, int]:
    """Call ``count`` made-up method names; the server must answer UNIMPLEMENTED without a series per name."""
    codes: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        for i in range(count):
            call = channel.unary_unary(f"/attack.Nope{i}/M{i}", request_serializer=None, response_deserializer=None)
            try:
                call(b"", timeout=10)
                code = "OK"
            except grpc.RpcError as exc:
                code = _code(exc)
            codes[code] = codes.get(code, 0) + 1
    return codes
