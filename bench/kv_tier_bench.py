#!/usr/bin/env python3
"""The shared KV tier with real bytes, on real vLLM engines (CPU build, the tiny generated model): two engines as
host processes under KV pressure (``--num-gpu-blocks-override``), fuyao-router in front, with and without the tier
(fuyao's KV connector on a shared directory, ``fuyao-kvcache`` holding it at a size and telling the router what it
holds). Prints a table, then one JSON object (the figures of docs/benchmarks.md, "Shared KV tier").

Rows, in one run (each on its own prompts: a run's name prefixes them, so no row is served from another's cache):

- ``round-robin, no tier``: the design doc's baseline;
- ``prefix-aware, no tier``;
- ``round-robin + tier`` and ``prefix-aware + tier`` (LRU, room for the working set);
- ``prefix-aware + tier <POLICY>, small``: LRU, LFU and FIFO with a tier smaller than the working set;
- ``prefix-aware + tier + warming``: the contexts sent through an engine before the run by fuyao-kvcache.

Workloads: ``shared-prefix`` (more distinct contexts than the fleet's KV cache holds, a question after each) and
``multi-turn`` (each turn resends the conversation). Fleet hit rate = (engine prefix-cache hits + tier hits) / prompt
tokens, from vLLM's own counters (``vllm:prefix_cache_hits_total``, ``vllm:external_prefix_cache_hits_total``,
``vllm:prefix_cache_queries_total``); TTFT from the streamed answers. The design doc's "KV hit +45 points" is the
``+tier`` fleet hit rate against ``round-robin, no tier``.

Usage: bench/kv_tier_bench.py [--duration 40] [--rate 1.2] [--blocks 96] [--only shared-prefix,multi-turn]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_out_argument, emit
from bench.router_bench import Job, comparison_lines, multi_turn, pct, run_load, shared_prefix, steady_state_run
from tests.support.apiserver import free_port
from tests.support.engines import Daemon, kvcache
from tests.support.vllm import BLOCK_SIZE, MODEL, REPO, vllm_engine

BLOCK_FILE_BYTES = 33 * 1024
"""One block file of the tiny model (2 layers x 2 KV heads x 32 tokens x 128 x 2 bytes, plus its header)."""


def connector(path: Path) -> list[str]:
    return ["--kv-transfer-config", json.dumps({
        "kv_connector": "FuyaoKVConnector", "kv_connector_module_path": "fuyao.kvcache.connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"path": str(path)}})]


def start_engines(count: int, blocks: int, tier: Path | None) -> list[Daemon]:
    engines: list[Daemon] = []
    try:
        for _ in range(count):
            extra = ["--num-gpu-blocks-override", str(blocks), "--max-num-seqs", "32"]
            env = None
            if tier is not None:
                extra += connector(tier)
                env = {"PYTHONPATH": str(REPO)}
            engines.append(vllm_engine(*extra, env=env).start(timeout=300))
    except BaseException:
        for e in engines:
            e.close()
        raise
    return engines


def start_router(strategy: str, engines: list[Daemon], service: str | None) -> Daemon:
    port = free_port()
    config = Path(tempfile.mkstemp(prefix="fuyao-tier-router-", suffix=".yaml")[1])
    lines = ["version: v1", "kvCache:", f"  blockSize: {BLOCK_SIZE}"]
    if service:
        lines.append(f"  service: {service}")
    config.write_text("\n".join(lines) + "\n")
    args = ["--listen", f"127.0.0.1:{port}", "--strategy", strategy, "--log-level", "warning", "--config", str(config)]
    args += [a for e in engines for a in ("--backend", e.url)]
    if not service:  # the engines' KV events feed the router's own index
        args += [f"--kv-events={e.events}={e.url}" for e in engines]  # type: ignore[attr-defined]
    return Daemon("fuyao.inference_router.cli", args, port, "/health").start()


def start_tier_service(tier: Path, size: int, policy: str, warming: list[str] | None = None,
                       engine: str | None = None) -> Daemon:
    config = Path(tempfile.mkstemp(prefix="fuyao-tier-kv-", suffix=".yaml")[1])
    text = (f"version: v1\nkvCache:\n  blockSize: {BLOCK_SIZE}\n  size: {size}\n  evictionPolicy: {policy}\n"
            f"  volume:\n    path: {tier}\n    interval: 1s\n")
    if warming and engine:
        text += f"  warming:\n    enabled: true\n    engine: {engine}\n    model: {MODEL}\n    interval: 1h\n"
        text += "    queries: " + json.dumps(warming) + "\n"
    config.write_text(text)
    return kvcache("--config", str(config)).start(timeout=30)


def counters(engines: list[Daemon]) -> tuple[float, float]:
    """(engine prefix-cache hits + tier hits, prompt tokens) over the fleet."""
    hits = sum(e.metric("vllm:prefix_cache_hits_total") + e.metric("vllm:external_prefix_cache_hits_total")
               for e in engines)
    return hits, sum(e.metric("vllm:prefix_cache_queries_total") for e in engines)


def workload(name: str, rate: float, duration: float, seed: int, words: int) -> list[Job]:
    if name == "multi-turn":
        return multi_turn(rate, duration, seed, conversations=12, output=16)
    return shared_prefix(rate, duration, seed, groups=24, prefix_words=words, output=16)


def contexts(jobs: list[Job]) -> list[str]:
    """The shared contexts of a shared-prefix workload (what warming would be given)."""
    return sorted({job.body["prompt"].split(" Question: ", 1)[0] for job in jobs if "prompt" in job.body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--rate", type=float, default=1.2, help="requests per second")
    parser.add_argument("--blocks", type=int, default=96, help="KV blocks of 32 tokens per engine")
    parser.add_argument("--words", type=int, default=150, help="words per shared context")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", default="shared-prefix,multi-turn")
    add_out_argument(parser)
    args = parser.parse_args()
    wanted = args.only.split(",")
    results: dict[str, Any] = {"engines": 2, "blocks_per_engine": args.blocks, "block_size": BLOCK_SIZE,
                               "rate": args.rate, "duration_s": args.duration, "workloads": {}}
    rows: dict[str, dict[str, dict[str, Any]]] = {w: {} for w in wanted}

    def run(name: str, router_url: str, engines: list[Daemon], workload_name: str) -> None:
        jobs = workload(workload_name, args.rate, args.duration, args.seed, args.words)
        tag = f"{workload_name}/{name}".replace(" ", "-")
        if "messages" in jobs[0].body:  # conversations: the run's name opens each one (no warm-up: turns build it)
            for job in jobs:
                first = job.body["messages"][0]
                job.body["messages"] = [{**first, "content": f"[{tag}] " + first["content"]},
                                        *job.body["messages"][1:]]
            before = counters(engines)
            samples, wall = asyncio.run(run_load(router_url, jobs))
            after = counters(engines)
            ok = [s.ttft for s in samples if s.error is None and s.ttft is not None]
            queries = after[1] - before[1]
            result = {"requests": len(samples), "errors": len(samples) - len(ok), "p50": pct(ok, 50),
                      "p88": pct(ok, 88), "hit_rate": (after[0] - before[0]) / queries if queries else None,
                      "wall": wall}
        else:
            result = steady_state_run(router_url, jobs, tag, lambda: counters(engines))
        rows[workload_name][name] = result
        print(f"{workload_name:14s} {name:34s} {json.dumps(result)}", flush=True)

    started = time.monotonic()
    # without a tier
    engines = start_engines(2, args.blocks, None)
    try:
        for strategy in ("round-robin", "prefix-aware"):
            router = start_router(strategy, engines, None)
            try:
                for w in wanted:
                    run(f"{strategy}, no tier", router.url, engines, w)
            finally:
                router.close()
    finally:
        for e in engines:
            e.close()
    # with the tier
    tier = Path(tempfile.mkdtemp(prefix="fuyao-kv-tier-"))
    engines = start_engines(2, args.blocks, tier)
    try:
        roomy = 1 << 30
        small = 24 * BLOCK_FILE_BYTES * 4  # a fraction of the shared contexts' blocks
        cases: list[tuple[str, str, int, str, bool]] = [
            ("round-robin + tier", "round-robin", roomy, "LRU", False),
            ("prefix-aware + tier", "prefix-aware", roomy, "LRU", False),
            ("prefix-aware + tier LRU, small", "prefix-aware", small, "LRU", False),
            ("prefix-aware + tier LFU, small", "prefix-aware", small, "LFU", False),
            ("prefix-aware + tier FIFO, small", "prefix-aware", small, "FIFO", False),
            ("prefix-aware + tier + warming", "prefix-aware", roomy, "LRU", True)]
        for name, strategy, size, policy, warm in cases:
            for w in wanted:
                if warm and w != "shared-prefix":
                    continue
                warming = None
                if warm:
                    tag = f"{w}/{name}".replace(" ", "-")
                    warming = [f"[{tag}] " + c for c in contexts(workload(w, args.rate, args.duration, args.seed,
                                                                           args.words))]
                service = start_tier_service(tier, size, policy, warming, engines[0].url)
                router = start_router(strategy, engines, service.url)
                try:
                    if warming:  # the warming round computed every context before the run
                        deadline = time.monotonic() + 300
                        while service.metric("fuyao_kvcache_warming_queries_total") < len(warming):
                            if time.monotonic() > deadline:
                                raise RuntimeError("warming did not finish in 300 s")
                            time.sleep(1)
                    run(name, router.url, engines, w)
                    rows[w][name]["tier_bytes"] = service.metric("fuyao_kvcache_volume_bytes")
                finally:
                    router.close()
                    service.close()
    finally:
        for e in engines:
            e.close()
        shutil.rmtree(tier, ignore_errors=True)
    for w in wanted:
        print(f"\n{w}: 2 vLLM CPU engines x {args.blocks} blocks of {BLOCK_SIZE}, {args.rate} req/s for "
              f"{args.duration:.0f} s")
        for line in comparison_lines(list(rows[w].items()), hits="fleet hits"):
            print("  " + line)
        base = rows[w].get("round-robin, no tier", {}).get("hit_rate")
        best = rows[w].get("prefix-aware + tier", {}).get("hit_rate")
        if base is not None and best is not None:
            print(f"  fleet hit rate: {base * 100:.0f} % (round-robin, no tier) -> {best * 100:.0f} % "
                  f"(prefix-aware + tier): {(best - base) * 100:+.0f} points (the design doc: +45)")
        results["workloads"][w] = rows[w]
    results["seconds"] = round(time.monotonic() - started)
    emit(results, args.out, "kv_tier_bench", None)


if __name__ == "__main__":
    main()
