#!/usr/bin/env python3
"""Ray Serve on NPUs, routed four ways (issue 25): fuyao's Serve application (``fuyao.ray_serve.app``: one engine
simulator per replica, each on its own NPU slot) on a local Ray (``ray start --head --resources '{"NPU": N}'``), under
the shared-prefix workload, with

- ``serve power-of-two``: Serve's default request router (the baseline);
- ``serve prefix-tree``: Serve's own ``PrefixCacheAffinityRouter`` (a prefix tree of the prompts it routed), only
  where Ray's LLM module imports (it needs ``ray[llm]``: vLLM or SGLang beside Ray); otherwise reported as skipped;
- ``serve kv-index``: fuyao's ``KvIndexRequestRouter`` (asks fuyao-kvcache, fed by the engines' KV events);
- ``fuyao-router prefix-aware``: fuyao's router in front of the replicas' engines (its own KV index from the same
  events), Serve's data path bypassed.

Each runs on a fresh Ray and fresh engines (cold caches), on the same seeded arrivals, measured in steady state
(one unmeasured warm-up request per shared context first, as the router benchmark does): TTFT p50/p88 of the
streamed answers, and the fleet's prefix-cache hit rate from the engines' own counters. Prints a table, then the
JSON of docs/benchmarks.md, with ratios against ``serve power-of-two`` from the same run.

Usage: bench/ray_serve_bench.py [--replicas 4] [--rate 6] [--duration 40] [--groups 16] [--blocks 640] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots
from bench.report import add_out_argument, emit
from bench.router_bench import Fleet, comparison_lines, shared_prefix, start_router, steady_state_run
from tests.support.apiserver import free_port
from tests.support.engines import Daemon, kvcache, scrape
from tests.support.ray_local import LocalRay

MODEL = "fuyao-sim-7b"
CONFIGS = ("serve power-of-two", "serve prefix-tree", "serve kv-index", "fuyao-router prefix-aware")
BASELINE = CONFIGS[0]


def engine_counters(urls: list[str]) -> tuple[float, float]:
    return (sum(scrape(url, "vllm:prefix_cache_hits_total") for url in urls),
            sum(scrape(url, "vllm:prefix_cache_queries_total") for url in urls))


def run(config: str, jobs: list[Any], replicas: int, blocks: int, seed: int) -> dict[str, Any]:
    http, events = free_port(replicas), free_port(replicas)
    engines = [f"http://127.0.0.1:{http + i}" for i in range(replicas)]
    streams = {url: f"tcp://127.0.0.1:{events + i}" for i, url in enumerate(engines)}
    kind, _, policy = config.partition(" ")
    index: Daemon | None = None
    router: Daemon | None = None
    ray = LocalRay(npus=replicas, cpus=2).start()
    try:
        if policy == "kv-index":
            index = kvcache(*[a for url, stream in streams.items() for a in ("--kv-events", f"{url}={stream}")],
                            "--log-level", "warning").start()
        route = {"policy": policy if kind == "serve" else "power-of-two"}
        if index is not None:
            route["kvIndexUrl"] = index.url
        ray.deploy({"replicas": replicas, "npusPerReplica": 1, "maxOngoingRequests": 64, "router": route,
                    "engine": {"host": "127.0.0.1", "port": http, "kv_events_port": events, "model": MODEL,
                               "args": ["--host", "{host}", "--port", "{port}", "--model", "{model}",
                                        "--kv-events-endpoint", "tcp://*:{kv_events_port}", "--num-gpu-blocks",
                                        str(blocks), "--max-num-batched-tokens", "4096", "--seed", str(seed),
                                        "--log-level", "warning"]}})
        url = ray.http_url
        if kind == "fuyao-router":
            fleet = Fleet([_Known(u) for u in engines], events=streams, model=MODEL)
            router = start_router("fuyao", "prefix-aware", fleet)
            url = router.url
        started = time.monotonic()
        result = steady_state_run(url, copy.deepcopy(jobs), config.replace(" ", "-"),
                                  lambda: engine_counters(engines))
        result["seconds"] = round(time.monotonic() - started, 1)
        return result
    finally:
        if router is not None:
            router.close()
        ray.stop()
        if index is not None:
            index.close()


def prefix_tree_available() -> bool:
    import subprocess

    from tests.support.ray_local import ray_python

    return subprocess.run([ray_python(), "-c", "import ray.serve.llm.request_router"], capture_output=True,
                          timeout=120).returncode == 0


class _Known(Daemon):
    """An engine the Serve replica started (the router benchmark's Fleet wants Daemons: only ``url`` is used)."""

    def __init__(self, url: str):
        super().__init__("", [], int(url.rsplit(":", 1)[1]), "/health")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4, help="engine replicas (one NPU each)")
    parser.add_argument("--rate", type=float, default=6.0, help="requests per second offered")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run")
    parser.add_argument("--groups", type=int, default=16, help="shared contexts (~1.8k tokens each)")
    parser.add_argument("--blocks", type=int, default=640, help="KV blocks per engine (16 tokens each)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations")
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the benchmark)")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.groups = 8.0, 6
    jobs = shared_prefix(args.rate, args.duration, args.seed, groups=args.groups)
    for job in jobs:
        job.body["model"] = MODEL
    rows: dict[str, dict[str, Any]] = {}
    for config in [c for c in CONFIGS if c in args.only.split(",")]:
        if config == "serve prefix-tree" and not prefix_tree_available():
            rows[config] = {"failed": "skipped: Serve's PrefixCacheAffinityRouter needs ray[llm] (vLLM or SGLang) "
                                      "in the Ray environment"}
            print(f"{config:28s} {rows[config]['failed']}", flush=True)
            continue
        try:
            rows[config] = run(config, jobs, args.replicas, args.blocks, args.seed)
        except (RuntimeError, OSError) as exc:  # a run that failed is reported, and the others still run
            import traceback

            traceback.print_exc()
            rows[config] = {"failed": f"{type(exc).__name__}: {str(exc)[:500]}"}
        print(f"{config:28s} {json.dumps(rows[config])}", flush=True)
    measured = [(name, r) for name, r in rows.items() if "failed" not in r]
    print("\n" + "\n".join(comparison_lines(measured, "KV hit rate")))
    base = rows.get(BASELINE, {})
    ratios = {}
    for name, row in measured:
        if base.get("p88") and row.get("p88"):
            ratios[name] = {"ttft_p88_vs_default": round(row["p88"] / base["p88"], 3),
                            "hit_rate_points_vs_default": (round((row["hit_rate"] - base["hit_rate"]) * 100, 1)
                                                           if row.get("hit_rate") is not None
                                                           and base.get("hit_rate") is not None else None)}
    for name, ratio in ratios.items():
        print(f"{name:28s} TTFT p88 {ratio['ttft_p88_vs_default']:.2f}x of Serve's default, KV hit rate "
              f"{ratio['hit_rate_points_vs_default']:+} points")
    emit({"benchmark": "ray-serve", "replicas": args.replicas, "rate": args.rate, "duration_s": args.duration,
          "groups": args.groups, "blocks_per_engine": args.blocks, "rows": rows, "ratios": ratios}, args.out,
         "ray-serve", charts)


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    rows = {k: v for k, v in result["rows"].items() if "failed" not in v}
    if not rows:
        return []
    return [
        plots.grouped_bars(out / "ray-serve-ttft.png", "Ray Serve on NPUs: TTFT under the shared-prefix workload",
                           {n: {"p50": r["p50"] * 1000, "p88": r["p88"] * 1000} for n, r in rows.items()}, "ms"),
        plots.grouped_bars(out / "ray-serve-hits.png", "Ray Serve on NPUs: fleet KV-cache hit rate",
                           {n: {"hit rate": (r["hit_rate"] or 0) * 100} for n, r in rows.items()}, "%"),
    ]

if __name__ == "__main__":
    main()
