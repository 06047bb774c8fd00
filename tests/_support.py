"""Helpers the test suite shares (and nothing outside it needs): child programs, bounded waits, small servers.

Child programs live as real modules in ``tests/children/`` (ruff and mypy check them like any code) and run by
path in a fresh interpreter: ``child_argv("name", *args)`` is the argv. Run by path, the child's ``sys.path[0]`` is
``tests/children``; it imports ``devrep`` as the test process does (the editable install, or ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from devrep.memory import HostMemory, create_private, map_fd, memfd_create

ROOT = Path(__file__).resolve().parents[1]
CHILDREN = Path(__file__).resolve().with_name("children")

SPIN_KERNEL = r"""
extern "C" __global__ void spin(const unsigned char* p, long long cycles, unsigned int* out) {
    long long start = clock64();
    unsigned int acc = 0;
    while (clock64() - start < cycles) acc += p[threadIdx.x];
    out[threadIdx.x] = acc;
}
"""
"""CUDA source of ``spin(p, cycles, out)``: each of a block's threads keeps reading ``p[threadIdx.x]`` for
``cycles`` GPU clock cycles (a kernel still reading a replica when its lease is released)."""


def cuda_missing() -> str | None:
    """Why CUDA tests cannot run here (CuPy missing, or no GPU the driver shows), or None when they can."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install devrep[cuda12] or devrep[cuda13])"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"CuPy is installed but the CUDA driver reports no GPU ({exc})"
    return None if count else "CuPy is installed but no NVIDIA GPU is visible"


HOST_KINDS = ["anonymous", "memfd"]
"""The two kinds of writable memory devrep protects: ``create_region``'s private memory, and a shared memfd mapping
(a client's memory, as the writer maps it)."""


def host_memory(kind: str, name: str, nbytes: int) -> HostMemory:
    """Writable host memory of ``kind`` (one of ``HOST_KINDS``) mapped in this process, pages allocated."""
    if kind == "anonymous":
        return create_private(name, nbytes)
    fd = memfd_create(name, nbytes)
    return HostMemory("memfd", map_fd(fd, nbytes, writable=True), nbytes, fd=fd)


def child_path(name: str) -> Path:
    """The file of child program ``name`` (``tests/children/<name>.py``)."""
    path = CHILDREN / f"{name}.py"
    assert path.is_file(), f"no child program {path}"
    return path


def child_argv(name: str, *args: str) -> list[str]:
    """The argv that runs child program ``name`` with ``args`` in this interpreter."""
    return [sys.executable, str(child_path(name)), *args]


def run_cli(*args: str, address: str | None = None, env: Mapping[str, str | None] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``devrep ARGS`` (``python -m devrep.cli`` in this interpreter, from the checkout's root), its output captured
    as text. ``address`` becomes $DEVREP_ADDRESS (without it the variable is unset: no server is picked up by
    accident); ``env`` sets variables over this process's environment (a None value unsets one)."""
    full = dict(os.environ)
    full.pop("DEVREP_ADDRESS", None)
    if address:
        full["DEVREP_ADDRESS"] = address
    for name, value in (env or {}).items():
        if value is None:
            full.pop(name, None)
        else:
            full[name] = value
    return subprocess.run([sys.executable, "-m", "devrep.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Prometheus samples: (name, sorted label pairs) -> value."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server's ``--metrics-port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metric_samples(text: str | bytes) -> Samples:
    """The samples of a Prometheus text exposition (``Metrics.render()`` or a scrape)."""
    if isinstance(text, bytes):
        text = text.decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> Samples:
    """GET http://127.0.0.1:PORT/metrics (must answer 200) and parse it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return metric_samples(reply.read())


def proc_fds(pid: int) -> int:
    """How many fds process ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def soak_scale() -> float:
    """``DEVREP_SOAK_SCALE`` (default 1): multiplies the soak versions' sizes (``make soak``)."""
    try:
        return float(os.environ.get("DEVREP_SOAK_SCALE", "1"))
    except ValueError:
        raise ValueError(f"DEVREP_SOAK_SCALE must be a number, got {os.environ['DEVREP_SOAK_SCALE']!r}") from None


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 15.0, interval: float = 0.02) -> float:
    """Poll ``predicate`` until it returns a true value; the seconds that took. A bounded wait for what is
    guaranteed to happen eventually (not a speed assertion): raises AssertionError naming ``what`` after
    ``timeout`` seconds."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


@contextmanager
def remote_writer(mode: str, *args: str) -> Iterator[tuple[socket.socket, int, list[int], subprocess.Popen[bytes]]]:
    """``children/remote_writer.py MODE <fd> ARGS...`` over a socket pair: yields our end (30 s timeout), the
    address of the child's mapping, the fds it sent (sync: userfaultfd, memfd; async: userfaultfd, pagemap,
    memfd) and the child; closes our end and kills the child (if still running) afterwards."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(child_argv("remote_writer", mode, str(theirs.fileno()), *args), pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ours.settimeout(30)
        msg, fds, _, _ = socket.recv_fds(ours, 64, 3)
        yield ours, int.from_bytes(msg, "little"), fds, proc
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
