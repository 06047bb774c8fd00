"""NUMA backend: one device per NUMA node with memory; a replica is a CPU-backend replica bound to its node.

Every buffer is the CPU backend's sealed memfd (same copy, hash and fd export code, inherited), with one step
added between mapping it and allocating its pages: ``mbind(MPOL_BIND, {node})`` on the writable mapping. On a
shared memfd mapping that sets the file's shared policy, so the ``fallocate`` that follows allocates every page
on the node, and any later page (none: the memfd is sealed against growing) would land there too. Readers in
other processes map the same pages through the exported fd, wherever they run.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..errors import BackendError, ResourceExhaustedError
from ..linux.numa import MPOL_BIND, mbind
from ..memory import buffer_address
from ..numa import SYSFS_NODE_ROOT, Topology, pick_replica, read_topology
from ._cpu import CpuBackend


class NumaBackend(CpuBackend):
    """``numa:0`` .. ``numa:{N-1}``: the host's online NUMA nodes that have memory, in node order.

    ``capacity`` caps the bytes per device (``None``: the node's memory is the limit). ``sysfs_root`` (or a ready
    ``topology``) is where the nodes are read from: tests point it at a fake tree.
    """

    name = "numa"

    def __init__(self, capacity: int | None = None, *, sysfs_root: str | os.PathLike[str] = SYSFS_NODE_ROOT,
                 topology: Topology | None = None) -> None:
        if topology is None:
            try:
                topology = read_topology(Path(sysfs_root))
            except (OSError, ValueError) as exc:  # a sysfs this code cannot read: say so, do not guess nodes
                raise BackendError(f"cannot read the NUMA topology under {sysfs_root}: {exc}") from exc
        self.topology = topology
        super().__init__(devices=len(self.topology.nodes), capacity=capacity)

    def node(self, index: int) -> int:
        """The NUMA node id behind ``numa:index``."""
        self._check_index(index)
        return self.topology.nodes[index]

    def _describe(self, index: int) -> str:
        node = self.node(index)
        return (f"numa:{index} (NUMA node {node}, {self.topology.memory.get(node, 0) / 2**30:.1f} GiB, "
                "sealed memfd bound with mbind)")

    def pick(self, alias: str, indices: Iterable[int], *, here: int | None = None) -> int:
        """Of the devices ``indices``, the one serving ``alias`` (``numa:local``, ``numa:near:N``): on the aliased
        node, else on the node nearest to it (see ``devrep.numa.pick_replica``)."""
        by_node = {self.node(i): i for i in indices}
        return by_node[pick_replica(self.topology, alias, by_node, here=here)]

    def _place(self, index: int, array: npt.NDArray[np.uint8]) -> None:
        node = self.node(index)
        try:
            mbind(buffer_address(array), array.nbytes, MPOL_BIND, [node])
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                raise ResourceExhaustedError(f"numa:{index}: mbind to node {node} failed: {exc.strerror}") from exc
            why = {errno.EINVAL: " (is the node outside this process's cpuset, Mems_allowed?)",
                   errno.ENOSYS: " (the kernel lacks CONFIG_NUMA)",
                   errno.EPERM: " (not permitted here)"}.get(exc.errno or 0, "")
            raise BackendError(f"numa:{index}: mbind(MPOL_BIND) to node {node} failed: {exc.strerror}{why}") from exc
