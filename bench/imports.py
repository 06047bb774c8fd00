"""I0: what importing devrep costs a process that only wants the client (issue 13, item 2).

``import devrep.client`` in a fresh interpreter, median of 5, against importing only its third-party dependencies
(grpc + numpy) in the same run: the target is an absolute < 0.5 s here, reported as value / 0.5 s, with the
overhead over the dependencies alongside. The module set (no numba, no server module) is a unit test
(tests/test_layers.py); the time lives here because timing belongs in benchmarks.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

TARGET_S = 0.5


def _fresh_import_seconds(statement: str, repeat: int = 5) -> float:
    """Median wall time of a fresh ``python -c statement`` minus that of an empty interpreter, same run."""
    def once(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        return time.perf_counter() - start

    empty = statistics.median(once("pass") for _ in range(repeat))
    return max(statistics.median(once(statement) for _ in range(repeat)) - empty, 0.0)


def i0_client_import(results: dict[str, Any]) -> None:
    client = _fresh_import_seconds("import devrep.client")
    deps = _fresh_import_seconds("import grpc, numpy")
    results["I0-client-import"] = {
        "value": round(client, 4), "baseline": round(deps, 4), "ratio": round(client / TARGET_S, 3),
        "target": TARGET_S, "unit": "s", "meets": bool(client < TARGET_S),
        "note": "import devrep.client in a fresh interpreter (baseline: import grpc, numpy alone); "
                "target < 0.5 s (ratio = value / 0.5 s)"}


def run(results: dict[str, Any]) -> None:
    i0_client_import(results)


if __name__ == "__main__":
    out: dict[str, Any] = {}
    run(out)
    print(out)
