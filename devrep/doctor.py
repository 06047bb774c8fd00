"""``devrep doctor``: what this kernel and these privileges allow, and which tracking modes work here.

Every mode is checked by doing it for real on a few scratch pages (a write-protect fault round trip, an
async-WP write found by PAGEMAP_SCAN, an inotify watch), not only by reading feature bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import select
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .linux.pagemap import PageCategory, PagemapScanner, ScanFlag
from .linux.uffd import DEV_USERFAULTFD, REARM_LOOP, Feature, RegisterMode, Userfaultfd
from .model import ExportKind

CAP_SYS_PTRACE = 19
MODES = ("sync", "async", "file", "explicit")


@dataclass
class ModeStatus:
    works: bool
    reason: str = ""


@dataclass
class NumaNode:
    node: int
    memory_bytes: int
    device: str
    """``numa:I`` for a node with memory, ``""`` for a memoryless (CPU-only) node."""


@dataclass
class NumaStatus:
    nodes: list[NumaNode] = field(default_factory=list)
    """Every online node (from ``/sys/devices/system/node``)."""
    mbind: bool = False
    """``mbind(MPOL_BIND)`` on a scratch memfd mapping worked and its pages landed on the node asked for."""
    mbind_error: str = ""


@dataclass
class BackendStatus:
    devices: list[str]
    """``describe()`` of each device the backend sees with its default options (``opencl:0 (...)``)."""
    error: str = ""
    """Why the backend is unavailable (a missing package or driver), empty when it loaded."""


@dataclass
class CudaDevice:
    device: str
    name: str
    uuid: str
    sharing: ExportKind
    """``CUDA_FD`` (VMM fd, read-only mappings, works across PID namespaces) or ``CUDA_IPC`` (classic IPC)."""
    reason: str
    """Why VMM fd sharing is or is not used on this device."""


@dataclass
class CudaStatus:
    available: bool = False
    reason: str = ""
    """Why the CUDA backend is unavailable (no CuPy, no driver, no GPU)."""
    devices: list[CudaDevice] = field(default_factory=list)


def probe_cuda(cupy_module: Any = None, vmm: Any = None) -> CudaStatus:
    """The CUDA backend's view of this machine: its GPUs, their UUIDs, and whether replicas are shared by VMM fd
    (read-only, across pods) or fall back to classic CUDA IPC, and why. Never raises."""
    from .errors import DevrepError

    try:
        from .backends._cuda import CudaBackend

        backend = CudaBackend(cupy_module=cupy_module, vmm=vmm)
    except DevrepError as exc:
        return CudaStatus(reason=str(exc))
    except Exception as exc:  # a broken CUDA install is reported, not fatal to doctor
        return CudaStatus(reason=f"{type(exc).__name__}: {exc}")
    try:
        if backend.device_count() == 0:
            return CudaStatus(reason="CuPy imports but the CUDA driver reports no GPU")
        status = CudaStatus(available=True)
        for i in range(backend.device_count()):
            d = backend._devices[i]
            sharing, why = backend.sharing(i)
            status.devices.append(CudaDevice(f"cuda:{i}", d.name, d.uuid, sharing, why))
        return status
    finally:
        backend.close()


@dataclass
class Capabilities:
    kernel: str
    machine: str
    euid: int
    cap_sys_ptrace: bool
    unprivileged_userfaultfd: int | None
    dev_userfaultfd: str
    userfaultfd: bool
    userfaultfd_error: str
    features: dict[str, bool]
    pagemap_scan: bool
    pagemap_scan_error: str
    inotify: bool
    fanotify: bool
    fanotify_error: str
    rearm_loop: str = REARM_LOOP
    """The sync-mode rearm loop: "c" (devrep.linux._wp, built with the package) or "python" (no C compiler was
    at hand when devrep was built: the same calls, about 1.8x slower)."""
    modes: dict[str, ModeStatus] = field(default_factory=dict)
    numa: NumaStatus = field(default_factory=NumaStatus)
    backends: dict[str, BackendStatus] = field(default_factory=dict)
    cuda: CudaStatus = field(default_factory=CudaStatus)

    @property
    def all_modes_work(self) -> bool:
        return all(m.works for m in self.modes.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def render(self, console: Any) -> None:
        """Print as rich tables on ``console`` (a ``rich.console.Console``)."""
        from rich.markup import escape
        from rich.table import Table

        def yes(ok: bool) -> str:
            return "[green]yes[/]" if ok else "[red]no[/]"

        env = Table(title="devrep doctor: kernel and privileges", show_header=False)
        env.add_row("kernel", f"{self.kernel} ({self.machine})")
        env.add_row("effective uid", str(self.euid))
        env.add_row("CAP_SYS_PTRACE", yes(self.cap_sys_ptrace))
        env.add_row("vm.unprivileged_userfaultfd", "absent" if self.unprivileged_userfaultfd is None
                    else str(self.unprivileged_userfaultfd))
        env.add_row(DEV_USERFAULTFD, self.dev_userfaultfd)
        env.add_row("userfaultfd", yes(self.userfaultfd) + (f"  {self.userfaultfd_error}" if self.userfaultfd_error
                                                           else ""))
        env.add_row("PAGEMAP_SCAN", yes(self.pagemap_scan) + (f"  {self.pagemap_scan_error}"
                                                              if self.pagemap_scan_error else ""))
        env.add_row("sync-mode rearm loop", "C (devrep.linux._wp)" if self.rearm_loop == "c" else
                    "[yellow]Python[/]  devrep was built without a C compiler; reinstall with gcc for faster syncs")
        env.add_row("inotify", yes(self.inotify))
        env.add_row("fanotify", yes(self.fanotify) + (f"  {self.fanotify_error}" if self.fanotify_error else ""))
        console.print(env)
        if self.features:
            feats = Table(title="userfaultfd features")
            feats.add_column("feature")
            feats.add_column("supported")
            for name, ok in self.features.items():
                feats.add_row(name, yes(ok))
            console.print(feats)
        modes = Table(title="tracking modes")
        modes.add_column("mode")
        modes.add_column("works")
        modes.add_column("why not")
        for name, status in self.modes.items():
            modes.add_row(name, yes(status.works), escape(status.reason))
        console.print(modes)
        nodes = Table(title="NUMA nodes (numa backend)")
        nodes.add_column("node")
        nodes.add_column("memory")
        nodes.add_column("device")
        for n in self.numa.nodes:
            nodes.add_row(str(n.node), f"{n.memory_bytes / 2**30:.1f} GiB", n.device or "(no memory)")
        console.print(nodes)
        console.print("mbind(MPOL_BIND): " + yes(self.numa.mbind)
                      + (f"  {self.numa.mbind_error}" if self.numa.mbind_error else ""))
        if self.backends:
            devices = Table(title="devices per backend")
            devices.add_column("backend")
            devices.add_column("devices")
            for name, backend in self.backends.items():
                devices.add_row(name, escape("\n".join(backend.devices)) if backend.devices
                                else f"[yellow]none[/]  {escape(backend.error)}".rstrip())
            console.print(devices)
        from rich.markup import escape  # reasons name extras like devrep[cuda12]

        if not self.cuda.available:
            console.print(f"CUDA backend: [red]not available[/]  {escape(self.cuda.reason)}")
        else:
            gpus = Table(title="CUDA GPUs (cuda backend)")
            for column in ("device", "name", "UUID", "VMM fd sharing (read-only)", "why"):
                gpus.add_column(column)
            for g in self.cuda.devices:
                vmm = g.sharing == ExportKind.CUDA_FD
                fallback = "" if vmm else "  (classic CUDA IPC: read-write, one PID namespace)"
                gpus.add_row(g.device, g.name, g.uuid, yes(vmm) + fallback, escape(g.reason))
            console.print(gpus)


def _cap_sys_ptrace() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    except OSError:
        pass
    return False


def _sysctl_unprivileged() -> int | None:
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def dev_userfaultfd_status() -> str:
    """`absent`, `accessible` or `present, no access`: what this process can do with /dev/userfaultfd."""
    if not os.path.exists(DEV_USERFAULTFD):
        return "absent"
    return "accessible" if os.access(DEV_USERFAULTFD, os.R_OK | os.W_OK) else "present, no access"


def _probe_uffd() -> tuple[Feature | None, str]:
    from .tracking._setup import uffd_unavailable_reason

    try:
        with Userfaultfd() as uffd:
            return uffd.api(Feature.NONE), ""
    except OSError as exc:
        return None, uffd_unavailable_reason(exc)


@contextlib.contextmanager
def _probe_mapping(npages: int) -> Iterator[tuple[mmap.mmap, int]]:
    """A shared mapping of a fresh ``npages``-page memfd and its address, for the probes below."""
    fd = os.memfd_create("devrep-doctor", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, npages * mmap.PAGESIZE)
        m = mmap.mmap(fd, npages * mmap.PAGESIZE)
    finally:
        os.close(fd)
    buf = (ctypes.c_char * len(m)).from_buffer(m)
    try:
        yield m, ctypes.addressof(buf)
    finally:
        del buf
        m.close()


def _check_sync() -> str:
    """A kernel-mode write into a write-protected memfd page must fault to us and complete once un-protected."""
    r, w = os.pipe()
    try:
        with _probe_mapping(2) as (m, address), Userfaultfd() as uffd:
            uffd.api(Feature.WP_HUGETLBFS_SHMEM)
            uffd.register(address, len(m), RegisterMode.WP)
            uffd.writeprotect(address, len(m), True)
            os.write(w, b"x")
            done: list[int] = []
            view = memoryview(m)[mmap.PAGESIZE: mmap.PAGESIZE + 1]
            reader = threading.Thread(target=lambda: done.append(os.readv(r, [view])), daemon=True)
            reader.start()
            if not select.select([uffd], [], [], 5)[0]:
                return "no write-protect fault arrived within 5 s"
            events = uffd.read_events()
            if not events or not events[0].is_wp:
                return f"unexpected userfaultfd events {events}"
            uffd.writeprotect(address + mmap.PAGESIZE, mmap.PAGESIZE, False)
            reader.join(5)
            view.release()
            if done != [1]:
                return "the faulting write did not complete after un-protecting"
        return ""
    finally:
        for f in (r, w):
            os.close(f)


def _check_async() -> str:
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _probe_mapping(4) as (m, address), Userfaultfd() as uffd:
            uffd.api(Feature.WP_ASYNC | Feature.WP_HUGETLBFS_SHMEM)
            uffd.register(address, len(m), RegisterMode.WP)
            uffd.writeprotect(address, len(m), True)
            m[2 * mmap.PAGESIZE] = 1
            ranges = PagemapScanner(pagemap).scan(address, address + len(m),
                                                  flags=ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC,
                                                  category_mask=PageCategory.WRITTEN,
                                                  return_mask=PageCategory.WRITTEN)
            want = [[address + 2 * mmap.PAGESIZE, address + 3 * mmap.PAGESIZE]]
            if ranges.tolist() != want:
                return f"PAGEMAP_SCAN found {ranges.tolist()} instead of the one written page"
        return ""
    finally:
        os.close(pagemap)


def _probe_pagemap_scan() -> str:
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        PagemapScanner(pagemap, 1).scan(0, mmap.PAGESIZE)
        return ""
    except OSError as exc:
        return f"PAGEMAP_SCAN ioctl failed ({exc.strerror}); it needs Linux 6.7+"
    finally:
        os.close(pagemap)


def _probe_inotify() -> str:
    from inotify_simple import INotify
    from inotify_simple import flags as IN

    try:
        with INotify() as ino, tempfile.TemporaryDirectory() as d:
            ino.add_watch(d, IN.MODIFY)
        return ""
    except OSError as exc:
        return f"inotify failed: {exc}"


def _probe_fanotify() -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "fanotify_init"):
        return "libc has no fanotify_init"
    fd = libc.fanotify_init(0, os.O_RDONLY)  # FAN_CLASS_NOTIF
    if fd < 0:
        return f"fanotify_init: {os.strerror(ctypes.get_errno())} (needs CAP_SYS_ADMIN)"
    os.close(fd)
    return ""


def _check_mbind(node: int) -> str:
    """Bind a scratch memfd mapping to ``node`` before first touch, allocate it, and ask the kernel (get_mempolicy,
    move_pages) whether the policy holds and every page sits on the node: what the numa backend relies on."""
    from .linux.numa import MPOL_BIND, get_mempolicy, mbind, page_nodes
    from .memory import buffer_address, map_fd

    npages = 4
    fd = os.memfd_create("devrep-doctor-numa", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, npages * mmap.PAGESIZE)
        array = map_fd(fd, npages * mmap.PAGESIZE, writable=True)
        address = buffer_address(array)
        mbind(address, array.nbytes, MPOL_BIND, [node])
        os.posix_fallocate(fd, 0, array.nbytes)
        array[::mmap.PAGESIZE] = 1  # map every page here, so move_pages can see it
        policy = get_mempolicy(address)
        if policy != (MPOL_BIND, [node]):
            return f"get_mempolicy reports mode {policy[0]} on nodes {policy[1]}, not MPOL_BIND on [{node}]"
        placed = page_nodes(address, npages).tolist()
        if placed != [node] * npages:
            return f"move_pages reports the pages on nodes {placed}, not all on node {node}"
        return ""
    finally:
        os.close(fd)


def _probe_numa() -> NumaStatus:
    from .numa import read_topology

    try:
        topology = read_topology()
    except (OSError, ValueError) as exc:
        return NumaStatus(mbind_error=f"cannot read /sys/devices/system/node: {exc}")
    status = NumaStatus([NumaNode(n, topology.memory.get(n, 0), topology.device(n) if n in topology.nodes else "")
                         for n in topology.online])
    if not topology.nodes:
        status.mbind_error = "no NUMA node with memory in /sys/devices/system/node (a kernel without CONFIG_NUMA?)"
        return status
    status.mbind_error = _attempt(lambda: _check_mbind(topology.nodes[0]))
    status.mbind = not status.mbind_error
    return status


def _attempt(check: Any) -> str:
    try:
        return str(check())
    except OSError as exc:
        return f"{exc}"


def probe_backends() -> dict[str, BackendStatus]:
    """Load every backend with its default options and list the devices it sees; never raises."""
    from .backends import BACKENDS, load_backend

    out = {}
    for kind in BACKENDS:
        try:
            backend = load_backend(kind)
        except Exception as exc:  # a missing package / driver / device is reported, not raised
            out[kind] = BackendStatus([], f"{type(exc).__name__}: {exc}")
            continue
        try:
            out[kind] = BackendStatus([backend.describe(i) for i in range(backend.device_count())])
        except Exception as exc:
            out[kind] = BackendStatus([], f"{type(exc).__name__}: {exc}")
        finally:
            backend.close()
    return out


def probe(backends: bool = False) -> Capabilities:
    """Probe this machine; never raises for a missing feature (it is reported instead)."""
    uname = os.uname()
    supported, uffd_error = _probe_uffd()
    features = {f.name: bool(supported is not None and f in supported) for f in Feature if f.name and f.value}
    scan_error = _attempt(_probe_pagemap_scan)
    inotify_error = _attempt(_probe_inotify)
    fanotify_error = _attempt(_probe_fanotify)
    caps = Capabilities(
        kernel=uname.release, machine=uname.machine, euid=os.geteuid(), cap_sys_ptrace=_cap_sys_ptrace(),
        unprivileged_userfaultfd=_sysctl_unprivileged(), dev_userfaultfd=dev_userfaultfd_status(),
        userfaultfd=supported is not None, userfaultfd_error=uffd_error, features=features,
        pagemap_scan=not scan_error, pagemap_scan_error=scan_error, inotify=not inotify_error,
        fanotify=not fanotify_error, fanotify_error=fanotify_error,
    )
    if supported is None:
        sync_reason = async_reason = uffd_error
    else:
        sync_reason = ("userfaultfd lacks WP_HUGETLBFS_SHMEM (write-protecting memfd pages, Linux 5.19+)"
                       if Feature.WP_HUGETLBFS_SHMEM not in supported else _attempt(_check_sync))
        if Feature.WP_ASYNC not in supported:
            async_reason = "userfaultfd lacks WP_ASYNC (Linux 6.7+)"
        elif scan_error:
            async_reason = scan_error
        else:
            async_reason = _attempt(_check_async)
    caps.modes = {
        "sync": ModeStatus(not sync_reason, sync_reason),
        "async": ModeStatus(not async_reason, async_reason),
        "file": ModeStatus(not inotify_error, inotify_error),
        "explicit": ModeStatus(True, ""),
    }
    caps.numa = _probe_numa()
    if backends:
        caps.backends = probe_backends()
    caps.cuda = probe_cuda()
    return caps


def main_doctor(as_json: bool) -> int:
    """Entry point for ``devrep doctor [--json]``: 0 when every tracking mode works here, 1 otherwise.

    Also lists the devices each backend sees (a backend without devices does not change the exit code: most
    hosts have no GPU)."""
    caps = probe(backends=True)
    if as_json:
        print(caps.to_json())
    else:
        from ._console import make_console

        caps.render(make_console())
    return 0 if caps.all_modes_work else 1
