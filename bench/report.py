#!/usr/bin/env python3
"""Where a benchmark's figures go: its JSON on stdout, as always, and ``<out>/<name>.json`` with PNG charts next to
it (latency CDFs, ratios against the same run's baseline).

Each bench script has ``charts(result, out) -> list[Path]`` that draws from the JSON alone, so a directory's charts
can be drawn again without running anything: ``bench/report.py DIR`` (docs/benchmarks.md embeds ``docs/benchmarks/``).
Latency distributions travel in the JSON as quantile curves (:func:`quantiles`), not raw samples.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
QUANTILE_STEPS = 20
"""A quantile curve holds the values at 0 %, 5 %, …, 100 % of the samples (21 points)."""

Charts = Callable[[dict[str, Any], Path], list[Path]]

BENCHES = {  # the JSON's file name → the module whose charts() draws it
    "deviceplugin": "bench.deviceplugin_bench", "extender": "bench.extender_bench",
    "extender-volcano": "bench.extender_bench", "extender-scale": "bench.extender_scale",
    "qos": "bench.qos_bench", "kvcache": "bench.kvcache_bench", "router": "bench.router_bench",
    "scheduling": "bench.scheduling_bench", "colocation": "bench.colocation_bench", "cluster": "bench.cluster_bench",
    "ray-serve": "bench.ray_serve_bench",
}


def quantiles(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> list[float]:
    """The samples' values at fractions 0, 1/QUANTILE_STEPS, …, 1 (nearest rank), times ``scale``."""
    if not values:
        return []
    ordered = sorted(values)
    last = len(ordered) - 1
    return [round(ordered[round(i / QUANTILE_STEPS * last)] * scale, digits) for i in range(QUANTILE_STEPS + 1)]


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory for <name>.json and its PNG charts (default {DEFAULT_OUT}); '-' for stdout "
                             "only")


def emit(result: dict[str, Any], out: Path, name: str, charts: Charts | None) -> list[Path]:
    """Print ``result``; unless ``out`` is ``-``, write ``out/<name>.json`` and draw its charts next to it."""
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if str(out) == "-":
        return []
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(text + "\n")
    written = [path] + (charts(result, out) if charts is not None else [])
    for p in written:
        print(f"wrote {p}", file=sys.stderr)
    return written


def redraw(directory: Path) -> list[Path]:
    """Draw the charts of every known ``<name>.json`` in ``directory`` again."""
    written: list[Path] = []
    for name, module in BENCHES.items():
        path = directory / f"{name}.json"
        if path.exists():
            charts: Charts = importlib.import_module(module).charts
            written += charts(json.loads(path.read_text()), directory)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Draw the charts of a directory of benchmark JSON files again.")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    written = redraw(args.directory)
    if not written:
        sys.exit(f"no benchmark JSON ({', '.join(f'{n}.json' for n in BENCHES)}) in {args.directory}")
    for p in written:
        print(p)


if __name__ == "__main__":
    main()
