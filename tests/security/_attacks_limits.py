"""Attacks on the server's limits (issue 10 items 4, 5, 6, 8, 9), run as uid/gid 65534 by ``run_as_attacker``.

Each function returns plain JSON (codes as gRPC status names) so the test asserts on what the attacker saw.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

import grpc


def _code(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return str(exc.code().name)
    return str(getattr(exc, "grpc_code", type(exc).__name__))


# ---------------------------------------------------------------------- metrics (item 9)
def unknown_methods(address: str, count: int) -> dict[str, int]:
    """Call ``count`` made-up method names; the server must answer UNIMPLEMENTED without a series per name."""
    codes: dict[str, int] = {}
    with grpc.insecure_channel(address) as channel:
        for i in range(count):
            call = channel.unary_unary(f"/attack.Nope{i}/M{i}", request_serializer=None, response_deserializer=None)
            try:
                call(b"", timeout=10)
                code = "OK"
            except grpc.RpcError as exc:
                code = _code(exc)
            codes[code] = codes.get(code, 0) + 1
    return codes


# ---------------------------------------------------------------------- helpers
def _client(address: str, label: str | None = None, token: str | None = None) -> Any:
    import devrep.client

    return devrep.client.connect(address, label=label, token=token)


def _raw(client: Any, method: str, request: Any, timeout: float = 30.0) -> tuple[str, Any]:
    """``(status name, response)`` of one raw gRPC call with the client's token."""
    try:
        reply = getattr(client._stub, method)(request, metadata=client._metadata, timeout=timeout)
        if isinstance(reply, grpc.Call):  # a stream: its status comes at the end
            reply = list(reply)
        return "OK", reply
    except grpc.RpcError as exc:
        return _code(exc), None


