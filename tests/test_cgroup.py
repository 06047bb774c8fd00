"""``devrep.linux.cgroup``: the CFS CPU limit of this process's cgroups, on fake trees and on a real cgroup."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from devrep.linux.cgroup import parse_cfs, parse_cpu_max, parse_proc_cgroup, read_cpu_limit

HYBRID = "12:cpu,cpuacct:/kubepods/pod1/ctr\n4:memory:/x\n1:name=systemd:/y\n0::/unified/z\n"


def test_parsers() -> None:
    assert parse_proc_cgroup("0::/kubepods.slice/ctr.scope\n") == ("/kubepods.slice/ctr.scope", None)
    assert parse_proc_cgroup(HYBRID) == ("/unified/z", "/kubepods/pod1/ctr")
    assert parse_proc_cgroup("2:cpuacct:/a\n1:cpu:/b\n") == (None, "/b")
    assert parse_proc_cgroup("") == (None, None)
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


REPORT = ("from devrep.linux.cgroup import read_cpu_limit; from devrep.region._plan import _other_cpus; "
          "print(read_cpu_limit(), len(_other_cpus()))")


def _real_cgroup(tmp: str) -> tuple[Path, Path]:
    """A new cgroup limited to a quarter of a CPU: (its directory, the file a pid is written to), on the v1 ``cpu``
    hierarchy or in v2 under the root; skips saying what this machine lacks."""
    root = Path("/sys/fs/cgroup")
    if os.geteuid() != 0:
        pytest.skip("making a cgroup needs root")
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        if (v1 / "cpu.cfs_quota_us").exists():
            group = v1 / tmp
            group.mkdir()
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text("25000")
            return group, group / "cgroup.procs"
    subtree = root / "cgroup.subtree_control"
    if subtree.exists() and "cpu" in subtree.read_text().split():
        group = root / tmp
        group.mkdir()
        (group / "cpu.max").write_text("25000 100000")
        return group, group / "cgroup.procs"
    pytest.skip("no cgroup v1 cpu hierarchy, and the cgroup v2 root does not delegate the cpu controller")


def test_a_real_cpu_limit_is_read_and_turns_staging_off() -> None:
    """A child moved into a real cgroup limited to 0.25 CPU reads that limit, and the staged rearm finds no CPU
    to overlap on there (its affinity mask still lists every CPU); outside it, no limit."""
    name = f"devrep-test-{uuid.uuid4().hex[:8]}"
    try:
        group, procs = _real_cgroup(name)
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    try:
        child = subprocess.Popen([sys.executable, "-c", f"import sys; sys.stdin.readline(); {REPORT}"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.write_text(str(child.pid))
        out, _ = child.communicate("go\n", timeout=120)
        limit, others = out.split()
        assert float(limit) == 0.25 and int(others) == 0, out
        outside = subprocess.run([sys.executable, "-c", REPORT], capture_output=True, text=True, timeout=120,
                                 check=True)
        assert outside.stdout.split()[0] != "0.25", outside.stdout
    finally:
        group.rmdir()
