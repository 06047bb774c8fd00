"""examples/ run as a user runs them: a subprocess each, on the CPU backend, against a real `devrep serve`
(each example starts its own), with bounded timeouts. GPU variants run where CuPy sees a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.timeout(600)


def run_example(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DEVREP_ADDRESS", None)  # each example starts its own server
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    print(proc.stdout)
    print(proc.stderr, file=sys.stderr)
    return proc


def result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line (exit {proc.returncode}); stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def gpu_reason() -> str:
    """'' when CuPy sees a CUDA device and torch is a CUDA build; else why the GPU variant cannot run."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (no GPU on this machine)"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:
        return f"no usable CUDA device: {exc}"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} is a CPU build (torch.from_dlpack of a CUDA replica needs CUDA torch)"
    return ""


def test_embeddings_online_readers_never_see_stale_rows() -> None:
    proc = run_example("embeddings_online/run.py", "--seconds", "3")
    out = result(proc)
    assert proc.returncode == 0, f"expected exit 0, got {proc.returncode}"
    assert out["trainer"]["rows_updated"] > 0, out["trainer"]
    assert len(out["readers"]) == 2
    for r in out["readers"]:
        assert r["acquires"] >= 1 and r["lookups"] >= 1, r
        assert r["violations"] == 0, f"expected no stale/torn rows, got {r['violations']}: {r['first_violation']}"
    assert "lookups/s" in proc.stdout and "rows/s" in proc.stdout  # it prints throughput


def test_embeddings_online_check_catches_stale_reads() -> None:
    """The freshness check is not vacuous: with fresh=False acquires the replica is never synced, and the
    readers must report rows older than their last completed update (and the example must fail)."""
    proc = run_example("embeddings_online/run.py", "--seconds", "2", "--rows", "4096", "--stale-reads")
    out = result(proc)
    stale = sum(r["stale_rows"] for r in out["readers"])
    assert stale > 0, f"expected stale rows to be detected with fresh=False, got {stale}"
    assert proc.returncode == 1, f"expected exit 1 on violations, got {proc.returncode}"


@pytest.mark.gpu
def test_embeddings_online_cuda() -> None:
    reason = gpu_reason()
    if reason:
        pytest.skip(reason)
    proc = run_example("embeddings_online/run.py", "--seconds", "3", "--device", "cuda:0")
    out = result(proc)
    assert proc.returncode == 0 and all(r["violations"] == 0 for r in out["readers"]), out


def test_weights_hot_swap_moves_only_changed_pages() -> None:
    proc = run_example("weights_hot_swap/run.py")
    out = result(proc)
    assert proc.returncode == 0, f"expected exit 0, got {proc.returncode}"
    assert out["initial_pages"] == out["npages"], out
    assert out["swap_pages"] == out["expected_pages"] < out["npages"], out


def test_cupy_reader() -> None:
    reason = gpu_reason()
    proc = run_example("cupy_reader.py", "--mib", "16", timeout=180)
    if reason.startswith(("CuPy", "no ")):
        # No GPU here: the example must say so clearly and exit 7 (failed precondition), not crash.
        assert proc.returncode == 7, f"expected exit 7 without a GPU, got {proc.returncode}: {proc.stderr}"
        assert "needs an NVIDIA GPU with CuPy" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, f"expected exit 0 on a GPU, got {proc.returncode}"
        assert "up to date: True" in proc.stdout
