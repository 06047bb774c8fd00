"""``Replicator``: the in-process entry point. Owns backends and regions; the gRPC service wraps one."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._pages import PAGE_SIZE, check_block_size
from .backends import Backend, load_backend, parse_device
from .errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnknownDeviceError,
)
from .memory import HostMemory, adopt_fd, create_private, map_file, map_file_fd, wrap_buffer
from .model import Event, Listener, ProgressCallback, SyncReport
from .region import DEFAULT_TIMEOUT, Region, check_region_name
from .tracking import Tracker, make_tracker


class Replicator:
    """Regions of host memory and their device replicas.

    >>> with Replicator() as rep:
    ...     region = rep.create_region("emb", 1 << 20)
    ...     region.array[:] = 7
    ...     _ = rep.replicate("emb", ["cpu:0", "cpu:1"])
    ...     region.array[4096] = 8              # a host write...
    ...     _ = region.invalidate(4096, 1)      # ...reported (explicit mode)
    ...     with region.acquire("cpu:0") as lease:   # fresh: syncs the one stale page first
    ...         int(lease.array[4096])
    8

    ``backends`` maps a backend name to an instance (default: a 4-device CPU backend; ``opencl`` and
    ``cuda`` are loaded on first use of one of their devices).
    """

    def __init__(self, backends: dict[str, Backend] | None = None, *, cpu_devices: int = 4) -> None:
        self._backends: dict[str, Backend] = dict(backends or {})
        self._cpu_devices = cpu_devices
        self._regions: dict[str, Region] = {}
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self.closed = False

    # ------------------------------------------------------------------ devices
    def backend(self, kind: str) -> Backend:
        with self._lock:
            if kind not in self._backends:
                options: dict[str, Any] = {"devices": self._cpu_devices} if kind == "cpu" else {}
                self._backends[kind] = load_backend(kind, **options)
            return self._backends[kind]

    def resolve(self, device: str) -> tuple[Backend, int]:
        """``"cpu:1"`` -> (backend, 1), checking that the device exists."""
        kind, index = parse_device(device)
        backend = self.backend(kind)
        count = backend.device_count()
        if index >= count:
            have = f"{kind}:0..{kind}:{count - 1}" if count else f"no {kind} devices"
            raise UnknownDeviceError(f"no device {device}: this host has {have}")
        return backend, index

    def devices(self) -> list[str]:
        """Devices of the backends loaded so far."""
        with self._lock:
            return [f"{k}:{i}" for k, b in self._backends.items() for i in range(b.device_count())]

    # ------------------------------------------------------------------ events
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every region event (invalidate, sync, verify, ...)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def _dispatch(self, event: Event) -> None:
        for listener in list(self._listeners):
            listener(event)

    # ------------------------------------------------------------------ regions
    def _add(self, name: str, make_host: Any, block_size: int, tracking: str | Tracker) -> Region:
        check_region_name(name)
        check_block_size(block_size)
        tracker = make_tracker(tracking) if isinstance(tracking, str) else tracking
        try:
            return self._add_tracked(name, make_host, block_size, tracker)
        except BaseException:
            with contextlib.suppress(Exception):  # releases any fds (a handed-over uffd) the tracker holds
                tracker.close()
            raise

    def _add_tracked(self, name: str, make_host: Any, block_size: int, tracker: Tracker) -> Region:
        with self._lock:
            if self.closed:
                raise InvalidArgumentError("replicator is closed")
            if name in self._regions:
                raise AlreadyExistsError(f"region {name!r} already exists")
            self._regions[name] = None  # type: ignore[assignment]  # reserve the name
        try:
            host: HostMemory = make_host()
            try:
                region = Region(name, host, tracker, self.resolve, block_size=block_size,
                                listeners=[self._dispatch])
            except BaseException:
                host.close()
                raise
        except BaseException:
            with self._lock:
                del self._regions[name]
            raise
        with self._lock:
            if not self.closed:
                self._regions[name] = region
                return region
            del self._regions[name]
        region.close()  # close() ran meanwhile and could not see this region
        raise FailedPreconditionError("replicator was closed while the region was being registered")

    def create_region(self, name: str, nbytes: int, *, block_size: int = PAGE_SIZE,
                      tracking: str | Tracker = "explicit") -> Region:
        """A new host buffer of private memory, allocated up front; ``region.array`` is the owner's writable view
        (a forked child gets its own copy, as of any private memory: its writes never reach the region)."""
        return self._add(name, lambda: create_private(name, nbytes), block_size, tracking)

    def register_file(self, name: str, path: str | os.PathLike[str], *, block_size: int = PAGE_SIZE,
                      tracking: str | Tracker = "file") -> Region:
        """An existing regular file, mapped read-only; by default rewrites are found by inotify + page hashes."""
        return self._add(name, lambda: map_file(path), block_size, tracking)

    def register_file_fd(self, name: str, fd: int, path: str | os.PathLike[str] | None = None, *,
                         block_size: int = PAGE_SIZE, tracking: str | Tracker = "file") -> Region:
        """A regular file already open for reading on ``fd`` (devrep takes ownership of ``fd``, closed on failure
        too); ``path`` names it for messages and the file tracker. The server registers clients' files this way,
        so it never re-opens a client-named path with its own privileges."""
        handed: list[bool] = []

        def adopt() -> HostMemory:
            handed.append(True)  # from here map_file_fd (on failure) or the host memory owns fd
            return map_file_fd(fd, Path(path) if path is not None else None)

        try:
            return self._add(name, adopt, block_size, tracking)
        except BaseException:
            if not handed:  # refused before mapping (name taken, replicator closed)
                os.close(fd)
            raise

    def register_buffer(self, name: str, buffer: Any, *, block_size: int = PAGE_SIZE,
                        tracking: str | Tracker = "explicit") -> Region:
        """Any page-aligned buffer of this process (e.g. an ``mmap``); devrep never writes it."""
        return self._add(name, lambda: wrap_buffer(buffer), block_size, tracking)

    def register_fd(self, name: str, fd: int, nbytes: int | None = None, *, block_size: int = PAGE_SIZE,
                    tracking: str | Tracker = "explicit") -> Region:
        """A memfd handed over by another process; devrep takes ownership of ``fd`` (closed on failure too) and
        seals it against shrinking."""
        adopted: list[HostMemory] = []

        def adopt() -> HostMemory:
            adopted.append(adopt_fd(fd, nbytes))
            return adopted[0]

        try:
            return self._add(name, adopt, block_size, tracking)
        except BaseException:
            if not adopted:  # once adopted, the failed registration closed it with the host memory
                os.close(fd)
            raise

    def region(self, name: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            raise NotFoundError(f"no region named {name!r}")
        return region

    def regions(self) -> list[Region]:
        with self._lock:
            return [r for r in self._regions.values() if r is not None]

    def unregister(self, name: str) -> None:
        """Stop tracking, free the replicas (as their readers release them) and forget the region."""
        region = self.region(name)
        with self._lock:
            del self._regions[name]
        region.close()

    # ------------------------------------------------------------------ replication
    def replicate(self, name: str, devices: Sequence[str], *, progress: ProgressCallback | None = None,
                  timeout: float | None = DEFAULT_TIMEOUT) -> SyncReport:
        """Create replicas of ``name`` on ``devices`` (those it lacks) and bring every replica up to date."""
        region = self.region(name)
        if not devices:
            raise InvalidArgumentError("replicate needs at least one device")
        for device in devices:
            self.resolve(device)  # all-or-nothing: check every name before allocating anything
        added = []
        try:
            for device in dict.fromkeys(devices):
                if device not in region.devices:
                    region.add_replica(device)
                    added.append(device)
        except BaseException:
            for device in added:
                region.remove_replica(device)
            raise
        return region.sync(timeout=timeout, progress=progress)

    def sync(self, name: str | None = None, **kwargs: Any) -> list[SyncReport]:
        """Sync one region, or all of them."""
        regions = [self.region(name)] if name is not None else self.regions()
        return [r.sync(**kwargs) for r in regions]

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Unregister every region (releasing all write protections) and close the backends."""
        with self._lock:
            self.closed = True
            names = [n for n, r in self._regions.items() if r is not None]
        for name in names:
            self.unregister(name)
        for backend in self._backends.values():
            backend.close()

    def __enter__(self) -> Replicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
