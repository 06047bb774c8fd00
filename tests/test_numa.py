"""The NUMA backend: node discovery and replica selection against fake sysfs trees (2 and 4 nodes, asymmetric
distances, a memoryless node, sparse ids), and on this host real placement: every replica page bound with
MPOL_BIND to its node and reported there by move_pages(2) in query mode, in-process and through the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _devrep_service import inproc_server
from _support import metric_samples

import devrep
from devrep import numa
from devrep.backends import load_backend
from devrep.backends._numa import NumaBackend
from devrep.client import connect
from devrep.doctor import probe
from devrep.errors import BackendError, InvalidArgumentError, NotFoundError, UnknownDeviceError
from devrep.linux.numa import MPOL_BIND, get_mempolicy, getcpu, page_nodes
from devrep.memory import buffer_address
from devrep.metrics import Metrics
from devrep.numa import Topology, parse_node_list, pick_replica, read_topology
from devrep.wire._gen import devrep_pb2 as pb

pytestmark = pytest.mark.timeout(120)
PAGE = 4096
MiB = 1 << 20


# ---------------------------------------------------------------------------- fake sysfs trees

def fake_sysfs(root: Path, online: str, distance: dict[int, list[int]], memory_kb: dict[int, int],
               has_memory: str | None) -> Path:
    """A ``/sys/devices/system/node`` lookalike: ``online``, ``has_memory`` (omitted when None) and per node
    ``distance`` and ``meminfo``, in the kernel's formats."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "online").write_text(online + "\n")
    (root / "possible").write_text(online + "\n")
    if has_memory is not None:
        (root / "has_memory").write_text(has_memory + "\n")
    for node, row in distance.items():
        d = root / f"node{node}"
        d.mkdir()
        (d / "distance").write_text(" ".join(map(str, row)) + "\n")
        kb = memory_kb.get(node, 0)
        (d / "meminfo").write_text(f"Node {node} MemTotal:       {kb} kB\nNode {node} MemFree:        {kb // 2} kB\n"
                                   f"Node {node} MemUsed:        {kb - kb // 2} kB\n")
    return root


@pytest.fixture
def two_nodes(tmp_path: Path) -> Path:
    return fake_sysfs(tmp_path / "two", "0-1", {0: [10, 21], 1: [21, 10]}, {0: 8 << 20, 1: 8 << 20}, "0-1")


# Rows are what a reader on that node sees; they are deliberately not symmetric (node 3 is close to node 0, but
# node 0 counts node 3 as far away), so a selection that read the columns instead of the reader's row would differ.
FOUR = {
    0: [10, 20, 30, 40],
    1: [20, 10, 40, 30],
    2: [35, 25, 10, 20],
    3: [12, 22, 22, 10],  # node 3 has CPUs but no memory
}


@pytest.fixture
def four_nodes(tmp_path: Path) -> Path:
    return fake_sysfs(tmp_path / "four", "0-3", FOUR, {0: 16 << 20, 1: 16 << 20, 2: 4 << 20, 3: 0}, "0-2")


def test_parse_node_list() -> None:
    assert parse_node_list("0-3,5\n") == [0, 1, 2, 3, 5]
    assert parse_node_list("0\n") == [0]
    assert parse_node_list("") == [] and parse_node_list("\n") == []
    assert parse_node_list("4,0-1") == [0, 1, 4]
    for bad in ("3-1", "a", "1-", "-2"):
        with pytest.raises(ValueError):
            parse_node_list(bad)


def test_two_nodes_discovery_and_fallback(two_nodes: Path) -> None:
    topo = read_topology(two_nodes)
    assert topo.online == (0, 1) and topo.nodes == (0, 1)
    assert topo.memory == {0: 8 << 30, 1: 8 << 30}
    assert topo.distance == {0: {0: 10, 1: 21}, 1: {0: 21, 1: 10}}
    backend = NumaBackend(sysfs_root=two_nodes)
    assert backend.device_count() == 2
    assert "NUMA node 1" in backend.describe(1) and "8.0 GiB" in backend.describe(1)
    # numa:local on node 1: its own replica when there is one, else the other node's
    assert backend.pick("numa:local", [0, 1], here=1) == 1
    assert backend.pick("numa:local", [0], here=1) == 0
    assert backend.pick("numa:local", [1], here=0) == 1
    assert backend.pick("numa:near:0", [0, 1]) == 0