def _sealed_memfd(size: int) -> int:
    """A *sparse* sealed memfd (ftruncate only: devrep.memory.memfd_create would allocate every page)."""
    from devrep.memory import F_SEAL_GROW, F_SEAL_SHRINK, add_seals

    fd = os.memfd_create("attack", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    add_seals(fd, F_SEAL_SHRINK | F_SEAL_GROW)
    return fd


def _ticket(client: Any, size: int) -> str:
    fd = _sealed_memfd(size)
    try:
        reply, _ = client._sc.call({"op": "put_fds", "kind": "memfd"}, [fd])
    finally:
        os.close(fd)
    return str(reply["ticket"])


def _register(client: Any, name: str, size: int, block_size: int = 0) -> str:
    from devrep.wire._gen import devrep_pb2 as pb

    try:
        ticket = _ticket(client, size)
    except Exception as exc:
        return _code(exc)
    code, _ = _raw(client, "RegisterRegion", pb.RegisterRegionRequest(
        name=name, memfd=pb.MemfdSource(fd_ticket=ticket), block_size=block_size))
    return code


def _mark(directory: str, name: str) -> None:
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w") as f:
        f.write("1")
    os.replace(path + ".tmp", path)


def _wait_mark(directory: str, name: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(directory, name)):
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------------- bounded inputs (item 5)
def huge_block_sizes(address: str) -> dict[str, str]:
    """block_size 2^37 and 2^40 (each cost the server 0.5 GiB+ per Invalidate), then a fine one."""
    from devrep.wire._gen import devrep_pb2 as pb

    out = {}
    with _client(address) as c:
        for exp in (37, 40, 62):
            out[f"register 2^{exp}"] = _register(c, f"b{exp}", 1 << 20, 1 << exp)
            out[f"invalidate 2^{exp}"] = _raw(c, "Invalidate", pb.InvalidateRequest(name=f"b{exp}"))[0]
        out["register 2^30"] = _register(c, "ok", 1 << 20, 1 << 30)
        out["invalidate 2^30"] = _raw(c, "Invalidate", pb.InvalidateRequest(name="ok"))[0]
    return out


def sparse_memfd(address: str, nbytes: int) -> dict[str, str]:
    """Register a sparse memfd of ``nbytes`` (costs the attacker nothing), then invalidate it all."""
    from devrep.wire._gen import devrep_pb2 as pb

    with _client(address) as c:
        code = _register(c, "sparse", nbytes)
        inval = _raw(c, "Invalidate", pb.InvalidateRequest(name="sparse"))[0] if code == "OK" else "-"
        return {"register": code, "invalidate": inval}


def deep_json(fd_socket: str) -> dict[str, Any]:
    """A 64 KiB packet of nested arrays (the parser recursed until RecursionError killed the thread)."""
    from devrep.wire import sidechannel as protocol

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(fd_socket)
    try:
        depth = protocol.MAX_MESSAGE // 2 - 16
        out: dict[str, Any] = {}
        for i, payload in enumerate((b"[" * depth + b"]" * depth, b'{"op":' + b"[" * 30000 + b"]" * 30000 + b"}")):
            sock.send(payload)
            reply, _ = protocol.recv(sock)
            out[f"deep{i}"] = reply.get("code") if reply else "closed"
        sock.send(json.dumps({"op": "hello", "label": "after"}).encode())
        reply, _ = protocol.recv(sock)
        out["hello after"] = bool(reply and reply.get("ok"))
        return out
    finally:
        sock.close()


def big_unauthenticated(address: str, sizes_mib: list[int]) -> dict[str, str]:
    """Invalidate requests of ``sizes_mib`` MiB of packed runs, with no token at all."""
    from devrep.wire._gen import devrep_pb2 as pb
    from devrep.wire._gen import devrep_pb2_grpc as pb_grpc

    out = {}
    options = [("grpc.max_send_message_length", 128 << 20)]
    with grpc.insecure_channel(address, options) as channel:
        stub = pb_grpc.DevrepServiceStub(channel)
        for mib in sizes_mib:
            request = pb.InvalidateRequest(name="x", runs=[1] * ((mib << 20) - 16))  # 1-byte varints
            try:
                stub.Invalidate(request, timeout=60)
                out[str(mib)] = "OK"
            except grpc.RpcError as exc:
                out[str(mib)] = _code(exc)
    return out


def overflows(address: str) -> dict[str, str]:
    """int64 extremes in runs and timeout_ms."""
    from devrep.wire._gen import devrep_pb2 as pb

    big = (1 << 63) - 1
    out = {}
    with _client(address) as c:
        assert _register(c, "r", 1 << 16) == "OK"
        out["replicate"] = _raw(c, "Replicate", pb.ReplicateRequest(name="r", devices=["cpu:0"]))[0]
        for label, runs in {"wrap": [1 << 62, 1 << 62], "max": [big, big], "first-max": [big, 1],
                            "count-max": [0, big], "last-page+2": [15, 2]}.items():
            out[f"runs {label}"] = _raw(c, "Invalidate", pb.InvalidateRequest(name="r", runs=runs))[0]
        out["invalidate length max"] = _raw(c, "Invalidate", pb.InvalidateRequest(name="r", offset=0, length=big))[0]
        for method, request in {
            "Sync": pb.SyncRequest(name="r", timeout_ms=big),
            "Acquire": pb.AcquireRequest(name="r", device="cpu:0", timeout_ms=big),
            "Replicate": pb.ReplicateRequest(name="r", devices=["cpu:1"], timeout_ms=big),
        }.items():
            out[f"{method} timeout_ms max"] = _raw(c, method, request)[0]
        out["Sync timeout_ms 1h"] = _raw(c, "Sync", pb.SyncRequest(name="r", timeout_ms=3_600_000))[0]
        out["ping after"] = "OK" if c.ping() else "?"
    return out


# ---------------------------------------------------------------------- fair sharing (item 6)
def long_syncs(address: str, marks: str, sessions: int, per_session: int, timeout_s: float) -> dict[str, Any]:
    """Every thread of every session runs a Sync that waits ``timeout_s`` (both replica buffers leased), to hold
    all the server's gRPC workers."""
    from devrep.wire._gen import devrep_pb2 as pb

    clients = [_client(address, label=f"hog{i}") for i in range(sessions)]
    leases = []
    for c in clients:
        name = f"r{c.session_id}"
        c.create_region(name, 4096)
        c.replicate(name, ["cpu:0"])
        leases.append(c.acquire(name, "cpu:0"))
        c.invalidate(name, 0, 4096)
        c.sync(name)
        leases.append(c.acquire(name, "cpu:0"))  # the other buffer: now a sync has nowhere to write
        c.invalidate(name, 0, 4096)
    results: list[tuple[str, float]] = []
    lock = threading.Lock()

    def hog(c: Any) -> None:
        start = time.monotonic()
        code, _ = _raw(c, "Sync", pb.SyncRequest(name=f"r{c.session_id}", timeout_ms=int(timeout_s * 1000)),
                       timeout=timeout_s + 30)
        with lock:
            results.append((code, time.monotonic() - start))
            if code != "RESOURCE_EXHAUSTED":
                _mark(marks, "first-done")

    threads = [threading.Thread(target=hog, args=(c,)) for c in clients for _ in range(per_session)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the refused calls come back at once; the rest are in the server
        with lock:
            if len(results) >= len(threads) - 8:
                break
        time.sleep(0.05)
    _mark(marks, "holding")
    for t in threads:
        t.join()
    for lease in leases:
        lease.release()
    for c in clients:
        c.close()
    codes: dict[str, int] = {}
    for code, _ in results:
        codes[code] = codes.get(code, 0) + 1
    return {"codes": codes}


def side_channel_flood(fd_socket: str, count: int, marks: str, allowed: int) -> dict[str, int]:
    """Open ``count`` side-channel connections and never say hello."""
    import select

    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(fd_socket)
        except OSError:
            s.close()
            continue
        socks.append(s)
    # A refused connection gets its error reply and EOF at once; under load, give the server a while to say so
    # (an accepted one says nothing until the hello deadline).
    deadline = time.monotonic() + 2  # within the hello deadline (5 s): the slots must still be held after
    while True:
        refused = sum(1 for s in socks if select.select([s], [], [], 0)[0])
        if refused >= len(socks) - allowed or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _mark(marks, "holding")
    _wait_mark(marks, "release", 30)
    for s in socks:
        s.close()
    return {"connected": len(socks), "refused": refused, "held": len(socks) - refused}


def hello_stalling(fd_socket: str, packet: dict[str, Any], interval: float, total: float) -> dict[str, Any]:
    """Keep a connection without a session alive by sending ``packet`` (refused) every ``interval`` seconds;
    returns when (seconds after connecting) the server cut it, or ``None``."""
    from devrep.wire import sidechannel as protocol

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(fd_socket)
    start = time.monotonic()
    codes: list[Any] = []
    try:
        while time.monotonic() - start < total:
            try:
                protocol.send(sock, packet)
                sock.settimeout(interval + 5)
                reply, _ = protocol.recv(sock)
            except OSError:
                return {"cut_after": time.monotonic() - start, "codes": codes}
            if reply is None:
                return {"cut_after": time.monotonic() - start, "codes": codes}
            codes.append(reply.get("code"))
            if reply.get("ok"):
                return {"cut_after": None, "codes": codes, "session": True}
            time.sleep(interval)
        return {"cut_after": None, "codes": codes}
    finally:
        sock.close()


def watch_flood(address: str, marks: str, sessions: int, per_session: int, allowed: int) -> dict[str, int]:
    """Open as many Watch streams as the server lets this uid hold, from several sessions."""
    from devrep.wire._gen import devrep_pb2 as pb

    clients = [_client(address, label=f"watch{i}") for i in range(sessions)]
    calls = []
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def drain(call: Any) -> None:
        try:
            for _ in call:
                pass
            code = "OK"
        except grpc.RpcError as exc:
            code = _code(exc)
        with lock:
            codes[code] = codes.get(code, 0) + 1

    threads = []
    for c in clients:
        for _ in range(per_session):
            call = c._stub.Watch(pb.WatchRequest(), metadata=c._metadata)
            calls.append(call)
            threads.append(threading.Thread(target=drain, args=(call,)))
            threads[-1].start()
    deadline = time.monotonic() + 20  # refusals come back at once; under load, allow a while
    while True:
        with lock:
            refused = codes.get("RESOURCE_EXHAUSTED", 0)
        if refused >= len(calls) - allowed or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _mark(marks, "holding")
    _wait_mark(marks, "release", 60)
    for call in calls:
        call.cancel()
    for t in threads:
        t.join(10)
    for c in clients:
        c.close()
    return {"opened": len(calls), "refused": refused, "held": len(calls) - refused}


def fd_hoard(address: str, regions: int) -> dict[str, Any]:
    """Register up to ``regions`` memfd regions (1 fd each kept by the server) and pending tickets."""
    registered = 0
    code = "OK"
    message = ""
    with _client(address) as c:
        for i in range(regions):
            try:
                ticket = _ticket(c, 4096)
            except Exception as exc:
                code, message = _code(exc), str(exc)
                break
            from devrep.wire._gen import devrep_pb2 as pb

            code, _ = _raw(c, "RegisterRegion", pb.RegisterRegionRequest(name=f"r{i}",
                                                                      memfd=pb.MemfdSource(fd_ticket=ticket)))
            if code != "OK":
                break
            registered += 1
        c.unregister("r0")
        freed = _register(c, "again", 4096)  # a region gone gives its fd back
        return {"registered": registered, "code": code, "message": message, "after unregister": freed}


def concurrent_replicates(address: str, regions: int, nbytes: int) -> dict[str, Any]:
    """Replicate ``regions`` regions of ``nbytes`` at the same moment, each alone within the quota."""
    from devrep.wire._gen import devrep_pb2 as pb

    with _client(address) as c:
        for i in range(regions):
            assert _register(c, f"q{i}", nbytes) == "OK"
        barrier = threading.Barrier(regions)
        codes: list[str] = []

        def replicate(i: int) -> None:
            barrier.wait()
            codes.append(_raw(c, "Replicate", pb.ReplicateRequest(name=f"q{i}", devices=["cpu:0"]), timeout=120)[0])

        threads = [threading.Thread(target=replicate, args=(i,)) for i in range(regions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _, info = _raw(c, "GetServerInfo", pb.GetServerInfoRequest())
        return {"codes": sorted(codes), "used_bytes": int(info.quota.used_bytes),
                "max_bytes": int(info.quota.max_bytes)}


# ---------------------------------------------------------------------- labels (item 4)
def label_squat(address: str, label: str, names: list[str], token: str | None = None) -> dict[str, Any]:
    """Say hello with someone else's label (or present ``token``) and try to read the regions ``names``."""
    from devrep.wire._gen import devrep_pb2 as pb

    with _client(address, label=label, token=token) as c:
        listed = sorted(r.name for r in c.list_regions())
        codes = {name: _raw(c, "Acquire", pb.AcquireRequest(name=name, device="cpu:0", fresh=False))[0]
                 for name in names}
        return {"label": c.label, "listed": listed, "codes": codes}


# ---------------------------------------------------------------------- revocation (item 8)
def watch_until(address: str, marks: str, names: list[str], token: str | None = None) -> dict[str, Any]:
    """Watch ``names`` (all visible regions when empty) until the test says ``release``; every event's region and
    runs, and how the stream ended if it ended by itself."""
    from devrep.wire._gen import devrep_pb2 as pb

    with _client(address, token=token) as c:
        call = c._stub.Watch(pb.WatchRequest(names=names, coalesce_ms=1), metadata=c._metadata)
        call.initial_metadata()  # the server sends it once the watcher is registered
        _mark(marks, "watching")
        events: list[dict[str, Any]] = []
        end: list[str] = []

        def drain() -> None:
            try:
                for message in call:
                    for e in message.events:
                        events.append({"kind": e.kind, "region": e.region, "runs": list(e.runs)})
                        _mark(marks, "got-event")
                end.append("OK")
            except grpc.RpcError as exc:
                end.append(_code(exc))
                _mark(marks, "ended")

        thread = threading.Thread(target=drain)
        thread.start()
        _wait_mark(marks, "release", 90)
        ended_by_server = list(end)
        call.cancel()
        thread.join(10)
        return {"events": events, "end": ended_by_server[0] if ended_by_server else None}


def name_probe(address: str, names: list[str]) -> dict[str, Any]:
    """Probe region names: DescribeRegion, then RegisterRegion (twice) of each; then what a shared name means."""
    from devrep.wire._gen import devrep_pb2 as pb

    out: dict[str, Any] = {}
    with _client(address) as c:
        for name in names:
            describe = _raw(c, "DescribeRegion", pb.DescribeRegionRequest(name=name))[0]
            first, second = _register(c, name, 4096), _register(c, name, 4096)
            _, mine = _raw(c, "DescribeRegion", pb.DescribeRegionRequest(name=name))
            out[name] = {"describe": describe, "register": first, "again": second,
                         "then": "own" if mine is not None and not mine.region.read_only else "other"}
        code, _ = _raw(c, "DescribeRegion", pb.DescribeRegionRequest(name="dup"))
        out["dup"] = code
        listed = _raw(c, "ListRegions", pb.ListRegionsRequest())[1]
        out["listed"] = sorted(r.name for r in listed.regions)
    return out
