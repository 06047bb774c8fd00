"""CLI polish: --version, help on every option, human sizes, unwrapped output in pipes, doctor's device list,
verify's stale pages apart from mismatches, and the ``sync`` subcommand (against a real server process)."""

from __future__ import annotations

import argparse
import json
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _devrep_service import ROOT, short_tmpdir
from _support import run_cli

import devrep
from devrep import Replicator
from devrep.cli import build_parser
from devrep.client import connect
from devrep.demo import server_process
from devrep.errors import ResourceExhaustedError
from devrep.sizes import format_size, parse_size

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``devrep ARGS`` with stdout a pipe and no $COLUMNS: what a script or CI log sees."""
    return run_cli(*args, env={"COLUMNS": None, **(env or {})}, timeout=timeout)


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # the one-line help shown in the parent's listing
                yield f"{path} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


def test_every_subcommand_and_option_has_help() -> None:
    actions = list(_walk(build_parser(), "devrep"))
    missing = [f"{path}: {action.option_strings or action.dest}" for path, action in actions
               if not action.help or action.help == argparse.SUPPRESS]
    assert not missing, f"no help text: {missing}"
    commands = {path for path, _ in actions}
    assert {"devrep sync", "devrep verify", "devrep doctor", "devrep serve", "devrep demo"} <= commands


def test_version_matches_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"devrep {project['version']}" == f"devrep {devrep.__version__}"


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("0", 0), ("512B", 512), ("16G", 16 << 30), ("16GiB", 16 << 30), ("16 gib", 16 << 30),
    ("2K", 2048), ("3KiB", 3072), ("1.5M", 3 << 19), ("10GB", 10 * 10**9), ("1T", 1 << 40), ("2TiB", 2 << 40),
    ("7mb", 7 * 10**6), (".5K", 512), (4096, 4096),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "16X", "-1", "1.3B", "16 G B", "1e9", "0x10", "16Gi"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 512, 4096, 16 << 30, 3 << 19)] == [
        "0 B", "512 B", "4.0 KiB", "16.0 GiB", "1.5 MiB"]


def test_quota_bytes_takes_human_sizes() -> None:
    args = build_parser().parse_args(["serve", "--quota-bytes", "16G"])
    assert args.quota_bytes == 16 << 30
    r = cli("serve", "--quota-bytes", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr, r.stderr


def test_quota_bytes_in_human_units_is_enforced() -> None:
    with short_tmpdir() as tmp, server_process(tmp, "--quota-bytes", "64K") as (address, _), \
            connect(address) as client:
        client.create_region("q", 8 * 4096)
        client.replicate("q", ["cpu:0", "cpu:1"])  # 2 x 32 KiB: exactly the quota
        with pytest.raises(ResourceExhaustedError):
            client.replicate("q", ["cpu:2"])


def test_output_is_not_cut_at_80_columns_in_a_pipe() -> None:
    r = cli("doctor")
    assert r.returncode in (0, 1), r.stderr
    from devrep.backends import load_backend

    backend = load_backend("opencl")
    try:
        described = backend.describe(0)
    finally:
        backend.close()
    assert len(described) > 70
    lines = r.stdout.splitlines()
    assert any(described in line for line in lines), f"{described!r} not on one line of:\n{r.stdout}"
    assert max(len(line) for line in lines) > 80


def test_doctor_lists_the_devices_each_backend_sees() -> None:
    r = cli("doctor", "--json")
    report = json.loads(r.stdout)
    backends = report["backends"]
    assert [d.split()[0] for d in backends["cpu"]["devices"]] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert backends["opencl"]["devices"] and backends["opencl"]["devices"][0].startswith("opencl:0 ("), backends
    assert set(backends) >= {"cpu", "opencl", "cuda"}
    if not backends["cuda"]["devices"]:  # no GPU / no CuPy here: says why
        assert backends["cuda"]["error"]


def test_verify_counts_stale_pages_apart_from_mismatches() -> None:
    with Replicator(cpu_devices=1) as rep:
        region = rep.create_region("v", 16 * 4096, tracking="explicit")
        region.array[:] = 1
        region.invalidate()
        rep.replicate("v", ["cpu:0"])
        region.array[3 * 4096:6 * 4096] = 2  # written and announced, not yet synced: stale, not a mismatch
        region.invalidate(3 * 4096, 3 * 4096)
        # a page devrep believes valid, corrupted behind its back: a mismatch
        replica = region._replicas["cpu:0"]
        buffer = replica.buffers[replica.front]
        assert buffer is not None
        buffer.handle[1][10 * 4096] ^= 0xFF
        [report] = region.verify(resync=False)
        assert (report.stale_pages, report.mismatched_pages, report.pages_checked) == (3, 1, 13)
        assert report.mismatched.tolist() == [[10, 1]]


def test_sync_subcommand_and_verify_output(tmp_path: Path) -> None:
    token = "cli-polish-token-0123456789"
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "ops").write_text(token)
    env = {"DEVREP_TOKEN": token}
    with short_tmpdir() as tmp, server_process(tmp, "--token-dir", str(tmp_path / "tokens")) as (address, _), \
            connect(address, token=token) as client:
        env["DEVREP_ADDRESS"] = address
        region = client.create_region("s", 32 * 4096, tracking="explicit")
        client.replicate("s", ["cpu:0", "cpu:1"])
        region.array[5 * 4096:9 * 4096] = 7
        client.invalidate("s", 5 * 4096, 4 * 4096)

        r = cli("verify", "s", "--json", "--no-resync", env=env)
        assert r.returncode == 0, r.stderr  # stale pages are not a failure
        reports = {x["device"]: x for x in json.loads(r.stdout)}
        for device in ("cpu:0", "cpu:1"):
            assert (reports[device]["stale_pages"], reports[device]["mismatched_pages"]) == (4, 0), reports
        r = cli("verify", "s", "--no-resync", env=env)
        assert r.returncode == 0 and "stale pages (not checked)" in r.stdout and "awaiting" in r.stdout, r.stdout

        r = cli("sync", "s", "--device", "cpu:1", "--json", env=env)
        assert r.returncode == 0, r.stderr
        synced = json.loads(r.stdout)
        assert synced["pages_copied"] == 4 and synced["devices"] == ["cpu:1"], synced
        r = cli("sync", "s", env=env)
        assert r.returncode == 0 and "synced s" in r.stdout and "16.0 KiB" in r.stdout, r.stdout
        with client.acquire("s", "cpu:0") as lease:
            assert np.array_equal(lease.array, region.array)
        r = cli("verify", "s", "--json", "--no-resync", env=env)
        assert all(x["stale_pages"] == 0 and x["pages_checked"] == 32 for x in json.loads(r.stdout))

        r = cli("sync", "nope", env=env)
        assert r.returncode == 4 and "nope" in r.stderr
