"""Verify: hash the host and each replica's readable buffer, and mark stale (then, optionally, copy again) the pages
that were valid in the leased buffer, not written since, and hash differently."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .._pages import RunArray, runs_from_pages
from ..errors import FailedPreconditionError
from ..model import Event, EventKind, VerifyReport
from ._replicas import Lease, Replica

if TYPE_CHECKING:
    from ._region import Region


def verify(region: Region, devices: Sequence[str] | None, resync: bool, deadline: float | None
           ) -> list[VerifyReport]:
    """``Region.verify`` (see there); ``deadline`` on the monotonic clock, ``None`` for no bound."""
    targets = list(devices) if devices is not None else region.devices
    held: list[tuple[Lease, npt.NDArray[np.uint32], npt.NDArray[np.bool_]]] = []
    reports: list[tuple[Replica, RunArray, int]] = []
    state = region.page_state
    try:
        for device in targets:
            with region.lock:
                events = region._collect_locked()
                lease = region._lease_locked(region._replica(device), deadline, fresh=False)
                assert lease is not None
                # Snapshot in the same lock hold as the lease: these bits describe the leased buffer.
                held.append((lease, state.gen.copy(), state.valid_mask(lease.replica.slot)))
            region._emit(events)
        try:
            host_hashes = region.host.hash_pages()
        except FailedPreconditionError as exc:
            region.fail(str(exc))
            raise
        device_hashes = [lease.replica.backend.hash_pages(lease.buffer) for lease, _, _ in held]
        events = []
        with region.lock:
            events += region._collect_locked()
            for (lease, gen_at_lease, valid_at_lease), dev_hashes in zip(held, device_hashes, strict=True):
                rep = lease.replica
                checked = valid_at_lease & (state.gen == gen_at_lease)
                bad = rep.backend.compare(host_hashes, dev_hashes)
                bad = bad[checked[bad]]
                state.mark_mismatched(rep.slot, bad, has_spare=rep.has_spare())
                runs = runs_from_pages(bad)
                stats = region.stats
                stats.verifies += 1
                stats.pages_verified += int(np.count_nonzero(checked))
                stats.verify_mismatches += int(bad.size)
                reports.append((rep, runs, int(np.count_nonzero(checked))))
                if bad.size:
                    events.append(Event(EventKind.VERIFY, region.name, state.generation, runs, device=rep.device))
        region._emit(events)
    finally:
        for lease, _, _ in held:
            lease.release()
    mismatched = [rep.device for rep, runs, _ in reports if len(runs) and not rep.closed]
    if resync and mismatched:
        region.sync(mismatched, timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        with region.lock:
            region.stats.resyncs += 1
    return [VerifyReport(region.name, rep.device, checked, runs, bool(resync and len(runs)), region.npages - checked)
            for rep, runs, checked in reports]
