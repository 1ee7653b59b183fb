#!/usr/bin/env python3
"""The shared KV tier with real bytes, on real vLLM engines (CPU build, a generated model) or on a bigger fleet of
engine simulators: engines as host processes under KV pressure, fuyao-router in front, with and without the tier
(fuyao's KV connector on a shared directory, or the simulator's ``--kv-volume`` writing the same files;
``fuyao-kvcache`` holding the directory at a size and telling the router what it holds). Prints a table, then one
JSON object (the figures of docs/benchmarks.md, "Shared KV tier").

Engines: ``--engine vllm`` (2 by default; ``--model-size tiny`` is the tests' model, ``small`` one whose prefill
costs far more per token than loading its KV, as a real model's does) or ``--engine sim`` (8 by default; the
simulator's 7B latency profile, a load costing ``kv_transfer_per_token_ms`` per token).

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

Usage: bench/kv_tier_bench.py [--engine vllm|sim] [--engines N] [--model-size tiny|small] [--duration 40]
       [--rate R] [--blocks B] [--only shared-prefix,multi-turn]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_out_argument, emit
from bench.router_bench import Job, comparison_lines, multi_turn, pct, run_load, shared_prefix, steady_state_run
from tests.support.apiserver import free_port
from tests.support.engines import Daemon, engine, kvcache, metric_total
from tests.support.vllm import BLOCK_SIZE as VLLM_BLOCK_SIZE
from tests.support.vllm import MODEL as VLLM_MODEL
from tests.support.vllm import REPO, model_shape, vllm_engine

SIM_MODEL = "fuyao-sim-7b"
SIM_BLOCK_SIZE = 16
SIM_BYTES_PER_TOKEN = 64


def connector(path: Path) -> list[str]:
    return ["--kv-transfer-config", json.dumps({
        "kv_connector": "FuyaoKVConnector", "kv_connector_module_path": "fuyao.kvcache.connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"path": str(path)}})]


@dataclass(frozen=True)
class Engines:
    """Which engines the run uses and what follows from it."""

    kind: str  # vllm | sim
    count: int
    blocks: int
    model_size: str = "tiny"

    @property
    def block_size(self) -> int:
        return VLLM_BLOCK_SIZE if self.kind == "vllm" else SIM_BLOCK_SIZE

    @property
    def model(self) -> str:
        return VLLM_MODEL if self.kind == "vllm" else SIM_MODEL

    @property
    def block_file_bytes(self) -> int:
        """One block's file: its KV (every layer's K and V pages) plus a header of about 1 KB."""
        if self.kind == "sim":
            return SIM_BYTES_PER_TOKEN * self.block_size + 1024
        shape = model_shape(self.model_size)
        per_token = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * shape["head_dim"] * 2
        return per_token * self.block_size + 1024

    def start(self, tier: Path | None) -> list[Daemon]:
        engines: list[Daemon] = []
        try:
            for _ in range(self.count):
                if self.kind == "sim":
                    extra = ["--num-gpu-blocks", str(self.blocks), "--max-num-seqs", "32", "--block-size",
                             str(self.block_size), "--log-level", "warning"]
                    if tier is not None:
                        extra += ["--kv-volume", str(tier), "--kv-volume-bytes-per-token", str(SIM_BYTES_PER_TOKEN)]
                    engines.append(engine(*extra, events=True, replay=True, time_scale=1.0).start(timeout=30))
                    continue
                extra = ["--num-gpu-blocks-override", str(self.blocks), "--max-num-seqs", "32"]
                env = None
                if tier is not None:
                    extra += connector(tier)
                    env = {"PYTHONPATH": str(REPO)}
                engines.append(vllm_engine(*extra, env=env, model_size=self.model_size).start(timeout=300))
        except BaseException:
            for e in engines:
                e.close()
            raise
        return engines


def start_router(strategy: str, engines: list[Daemon], service: str | None, block_size: int) -> Daemon:
    port = free_port()
    config = Path(tempfile.mkstemp(prefix="fuyao-tier-router-", suffix=".yaml")[1])
    lines = ["version: v1", "kvCache:", f"  blockSize: {block_size}"]
    if service:
        lines.append(f"  service: {service}")
    config.write_text("\n".join(lines) + "\n")
    args = ["--listen", f"127.0.0.1:{port}", "--strategy", strategy, "--log-level", "warning", "--config", str(config)]
    args += [a for e in engines for a in ("--backend", e.url)]
    if not service:  # the engines' KV events feed the router's own index
        args += [f"--kv-events={e.events}={e.url}" for e in engines]  # type: ignore[attr-defined]
    return Daemon("fuyao.inference_router.cli", args, port, "/health").start()


def start_tier_service(tier: Path, size: int, policy: str, fleet: Engines, engines: list[Daemon],
                       warming: list[str] | None = None, ttl: str | None = None) -> Daemon:
    """fuyao-kvcache holding the volume at ``size``, following every engine's KV events (what each engine caches:
    the router asks it, as in the chart) and, with ``warming``, computing those prompts through the first engine."""
    config = Path(tempfile.mkstemp(prefix="fuyao-tier-kv-", suffix=".yaml")[1])
    endpoints = [{"name": e.url, "events": e.events, **({"replay": e.replay} if getattr(e, "replay", None) else {})}
                 for e in engines]  # type: ignore[attr-defined]
    text = (f"version: v1\nkvCache:\n  blockSize: {fleet.block_size}\n  size: {size}\n  evictionPolicy: {policy}\n"
            f"  volume:\n    path: {tier}\n    interval: 1s\n"
            f"  events:\n    endpoints: {json.dumps(endpoints)}\n")
    warm_through = engines[0].url
    if ttl:
        text += f"  ttl: {ttl}\n"
    if warming:
        text += (f"  warming:\n    enabled: true\n    engine: {warm_through}\n    model: {fleet.model}\n"
                 "    interval: 1h\n")
        text += "    queries: " + json.dumps(warming) + "\n"
    config.write_text(text)
    return kvcache("--config", str(config)).start(timeout=30)


def counters(engines: list[Daemon]) -> tuple[float, float]:
    """(engine prefix-cache hits + tier hits, prompt tokens) over the fleet."""
    hits = sum(e.metric("vllm:prefix_cache_hits_total") + e.metric("vllm:external_prefix_cache_hits_total")
               for e in engines)
    return hits, sum(e.metric("vllm:prefix_cache_queries_total") for e in engines)


def workload(name: str, rate: float, duration: float, seed: int, words: int, engines: int) -> list[Job]:
    """12 contexts (or conversations) per engine: more than the fleet's KV cache holds at once."""
    if name == "multi-turn":
        return multi_turn(rate, duration, seed, conversations=6 * engines, output=16)
    return shared_prefix(rate, duration, seed, groups=12 * engines, prefix_words=words, output=16)


