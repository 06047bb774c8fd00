"""What ``devrep serve`` loads before it reports SERVING (benchmark S1 times it; this checks the cause, untimed).

A real ``devrep serve`` process starts on a temporary socket; right after its server started (health SERVING),
a hook records which heavy modules the process has loaded, then the process stops itself with SIGTERM.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from _devrep_service import ROOT, short_tmpdir

pytestmark = pytest.mark.timeout(120)

# Runs `devrep serve`; DevrepServer.start is wrapped to print the loaded modules of interest once serving.
SERVE_AND_REPORT = """
import os, signal, sys
import devrep.cli as cli
import devrep.service.server as server

started = server.DevrepServer.start

def start(self):
    result = started(self)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("rich", "numba", "llvmlite") or m == "ctypes.util")
    print("LOADED", *heavy, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # run() stops gracefully on SIGTERM
    return result

server.DevrepServer.start = start
sys.exit(cli.main(["serve", "--socket", sys.argv[1]]))
"""


def test_serve_reaches_serving_without_rich_numba_or_ldconfig() -> None:
    """rich loads only when the CLI prints through it, numba only in the warm-up thread after SERVING, and libc
    is opened by soname (``ctypes.util.find_library`` runs ``ldconfig -p`` in a subprocess)."""
    with short_tmpdir() as tmp:
        proc = subprocess.run([sys.executable, "-c", SERVE_AND_REPORT, f"{tmp}/d.sock"], capture_output=True,
                              text=True, timeout=90, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("LOADED")]
    assert proc.returncode == 0 and lines, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    loaded = lines[0].split()[1:]
    assert loaded == [], f"expected no rich/numba/llvmlite/ctypes.util before SERVING, got {loaded}"
