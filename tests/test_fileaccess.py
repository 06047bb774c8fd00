"""The per-thread credential switch of ``devrep.service.fileaccess`` stays in its thread and is always undone."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import pytest

from devrep.errors import PermissionDeniedError
from devrep.service import fileaccess

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid's credentials needs root")


def _creds(tid: int | None = None) -> dict[str, str]:
    path = f"/proc/self/task/{tid}/status" if tid else "/proc/thread-self/status"
    lines = dict(line.split(":", 1) for line in Path(path).read_text().splitlines() if ":" in line)
    return {k: " ".join(lines[k].split()) for k in ("Uid", "Gid", "Groups", "CapEff", "CapPrm")}


@needs_root
def test_switch_is_per_thread_and_undone() -> None:
    before = _creds()
    main_tid = threading.get_native_id()
    seen: dict[str, dict[str, str]] = {}
    inside = threading.Event()
    leave = threading.Event()

    def worker() -> None:
        seen["before"] = _creds()
        with fileaccess._thread_credentials(65534, 65534, [65533]):
            seen["inside"] = _creds()
            inside.set()
            leave.wait(30)
        seen["after"] = _creds()

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(30)
    seen["main_meanwhile"] = _creds(main_tid)
    leave.set()
    thread.join(30)
    print(seen)
    # fsuid/fsgid are the 4th Uid/Gid field; no effective capability; the given groups
    assert seen["inside"]["Uid"].split()[3] == "65534" and seen["inside"]["Gid"].split()[3] == "65534"
    assert seen["inside"]["Groups"] == "65533" and int(seen["inside"]["CapEff"], 16) == 0
    assert seen["inside"]["CapPrm"] == before["CapPrm"]
    assert seen["main_meanwhile"] == before, "another thread's credentials changed"
    assert seen["after"] == seen["before"] == before


@needs_root
def test_refused_open_restores_credentials() -> None:
    directory = Path(tempfile.mkdtemp(prefix="devrep-fa-"))
    try:
        secret = directory / "secret"
        secret.write_text("x")
        secret.chmod(0o600)
        before = _creds()
        with pytest.raises(PermissionDeniedError):
            fileaccess.open_as_peer(str(secret), 65534, 65534, ())
        assert _creds() == before
        fd = fileaccess.open_as_peer(str(secret), 0, 0, ())  # and the same thread still opens as root
        os.close(fd)
    finally:
        secret.unlink()
        directory.rmdir()
