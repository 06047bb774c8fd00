"""A client as a pod's process (test_kube_node; run in its own PID and mount namespaces, without capabilities).

``python pod_client.py ADDRESS``: prints one JSON line: its pid, its effective capabilities (``CapEff`` of
/proc/self/status), the errno of a bare userfaultfd(2) (0 if it worked), and per tracking mode (sync, async,
explicit) either ``"unsupported: <reason>"`` or whether a fresh cpu:0 replica equals the host after writes that
the mode must report (explicit mode invalidates them).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

import devrep
import devrep.client
from devrep.linux import uffd


def main(address: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "caps": [line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                 if line.startswith("CapEff")],
    }
    # What a default container gets: userfaultfd(2) without CAP_SYS_PTRACE may only see user-mode faults.
    fd = libc.syscall(uffd.SYS_USERFAULTFD, os.O_CLOEXEC)
    report["syscall_errno"] = 0 if fd >= 0 else ctypes.get_errno()
    with devrep.client.connect(address, timeout=30) as dr:
        for mode in ("sync", "async", "explicit"):
            try:
                region = dr.create_region(mode, 64 * 4096, tracking=mode)
            except devrep.UnsupportedModeError as e:
                report[mode] = f"unsupported: {e}"
                continue
            region.array[:] = 1
            dr.replicate(mode, ["cpu:0"])
            with dr.acquire(mode, "cpu:0") as lease:
                assert int(lease.array.sum()) == 64 * 4096
            region.array[4096:3 * 4096] = 7  # sync/async: no invalidate, the kernel must report these writes
            region.array[-1] = 9
            if mode == "explicit":
                region.invalidate(4096, 2 * 4096)
                region.invalidate(63 * 4096, 4096)
            with dr.acquire(mode, "cpu:0", fresh=True) as lease:
                report[mode] = bool(np.array_equal(lease.array, region.array))
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