def test_four_nodes_asymmetric_distances(four_nodes: Path) -> None:
    topo = read_topology(four_nodes)
    assert topo.online == (0, 1, 2, 3)
    assert topo.nodes == (0, 1, 2), "node 3 has no memory: no device"
    assert topo.device(2) == "numa:2"
    with pytest.raises(UnknownDeviceError, match="node 3 has no memory"):
        topo.device(3)
    backend = NumaBackend(sysfs_root=four_nodes)
    assert backend.device_count() == 3
    with pytest.raises(UnknownDeviceError, match="numa:3"):
        backend.allocate(3, PAGE)
    # A reader on memoryless node 3: its row says node 0 (12) is nearest (the columns would say node 2).
    assert pick_replica(topo, "numa:local", [0, 1, 2], here=3) == 0
    assert backend.pick("numa:local", [0, 1, 2], here=3) == 0
    # Equal distances (22, 22) from node 3: the lower node id.
    assert pick_replica(topo, "numa:near:3", [1, 2]) == 1
    # From node 2 with replicas on 0 and 1: row 2 says 35 vs 25 -> node 1 (the columns would say node 0).
    assert pick_replica(topo, "numa:local", [0, 1], here=2) == 1
    # From node 0: 20 (node 1) beats 30 (node 2); its own replica beats everything.
    assert pick_replica(topo, "numa:near:0", [1, 2]) == 1
    assert pick_replica(topo, "numa:near:0", [2, 0, 1]) == 0
    # A node sysfs does not know: every replica equally far, the lowest id.
    assert pick_replica(topo, "numa:near:9", [2, 1]) == 1


def test_sparse_node_ids_and_meminfo_fallback(tmp_path: Path) -> None:
    # Nodes 0 and 2 online; no has_memory file (older kernels): memory from MemTotal, and node 2 has none.
    root = fake_sysfs(tmp_path / "sparse", "0,2,5", {0: [10, 20, 30], 2: [20, 10, 30], 5: [30, 30, 10]},
                      {0: 1 << 20, 2: 0, 5: 2 << 20}, None)
    topo = read_topology(root)
    assert topo.online == (0, 2, 5) and topo.nodes == (0, 5)
    assert topo.distance[2] == {0: 20, 2: 10, 5: 30}
    backend = NumaBackend(sysfs_root=root)
    assert backend.device_count() == 2 and backend.node(1) == 5  # numa:1 is node 5
    assert backend.pick("numa:local", [0, 1], here=2) == 0  # node 2 (memoryless) is nearest to node 0
    assert backend.pick("numa:near:5", [0, 1]) == 1


def test_malformed_sysfs_is_an_error_not_a_guess(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path / "bad", "0-1", {0: [10, 21], 1: [21]}, {0: 1, 1: 1}, "0-1")
    with pytest.raises(ValueError, match="1 entries for 2 online nodes"):
        read_topology(root)
    with pytest.raises(BackendError, match="cannot read the NUMA topology"):
        NumaBackend(sysfs_root=root)
    (root / "online").write_text("0-x\n")
    with pytest.raises(BackendError, match="cannot read the NUMA topology"):
        NumaBackend(sysfs_root=root)


def test_no_numa_tree_means_no_devices(tmp_path: Path) -> None:
    backend = NumaBackend(sysfs_root=tmp_path / "absent")
    assert backend.device_count() == 0
    with pytest.raises(UnknownDeviceError, match="no numa devices"):
        backend.allocate(0, PAGE)


@pytest.fixture
def pinned() -> Iterator[int]:
    """Pin this thread to the CPU it runs on (restored afterwards), so its node cannot change mid-test on a
    multi-node host; yields that node."""
    allowed = os.sched_getaffinity(0)
    cpu, node = getcpu()
    os.sched_setaffinity(0, {cpu})
    try:
        yield node
    finally:
        os.sched_setaffinity(0, allowed)


