"""Regions, replicas and leases: the coherence rules live here (see README, "Coherence rules").

The package is split by job; ``Region`` (``_region``) is the facade that holds the region lock and wires the rest:

* ``_state.PageState``: the per-page state (generation, valid bits, lag bits) and its pure transitions, numpy only;
* ``_replicas``: ``Replica`` (a region's one or two buffers on a device, lease counts, the spare and the flip) and
  ``Lease`` (a reader's hold on one buffer);
* ``_plan``: sync planning (which buffer, which pages), the copy (host read once, fan-out) and the commit;
* ``_verify``: hashing host and replicas and marking mismatches stale.

Torn pages are impossible by construction: a sync never writes a buffer that has a lease on it. A replica has one
buffer until a sync finds it leased; then it gets a second, the sync writes the new pages there (catching up the
pages the spare missed, tracked by ``lag``) and flips which buffer new acquires get. The old buffer becomes the
spare once its readers release it. A sync that finds both buffers leased waits for the spare's readers, bounded by
its timeout.

A page is marked valid only if its generation did not change between the snapshot a sync takes before copying and
the commit after it; a tracker's ``rearm`` (before the copy, off the region lock) makes every later write show up
in the commit's ``collect()`` (see ``devrep.tracking``).
"""

from __future__ import annotations

from ._region import DEFAULT_TIMEOUT, Region, check_region_name
from ._replicas import MAX_REPLICAS, Lease, Replica
from ._state import PageState

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_REPLICAS",
    "Lease",
    "PageState",
    "Region",
    "Replica",
    "check_region_name",
]
