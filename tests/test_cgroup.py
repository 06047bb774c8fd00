"""``devrep.linux.cgroup`` and ``devrep.memory.ensure_room``: the CPU and memory limits of this process's cgroups,
on fake trees and on real cgroups (a server in a memory-limited cgroup refuses a replicate that would get it killed)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import devrep
from devrep import memory
from devrep.client import Client, connect
from devrep.demo import server_process
from devrep.linux.cgroup import (
    parse_cfs,
    parse_cpu_max,
    parse_memory_stat,
    parse_proc_cgroup,
    read_cpu_limit,
    read_memory_room,
)
from devrep.testing import short_tmpdir

MiB = 1 << 20

HYBRID = "12:cpu,cpuacct:/kubepods/pod1/ctr\n4:memory:/x\n1:name=systemd:/y\n0::/unified/z\n"


def test_parsers() -> None:
    assert parse_proc_cgroup("0::/kubepods.slice/ctr.scope\n") == {"": "/kubepods.slice/ctr.scope"}
    assert parse_proc_cgroup(HYBRID) == {"cpu": "/kubepods/pod1/ctr", "cpuacct": "/kubepods/pod1/ctr", "memory": "/x",
                                         "name=systemd": "/y", "": "/unified/z"}
    assert parse_proc_cgroup("2:cpuacct:/a\n1:cpu:/b\n") == {"cpuacct": "/a", "cpu": "/b"}
    assert parse_proc_cgroup("") == {}
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("50000\n") == 0.5  # period left out: the kernel's default
    assert parse_cpu_max("") is None
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("25000\n", "100000\n") == 0.25
    with pytest.raises(ValueError):
        parse_cpu_max("lots 100000")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_takes_the_smallest_limit_up_the_tree(tmp_path: Path) -> None:
    """A Kubernetes pod's limit sits on the pod's cgroup, above the container's; the smallest one applies."""
    _write(tmp_path / "kubepods.slice" / "cpu.max", "max 100000\n")
    _write(tmp_path / "kubepods.slice" / "pod.slice" / "cpu.max", "150000 100000\n")
    _write(tmp_path / "kubepods.slice" / "pod.slice" / "ctr.scope" / "cpu.max", "400000 100000\n")
    assert read_cpu_limit(tmp_path, "0::/kubepods.slice/pod.slice/ctr.scope\n") == 1.5
    assert read_cpu_limit(tmp_path, "0::/kubepods.slice\n") is None
    assert read_cpu_limit(tmp_path, "0::/\n") is None  # the root has no cpu.max
    assert read_cpu_limit(tmp_path, "0::/not/there\n") is None  # unreadable levels are no limit
    assert read_cpu_limit(tmp_path, "") is None
    _write(tmp_path / "garbage" / "cpu.max", "lots of time\n")
    assert read_cpu_limit(tmp_path, "0::/garbage\n") is None  # never raises


def test_v1_reads_the_cpu_hierarchy(tmp_path: Path) -> None:
    ctr = tmp_path / "cpu,cpuacct" / "kubepods" / "pod1" / "ctr"
    _write(ctr / "cpu.cfs_quota_us", "-1\n")
    _write(ctr / "cpu.cfs_period_us", "100000\n")
    _write(ctr.parent / "cpu.cfs_quota_us", "50000\n")
    _write(ctr.parent / "cpu.cfs_period_us", "100000\n")
    assert read_cpu_limit(tmp_path, HYBRID) == 0.5
    _write(tmp_path / "unified" / "z" / "cpu.max", "20000 100000\n")  # a v2 limit counts too
    assert read_cpu_limit(tmp_path, HYBRID) == 0.2


