"""Thin ctypes bindings to the Linux interfaces devrep's write tracking is built on.

* :mod:`devrep.kernel.uffd` -- userfaultfd(2): API handshake, register, write-protect, wake, event reading.
* :mod:`devrep.kernel.pagemap` -- the PAGEMAP_SCAN ioctl on ``/proc/<pid>/pagemap`` (Linux 6.7+).
* :mod:`devrep.kernel.numa` -- mbind, get_mempolicy, move_pages (query mode) and getcpu, for the NUMA backend.

No policy lives here: errors surface as ``OSError`` with the kernel's errno; :mod:`devrep.tracking` turns
them into devrep errors.
"""

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
