"""``make demo``: a real server process on a temporary socket and a client scenario against it.

region -> 2 replicas (progress bar) -> random host writes -> invalidation events -> resync -> verify, then a
safetensors file whose rewrite moves only the changed tensor's pages. Prints a summary table; the server is
always stopped (SIGTERM, then SIGKILL if it does not exit in time).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from ._console import make_console, replicate_with_progress
from ._pages import PAGE_SIZE, pages_from_runs, runs_from_pages
from .model import Event
from .sizes import format_size

console = make_console()
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
EVENT_TIMEOUT = 60.0
"""Seconds to wait for watch events (a bound for loaded machines, not a speed target)."""


@contextlib.contextmanager
def server_process(workdir: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``devrep serve`` in a subprocess on ``workdir/devrep.sock``; yields ``(address, process)`` once it is up."""
    sock = workdir / "devrep.sock"
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen([sys.executable, "-m", "devrep.cli", "serve", "--socket", str(sock), *extra],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        fd_sock = sock.with_name("devrep.fd.sock")
        # The "serving" line, not the socket files: they exist before the server is up (or are a dead one's).
        while not (sock.exists() and fd_sock.exists() and b"devrep: serving" in (workdir / "server.log").read_bytes()):
            if proc.poll() is not None:
                raise RuntimeError(f"devrep serve exited with {proc.returncode}: "
                                   f"{(workdir / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"devrep serve did not start within {START_TIMEOUT}s")
            time.sleep(0.05)
        yield f"unix:{sock}", proc
    finally:
        stop_server(proc)
        log.close()


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


class EventLog:
    """Collects a Watch stream in a background thread."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.events: list[Event] = []
        self.messages = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            for batch in self.stream.batches():
                with self._lock:
                    self.messages += 1
                    self.events.extend(batch)

    def pages_after(self, kind: str, region: str, generation: int) -> set[int]:
        """Distinct pages in ``kind`` events of ``region`` newer than ``generation``."""
        with self._lock:
            runs = [e.runs for e in self.events if e.kind == kind and e.region == region and e.generation > generation]
        return set(pages_from_runs(np.concatenate(runs)).tolist()) if runs else set()

    def pages(self, kind: str, region: str, device: str | None = None) -> int:
        with self._lock:
            return sum(e.pages for e in self.events
                       if e.kind == kind and e.region == region and (device is None or e.device == device))

    def count(self, kind: str, region: str) -> int:
        with self._lock:
            return sum(1 for e in self.events if e.kind == kind and e.region == region)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        self.stream.cancel()
        self._thread.join(2)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def scenario(address: str, workdir: Path, size_mib: int, rows: list[tuple[str, str, str]]) -> bool:
    from . import safetensors_io
    from .client import connect

    ok = True

    def step(what: str, result: str, good: bool = True) -> None:
        nonlocal ok
        ok &= good
        rows.append((what, result, "[green]ok[/]" if good else "[red]FAILED[/]"))
        console.print(f"  {'[green]✓[/]' if good else '[red]✗[/]'} {what}: {result}")

    with connect(address, label="demo") as client:
        info = client.stats()
        mode = "async" if "async" in info.tracking_modes else "explicit"
        step("server", f"devrep {info.version}, devices {', '.join(info.devices)}, modes "
                       f"{', '.join(info.tracking_modes)}")
        watch = EventLog(client.watch())
        nbytes = size_mib << 20
        t = time.perf_counter()
        region = client.create_region("demo/table", nbytes, tracking=mode)
        words = region.array.view(np.uint64)
        words[:] = np.arange(words.size, dtype=np.uint64)
        if mode == "explicit":
            region.invalidate()
        step("create region", f"demo/table, {format_size(nbytes)} memfd, tracking={mode}, filled in "
                              f"{_ms(time.perf_counter() - t)}")

        report = replicate_with_progress(client, "demo/table", ["cpu:0", "cpu:1"], console=console)
        gbps = report.bytes_copied / max(report.seconds, 1e-9) / 1e9
        step("replicate to cpu:0, cpu:1", f"{format_size(report.bytes_copied)} copied in {_ms(report.seconds)} "
                                          f"({gbps:.1f} GB/s, host read once: {format_size(report.host_bytes_read)})")

        # Under load, counts can legitimately differ (events of the fill still arriving, a page reported twice):
        # each check asserts what is guaranteed and prints expected vs got.
        generation_before = report.generation
        rng = np.random.default_rng(4)
        pages = np.unique(rng.integers(0, nbytes // PAGE_SIZE, 2000))
        region.array.reshape(-1, PAGE_SIZE)[pages, 0:8] = 0xAB
        if mode == "explicit":
            client.invalidate("demo/table", runs=runs_from_pages(pages))
        t = time.perf_counter()
        report = client.sync("demo/table")
        step("random writes -> resync", f"{pages.size} pages written, {report.pages_copied} page copies "
                                        f"({report.runs} runs) in {_ms(time.perf_counter() - t)}; expected at "
                                        f"least {2 * pages.size} (every written page, 2 replicas)",
             report.pages_copied >= 2 * pages.size)
        written = set(pages.tolist())
        got = watch.wait_for(lambda: written <= watch.pages_after("invalidate", "demo/table", generation_before),
                             timeout=EVENT_TIMEOUT)
        covered = len(written & watch.pages_after("invalidate", "demo/table", generation_before))
        step("invalidation events", f"every written page reported: expected {pages.size}, got {covered}, "
                                    f"as coalesced runs ({watch.messages} watch messages in the whole demo)", got)

        t = time.perf_counter()
        with client.acquire("demo/table", "cpu:1") as lease:
            acquire_s = time.perf_counter() - t
            same = bool(np.array_equal(lease.array, region.array))
            step("acquire cpu:1 (fresh)", f"generation {lease.generation}, {_ms(acquire_s)}, replica == host: "
                                          f"{same}", same)
        verify = client.verify("demo/table")
        bad = sum(r.mismatched_pages for r in verify)
        step("verify (XXH64 per page)", f"{sum(r.pages_checked for r in verify)} pages checked, {bad} mismatched",
             bad == 0)

        # ---------------------------------------------------------------- safetensors
        import safetensors.numpy

        tensors = {f"layer{i}.weight": rng.standard_normal((512, 1024)).astype(np.float32) for i in range(4)}
        path = workdir / "model.safetensors"
        path.write_bytes(safetensors.numpy.save(tensors))
        file_mode = "file" if "file" in info.tracking_modes else "explicit"
        client.register_file("demo/model", path, tracking=file_mode)
        generation_model = client.replicate("demo/model", ["cpu:0"]).generation
        before = client.describe("demo/model").stats.pages_copied
        with client.acquire_safetensors("demo/model", "cpu:0") as model:
            same = all(np.array_equal(model[k], v) for k, v in tensors.items())
            step("safetensors acquire", f"{len(model)} tensors as zero-copy read-only arrays "
                                        f"({format_size(path.stat().st_size)}), equal to the file: {same}", same)
            infos = model.infos
        tensors["layer2.weight"] = tensors["layer2.weight"] + 1
        with open(path, "r+b") as f:  # same layout: rewrite in place
            f.write(safetensors.numpy.save(tensors))
        changed = safetensors_io.changed_pages(infos, ["layer2.weight"])
        expected = int(changed[:, 1].sum())
        if file_mode == "explicit":
            client.invalidate("demo/model", runs=changed)
        deadline = time.monotonic() + EVENT_TIMEOUT
        moved = 0
        while time.monotonic() < deadline:
            with client.acquire_safetensors("demo/model", "cpu:0") as model:
                if np.array_equal(model["layer2.weight"], tensors["layer2.weight"]):
                    same = all(np.array_equal(model[k], v) for k, v in tensors.items())
                    break
            time.sleep(0.05)
        moved = client.describe("demo/model").stats.pages_copied - before
        # Only that tensor's pages move (a page noticed mid-write may move twice: count distinct pages).
        span = set(pages_from_runs(changed).tolist())
        span |= {p + 1 for p in span} | {p - 1 for p in span}  # its first/last page may share a neighbour
        synced = watch.pages_after("sync", "demo/model", generation_model)
        outside = len(synced - span)
        step("safetensors rewrite", f"1 of 4 tensors changed ({file_mode} tracking): {moved} page copies, "
                                    f"{len(synced)} distinct pages; that tensor spans {expected}; pages outside "
                                    f"it moved: expected 0, got {outside}", same and outside == 0)
        watch.stop()
        client.unregister("demo/model")
        client.unregister("demo/table")
    return ok


def main(size_mib: int = 512) -> int:
    if console.is_terminal:
        console.rule("[bold]devrep demo")
    else:  # a rule would be as wide as the unwrapped console
        console.print("[bold]devrep demo")
    rows: list[tuple[str, str, str]] = []
    t0 = time.perf_counter()
    ok = False
    with tempfile.TemporaryDirectory(prefix="devrep-demo-") as tmp:
        workdir = Path(tmp)
        try:
            with server_process(workdir) as (address, proc):
                console.print(f"server pid {proc.pid} on {address}")
                ok = scenario(address, workdir, size_mib, rows)
                t = time.perf_counter()
                code = stop_server(proc)
                rows.append(("server SIGTERM", f"exit status {code} after {_ms(time.perf_counter() - t)}",
                             "[green]ok[/]" if code == 0 else "[red]FAILED[/]"))
                ok &= code == 0
        except Exception as exc:
            rows.append(("error", f"{type(exc).__name__}: {exc}", "[red]FAILED[/]"))
            ok = False
    table = Table(title=f"devrep demo summary ({time.perf_counter() - t0:.1f} s)")
    table.add_column("step")
    table.add_column("what happened")
    table.add_column("")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
