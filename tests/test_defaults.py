"""One default, never stale (issue 11 item 2), through a real ``devrep serve`` process: a file registered with the
client's defaults is file-tracked (a rewrite shows in the next fresh acquire), and a memfd region gets the strongest
mode this host allows, which DescribeRegion reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _devrep_service import server_process

from devrep.client import connect

pytestmark = pytest.mark.timeout(180)


def test_file_registered_with_defaults_is_never_stale(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"A" * (16 * 4096 + 10))
    with server_process() as (address, _proc), connect(address) as client:
        region = client.register_file("data", path)                 # defaults
        assert region.info.tracking == "file", region.info
        client.replicate("data", ["cpu:0"])
        with client.acquire("data", "cpu:0") as lease:
            assert bytes(lease.array[:4]) == b"AAAA"
        with open(path, "r+b") as f:                                 # rewrite in place, same size
            f.write(b"B" * (16 * 4096 + 10))
        with client.acquire("data", "cpu:0") as lease:              # a fresh acquire: the new bytes
            got = bytes(lease.array[::4096])
        print(f"after the rewrite: expected {b'B' * 17!r}, got {got!r}")
        assert got == b"B" * 17
        assert client.describe("data").tracking == "file"


def test_memfd_region_defaults_to_the_strongest_mode_and_describe_reports_it() -> None:
    with server_process() as (address, _proc), connect(address) as client:
        modes = set(client.stats().tracking_modes)
        handle = client.create_region("m", 64 * 4096)                # defaults
        chosen = client.describe("m").tracking
        strongest = next((m for m in ("sync", "async") if m in modes), "explicit")
        print(f"server modes {sorted(modes)}: expected {strongest}, got {chosen}")
        # Root on Linux >= 6.7 (CI) offers every mode: the default must be sync there.
        assert chosen == strongest == handle.info.tracking
        handle.array[:] = 1
        client.replicate("m", ["cpu:0"])
        handle.array[5 * 4096: 6 * 4096] = 7                         # no invalidate call
        if chosen == "explicit":
            handle.invalidate(5 * 4096, 4096)
        with client.acquire("m", "cpu:0") as lease:
            page = np.asarray(lease.array[5 * 4096: 6 * 4096])
            assert int(page.min()) == int(page.max()) == 7, f"expected 7s, got {np.unique(page)}"
        explicit = client.create_region("e", 4096, tracking="explicit")  # explicit only when asked for
        assert explicit.info.tracking == "explicit"
