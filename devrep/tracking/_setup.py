"""Shared setup of the userfaultfd-based modes in the service: which memory they can protect. Opening and
registering a userfaultfd (also done by a client for its own memory) lives in :mod:`devrep.protect`."""

from __future__ import annotations

from ..errors import UnsupportedModeError
from ..memory import HostMemory
from ..protect import WP_FEATURES, address_and_length, open_uffd, register_wp, uffd_unavailable_reason

__all__ = ["WP_FEATURES", "address_and_length", "check_host", "open_uffd", "register_wp",
           "uffd_unavailable_reason"]

def check_host(mode: str, host: HostMemory) -> None:
    """Reject memory whose writers do not write through a mapping of this process."""
    if host.kind == "file":
        raise UnsupportedModeError(
            f"tracking='{mode}' cannot protect a regular file ({host.path}): its writers use write(2) from "
            "other processes, which no page protection here sees; use tracking='file' or 'explicit'"
        )
    if host.kind == "memfd" and not host.array.flags.writeable:
        raise UnsupportedModeError(
            f"tracking='{mode}' on a memory object handed over by another process protects nothing: the "
            f"writer writes through its own mapping. Have the writer set up the userfaultfd "
            f"(prepare_{mode}_client) and use {mode.capitalize()}Tracker.remote(...), or use 'explicit'"
        )


