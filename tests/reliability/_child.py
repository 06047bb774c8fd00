"""Imported first by the suite's helper scripts: tie the helper's life to the test process that started it.

PR_SET_PDEATHSIG is set by the child itself (not with ``preexec_fn``: forking a parent that runs gRPC threads
and then running Python code before exec upsets gRPC's fork handlers).
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies, so a test killed by its timeout leaves nothing behind.

    The signal really fires when the parent *thread* that started us exits: the suite starts helpers from
    the test's main thread only."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


die_with_parent()