def test_bad_aliases(pinned: int) -> None:
    for bad in ("numa:near:", "numa:near:x", "numa:near:-1", "numa:near:99999"):
        with pytest.raises(UnknownDeviceError, match="numa:local or numa:near:NODE"):
            numa.alias_node(bad)
    assert numa.alias_node("numa:near:3") == 3
    assert numa.alias_node("numa:local", here=7) == 7
    assert numa.client_device("cpu:0") == "cpu:0" and numa.client_device("numa:1") == "numa:1"
    assert numa.client_device("numa:local") == f"numa:near:{pinned}"
    with pytest.raises(ValueError):
        Topology().nearest(0, [])


# ---------------------------------------------------------------------------- this host: real placement

@pytest.fixture
def rep() -> Iterator[devrep.Replicator]:
    with devrep.Replicator(cpu_devices=1) as r:
        yield r


def all_numa(rep: devrep.Replicator) -> list[str]:
    count = rep.backend("numa").device_count()
    assert count >= 1, "this host shows no NUMA node with memory in /sys/devices/system/node"
    return [f"numa:{i}" for i in range(count)]


def check_placed(array: np.ndarray, node: int, where: str) -> None:
    """The memory policy and the page placement of a replica mapping: MPOL_BIND on ``node``, every page there."""
    address, npages = buffer_address(array), array.nbytes // PAGE
    mode, nodes = get_mempolicy(address)
    assert (mode, nodes) == (MPOL_BIND, [node]), f"{where}: expected MPOL_BIND on [{node}], got mode {mode} on {nodes}"
    int(np.bitwise_or.reduce(array[::PAGE]))  # read one byte per page: maps every page into this process
    status = page_nodes(address, npages)
    wrong = np.flatnonzero(status != node)
    assert wrong.size == 0, (f"{where}: expected all {npages} pages on node {node}; page {wrong[0]} reports "
                             f"{status[wrong[0]]} ({wrong.size} pages elsewhere)")


def test_replicas_are_bound_and_placed_on_their_node(rep: devrep.Replicator) -> None:
    devices = all_numa(rep)
    backend = rep.backend("numa")
    assert isinstance(backend, NumaBackend)
    region = rep.create_region("t", 8 * MiB)
    region.array[:] = np.random.default_rng(1).integers(0, 256, region.nbytes, dtype=np.uint8)
    rep.replicate("t", devices)
    for device in devices:
        node = backend.node(int(device.partition(":")[2]))
        with region.acquire(device) as lease:
            assert np.array_equal(lease.array, region.array)
            view = backend.host_view(lease.buffer)
            assert view is not None, f"{device}: a NUMA replica is host memory, it must have a host view"
            check_placed(view, node, device)
            # a write under the lease makes the next sync allocate the second (spare) buffer: bound the same way
            region.array[5 * PAGE] ^= 0xFF
            region.invalidate(5 * PAGE, 1)
            region.sync([device])
            buffers = [b for b in lease.replica.buffers if b is not None]
            assert len(buffers) == 2, f"{device}: expected a spare buffer after syncing under a lease"
            for i, buf in enumerate(buffers):
                view = backend.host_view(buf)
                assert view is not None
                check_placed(view, node, f"{device} buffer {i}")


def test_numa_local_in_process(rep: devrep.Replicator, pinned: int) -> None:
    devices = all_numa(rep)
    region = rep.create_region("t", 64 * PAGE)
    region.array[:] = 9
    with pytest.raises(NotFoundError, match="no NUMA replica"):
        region.acquire("numa:local")
    rep.replicate("t", ["cpu:0"])
    with pytest.raises(NotFoundError, match="no NUMA replica"):
        region.acquire("numa:local")
    rep.replicate("t", devices)
    here = pinned
    backend = rep.backend("numa")
    assert isinstance(backend, NumaBackend)
    want = f"numa:{backend.pick('numa:local', range(len(devices)), here=here)}"
    with region.acquire("numa:local") as lease:
        assert lease.device == want, f"thread on node {here}: expected {want}, got {lease.device}"
        assert (lease.array == 9).all()
    with region.acquire("numa:near:999") as lease:  # no such node: the lowest one with a replica
        assert lease.device == "numa:0"
    with pytest.raises(UnknownDeviceError, match="numa:near:NODE"):
        region.acquire("numa:near:x")


