"""``python -m devrep.kube.probe``: exec liveness/readiness probe over gRPC health checking.

Exits 0 when the service answers SERVING, 1 otherwise (printing why). The address is a socket path,
``unix:PATH``, or ``host:port``; default ``$DEVREP_ADDRESS`` or ``/run/devrep/devrep.sock``.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "/run/devrep/devrep.sock"


def target(address: str) -> str:
    """A grpc target for a path, ``unix:`` URL or ``host:port``."""
    return "unix:" + address if address.startswith("/") else address


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """(serving, human-readable status) of ``service`` at ``address``."""
    try:
        with grpc.insecure_channel(target(address)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as e:
        return False, f"{address}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address} {service or '(server)'}: {status}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devrep.kube.probe", description=__doc__.splitlines()[0])
    p.add_argument("--address", default=os.environ.get("DEVREP_ADDRESS", DEFAULT_ADDRESS))
    p.add_argument("--service", default="", help="health service name ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    ok, message = check(args.address, args.service, args.timeout)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
