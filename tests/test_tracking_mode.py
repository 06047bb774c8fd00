"""Tracking modes are one enum, ``devrep.model.TrackingMode`` (issue 13 item 7): a ``StrEnum``, so the strings users
pass keep working everywhere, and an unknown mode is an ``InvalidArgumentError`` naming the valid ones."""

from __future__ import annotations

import pytest
from _devrep_service import inproc_server

from devrep.client import connect
from devrep.client._client import MODES as CLIENT_MODES
from devrep.engine import Replicator
from devrep.errors import InvalidArgumentError
from devrep.model import TrackingMode
from devrep.service.servicer import MODES as SERVER_MODES
from devrep.service.servicer import available_modes
from devrep.tracking import TRACKERS, _register_kernel_trackers, make_tracker
from devrep.wire._gen import devrep_pb2 as pb

pytestmark = pytest.mark.timeout(120)


def test_the_modes_and_their_strings() -> None:
    assert [str(m) for m in TrackingMode] == ["explicit", "sync", "async", "file", "auto"]
    assert TrackingMode("sync") is TrackingMode.SYNC and TrackingMode.SYNC == "sync"
    assert f"{TrackingMode.ASYNC}" == "async"


def test_every_tracker_is_registered_under_its_own_mode() -> None:
    _register_kernel_trackers()
    print(f"TRACKERS: {dict(TRACKERS)}")
    assert set(TRACKERS) == set(TrackingMode) - {TrackingMode.AUTO}  # auto is a request, resolved by the service
    for mode, cls in TRACKERS.items():
        assert type(mode) is TrackingMode and cls.mode is mode, (mode, cls)
        assert TRACKERS[str(mode)] is cls  # type: ignore[index]  # a plain string finds it too


def test_make_tracker_takes_a_mode_or_its_string_and_names_the_known_modes() -> None:
    for mode in (TrackingMode.EXPLICIT, "explicit"):
        tracker = make_tracker(mode)
        assert tracker.mode is TrackingMode.EXPLICIT
        tracker.close()
    for bad in ("bogus", "auto", TrackingMode.AUTO, "", "EXPLICIT"):
        with pytest.raises(InvalidArgumentError) as exc:
            make_tracker(bad)
        print(f"make_tracker({bad!r}): {exc.value}")
        assert str(exc.value) == f"unknown tracking mode {str(bad)!r}; known: async, explicit, file, sync"


def test_the_wire_maps_cover_every_protobuf_mode_both_ways() -> None:
    assert set(SERVER_MODES) == set(pb.TrackingMode.values())
    assert set(SERVER_MODES.values()) == set(TrackingMode)
    assert {v: k for k, v in SERVER_MODES.items()} == CLIENT_MODES
    assert available_modes() == ["async", "explicit", "file", "sync"]
    assert all(type(m) is str for m in available_modes())  # plain strings on the wire


def test_in_process_regions_take_strings_and_modes() -> None:
    with Replicator(cpu_devices=1) as rep:
        for name, mode in (("s", "explicit"), ("m", TrackingMode.EXPLICIT)):
            region = rep.create_region(name, 4096, tracking=mode)
            info = region.describe()
            assert info.tracking == "explicit" and info.tracking is TrackingMode.EXPLICIT, info.tracking
        with pytest.raises(InvalidArgumentError, match="unknown tracking mode 'bogus'; known: "):
            rep.create_region("bad", 4096, tracking="bogus")


def test_client_regions_take_strings_and_modes() -> None:
    with inproc_server() as server, connect(server.address) as client:
        for name, mode in (("s", "explicit"), ("m", TrackingMode.EXPLICIT), ("a", TrackingMode.AUTO)):
            handle = client.create_region(name, 4096, tracking=mode)
            described = client.describe(name).tracking
            print(f"create_region(tracking={mode!r}): {handle.info.tracking}, described {described!r}")
            assert handle.info.tracking == described == "explicit"  # auto in a server in this process: explicit
            assert type(described) is str
        with pytest.raises(InvalidArgumentError) as exc:
            client.create_region("bad", 4096, tracking="bogus")
        assert "'auto', 'explicit', 'sync' or 'async', not 'bogus'" in str(exc.value)