def test_numa_local_through_the_service() -> None:
    """The client resolves numa:local on its own thread; the replica it maps is on that node (its own mapping, in
    its own page tables, queried with move_pages); a raw numa:local reaching the server is refused."""
    with inproc_server() as server, connect(server.address) as client:
        handle = client.create_region("svc/t", 2 * MiB)
        handle.array[:] = 7
        client.replicate("svc/t", ["numa:0"])
        node0 = read_topology().nodes[0]
        with client.acquire("svc/t", "numa:local") as lease:
            assert lease.device == "numa:0", lease.device
            assert (lease.array == 7).all() and not lease.array.flags.writeable
            status = page_nodes(buffer_address(lease.array), lease.array.nbytes // PAGE)
            assert (status == node0).all(), f"client mapping: expected every page on node {node0}, got {set(status)}"
        with pytest.raises(InvalidArgumentError, match="client resolves it"):  # gRPC Acquire, unresolved alias
            client._call(client._stub.Acquire, pb.AcquireRequest(name="svc/t", device="numa:local", fresh=True))
        assert client._sc is not None
        with pytest.raises(InvalidArgumentError, match="client resolves it"):  # side-channel acquire, same check
            client._sc.call({"op": "acquire", "name": "svc/t", "device": "numa:local", "fresh": True,
                             "timeout_ms": 0})
        with client.acquire("svc/t", "numa:near:999") as lease:
            assert lease.device == "numa:0"
        with pytest.raises(NotFoundError, match="numa:near:NODE"):  # NOT_FOUND over the wire
            client.acquire("svc/t", "numa:near:x")
        client.create_region("svc/cpu-only", 4 * PAGE)
        client.replicate("svc/cpu-only", ["cpu:0"])
        with pytest.raises(NotFoundError, match="no NUMA replica"):
            client.acquire("svc/cpu-only", "numa:local")


# ---------------------------------------------------------------------------- doctor and metrics

def test_doctor_reports_nodes_and_mbind() -> None:
    topo = read_topology()
    status = probe().numa
    assert [n.node for n in status.nodes] == list(topo.online)
    first = status.nodes[0]
    assert first.device == "numa:0" and first.memory_bytes == topo.memory[first.node] > 0
    assert status.mbind, status.mbind_error
    out = subprocess.run([sys.executable, "-m", "devrep.cli", "doctor", "--json"], capture_output=True, text=True,
                         timeout=60)
    report = json.loads(out.stdout)["numa"]
    assert report["mbind"] is True and report["nodes"][0]["device"] == "numa:0", report


def test_metrics_label_numa_replicas_by_node(rep: devrep.Replicator) -> None:
    devices = all_numa(rep)
    metrics = Metrics(rep)
    try:
        region = rep.create_region("m", 16 * PAGE)
        rep.replicate("m", [*devices, "cpu:0"])
        samples = metric_samples(metrics.render())
        backend = rep.backend("numa")
        assert isinstance(backend, NumaBackend)
        for i, device in enumerate(devices):
            labels = (("device", device), ("node", str(backend.node(i))))
            assert samples[("devrep_numa_replicas", labels)] == 1
            assert samples[("devrep_numa_replica_bytes", labels)] >= region.nbytes
        assert not any(name.startswith("devrep_numa") and dict(labels).get("device") == "cpu:0"
                       for name, labels in samples)
    finally:
        metrics.close()


def test_numa_is_a_registered_backend() -> None:
    backend = load_backend("numa")
    assert isinstance(backend, NumaBackend) and backend.name == "numa"
    assert devrep.backends.parse_device("numa:0") == ("numa", 0)
