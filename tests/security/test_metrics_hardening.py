"""Issue 10 item 9: metrics cannot be used to grow the server's memory, and are not served to the network by
default."""

from __future__ import annotations

from pathlib import Path

from _support import free_port, scrape

from ._harness import root_server, run_as_attacker

ATTACKS = Path(__file__).with_name("_attacks_limits.py")


def listening_addresses(pid: int, port: int) -> set[str]:
    """Local IPv4/IPv6 addresses (hex, as /proc/net shows them) on which ``pid``'s network namespace listens on
    ``port`` (TCP state 0A = LISTEN)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


def test_metrics_listen_on_loopback_by_default() -> None:
    port = free_port()
    with root_server("--metrics-port", str(port)) as srv:
        scrape(port)  # it is up
        addresses = listening_addresses(srv.pid, port)
    assert addresses == {"0100007F"}, f"expected only 127.0.0.1 (0100007F), got {addresses}"


def test_metrics_address_is_explicit() -> None:
    port = free_port()
    with root_server("--metrics-port", str(port), "--metrics-address", "0.0.0.0") as srv:
        scrape(port)
        addresses = listening_addresses(srv.pid, port)
    assert addresses == {"00000000"}, f"expected 0.0.0.0 (00000000) when asked, got {addresses}"


def test_unknown_methods_do_not_create_series() -> None:
    port = free_port()
    with root_server("--metrics-port", str(port)) as srv:
        before = scrape(port)
        codes = run_as_attacker(ATTACKS, "unknown_methods", srv.address, 300)
        after = scrape(port)
        assert srv.alive()
    assert codes == {"UNIMPLEMENTED": 300}, codes
    new = {key for key in after if key not in before}
    methods = {dict(labels)["method"] for _, labels in new if "method" in dict(labels)}
    print("new series:", sorted(new))
    assert methods <= {"other"}, f"client-chosen method names became label values: {sorted(methods)[:5]}"
    assert after[("devrep_grpc_requests_total", (("code", "UNIMPLEMENTED"), ("method", "other")))] == 300
    assert len(new) <= 4, f"expected at most a handful of new series, got {len(new)}"
