"""Timing helpers shared by the benchmark modules."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeat: int = 5, setup: Callable[[], Any] | None = None) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs, each after an untimed ``setup``."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def entry(value: float, baseline: float, target: float, unit: str, note: str, higher_is_better: bool = True,
          ratio: float | None = None) -> dict[str, Any]:
    """One ``results.json`` entry. ``ratio`` defaults to value/baseline (or baseline/value for lower-is-better)."""
    if ratio is None:
        ratio = value / baseline if higher_is_better else baseline / value
    return {
        "value": round(value, 6),
        "baseline": round(baseline, 6),
        "ratio": round(ratio, 3),
        "target": target,
        "unit": unit,
        "meets": bool(ratio >= target),
        "note": note,
    }
