"""NUMA topology from sysfs, and the ``numa:local`` / ``numa:near:N`` device aliases.

The parsers are pure functions of file contents; ``read_topology(root)`` does the I/O, with the sysfs root a
parameter so tests can point it at a fake tree. Device ``numa:I`` is the I-th online node that has memory, in
ascending node order (on the usual host with nodes 0..N-1 all holding memory, ``numa:I`` is node I).

Aliases (accepted by ``acquire`` only; replicas are always created on a named ``numa:I``):

* ``numa:near:N`` -- the replica on node ``N``, else the one on the nearest node (smallest
  ``/sys/devices/system/node/nodeN/distance``, ties to the lower node id) among the region's NUMA replicas.
* ``numa:local`` -- ``numa:near:<node of the calling thread>`` (``getcpu(2)``). A client resolves it itself
  before asking the server (``Client.acquire`` does): the server's threads run wherever the server runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UnknownDeviceError

SYSFS_NODE_ROOT = Path("/sys/devices/system/node")
LOCAL = "numa:local"
NEAR_PREFIX = "numa:near:"


# ---------------------------------------------------------------------------- pure parsers

def parse_node_list(text: str) -> list[int]:
    """A sysfs node/cpu list (``"0-3,5"``, ``""``) -> ``[0, 1, 2, 3, 5]``. Raises ``ValueError`` if malformed."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, sep, last = part.partition("-")
        lo = int(first)
        hi = int(last) if sep else lo
        if lo < 0 or hi < lo:
            raise ValueError(f"bad range {part!r} in node list {text!r}")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def parse_distance_row(text: str, online: list[int]) -> dict[int, int]:
    """``nodeN/distance`` (one distance per *online* node, in ascending node order) -> ``{node: distance}``."""
    values = [int(v) for v in text.split()]
    if len(values) != len(online):
        raise ValueError(f"distance row {text.strip()!r} has {len(values)} entries for {len(online)} online nodes")
    return dict(zip(online, values, strict=True))


def parse_meminfo_total(text: str) -> int:
    """``nodeN/meminfo`` -> MemTotal in bytes (0 when absent)."""
    for line in text.splitlines():
        fields = line.split()
        # "Node 0 MemTotal:        5334812 kB"
        if len(fields) >= 4 and fields[2] == "MemTotal:":
            return int(fields[3]) * (1024 if fields[4:5] == ["kB"] else 1)
    return 0


@dataclass(frozen=True)
class Topology:
    """What the NUMA backend and the alias resolution need to know about the host's nodes."""

    online: tuple[int, ...] = ()
    nodes: tuple[int, ...] = ()
    """Online nodes with memory, ascending: ``numa:I`` is ``nodes[I]``."""
    memory: dict[int, int] = field(default_factory=dict)
    """MemTotal in bytes per online node."""
    distance: dict[int, dict[int, int]] = field(default_factory=dict)
    """``distance[a][b]``: the SLIT distance from node ``a`` to node ``b`` (10 = local)."""

    def device(self, node: int) -> str:
        """The device name of ``node`` (which must have memory)."""
        try:
            return f"numa:{self.nodes.index(node)}"
        except ValueError:
            raise UnknownDeviceError(f"NUMA node {node} has no memory or is offline (nodes with memory: "
                                     f"{list(self.nodes)})") from None

    def node(self, index: int) -> int:
        if not 0 <= index < len(self.nodes):
            raise UnknownDeviceError(f"no device numa:{index}: this host has {len(self.nodes)} NUMA nodes with memory")
        return self.nodes[index]

    def nearest(self, node: int, candidates: Iterable[int]) -> int:
        """The candidate node closest to ``node``: itself if listed, else the smallest distance (ties: lowest id).

        A node with no distance row (unknown to sysfs) counts every candidate as equally far.
        """
        pool = sorted(set(candidates))
        if not pool:
            raise ValueError("no candidate nodes")
        if node in pool:
            return node
        row = self.distance.get(node, {})
        return min(pool, key=lambda c: (row.get(c, math.inf), c))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def read_topology(root: str | os.PathLike[str] = SYSFS_NODE_ROOT) -> Topology:
    """The topology under ``root`` (``/sys/devices/system/node``). No tree (a kernel without CONFIG_NUMA): no nodes.

    Nodes with memory come from ``has_memory`` where the kernel has it, else from a non-zero MemTotal per node.
    """
    base = Path(root)
    online_text = _read(base / "online")
    if online_text is None:
        return Topology()
    online = parse_node_list(online_text)
    memory = {n: parse_meminfo_total(_read(base / f"node{n}" / "meminfo") or "") for n in online}
    has_memory = _read(base / "has_memory")
    with_memory = (set(parse_node_list(has_memory)) if has_memory is not None
                   else {n for n, total in memory.items() if total > 0})
    distance = {}
    for n in online:
        row = _read(base / f"node{n}" / "distance")
        if row is not None:
            distance[n] = parse_distance_row(row, online)
    return Topology(tuple(online), tuple(n for n in online if n in with_memory), memory, distance)


# ---------------------------------------------------------------------------- aliases

def current_node() -> int:
    """The node of the CPU the calling thread runs on now (``getcpu(2)``; 0 where the syscall is missing)."""
    from .linux.numa import getcpu

    try:
        return getcpu()[1]
    except OSError:
        return 0


def is_alias(device: str) -> bool:
    return device == LOCAL or device.startswith(NEAR_PREFIX)


def alias_node(device: str, *, here: int | None = None) -> int:
    """The node an alias asks to be near: ``N`` for ``numa:near:N``; for ``numa:local`` the calling thread's node
    (``here`` when given, else ``getcpu``)."""
    if device == LOCAL:
        return current_node() if here is None else here
    tail = device[len(NEAR_PREFIX):] if device.startswith(NEAR_PREFIX) else ""
    if not tail.isdigit() or len(tail) > 4:
        raise UnknownDeviceError(f"bad NUMA device alias {device!r}: expected numa:local or numa:near:NODE "
                                 "(NODE a node id, e.g. numa:near:1)")
    return int(tail)


def client_device(device: str) -> str:
    """What a client sends for ``device``: ``numa:local`` becomes ``numa:near:<this thread's node>``."""
    return f"{NEAR_PREFIX}{current_node()}" if device == LOCAL else device


def pick_replica(topology: Topology, alias: str, replica_nodes: Iterable[int], *, here: int | None = None) -> int:
    """The node whose replica serves ``alias``: the aliased node if it holds one of ``replica_nodes``, else the
    nearest by that node's distance row. ``here`` stands for the calling thread's node (``getcpu`` when ``None``)."""
    pool = list(replica_nodes)
    if not pool:
        raise ValueError("no NUMA replicas to choose from")
    return topology.nearest(alias_node(alias, here=here), pool)
