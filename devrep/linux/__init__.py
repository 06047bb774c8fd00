"""Thin ctypes bindings to the Linux interfaces devrep's write tracking is built on.

* :mod:`devrep.linux.uffd` -- userfaultfd(2): API handshake, register, write-protect, wake, event reading.
* :mod:`devrep.linux.pagemap` -- the PAGEMAP_SCAN ioctl on ``/proc/<pid>/pagemap`` (Linux 6.7+).
* :mod:`devrep.linux.numa` -- mbind, get_mempolicy, move_pages (query mode) and getcpu, for the NUMA backend.

No policy lives here: errors surface as ``OSError`` with the kernel's errno; :mod:`devrep.tracking` turns
them into devrep errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

# Loaded on first use: the sync fault helper needs ``uffd`` alone, and ``pagemap`` brings numpy.
_LAZY = {
    "PAGEMAP_SCAN": ".pagemap",
    "PageCategory": ".pagemap",
    "PagemapScanner": ".pagemap",
    "ScanFlag": ".pagemap",
    "pagemap_scan": ".pagemap",
    "MSG_SIZE": ".uffd",
    "Event": ".uffd",
    "FaultEvent": ".uffd",
    "Feature": ".uffd",
    "PagefaultFlag": ".uffd",
    "RegisterMode": ".uffd",
    "Userfaultfd": ".uffd",
    "WriteProtectMode": ".uffd",
    "parse_events": ".uffd",
}

if TYPE_CHECKING:
    from .pagemap import PAGEMAP_SCAN, PageCategory, PagemapScanner, ScanFlag, pagemap_scan
    from .uffd import (
        MSG_SIZE,
        Event,
        FaultEvent,
        Feature,
        PagefaultFlag,
        RegisterMode,
        Userfaultfd,
        WriteProtectMode,
        parse_events,
    )


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


__all__ = [
    "MSG_SIZE",
    "PAGEMAP_SCAN",
    "Event",
    "FaultEvent",
    "Feature",
    "PageCategory",
    "PagefaultFlag",
    "PagemapScanner",
    "RegisterMode",
    "ScanFlag",
    "Userfaultfd",
    "WriteProtectMode",
    "pagemap_scan",
    "parse_events",
]
