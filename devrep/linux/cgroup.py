"""How much CPU time this process's cgroups allow (the CFS bandwidth limit), cgroup v2 and v1.

Why: ``sched_getaffinity`` lists every CPU of the machine inside a container limited to one CPU's worth of time
(``docker --cpus=1``, a Kubernetes CPU limit), so code that spreads work over threads to save wall-clock time
must also ask the quota: two threads under a one-CPU quota only burn it twice as fast and then wait out the rest
of the period throttled (100 ms by default). ``devrep.region._plan`` asks before it stages a rearm on a second CPU.

The parsers are pure (text in, numbers out); ``cpu_limit`` does the reading, from ``/proc/self/cgroup`` and the
cgroup filesystems under ``/sys/fs/cgroup``, and never raises: a file it cannot read is a level without a limit.
"""

from __future__ import annotations

import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_CACHE_SECONDS = 10.0  # a limit can change (in-place pod resize); reading it costs ~3 file reads per level
_cache: tuple[float, Path, float | None] | None = None


def parse_proc_cgroup(text: str) -> tuple[str | None, str | None]:
    """``/proc/PID/cgroup`` -> (the cgroup v2 path, the path in the v1 hierarchy holding the ``cpu`` controller);
    ``None`` for a hierarchy the process is not in."""
    v2 = v1 = None
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


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
    text = proc_cgroup if proc_cgroup is not None else _read(Path("/proc/self/cgroup"))
    if not text:
        return None
    v2, v1 = parse_proc_cgroup(text)
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
