"""Run the benchmarks, print a table and write ``bench/results.json``.

``python -m bench`` runs every module; ``python -m bench core tracking`` runs some (``--help`` lists them; a
partial run keeps the other modules' entries from the previous results.json). Each module exposes
``run(results)`` and fills ``results[metric] = {"value", "baseline", "ratio", "target", "unit", "meets", "note"}``,
with its baseline measured in the same run (this machine is shared and noisy: compare ratios, not values).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rich.table import Table

from devrep._console import make_console

MODULES = ["core", "copy", "backends", "numa", "tracking", "service", "kube", "imports"]
RESULTS = Path(__file__).with_name("results.json")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run devrep's benchmarks (ratios against baselines measured in the same "
                                            "run), print a table and write bench/results.json.",
        epilog="modules: core (P1-P3 and bench/sync_vs_dirty.png), backends, tracking (P4, P5, FILL-*, STORE-*: "
               "what each tracking mode costs the writer), service, kube, imports (I0: import devrep.client)")
    parser.add_argument("modules", nargs="*", metavar="MODULE", help="modules to run (default: all)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    console = make_console()
    args = _parse(argv)
    wanted = args.modules or MODULES
    unknown = [m for m in wanted if m not in MODULES]
    if unknown:
        console.print(f"[red]unknown benchmark module(s): {', '.join(unknown)}; known: {', '.join(MODULES)}")
        return 2
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() and args.modules else {}

    failed = []
    for name in wanted:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            console.print(f"[yellow]skipping bench.{name}: {exc}")
            continue
        console.print(f"[bold]running bench.{name}[/] ...")
        start = time.perf_counter()
        try:
            module.run(results)
        except Exception:  # one broken module must not hide the others' figures
            failed.append(name)
            console.print(f"[red]bench.{name} failed:\n{traceback.format_exc()}")
        console.print(f"  bench.{name} took {time.perf_counter() - start:.1f} s")
    results["_meta"] = {"machine": platform.node(), "python": platform.python_version(),
                        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")

    table = Table(title="devrep benchmarks (ratio = devrep vs same-run baseline)")
    for column in ("metric", "value", "baseline", "unit", "ratio", "target", "meets", "what"):
        table.add_column(column, overflow="fold")
    for key in sorted(k for k in results if not k.startswith("_")):
        r = results[key]
        table.add_row(key, f"{r['value']:.4g}", f"{r['baseline']:.4g}", r["unit"], f"{r['ratio']:.2f}",
                      str(r["target"]), "[green]yes" if r["meets"] else "[red]no", r.get("note", ""))
    console.print(table)
    console.print(f"wrote {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
