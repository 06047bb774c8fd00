"""What this process's cgroups allow: CPU time (the CFS bandwidth limit) and memory (the limit less what is in
use), cgroup v2 and v1.

Why CPU: ``sched_getaffinity`` lists every CPU of the machine inside a container limited to one CPU's worth of time
(``docker --cpus=1``, a Kubernetes CPU limit), so code that spreads work over threads to save wall-clock time
must also ask the quota: two threads under a one-CPU quota only burn it twice as fast and then wait out the rest
of the period throttled (100 ms by default). ``devrep.region._plan`` asks before it stages a rearm on a second CPU.

Why memory: past a cgroup's memory limit the kernel does not fail an allocation, it kills a process of the group
(measured: ``devrep serve`` in a 600 MiB cgroup, one client's 1 GiB replicate, SIGKILL). ``devrep.memory`` asks
before it allocates host memory for a region or a replica, so the request fails with ``RESOURCE_EXHAUSTED``
instead.

The parsers are pure (text in, numbers out); ``cpu_limit`` does the reading, from ``/proc/self/cgroup`` and the
cgroup filesystems under ``/sys/fs/cgroup``, and never raises: a file it cannot read is a level without a limit.
"""

from __future__ import annotations

import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_CACHE_SECONDS = 10.0  # a limit can change (in-place pod resize); reading it costs ~3 file reads per level
_cache: tuple[float, Path, float | None] | None = None


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` -> the process's cgroup path per controller: ``""`` for the v2 (unified) hierarchy,
    the controller's name (``"cpu"``, ``"memory"``) for a v1 one. A hierarchy the process is not in is absent."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            paths[""] = path
        else:
            for controller in controllers.split(","):
                if controller:
                    paths[controller] = path
    return paths


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"max 100000"`` or ``"50000 100000"``) -> CPUs' worth of time, None for no limit."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = int(fields[1]) if len(fields) > 1 else 100_000
    return int(fields[0]) / period if period > 0 else None


def parse_cfs(quota: str, period: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` -> CPUs' worth of time, None for no limit (-1)."""
    q, p = int(quota), int(period)
    return q / p if q > 0 and p > 0 else None


# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages in bytes (9223372036854771712 with 4 KiB pages).
_V1_UNLIMITED = 1 << 62


def parse_memory_stat(text: str, key: str) -> int:
    """The value of ``key`` in a cgroup ``memory.stat`` (0 when absent)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _room(limit: int, usage: int, stat: str | None, inactive_key: str) -> int:
    """A cgroup level's room: its limit less its usage, not counting inactive file pages (page cache the kernel
    reclaims before it would kill anything; what Kubernetes calls the working set)."""
    reclaimable = parse_memory_stat(stat, inactive_key) if stat else 0
    return max(0, limit - max(0, usage - reclaimable))


def read_memory_room(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> int | None:
    """Bytes this process's cgroups still allow it to allocate: the least room over its cgroup and its parents
    (v2 ``memory.max`` less ``memory.current``; v1 ``memory.limit_in_bytes`` less ``memory.usage_in_bytes`` under
    ``root/memory``; inactive file pages count as free); None where no level has a limit or none is readable."""
    paths = _own_paths(proc_cgroup)
    v2, v1 = paths.get(""), paths.get("memory")
    rooms: list[int] = []
    try:
        if v2 is not None:
            for level in _levels(root, v2):
                limit, usage = _read(level / "memory.max"), _read(level / "memory.current")
                if limit is None or usage is None or limit.strip() == "max":
                    continue
                rooms.append(_room(int(limit), int(usage), _read(level / "memory.stat"), "inactive_file"))
        if v1 is not None and (root / "memory").is_dir():
            for level in _levels(root / "memory", v1):
                limit, usage = _read(level / "memory.limit_in_bytes"), _read(level / "memory.usage_in_bytes")
                if limit is None or usage is None or int(limit) >= _V1_UNLIMITED:
                    continue
                rooms.append(_room(int(limit), int(usage), _read(level / "memory.stat"), "total_inactive_file"))
    except ValueError:  # a file that is not what the kernel writes: no limit known, as for an unreadable one
        return min(rooms) if rooms else None
    return min(rooms) if rooms else None


def _own_paths(proc_cgroup: str | None) -> dict[str, str]:
    """``parse_proc_cgroup`` of ``proc_cgroup``, or of this process's ``/proc/self/cgroup`` (empty if unreadable)."""
    text = proc_cgroup if proc_cgroup is not None else _read(Path("/proc/self/cgroup"))
    return parse_proc_cgroup(text) if text else {}


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _levels(mount: Path, path: str) -> list[Path]:
    """The cgroup directory at ``path`` under ``mount`` and each of its parents up to ``mount`` itself: a limit on
    any of them applies (a Kubernetes pod's limit sits on the pod's cgroup, above its containers')."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def read_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The smallest CFS limit, in CPUs, over this process's cgroup and its parents (v2 ``cpu.max``; v1
    ``cpu.cfs_quota_us`` under ``root/cpu`` or ``root/cpu,cpuacct``); None where none is set or none is readable.
    Inside a cgroup namespace (a container) the paths are relative to the container's own cgroup, which is what
    ``root`` shows there, so the walk sees the container's limit."""
    paths = _own_paths(proc_cgroup)
    v2, v1 = paths.get(""), paths.get("cpu")
    limits: list[float] = []
    if v2 is not None:
        # A v2-only host mounts the hierarchy at root; a hybrid one at root/unified (which has no cpu controller).
        for level in _levels(root, v2):
            content = _read(level / "cpu.max")
            try:
                limit = parse_cpu_max(content) if content is not None else None
            except ValueError:
                limit = None
            if limit is not None:
                limits.append(limit)
    if v1 is not None:
        for mount in (root / "cpu", root / "cpu,cpuacct"):
            if not mount.is_dir():
                continue
            for level in _levels(mount, v1):
                quota, period = _read(level / "cpu.cfs_quota_us"), _read(level / "cpu.cfs_period_us")
                try:
                    limit = parse_cfs(quota, period) if quota is not None and period is not None else None
                except ValueError:
                    limit = None
                if limit is not None:
                    limits.append(limit)
            break
    return min(limits) if limits else None


def cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """``read_cpu_limit``, re-read at most every 10 s (it is asked once per staged sync)."""
    global _cache
    now = time.monotonic()
    if _cache is None or now - _cache[0] > _CACHE_SECONDS or _cache[1] != root:
        _cache = (now, root, read_cpu_limit(root))
    return _cache[2]
