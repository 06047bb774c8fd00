"""The limit attacks in a loop against one root server: nothing accumulates. After every round the server still
serves a victim, and its resident memory and open fds stay near where they started (a refusal path that leaked
an fd or a reservation would show here). Short: 2 rounds, in ``make test``; ``soak``: 20 x ``DEVREP_SOAK_SCALE``
rounds (``make soak``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _support import proc_fds, proc_rss, soak_scale

from ._harness import RSS_BOUND, root_server, run_as_attacker, still_serves

ATTACKS = Path(__file__).with_name("_attacks_limits.py")
FD_SLACK = 8
"""Open fds the server may legitimately hold beyond its start (gRPC and the allocator grow lazily)."""


def rounds_of_attacks(rounds: int) -> None:
    with root_server("--quota-bytes", str(64 << 20), "--quota-fds", "24") as srv:
        base_rss, base_fds = 0, 0
        for i in range(rounds + 1):
            run_as_attacker(ATTACKS, "huge_block_sizes", srv.address)
            run_as_attacker(ATTACKS, "sparse_memfd", srv.address, 1 << 40)
            run_as_attacker(ATTACKS, "deep_json", str(srv.fd_socket))
            run_as_attacker(ATTACKS, "overflows", srv.address)
            run_as_attacker(ATTACKS, "fd_hoard", srv.address, 40)
            run_as_attacker(ATTACKS, "concurrent_replicates", srv.address, 3, 32 << 20)
            run_as_attacker(ATTACKS, "big_unauthenticated", srv.address, [20, 8])
            still_serves(srv)
            if i == 0:  # a warm-up round: first-use allocations (buffers, arenas, caches) are not leaks
                base_rss, base_fds = proc_rss(srv.pid), proc_fds(srv.pid)
                continue
            grown, fds = proc_rss(srv.pid) - base_rss, proc_fds(srv.pid)
            print(f"round {i}: RSS +{grown >> 20} MiB, fds {base_fds} -> {fds}")
            assert grown < RSS_BOUND, f"round {i}: server RSS grew by {grown >> 20} MiB"
            assert fds <= base_fds + FD_SLACK, f"round {i}: server fds {base_fds} -> {fds}"


def test_limit_attacks_leave_nothing_behind() -> None:
    rounds_of_attacks(2)


@pytest.mark.soak
def test_limit_attacks_leave_nothing_behind_soak() -> None:
    rounds_of_attacks(int(20 * soak_scale()))
