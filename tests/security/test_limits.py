"""Issue 10 item 5: bounded inputs. Each hostile size or number gets a clean INVALID_ARGUMENT /
RESOURCE_EXHAUSTED / UNAUTHENTICATED (never INTERNAL, an OOM or a dead thread), the server's memory stays bounded,
and it keeps serving other clients afterwards."""

from __future__ import annotations

from pathlib import Path

from _support import proc_rss

from devrep.service.sessions import physical_memory

from ._harness import RSS_BOUND, RootServer, run_as_attacker, still_serves

ATTACKS = Path(__file__).with_name("_attacks_limits.py")


def test_block_size_is_bounded(server: RootServer) -> None:
    before = proc_rss(server.pid)
    got = run_as_attacker(ATTACKS, "huge_block_sizes", server.address)
    grown = proc_rss(server.pid) - before
    print(got, f"server RSS +{grown >> 20} MiB")
    for exp in (37, 40, 62):
        assert got[f"register 2^{exp}"] == "INVALID_ARGUMENT", got
        assert got[f"invalidate 2^{exp}"] == "NOT_FOUND", got
    assert got["register 2^30"] == "OK" and got["invalidate 2^30"] == "OK", got
    assert grown < RSS_BOUND, f"server RSS grew by {grown >> 20} MiB"
    still_serves(server)


def test_sparse_memfd_counts_against_the_host_bytes_quota(server: RootServer) -> None:
    before = proc_rss(server.pid)
    got = run_as_attacker(ATTACKS, "sparse_memfd", server.address, 1 << 40)
    grown = proc_rss(server.pid) - before
    print(got, f"server RSS +{grown >> 20} MiB")
    assert physical_memory() < 1 << 40, "this host has 1 TiB of RAM: pick a bigger sparse size"
    assert got == {"register": "RESOURCE_EXHAUSTED", "invalidate": "-"}, got
    assert grown < RSS_BOUND, f"server RSS grew by {grown >> 20} MiB"
    still_serves(server)


def test_nested_json_on_the_side_channel(server: RootServer) -> None:
    got = run_as_attacker(ATTACKS, "deep_json", str(server.fd_socket))
    assert got == {"deep0": "INVALID_ARGUMENT", "deep1": "INVALID_ARGUMENT", "hello after": True}, got
    still_serves(server)


def test_big_requests_before_authentication(server: RootServer) -> None:
    before = proc_rss(server.pid)
    got = run_as_attacker(ATTACKS, "big_unauthenticated", server.address, [60, 15, 15, 15, 15])
    grown = proc_rss(server.pid) - before
    print(got, f"server RSS +{grown >> 20} MiB")
    assert got == {"60": "RESOURCE_EXHAUSTED", "15": "UNAUTHENTICATED"}, got
    # Before the fix the 60 MiB request alone cost ~1 GiB (parsed into a list of 10^7 integers). Now each refused
    # request is at most MAX_REQUEST (16 MiB) held as bytes by gRPC's core and by Python while it is refused; how
    # much of that the allocator keeps mapped afterwards varies from run to run (+61 to +221 MiB seen on a loaded
    # 2-vCPU VM), so the bound is what holding all five at once would cost, far below the unfixed ~1 GiB.
    assert grown < 5 * 2 * (16 << 20) + RSS_BOUND, f"server RSS grew by {grown >> 20} MiB"
    still_serves(server)


def test_int64_overflow_in_runs_and_timeouts(server: RootServer) -> None:
    got = run_as_attacker(ATTACKS, "overflows", server.address)
    print(got)
    assert got.pop("replicate") == "OK" and got.pop("ping after") == "OK", got
    assert got.pop("Sync timeout_ms 1h") == "OK", got
    assert got.pop("invalidate length max") == "OK", got  # "to the end of the region": clipped, fine
    assert set(got.values()) == {"INVALID_ARGUMENT"}, got
    still_serves(server)