def test_memory_room_up_the_tree_counts_inactive_file_pages_as_free(tmp_path: Path) -> None:
    ctr = tmp_path / "kubepods.slice" / "ctr.scope"
    _write(ctr / "memory.max", "max\n")
    _write(ctr / "memory.current", "100\n")
    _write(ctr.parent / "memory.max", f"{1000 * MiB}\n")
    _write(ctr.parent / "memory.current", f"{900 * MiB}\n")
    _write(ctr.parent / "memory.stat", f"anon 1\ninactive_file {300 * MiB}\nactive_file 5\n")
    assert read_memory_room(tmp_path, "0::/kubepods.slice/ctr.scope\n") == 400 * MiB
    assert read_memory_room(tmp_path, "0::/\n") is None
    v1 = tmp_path / "memory" / "pod"
    _write(v1 / "memory.limit_in_bytes", f"{512 * MiB}\n")
    _write(v1 / "memory.usage_in_bytes", f"{600 * MiB}\n")  # over the limit: no room, not a negative one
    _write(tmp_path / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    _write(tmp_path / "memory" / "memory.usage_in_bytes", "1\n")
    assert read_memory_room(tmp_path, "5:memory:/pod\n") == 0
    _write(v1 / "memory.stat", f"total_inactive_file {200 * MiB}\ninactive_file 7\n")
    assert read_memory_room(tmp_path, "5:memory:/pod\n") == 112 * MiB
    _write(v1 / "memory.usage_in_bytes", "lots\n")
    assert read_memory_room(tmp_path, "5:memory:/pod\n") is None  # never raises
    assert parse_memory_stat("cache 4\ninactive_file 9\n", "inactive_file") == 9
    assert parse_memory_stat("", "inactive_file") == 0


def test_ensure_room_refuses_what_cannot_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert memory.parse_meminfo("MemTotal: 10 kB\nMemAvailable:  4 kB\nHugePages_Total: 3\n") == \
        {"MemTotal": 10240, "MemAvailable": 4096, "HugePages_Total": 3}
    monkeypatch.setattr(memory, "memory_room", lambda: (100 * MiB, "the test's limit"))
    memory.ensure_room(100 * MiB - memory.ROOM_MARGIN, "a fit")
    with pytest.raises(devrep.ResourceExhaustedError, match=r"a replica on cpu:0: \d+ bytes do not fit in the "
                                                             r"test's limit: 71303168 bytes can be allocated"):
        memory.ensure_room(100 * MiB - memory.ROOM_MARGIN + 1, "a replica on cpu:0")
    monkeypatch.setattr(memory, "memory_room", lambda: None)  # nothing readable: nothing refused
    memory.ensure_room(1 << 60, "anything")


REPORT = ("from devrep.linux.cgroup import read_cpu_limit; from devrep.region._plan import _other_cpus; "
          "print(read_cpu_limit(), len(_other_cpus()))")


def _real_cgroup(tmp: str, controller: str, limits: dict[str, str], v2_limits: dict[str, str]) -> tuple[Path, Path]:
    """A new cgroup with ``limits`` written into it (v1 ``controller`` hierarchy) or ``v2_limits`` (cgroup v2, under
    the root): (its directory, the file a pid is written to). Skips saying what this machine lacks."""
    root = Path("/sys/fs/cgroup")
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    for v1 in (root / controller, *sorted(root.glob(f"*{controller}*,*")), *sorted(root.glob(f"*,{controller}"))):
        if v1.is_dir() and (v1 / "cgroup.procs").exists() and not (v1 / "cgroup.controllers").exists():
            group = v1 / tmp
            group.mkdir()
            for name, value in limits.items():
                (group / name).write_text(value)
            return group, group / "cgroup.procs"
    subtree = root / "cgroup.subtree_control"
    if subtree.exists() and controller in subtree.read_text().split():
        group = root / tmp
        group.mkdir()
        for name, value in v2_limits.items():
            (group / name).write_text(value)
        return group, group / "cgroup.procs"
    pytest.skip(f"no cgroup v1 {controller} hierarchy, and the cgroup v2 root does not delegate the {controller} "
                "controller")


@contextmanager
def _limited(controller: str, limits: dict[str, str], v2_limits: dict[str, str]) -> Iterator[Path]:
    """A fresh cgroup with these limits (``_real_cgroup``) for the block: yields the file a pid is written to, and
    removes the cgroup afterwards (its processes must have ended by then)."""
    try:
        group, procs = _real_cgroup(f"devrep-test-{uuid.uuid4().hex[:8]}", controller, limits, v2_limits)
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        yield procs
    finally:
        group.rmdir()


def _memory_limit(limit: int) -> dict[str, dict[str, str]]:
    return {"limits": {"memory.limit_in_bytes": str(limit)},
            "v2_limits": {"memory.max": str(limit), "memory.swap.max": "0"}}


@contextmanager
def _server_limited_to(limit: int) -> Iterator[tuple[Client, subprocess.Popen[bytes]]]:
    """A real ``devrep serve`` moved into a cgroup limited to ``limit`` bytes of memory, and a client of it."""
    with _limited("memory", **_memory_limit(limit)) as procs, short_tmpdir() as tmp, \
            server_process(tmp) as (address, proc):
        procs.write_text(str(proc.pid))
        with connect(address) as client:
            yield client, proc


def test_a_real_cpu_limit_is_read_and_turns_staging_off() -> None:
    """A child moved into a real cgroup limited to 0.25 CPU reads that limit, and the staged rearm finds no CPU
    to overlap on there (its affinity mask still lists every CPU); outside it, no limit."""
    with _limited("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "25000"},
                  {"cpu.max": "25000 100000"}) as procs:
        child = subprocess.Popen([sys.executable, "-c", f"import sys; sys.stdin.readline(); {REPORT}"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.write_text(str(child.pid))
        out, _ = child.communicate("go\n", timeout=120)
        limit, others = out.split()
        assert float(limit) == 0.25 and int(others) == 0, out
        outside = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True, timeout=120,
                                 check=True)
        assert outside.stdout.split()[0] != "0.25", outside.stdout


def test_a_server_in_a_memory_limited_cgroup_refuses_a_replicate_that_would_get_it_killed() -> None:
    """``devrep serve`` moved into a cgroup limited to 600 MiB: one client's replicate of 1 GiB, which used to get
    the daemon SIGKILLed by the kernel (every client's service gone), is RESOURCE_EXHAUSTED naming the limit; the
    server keeps serving and a replicate that fits still works."""
    with _server_limited_to(600 * MiB) as (client, proc):
        client.create_region("big", 1 << 30, tracking="explicit")
        with pytest.raises(devrep.ResourceExhaustedError, match="cgroup memory limit"):
            client.replicate("big", ["cpu:0"])
        region = client.create_region("small", 64 * MiB, tracking="explicit")
        region.array[:] = 5
        client.replicate("small", ["cpu:0"])
        with client.acquire("small", "cpu:0") as lease:
            assert int(lease.array[12345]) == 5
        assert proc.poll() is None, "the server died"


def test_a_file_region_whose_staging_cannot_fit_is_refused_not_killed(tmp_path: Path) -> None:
    """A file region's copy stages the file's pages (pread, so a truncated file cannot SIGBUS the server) on top of
    the replica's own memory: in a 600 MiB cgroup a 300 MiB file's replica fits, replica plus staging does not.
    RESOURCE_EXHAUSTED naming the staging, and the server keeps serving. A sparse file of the same size stages
    only its data, so it is not refused."""
    dense, sparse = tmp_path / "dense.bin", tmp_path / "sparse.bin"
    dense.write_bytes(b"w" * (300 * MiB))
    with open(sparse, "wb") as f:
        f.truncate(300 * MiB)
        f.write(b"s" * MiB)
    with _server_limited_to(600 * MiB) as (client, proc):
        client.register_file("dense", dense)
        with pytest.raises(devrep.ResourceExhaustedError, match="staging its file's pages"):
            client.replicate("dense", ["cpu:0"])
        client.unregister("dense")
        client.register_file("sparse", sparse)
        client.replicate("sparse", ["cpu:0"])
        with client.acquire("sparse", "cpu:0") as lease:
            assert bytes(lease.array[:4]) == b"ssss" and int(lease.array[2 * MiB]) == 0
        assert proc.poll() is None, "the server died"


IN_PROCESS = """
import sys
sys.stdin.readline()
import devrep
with devrep.Replicator(cpu_devices=1) as rep:
    try:
        rep.create_region("big", 512 << 20)
    except devrep.ResourceExhaustedError as exc:
        print("refused:", exc)
    region = rep.create_region("small", 16 << 20)
    rep.replicate("small", ["cpu:0"])
    print("small ok")
"""


def test_create_region_past_a_memory_limit_is_resource_exhausted_not_a_kill() -> None:
    with _limited("memory", **_memory_limit(300 * MiB)) as procs:
        child = subprocess.Popen([sys.executable, "-c", IN_PROCESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        procs.write_text(str(child.pid))
        out, err = child.communicate("go\n", timeout=120)
        assert child.returncode == 0, (child.returncode, err[-2000:])
        assert "refused: region 'big'" in out and "cgroup memory limit" in out and "small ok" in out, out
