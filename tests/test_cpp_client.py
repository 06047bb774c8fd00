"""The protocol is language-neutral: a C++ client built from protos/ with Debian's gRPC C++ (examples/cpp_client,
following docs/protocol.md) creates a sync-mode memfd region with userfaultfd set up in C++, replicates it, writes
to it and reads a fresh CPU replica through the side channel, against a real `devrep serve`; a Python client then
checks the same replica."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _devrep_service import read_line, server_process, short_tmpdir

from devrep.client import connect
from devrep.doctor import probe

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "cpp_client" / "client.cc"
PAGE = 4096


def _missing_toolchain() -> str:
    for tool, package in (("protoc", "protobuf-compiler"), ("grpc_cpp_plugin", "protobuf-compiler-grpc"),
                          ("g++", "g++"), ("pkg-config", "pkg-config")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install {package}; `make test` installs it)"
    probe = subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"], capture_output=True)
    if probe.returncode:
        return ("pkg-config cannot find grpc++/protobuf (apt-get install libgrpc++-dev libprotobuf-dev; `make test` "
                "installs them)")
    return ""


@pytest.fixture(scope="module")
def cpp_client() -> Iterator[Path]:
    why = _missing_toolchain()
    if why:
        pytest.skip(why)
    with short_tmpdir() as build:
        plugin = shutil.which("grpc_cpp_plugin")
        subprocess.run(["protoc", f"-I{ROOT / 'protos'}", f"--cpp_out={build}", f"--grpc_out={build}",
                        f"--plugin=protoc-gen-grpc={plugin}", "devrep/v1/devrep.proto"], check=True, timeout=120)
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], capture_output=True,
                               text=True, check=True).stdout.split()
        gen = build / "devrep" / "v1"
        compiled = subprocess.run(
            ["nice", "g++", "-std=c++17", "-O1", f"-I{build}", str(SOURCE), str(gen / "devrep.pb.cc"),
             str(gen / "devrep.grpc.pb.cc"), *flags, "-o", str(build / "client")],
            capture_output=True, text=True, timeout=900)
        assert compiled.returncode == 0, f"g++ failed:\n{compiled.stderr[-4000:]}"
        yield build / "client"


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_cpp_client_tracked_region_fresh_replica(cpp_client: Path, mode: str) -> None:
    status = probe().modes[mode]
    if not status.works:  # the kernel feature is missing here: say exactly why
        pytest.skip(f"{mode} tracking unavailable: {status.reason}")
    with server_process() as (address, _server):
        sock = address.removeprefix("unix:")
        fd_sock = str(Path(sock).with_name("devrep.fd.sock"))
        proc = subprocess.Popen([str(cpp_client), sock, fd_sock, "cpp-region", mode], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            report = json.loads(read_line(proc, timeout=120))
            print("C++ client:", report)
            nbytes = report["nbytes"]
            assert report["tracking"] == mode, report
            assert report["replicated_pages"] == nbytes // PAGE, report
            assert report["page_fresh"] is True, f"the C++ store to page 3 is not in the fresh replica: {report}"
            assert report["equal"] is True, report
            assert report["generation"] >= 1, f"the {mode}-mode write should have bumped the generation: {report}"

            # The same replica through the Python client: the C++ client's bytes, its write included.
            expected = ((np.arange(nbytes, dtype=np.uint64) * 7 + 1) % 256).astype(np.uint8)
            expected[3 * PAGE:4 * PAGE] = 0x5A
            with connect(address) as client, client.acquire("cpp-region", "cpu:0") as lease:
                got = np.array(lease.array)
            assert got.nbytes == nbytes
            bad = np.flatnonzero(got != expected)
            assert bad.size == 0, f"replica differs from the C++ writes at {bad.size} bytes, first at {bad[:4]}"
            h = 1469598103934665603
            for b in got.tobytes():
                h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
            assert f"{h:016x}" == report["fnv1a"], (h, report)
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait(10)
        assert rc == 0, f"C++ client exited {rc}: {proc.stderr.read() if proc.stderr else ''}"


def test_cpp_client_usage_error(cpp_client: Path) -> None:
    proc = subprocess.run([str(cpp_client)], capture_output=True, text=True, timeout=30,
                          env={**os.environ})
    assert proc.returncode == 2 and "usage:" in proc.stderr
