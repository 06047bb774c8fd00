"""The ``devrep`` command: ``serve``, ``doctor``, ``ls``, ``add``, ``sync``, ``watch``, ``verify``, ``stats``,
``demo``.

Exit codes (also in docs/api.md): 0 ok; 1 failure (including verify mismatches); 2 usage or invalid argument;
3 cannot connect; 4 not found; 5 unauthenticated / permission denied; 6 resource exhausted; 7 failed
precondition (e.g. a tracking mode this host lacks); 8 timed out; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import __version__, errors
from ._console import LazyConsole, replicate_with_progress
from .sizes import format_size, size_arg

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_CONNECT, EXIT_NOT_FOUND, EXIT_DENIED, EXIT_EXHAUSTED, EXIT_PRECONDITION, \
    EXIT_TIMEOUT = range(9)
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): the shell convention 128 + 2."""

# rich loads on the first print: `devrep serve` logs through logging and reaches SERVING without it (bench S1).
console = cast("Console", LazyConsole())
err_console = cast("Console", LazyConsole(stderr=True))


EXIT_CODES: dict[str, int] = {
    "INVALID_ARGUMENT": EXIT_USAGE,
    "UNAVAILABLE": EXIT_CONNECT,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "PERMISSION_DENIED": EXIT_DENIED,
    "UNAUTHENTICATED": EXIT_DENIED,
    "RESOURCE_EXHAUSTED": EXIT_EXHAUSTED,
    "FAILED_PRECONDITION": EXIT_PRECONDITION,
    "DEADLINE_EXCEEDED": EXIT_TIMEOUT,
}
"""gRPC status name -> exit code; an error's status comes from the one table, ``devrep.errors.STATUS_OF``. Any other
status (INTERNAL, ALREADY_EXISTS) and any other exception exit with ``EXIT_FAIL``."""


def exit_code(exc: BaseException) -> int:
    return EXIT_CODES.get(errors.status_name(exc), EXIT_FAIL)


def _jsonable(obj: Any) -> Any:
    import numpy as np

    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(_jsonable(obj), indent=2))


_size = format_size


