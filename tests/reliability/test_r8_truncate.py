"""R8: an owner truncates the memory under a replicated region (a SIGBUS hazard for whoever reads it).

* memfd regions: the service only accepts memfds sealed with F_SEAL_SHRINK, so the owner's ftruncate fails
  (EPERM) and nothing can happen; an unsealed memfd is refused with INVALID_ARGUMENT.
* file regions: the owner truncates the file. The service must survive (no SIGBUS), mark the region failed and
  tell its watchers (``region_failed``); other regions keep working.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import devrep
import devrep.client
from devrep._pages import PAGE_SIZE
from devrep.memory import memfd_create
from devrep.wire import sidechannel as protocol

from .conftest import ServerProcess


def test_r8_sealed_memfd_cannot_shrink(server: ServerProcess) -> None:
    with devrep.client.connect(server.address) as owner:
        region = owner.create_region("m", 64 * PAGE_SIZE)
        region.array[:] = 5
        owner.replicate("m", ["cpu:0"])
        fd = os.open(f"/proc/{os.getpid()}/fd/{_memfd_of(region.array)}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, PAGE_SIZE)
        finally:
            os.close(fd)
        with owner.acquire("m", "cpu:0") as lease:
            assert int(lease.array[-1]) == 5
        assert owner.describe("m").failed is None


def _memfd_of(array: Any) -> int:
    """The fd number of this process's memfd mapped at ``array`` (the client keeps only the mapping; find the
    mapping's file through /proc/self/map_files)."""
    address = array.__array_interface__["data"][0]
    for entry in os.listdir("/proc/self/map_files"):
        start, end = (int(x, 16) for x in entry.split("-"))
        if start <= address < end:
            # Re-open the mapped file; the returned number is a new fd the caller closes.
            return os.open(f"/proc/self/map_files/{entry}", os.O_RDWR)
    raise AssertionError("mapping not found")


def test_r8_unsealed_memfd_is_refused(server: ServerProcess) -> None:
    with devrep.client.connect(server.address) as client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(10)
        sock.connect(str(server.socket.with_name("devrep.fd.sock")))
        try:
            protocol.send(sock, {"op": "hello", "token": client.token})
            assert protocol.recv(sock)[0]["ok"]  # type: ignore[index]
            fd = memfd_create("unsealed", 16 * PAGE_SIZE, sealable=False)
            try:
                protocol.send(sock, {"op": "put_fds", "kind": "memfd"}, [fd])
            finally:
                os.close(fd)
            reply, fds = protocol.recv(sock)
            assert fds == []
            assert reply is not None and not reply["ok"] and reply["code"] == "INVALID_ARGUMENT"
            assert "F_SEAL_SHRINK" in reply["error"]
        finally:
            sock.close()


# Truncating a file that the service has mapped: any read of a lost page by the service is SIGBUS.
# ``file``: file tracking notices the size change and fails the region. ``explicit``: the owner reports the
# change and the service syncs. ``file-busy``: file tracking while Verify keeps reading every page; a Verify is
# in flight at the truncation only most of the time, so this variant tries up to 4 times.
@pytest.mark.parametrize("variant", ["file", "explicit", "file-busy"])
def test_r8_truncated_file_fails_the_region_not_the_service(server: ServerProcess, tmp_path: Path,
                                                            variant: str) -> None:
    with devrep.client.connect(server.address) as owner, devrep.client.connect(server.address) as other:
        bystander = other.create_region("bystander", 16 * PAGE_SIZE)
        bystander.array[:] = 3
        other.replicate("bystander", ["cpu:0"])
        for attempt in range(4 if variant == "file-busy" else 1):
            truncate_under_the_service(server, owner, tmp_path / f"data{attempt}.bin", f"f{attempt}", variant)
            with other.acquire("bystander", "cpu:0") as lease:  # the service still serves everyone else
                assert int(lease.array[0]) == 3


def truncate_under_the_service(server: ServerProcess, owner: devrep.client.Client, path: Path, name: str,
                               variant: str) -> None:
    tracking = "explicit" if variant == "explicit" else "file"
    # Busy: big enough that hashing it (~10 ms) dwarfs the RPC round trip.
    npages = 16384 if variant == "file-busy" else 256
    path.write_bytes(bytes(range(256)) * (npages * PAGE_SIZE // 256))
    owner.register_file(name, path, tracking=tracking)
    owner.replicate(name, ["cpu:0", "cpu:1"])
    events: list[devrep.Event] = []
    stream = owner.watch(name)

    def read_events() -> None:
        with contextlib.suppress(devrep.DevrepError):  # the stream breaks if the service dies
            events.extend(stream)

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    busy = threading.Event()
    stop = threading.Event()

    def verify_loop() -> None:
        while not stop.is_set():
            try:
                owner.verify(name)
            except devrep.DevrepError:
                return
            busy.set()

    if variant == "file-busy":
        for _ in range(2):
            threading.Thread(target=verify_loop, daemon=True).start()
        assert busy.wait(30)
        time.sleep(0.05)
    os.truncate(path, PAGE_SIZE)  # all pages but the first vanish under the service's mapping
    if tracking == "explicit":
        owner.invalidate(name)  # the owner reports "everything changed"; the sync must not touch lost pages
    deadline = time.monotonic() + 10
    failed = None
    while time.monotonic() < deadline and not failed:
        try:
            failed = owner.describe(name).failed
            if not failed and tracking == "explicit":
                owner.sync(name)
        except devrep.FailedPreconditionError:
            break
        except devrep.client.ServiceUnavailableError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(5)  # type: ignore[union-attr]  # let a dying server finish dying
            break
        time.sleep(0.05)
    stop.set()
    proc = server.proc
    assert proc is not None and proc.poll() is None, \
        f"the service died (exit status {proc.poll() if proc else None}; -7 is SIGBUS)"
    assert failed, "the region was not marked failed"
    with pytest.raises(devrep.FailedPreconditionError):
        owner.acquire(name, "cpu:0")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(e.kind == "region_failed" for e in events):
        time.sleep(0.05)
    stream.cancel()
    reader.join(10)
    assert any(e.kind == "region_failed" and e.region == name for e in events), events
    owner.unregister(name)