def contexts(jobs: list[Job]) -> list[str]:
    """The shared contexts of a shared-prefix workload (what warming would be given)."""
    return sorted({job.body["prompt"].split(" Question: ", 1)[0] for job in jobs if "prompt" in job.body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    parser.add_argument("--engines", type=int, help="how many (default: 2 vLLM, 8 simulators)")
    parser.add_argument("--model-size", choices=["tiny", "small"], default="tiny", help="the vLLM engines' model")
    parser.add_argument("--duration", type=float, default=40.0)
    parser.add_argument("--rate", type=float, help="requests per second (default: 1.2 for vLLM, 3 per simulator)")
    parser.add_argument("--blocks", type=int, help="KV blocks per engine (default: 96 of 32 tokens for vLLM, "
                        "256 of 16 for the simulator)")
    parser.add_argument("--words", type=int, help="words per shared context (default: 150 for vLLM, 600 for the "
                        "simulator)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--only", default="shared-prefix,multi-turn")
    parser.add_argument("--rows", help="run only these rows (names as printed, comma-separated); default: all")
    add_out_argument(parser)
    args = parser.parse_args()
    sim = args.engine == "sim"
    fleet = Engines(args.engine, args.engines or (8 if sim else 2), args.blocks or (256 if sim else 96),
                    args.model_size)
    args.words = args.words or (600 if sim else 150)
    rate = args.rate or (3.0 * fleet.count if sim else 1.2)
    wanted = args.only.split(",")
    results: dict[str, Any] = {"engine": fleet.kind, "model_size": fleet.model_size if not sim else None,
                               "engines": fleet.count, "blocks_per_engine": fleet.blocks, "words": args.words,
                               "block_size": fleet.block_size, "rate": rate, "duration_s": args.duration,
                               "workloads": {}}
    rows: dict[str, dict[str, dict[str, Any]]] = {w: {} for w in wanted}

    def jobs_for(workload_name: str) -> list[Job]:
        return workload(workload_name, rate, args.duration, args.seed, args.words, fleet.count)

    chosen = set(args.rows.split(",")) if args.rows else None

    def wanted_row(name: str) -> bool:
        return chosen is None or name in chosen

    def run(name: str, router: Daemon, engines: list[Daemon], workload_name: str) -> None:
        jobs = jobs_for(workload_name)
        tag = f"{workload_name}/{name}".replace(" ", "-")
        if "messages" in jobs[0].body:  # conversations: the run's name opens each one (no warm-up: turns build it)
            for job in jobs:
                first = job.body["messages"][0]
                job.body["messages"] = [{**first, "content": f"[{tag}] " + first["content"]},
                                        *job.body["messages"][1:]]
            before = counters(engines)
            samples, wall = asyncio.run(run_load(router.url, jobs))
            after = counters(engines)
            ok = [s.ttft for s in samples if s.error is None and s.ttft is not None]
            queries = after[1] - before[1]
            result = {"requests": len(samples), "errors": len(samples) - len(ok), "p50": pct(ok, 50),
                      "p88": pct(ok, 88), "hit_rate": (after[0] - before[0]) / queries if queries else None,
                      "wall": wall}
        else:
            result = steady_state_run(router.url, jobs, tag, lambda: counters(engines))
        page = router.get("/metrics")[1]
        learned = [metric_total(page, "fuyao_router_tier_load_cost", backend=e.url) for e in engines]
        if any(learned):
            result["tier_load_cost"] = sum(learned) / len([v for v in learned if v])
        rows[workload_name][name] = result
        print(f"{workload_name:14s} {name:34s} {json.dumps(result)}", flush=True)

    started = time.monotonic()
    # without a tier
    engines = fleet.start(None) if any(wanted_row(f"{s}, no tier") for s in ("round-robin", "prefix-aware")) else []
    try:
        for strategy in ("round-robin", "prefix-aware"):
            if not wanted_row(f"{strategy}, no tier"):
                continue
            router = start_router(strategy, engines, None, fleet.block_size)
            try:
                for w in wanted:
                    run(f"{strategy}, no tier", router, engines, w)
            finally:
                router.close()
    finally:
        for e in engines:
            e.close()
    # with the tier
    tier = Path(tempfile.mkdtemp(prefix="fuyao-kv-tier-"))
    engines = fleet.start(tier)
    try:
        roomy = 1 << 34
        small = 12 * fleet.count * fleet.block_file_bytes * 4  # a fraction of the shared contexts' blocks
        cases: list[tuple[str, str, int, str, bool]] = [
            ("round-robin + tier", "round-robin", roomy, "LRU", False),
            ("prefix-aware + tier", "prefix-aware", roomy, "LRU", False),
            ("prefix-aware + tier LRU, small", "prefix-aware", small, "LRU", False),
            ("prefix-aware + tier LFU, small", "prefix-aware", small, "LFU", False),
            ("prefix-aware + tier FIFO, small", "prefix-aware", small, "FIFO", False),
            ("prefix-aware + tier TTL 10s", "prefix-aware", roomy, "TTL", False),
            ("prefix-aware + tier + warming", "prefix-aware", roomy, "LRU", True)]
        for name, strategy, size, policy, warm in cases:
            if not wanted_row(name):
                continue
            for w in wanted:
                if warm and w != "shared-prefix":
                    continue
                warming = None
                if warm:
                    tag = f"{w}/{name}".replace(" ", "-")
                    warming = [f"[{tag}] " + c for c in contexts(jobs_for(w))]
                ttl = policy == "TTL"
                service = start_tier_service(tier, size, "LRU" if ttl else policy, fleet, engines, warming,
                                             ttl="10s" if ttl else None)
                router = start_router(strategy, engines, service.url, fleet.block_size)
                try:
                    if warming:  # the warming round computed every context before the run
                        deadline = time.monotonic() + 300
                        while service.metric("fuyao_kvcache_warming_queries_total") < len(warming):
                            if time.monotonic() > deadline:
                                raise RuntimeError("warming did not finish in 300 s")
                            time.sleep(1)
                    run(name, router, engines, w)
                    rows[w][name]["tier_bytes"] = service.metric("fuyao_kvcache_volume_bytes")
                finally:
                    router.close()
                    service.close()
    finally:
        for e in engines:
            e.close()
        shutil.rmtree(tier, ignore_errors=True)
    what = (f"{fleet.count} simulators (7B profile) x {fleet.blocks} blocks of {fleet.block_size}" if sim else
            f"{fleet.count} vLLM CPU engines ({fleet.model_size} model) x {fleet.blocks} blocks of {fleet.block_size}")
    for w in wanted:
        print(f"\n{w}: {what}, {rate} req/s for {args.duration:.0f} s")
        for line in comparison_lines(list(rows[w].items()), hits="fleet hits"):
            print("  " + line)
        base = rows[w].get("round-robin, no tier", {}).get("hit_rate")
        best = rows[w].get("prefix-aware + tier", {}).get("hit_rate")
        if base is not None and best is not None:
            print(f"  fleet hit rate: {base * 100:.0f} % (round-robin, no tier) -> {best * 100:.0f} % "
                  f"(prefix-aware + tier): {(best - base) * 100:+.0f} points (the design doc: +45)")
        results["workloads"][w] = rows[w]
    results["seconds"] = round(time.monotonic() - started)
    name = "kv_tier_bench" + ("_sim" if sim else "" if fleet.model_size == "tiny" else f"_{fleet.model_size}")
    emit(results, args.out, name, None)


if __name__ == "__main__":
    main()