# ---------------------------------------------------------------------- argument types
def socket_mode(text: str) -> int:
    """``--socket-mode``: octal permission bits, e.g. ``0660``, ``660`` or ``0o660``."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is outside 0000..0777")
    return mode


def socket_group(text: str) -> int:
    """``--socket-group``: a group name or a numeric gid."""
    import grp

    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r} on this host") from None


# ---------------------------------------------------------------------- commands
def cmd_serve(args: argparse.Namespace) -> int:
    from .engine import Replicator
    from .service import Quota, TlsFiles, TokenStore, run

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s devrep %(levelname)s %(message)s")
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise errors.InvalidArgumentError("--tls-cert and --tls-key go together")
        tls = TlsFiles(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca) if args.tls_ca else None)
    else:
        tls = None
    address = args.address or (f"unix:{args.socket}" if args.socket else None)
    replicator = Replicator(cpu_devices=args.cpu_devices)
    interceptors: list[Any] = []
    metrics = None
    if args.metrics_port is not None:
        from .metrics import Metrics

        metrics = Metrics(replicator)
        interceptors.append(metrics.interceptor())
        metrics.serve(args.metrics_port, args.metrics_address)
    tokens = TokenStore(args.token_dir)

    def ready(server: Any) -> None:
        # One machine-readable line so scripts (and make demo) know the server is up.
        print(f"devrep: serving {server.address} fd={server.fd_socket_path}", file=sys.stderr, flush=True)

    try:
        return run(address, replicator=replicator, tokens=tokens, tls=tls, insecure=args.insecure,
                   quota=Quota(max_bytes=args.quota_bytes, max_regions=args.quota_regions, max_fds=args.quota_fds,
                               **({} if args.quota_host_bytes is None else {"max_host_bytes": args.quota_host_bytes})),
                   require_token=args.require_token, fd_socket=args.fd_socket, interceptors=interceptors,
                   metrics=metrics, socket_mode=args.socket_mode, socket_group=args.socket_group, ready=ready,
                   max_lease_s=args.max_lease_s, holder_ttl=args.holder_timeout_s)
    finally:
        if metrics is not None:
            metrics.close()


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        from .doctor import main_doctor
    except ImportError:
        err_console.print("devrep doctor is not available in this build (devrep.doctor missing)")
        return EXIT_FAIL
    return main_doctor(args.json)


def _connect(args: argparse.Namespace) -> Any:
    from .client import connect

    return connect(args.address, label=f"devrep-cli-{args.command}")


def _region_table(regions: Sequence[Any]) -> Table:
    from rich.table import Table

    table = Table(title="devrep regions")
    for col in ("name", "kind", "size", "tracking", "gen", "replicas (valid pages)", "owner"):
        table.add_column(col)
    for r in regions:
        reps = ", ".join(f"{x.device} ({x.valid_pages}/{r.npages})" for x in r.replicas) or "-"
        table.add_row(r.name, r.kind, _size(r.nbytes), r.tracking, str(r.generation), reps,
                      r.owner + (" (shared)" if r.read_only else ""))
    return table


def cmd_ls(args: argparse.Namespace) -> int:
    # Each devrep command is a session of its own, which owns no region: on its own, `ls` shows only regions
    # shared with it. Root gets the admin view (every session's regions) unless --mine; --all asks for it.
    admin = args.all or (os.geteuid() == 0 and not args.mine)
    with _connect(args) as client:
        try:
            regions = client.list_regions(all_sessions=admin)
        except errors.PermissionDeniedError:
            if args.all:
                raise
            regions = client.list_regions()  # root here, not to the server (a TCP or token session): normal view
        total = client.stats().regions if not regions else len(regions)
    if args.json:
        _print_json(regions)
    else:
        console.print(_region_table(regions))
    if not regions:
        why = ("the server holds no regions" if total == 0 else
               f"the server holds {total} regions of other sessions, none shared with this one (each devrep "
               "command is a session of its own); root sees them all with `devrep ls --all`")
        err_console.print(f"devrep ls: no regions: {why}", highlight=False, markup=False)
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        info = client.stats()
        regions = [client.describe(args.name)] if args.name else client.list_regions()
    if args.json:
        _print_json({"server": info, "regions": regions})
        return EXIT_OK
    from rich.table import Table

    table = Table(title=f"devrep {info.version}: {info.sessions} sessions, {info.regions} regions, "
                        f"{info.leases} leases, {_size(info.host_bytes)} host memory")
    for col in ("region", "invalidations", "pages invalidated", "syncs", "copied", "verifies", "mismatches"):
        table.add_column(col, justify="right" if col != "region" else "left")
    for r in regions:
        s = r.stats
        table.add_row(r.name, str(s.invalidations), str(s.pages_invalidated), str(s.syncs), _size(s.bytes_copied),
                      str(s.verifies), str(s.verify_mismatches))
    console.print(table)
    console.print(f"devices: {', '.join(info.devices)}; tracking modes: {', '.join(info.tracking_modes)}")
    return EXIT_OK


def cmd_add(args: argparse.Namespace) -> int:
    path = Path(args.file)
    name = args.name or path.name
    with _connect(args) as client:
        client.register_file(name, path, tracking=args.tracking)
        report = replicate_with_progress(client, name, args.device, show=not args.json)
        if args.json:
            _print_json(report)
        else:
            console.print(f"replicated [bold]{name}[/] ({_size(report.bytes_copied)} copied in "
                          f"{report.seconds * 1000:.1f} ms) to {', '.join(report.devices)}")
        if args.no_wait:
            return EXIT_OK
        if not args.json:
            err_console.print("holding the region (it goes when this command ends, unless DEVREP_TOKEN is a "
                              "pre-authorized token); Ctrl-C to stop")
        while client.server_alive(timeout=5.0):  # Ctrl-C ends it: "interrupted", exit 130 (main)
            pass
        err_console.print(f"devrep add: the server at {client.address} went away (stopped or died); region "
                          f"{name} went with it", highlight=False, markup=False)
        return EXIT_CONNECT


def cmd_watch(args: argparse.Namespace) -> int:
    seen = 0
    # Ctrl-C ends the stream: "interrupted", exit 130 (main)
    with _connect(args) as client, client.watch(args.names, coalesce_ms=args.coalesce_ms) as stream:
        for event in stream:
            if args.json:
                print(json.dumps({"kind": event.kind, "region": event.region, "generation": event.generation,
                                  "device": event.device, "pages": event.pages,
                                  "runs": event.runs.tolist()}), flush=True)
            else:
                runs = ", ".join(f"{a}+{b}" for a, b in event.runs[:8].tolist())
                more = f" (+{len(event.runs) - 8} runs)" if len(event.runs) > 8 else ""
                console.print(f"{event.kind:15} {event.region} gen={event.generation} "
                              f"{event.device or ''} pages={event.pages} {runs}{more}")
            seen += 1
            if args.count and seen >= args.count:
                break
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        reports = client.verify(args.name, args.device or (), resync=not args.no_resync)
    bad = sum(r.mismatched_pages for r in reports)
    if args.json:
        _print_json([{"device": r.device, "pages_checked": r.pages_checked, "mismatched_pages": r.mismatched_pages,
                      "mismatched_runs": r.mismatched.tolist(), "stale_pages": r.stale_pages,
                      "resynced": r.resynced} for r in reports])
    else:
        from rich.table import Table

        table = Table(title=f"verify {args.name}")
        for col in ("device", "pages checked", "mismatched pages", "stale pages (not checked)", "resynced"):
            table.add_column(col)
        for r in reports:
            table.add_row(r.device, str(r.pages_checked), str(r.mismatched_pages), str(r.stale_pages),
                          "yes" if r.resynced else "no")
        console.print(table)
        if any(r.stale_pages for r in reports):
            console.print("stale pages are known to be out of date (written since the last sync, awaiting one): "
                          "they are not mismatches; `devrep sync` copies them")
    # Only mismatches (a replica page devrep believed valid that differs from the host) are a failure.
    return EXIT_FAIL if bad else EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        report = client.sync(args.name, args.device or (), timeout=args.timeout)
    if args.json:
        _print_json(report)
    else:
        console.print(f"synced [bold]{report.region}[/] to generation {report.generation}: {report.pages_copied} "
                      f"pages ({_size(report.bytes_copied)}) in {report.runs} runs copied to "
                      f"{', '.join(report.devices) or 'no replica'} in {report.seconds * 1000:.1f} ms")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    size = args.size if args.size_mib is None else args.size_mib << 20
    if size <= 0 or size % (1 << 20):
        raise errors.InvalidArgumentError(f"--size must be a positive whole number of MiB, not {size} bytes")
    return demo_main(size_mib=size >> 20)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devrep", description="Never-stale device replicas of host memory.",
                                     epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 cannot connect, 4 not found, "
                                            "5 denied, 6 resource exhausted, 7 failed precondition, 8 timeout, "
                                            "130 interrupted. Sizes take K/M/G/T or KiB/MiB/GiB/TiB (powers of 1024), "
                                            "KB/MB/GB/TB (powers of 1000) or plain bytes.")
    parser.add_argument("--version", action="version", version=f"devrep {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    def client_parser(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--address", help="server address (default: $DEVREP_ADDRESS or the default socket)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = sub.add_parser("serve", help="run the replication service", description="Run the replication service.")
    p.add_argument("--socket", help="Unix socket path (default: /run/devrep/devrep.sock as root, else "
                                    "$XDG_RUNTIME_DIR/devrep/devrep.sock)")
    p.add_argument("--address", help="gRPC address instead of --socket, e.g. 0.0.0.0:7443 (needs TLS or --insecure)")
    p.add_argument("--fd-socket", help="fd side-channel socket (default: <socket stem>.fd.sock beside it)")
    p.add_argument("--socket-mode", type=socket_mode, default=0o660,
                   help="permission bits of both Unix sockets, octal (default 0660: owner and group connect)")
    p.add_argument("--socket-group", type=socket_group,
                   help="group (name or gid) given both Unix sockets, e.g. a group your non-root clients are in")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate chain for TCP with TLS (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--insecure", action="store_true", help="allow plain-text TCP")
    p.add_argument("--token-dir", help="directory of pre-authorized tokens (file name = label, content = token)")
    p.add_argument("--require-token", action="store_true", help="refuse sessions without a pre-authorized token")
    p.add_argument("--quota-bytes", type=size_arg, default=0, metavar="SIZE",
                   help="replica bytes per session, e.g. 16G (region size x replicas; 0 = unlimited)")
    p.add_argument("--quota-regions", type=int, default=256, help="regions per session (default 256)")
    p.add_argument("--quota-host-bytes", type=size_arg, default=None, metavar="SIZE",
                   help="bytes of regions one session may register, e.g. 64G (default: this host's RAM; "
                        "0 = unlimited)")
    p.add_argument("--quota-fds", type=int, default=512,
                   help="file descriptors the server may hold for one session (tickets and regions; default 512)")
    p.add_argument("--cpu-devices", type=int, default=4, help="number of cpu:N devices (default 4)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-address", default="127.0.0.1",
                   help="address the metrics port binds (default 127.0.0.1: loopback only; e.g. 0.0.0.0 in a pod "
                        "that Prometheus scrapes)")
    p.add_argument("--max-lease-s", type=float, default=300.0,
                   help="revoke a lease held longer than this many seconds, so no reader blocks the owner's syncs "
                        "forever (default 300; 0 = no limit)")
    p.add_argument("--holder-timeout-s", type=float, default=30.0,
                   help="release the gRPC-acquired leases of a client silent this long (its process died; "
                        "default 30)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("doctor", help="which tracking modes and devices work on this host",
                       description="Which tracking modes work on this host (each tried for real) and which devices "
                                   "each backend sees. Exit 0 when every tracking mode works, else 1.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)

    p = client_parser("ls", "list regions")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--all", action="store_true",
                      help="every session's regions (root on the local socket; the default for root)")
    view.add_argument("--mine", action="store_true", help="only this session's regions and those shared with it")
    p.set_defaults(func=cmd_ls)

    p = client_parser("stats", "server and region counters")
    p.add_argument("name", nargs="?", help="one region (default: all)")
    p.set_defaults(func=cmd_stats)

    p = client_parser("add", "register a file and replicate it")
    p.add_argument("file", help="the file to replicate (opened by this command, passed to the server as an fd)")
    p.add_argument("--device", action="append", required=True, help="device, e.g. cpu:0 (repeatable)")
    p.add_argument("--name", help="region name (default: the file name)")
    p.add_argument("--tracking", choices=["file", "explicit"], default="file",
                   help="how changes to the file are found: file (inotify + page hashes, default) or explicit "
                        "(only what `devrep sync`/Invalidate are told)")
    p.add_argument("--no-wait", action="store_true", help="exit at once (the region goes with this session)")
    p.set_defaults(func=cmd_add)

    p = client_parser("sync", "copy stale pages to a region's replicas now")
    p.add_argument("name", help="region name")
    p.add_argument("--device", action="append", help="only this replica (repeatable; default: all)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give up after this long waiting for readers to release (default: the server's)")
    p.set_defaults(func=cmd_sync)

    p = client_parser("watch", "print invalidation/sync events")
    p.add_argument("names", nargs="*", help="regions to watch (default: all)")
    p.add_argument("--count", type=int, default=0, help="stop after this many events (0: until Ctrl-C)")
    p.add_argument("--coalesce-ms", type=int, default=2,
                   help="merge invalidations of one region arriving within this many ms (default 2)")
    p.set_defaults(func=cmd_watch)

    p = client_parser("verify", "hash-compare replicas with the host (and resync mismatches)")
    p.add_argument("name", help="region name")
    p.add_argument("--device", action="append", help="only this replica (repeatable; default: all)")
    p.add_argument("--no-resync", action="store_true", help="report mismatches without copying them again")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("demo", help="end-to-end demo against a temporary server",
                       description="End-to-end demo: a temporary server, a region, replicas, writes, resync, verify "
                                   "and a safetensors file.")
    p.add_argument("--size", type=size_arg, default=512 << 20, metavar="SIZE",
                   help="region size, whole MiB (default 512M)")
    p.add_argument("--size-mib", type=int, help="region size in MiB (the older spelling of --size)")
    p.set_defaults(func=cmd_demo)
    return parser


def _error(command: str, message: str) -> None:
    from rich.markup import escape

    # escape(): a message naming e.g. devrep[cuda] must not lose "[cuda]" as Rich markup
    err_console.print(f"[red]devrep {command}: {escape(message)}[/]", highlight=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except errors.DevrepError as exc:
        _error(args.command, str(exc))
        return exit_code(exc)
    except OSError as exc:  # e.g. an unbindable --socket: one line, no traceback
        where = f" ({exc.filename})" if exc.filename else ""
        _error(args.command, f"{exc.strerror or exc}{where}")
        return EXIT_FAIL
    except KeyboardInterrupt:
        _error(args.command, "interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
