"""Python client of the devrep service.

>>> import devrep.client
>>> with devrep.client.connect() as dr:                       # doctest: +SKIP
...     region = dr.create_region("emb", 64 << 20)             # a memfd shared with the server
...     region.array[:4096] = 1                                 # write the host pages...
...     region.invalidate(0, 4096)                              # ...and report it (explicit tracking)
...     dr.replicate("emb", ["cpu:0", "cpu:1"])
...     with dr.acquire("emb", "cpu:0") as lease:              # fresh: every page up to date
...         print(lease.array[:8], lease.generation)           # read-only, zero-copy numpy
"""

from ._client import (
    Client,
    ClientLease,
    EventStream,
    RegionDescription,
    RegionHandle,
    ServerInfo,
    ServiceUnavailableError,
    UnauthenticatedError,
    connect,
)
from ._transport import GrpcTransport, LeaseGrant, SideChannelTransport, Stream, Transport

__all__ = ["Client", "ClientLease", "EventStream", "GrpcTransport", "LeaseGrant", "RegionDescription", "RegionHandle",
           "ServerInfo", "ServiceUnavailableError", "SideChannelTransport", "Stream", "Transport",
           "UnauthenticatedError", "connect"]
