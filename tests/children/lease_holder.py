"""A client that holds leases of the shared region ``t`` until it is killed (test_lease_lifetime).

``python lease_holder.py ADDRESS grpc-only TOKEN``: a gRPC-only client (no side channel) acquires cpu:0 of ``t``
and prints ``held <lease id>``; after a stdin line it takes a second lease and prints ``held <lease id>`` again,
then waits on stdin (killed there).

``python lease_holder.py ADDRESS joined TOKEN``: joins the token's pre-authorized session over the side channel,
acquires cpu:0 of ``t``, prints ``held <lease id>`` and waits on stdin (killed there).
"""

from __future__ import annotations

import sys

from devrep.client import Client, connect


def grpc_only(address: str, token: str) -> None:
    client = Client(address, token=token, fd_socket="/nonexistent/devrep.fd.sock")  # gRPC only: no side channel
    assert client._sc is None
    leases = [client.acquire("t", "cpu:0", fresh=False)]
    print("held", leases[0].lease_id, flush=True)
    sys.stdin.readline()
    leases.append(client.acquire("t", "cpu:0", fresh=False))
    print("held", leases[1].lease_id, flush=True)
    sys.stdin.readline()  # killed here


def joined(address: str, token: str) -> None:
    client = connect(address, token=token)  # joins the pre-authorized session over the side channel
    assert client._sc is not None
    lease = client.acquire("t", "cpu:0")
    print("held", lease.lease_id, flush=True)
    sys.stdin.readline()  # killed here


if __name__ == "__main__":
    address, how, token = sys.argv[1:4]
    {"grpc-only": grpc_only, "joined": joined}[how](address, token)
