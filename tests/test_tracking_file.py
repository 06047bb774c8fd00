"""File mode: inotify + mtime/size polling, then exactly the pages whose hash changed."""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import devrep
from devrep._pages import PAGE_SIZE, pages_from_runs
from devrep.model import Event
from devrep.tracking._file import FileTracker

pytestmark = pytest.mark.usefixtures("hang_guard")

DEV = "cpu:0"
NPAGES = 1000


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(1).integers(0, 256, NPAGES * PAGE_SIZE + 123, dtype=np.uint8)
    path = tmp_path / "model.ckpt"
    path.write_bytes(data.tobytes())
    return path, data


def test_in_place_rewrite_reports_exactly_the_changed_pages(rep: devrep.Replicator,
                                                            ckpt: tuple[Path, np.ndarray]) -> None:
    path, data = ckpt
    region = rep.register_file("f", path, tracking="file")
    rep.replicate("f", [DEV])
    rng = np.random.default_rng(2)
    changed = np.sort(rng.choice(NPAGES, NPAGES // 20, replace=False))  # a 5 % checkpoint update
    fd = os.open(path, os.O_WRONLY)
    try:
        for page in changed:
            os.pwrite(fd, rng.integers(0, 256, 100, dtype=np.uint8).tobytes(), int(page) * PAGE_SIZE + 7)
        # Rewriting pages with the bytes they already hold changes nothing.
        os.pwrite(fd, data[:PAGE_SIZE * 3].tobytes(), 0)
        os.pwrite(fd, b"\xff", NPAGES * PAGE_SIZE + 100)  # the partial last page
    finally:
        os.close(fd)
    expected = np.union1d(np.setdiff1d(changed, [0, 1, 2]), [NPAGES])
    stale = pages_from_runs(region.invalid_runs(DEV))
    assert np.array_equal(stale, expected)
    report = rep.sync("f")[0]
    assert report.pages_copied == expected.size  # ~5 % moves ~5 %
    with region.acquire(DEV) as lease:
        assert lease.read().tobytes() == path.read_bytes()
    assert len(region.invalid_runs(DEV)) == 0


def test_mmap_writes_are_found_by_polling(rep: devrep.Replicator, ckpt: tuple[Path, np.ndarray]) -> None:
    path, _ = ckpt
    got = threading.Event()
    seen: list[Event] = []

    def listener(event: Event) -> None:
        if event.kind == "invalidate" and event.region == "m":
            seen.append(event)
            got.set()

    rep.add_listener(listener)
    region = rep.register_file("m", path, tracking=FileTracker(poll_interval=0.05))
    rep.replicate("m", [DEV])
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        m[5 * PAGE_SIZE] = (m[5 * PAGE_SIZE] + 1) % 256
    assert got.wait(10), "the watcher never noticed the mmap write"
    assert pages_from_runs(seen[0].runs).tolist() == [5]
    assert len(region.invalid_runs(DEV)) > 0


def test_size_change_fails_the_region(rep: devrep.Replicator, ckpt: tuple[Path, np.ndarray]) -> None:
    path, _ = ckpt
    region = rep.register_file("s", path, tracking=FileTracker(poll_interval=0.05))
    rep.replicate("s", [DEV])
    with open(path, "ab") as f:
        f.write(b"more")
    assert region.invalid_runs(DEV)[:, 1].sum() == region.npages  # everything stale at once
    with pytest.raises(devrep.FailedPreconditionError, match="changed size"):
        rep.sync("s")


def test_replaced_by_rename_fails_the_region(rep: devrep.Replicator, ckpt: tuple[Path, np.ndarray]) -> None:
    path, data = ckpt
    region = rep.register_file("r", path, tracking=FileTracker(poll_interval=0.05))
    rep.replicate("r", [DEV])
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data.tobytes())
    tmp.replace(path)
    with pytest.raises(devrep.FailedPreconditionError, match="replaced"):
        region.acquire(DEV)
    deadline = time.monotonic() + 10  # the watcher thread fails the region (it may not hold the lock we do)
    while region.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "replaced" in (region.describe().failed or "")


def test_file_mode_rejects_memory(rep: devrep.Replicator) -> None:
    with pytest.raises(devrep.UnsupportedModeError, match="'sync', 'async' or 'explicit'"):
        rep.create_region("mem", 4 * PAGE_SIZE, tracking="file")


def test_bad_poll_interval() -> None:
    with pytest.raises(devrep.InvalidArgumentError):
        FileTracker(poll_interval=-1)
