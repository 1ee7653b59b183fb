#!/usr/bin/env python3
"""Router benchmark: fuyao-router's strategies against vllm-router (PyPI, Rust) on the same fleet of engine
simulators and the same arrivals. Prints a table, then one JSON object (figures of docs/benchmarks.md).

Workloads (Poisson arrivals, seeded; streamed completions, fixed output lengths):

- ``shared-prefix``: groups of users sharing a long context (llm-d's benchmark shape): G groups x a ~2k-token
  prefix + a short unique question. Engines hold only a few groups' prefixes (``--num-gpu-blocks``), so where a
  request lands decides whether its prefill is 2k tokens or ~50.
- ``multi-turn``: chat conversations; each turn resends the whole history plus a new message.
- ``random``: unique prompts (control: no prefix to exploit).

For each: fuyao ``round-robin``, ``intelligent``, ``prefix-aware``, and vllm-router ``round_robin``,
``cache_aware`` and ``kv_aware`` (fed by the simulators' KV events): TTFT p50/p88/p99, ITL p50, throughput,
fleet KV-cache hit rate, errors. Then prefill/decode disaggregation (same number of engines, colocated vs 3:5) and
the router's overhead on a zero-latency backend (added p50 latency and CPU per request, fuyao vs vllm-router).
Goodput: requests per second meeting the SLO (TTFT <= 2 s and mean ITL <= 50 ms) — "throughput within the SLO";
smooth goodput also asks that no gap between two tokens exceeds 250 ms (no visible stall in a stream): the figure
for the disaggregation comparison, since a prefill sharing a step with decodes stalls them all.
Every engine fleet is started fresh for each run (cold caches).

vllm-router comes from PyPI into ``~/.cache/fuyao/bench-venv`` (installed on first use).

Usage: bench/router_bench.py [--duration 40] [--rate 8] [--engines 4] [--only shared-prefix,...] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots
from bench.report import add_out_argument, emit, quantiles
from tests.support.apiserver import free_port
from tests.support.engines import Daemon

BENCH_VENV = Path.home() / ".cache" / "fuyao" / "bench-venv"
WORDS = ["river", "flood", "basin", "rainfall", "gauge", "levee", "delta", "channel", "sediment", "estuary",
         "aquifer", "runoff", "catchment", "tide", "reservoir", "drought", "monsoon", "wetland", "erosion", "current"]


# Workloads ---------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    at: float  # seconds after the start
    path: str
    body: dict  # type: ignore[type-arg]


def _text(rng: random.Random, words: int) -> str:
    """About one token per word (the shared tokenizer: a word with its leading space)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


def shared_prefix(rate: float, duration: float, seed: int, groups: int = 16, prefix_words: int = 1800,
                  output: int = 32) -> list[Job]:
    rng = random.Random(seed)
    prefixes = [f"Group {g} shared context: " + _text(rng, prefix_words) for g in range(groups)]
    jobs, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return jobs
        prompt = rng.choice(prefixes) + " Question: " + _text(rng, 20) + "?"
        jobs.append(Job(t, "/v1/completions", {"prompt": prompt, "max_tokens": output, "stream": True}))


def shared_prefix_pressure(rate: float, duration: float, seed: int) -> list[Job]:
    """More distinct long contexts than the fleet's KV cache holds at once (48 x ~1.9k tokens against 4 x 640
    blocks of 16 = ~21 such contexts), at a load near the fleet's capacity: where a context is recomputed, and
    whether it is copied to several engines, decides the hit rate."""
    return shared_prefix(rate, duration, seed, groups=48)


def zipf_contexts(rate: float, duration: float, seed: int, contexts: int = 96, prefix_words: int = 900,
                  skew: float = 1.1, output: int = 32) -> list[Job]:
    """Hot and cold contexts: context k is asked with probability ∝ 1/k^skew (a few hot ones carry most requests,
    a long tail of cold ones evicts them), ~0.9k-token contexts plus a short question."""
    rng = random.Random(seed)
    prefixes = [f"Document {k}: " + _text(rng, prefix_words) for k in range(contexts)]
    weights = [1 / (k + 1) ** skew for k in range(contexts)]
    jobs, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return jobs
        prompt = rng.choices(prefixes, weights)[0] + " Question: " + _text(rng, 20) + "?"
        jobs.append(Job(t, "/v1/completions", {"prompt": prompt, "max_tokens": output, "stream": True}))


def multi_turn(rate: float, duration: float, seed: int, conversations: int = 24, output: int = 32) -> list[Job]:
    rng = random.Random(seed)
    histories = [[{"role": "system", "content": "You are a hydrologist. " + _text(rng, 300)}]
                 for _ in range(conversations)]
    jobs, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return jobs
        history = rng.choice(histories)
        history.append({"role": "user", "content": _text(rng, 40)})
        jobs.append(Job(t, "/v1/chat/completions", {"messages": list(history), "max_tokens": output, "stream": True}))
        history.append({"role": "assistant", "content": _text(rng, output // 2)})
        if len(history) > 13:
            del history[1:3]


def random_prompts(rate: float, duration: float, seed: int, words: int = 400, output: int = 32) -> list[Job]:
    rng = random.Random(seed)
    jobs, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return jobs
        jobs.append(Job(t, "/v1/completions", {"prompt": _text(rng, words), "max_tokens": output, "stream": True}))


DEFAULT_RATES: dict[str, float] = {}
"""Offered load per workload where it differs from ``--rate`` (set near the fleet's capacity for the pressure
cases)."""
WORKLOADS = {"shared-prefix": shared_prefix, "shared-prefix-pressure": shared_prefix_pressure, "zipf": zipf_contexts,
             "multi-turn": multi_turn, "random": random_prompts}


# Processes ---------------------------------------------------------------------------------------------------------
@dataclass
class Fleet:
    engines: list[Daemon]
    events: dict[str, str] = field(default_factory=dict)  # engine URL → its KV event endpoint
    block_size: int = 16
    model: str = "fuyao-sim-7b"

    def close(self) -> None:
        for e in self.engines:
            e.close()


def start_fleet(count: int, blocks: int, roles: list[str] | None = None, profile: str | None = None,
                kind: str = "sim") -> Fleet:
    if kind == "vllm":
        return start_vllm_fleet(count, blocks)
    engines, events = [], {}
    for i in range(count):
        port, events_port = free_port(), free_port()
        # vLLM's own block hashes (sha256, its default seed), as a real vLLM reports them: vllm-router's kv_aware
        # recomputes exactly these, and fuyao's index keys blocks by content whatever the hash
        args = ["--port", str(port), "--num-gpu-blocks", str(blocks), "--max-num-batched-tokens", "4096",
                "--kv-events-endpoint", f"tcp://*:{events_port}", "--log-level", "warning",
                "--prefix-caching-hash-algo", "sha256"]
        if roles:
            args += ["--role", roles[i]]
        if profile:
            args += ["--latency-profile", profile]
        daemon = Daemon("fuyao.engine_sim.cli", args, port, "/health")
        engines.append(daemon)
        events[daemon.url] = f"tcp://127.0.0.1:{events_port}"
    for daemon in engines:
        daemon.start()
    return Fleet(engines, events)


def start_vllm_fleet(count: int, blocks: int) -> Fleet:
    """Real vLLM CPU engines (tests.support.vllm: the tiny generated model, random weights, prefix caching, KV
    events), each with ``blocks`` KV blocks of 32 tokens (``--num-gpu-blocks-override``), started one after the
    other (each start loads torch: ~40 s)."""
    from tests.support.vllm import BLOCK_SIZE, MODEL, vllm_engine

    engines: list[Daemon] = []
    try:
        for _ in range(count):
            engines.append(vllm_engine("--num-gpu-blocks-override", str(blocks), "--max-num-seqs", "32")
                           .start(timeout=300))
    except BaseException:
        for e in engines:
            e.close()
        raise
    # vLLM binds its PUB socket only on a wildcard or ipc address, and vllm-router's kv_aware takes only
    # tcp://HOST:PORT: forward each engine's ipc stream to a loopback TCP PUB (a ZMQ XSUB/XPUB proxy)
    return Fleet(engines, {e.url: _loopback_events(e.events) for e in engines}, BLOCK_SIZE, MODEL)  # type: ignore[attr-defined]


def _loopback_events(ipc: str) -> str:
    import threading

    import zmq

    context = zmq.Context.instance()
    port = free_port()
    inbound, outbound = context.socket(zmq.XSUB), context.socket(zmq.XPUB)
    inbound.connect(ipc)
    outbound.bind(f"tcp://127.0.0.1:{port}")
    threading.Thread(target=zmq.proxy, args=(inbound, outbound), daemon=True).start()
    return f"tcp://127.0.0.1:{port}"


def ensure_vllm_router() -> Path | None:
    binary = BENCH_VENV / "bin" / "vllm-router"
    if binary.exists():
        return binary
    try:
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "vllm-router==0.1.17"], check=True,
                       timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"vllm-router unavailable ({exc}); its rows are skipped", file=sys.stderr)
        return None
    return binary if binary.exists() else None


def start_router(kind: str, strategy: str, fleet: Fleet, pd: tuple[list[str], list[str]] | None = None) -> Daemon:
    port = free_port()
    if kind == "fuyao":
        strategy, _, tokenizer = strategy.partition(" +tokenizer=")  # "prefix-aware +tokenizer=DIR": local tokens
        args = ["--listen", f"127.0.0.1:{port}", "--strategy", strategy, "--log-level", "warning"]
        if tokenizer:
            args += ["--tokenizer", tokenizer]
        if fleet.block_size != 16:
            config = Path(f"/tmp/fuyao-bench-router-{port}.yaml")
            config.write_text(f"version: v1\nkvCache:\n  blockSize: {fleet.block_size}\n")
            args += ["--config", str(config)]
        if pd:
            args += [a for url in pd[0] for a in ("--prefill", url)] + [a for url in pd[1] for a in ("--decode", url)]
        else:
            args += [a for e in fleet.engines for a in ("--backend", e.url)]
        args += [f"--kv-events={stream}={url}" for url, stream in fleet.events.items()]
        return Daemon("fuyao.inference_router.cli", args, port, "/health").start()
    binary = ensure_vllm_router()
    assert binary is not None
    args = [str(binary), "--host", "127.0.0.1", "--port", str(port), "--policy", strategy, "--log-level", "warning",
            "--prometheus-port", str(free_port())]
    if pd:
        args += ["--vllm-pd-disaggregation"] + [a for url in pd[0] for a in ("--prefill", url)] + \
            [a for url in pd[1] for a in ("--decode", url)]
    else:
        args += ["--worker-urls", *[e.url for e in fleet.engines]]
    if strategy == "kv_aware":
        args += ["--kv-event-block-size", str(fleet.block_size), "--kv-event-model", fleet.model]
        args += [a for url, stream in fleet.events.items() for a in ("--kv-event-source", f"{url}={stream}")]
    daemon = _External(args, port)
    return daemon.start(timeout=60)


class _External(Daemon):
    """A non-Python router process (vllm-router) with the Daemon interface."""

    def __init__(self, argv: list[str], port: int):
        super().__init__("", [], port, "/health")
        self.argv = argv

    def start(self, timeout: float = 20.0) -> Daemon:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited: {self.proc.stderr.read().decode()[-1500:]}")  # type: ignore[union-attr]
            try:
                if self.get("/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("router did not become healthy")


# Load --------------------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    tokens: int = 0
    error: str | None = None


async def _one(session: aiohttp.ClientSession, url: str, job: Job) -> Sample:
    sample = Sample()
    started = time.perf_counter()
    try:
        async with session.post(url + job.path, json=job.body) as response:
            if response.status != 200:
                sample.error = f"HTTP {response.status}"
                await response.read()
                return sample
            last = None
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    data = json.loads(event[6:])
                    choices = data.get("choices") or []
                    if not choices:
                        continue
                    text = choices[0].get("text") or (choices[0].get("delta") or {}).get("content")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if sample.ttft is None:
                        sample.ttft = now - started
                    elif last is not None:
                        sample.itl.append(now - last)
                    last = now
                    sample.tokens += 1
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        sample.error = type(exc).__name__
    sample.e2e = time.perf_counter() - started
    return sample


async def run_load(url: str, jobs: list[Job]) -> tuple[list[Sample], float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()

        async def scheduled(job: Job) -> Sample:
            delay = job.at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            return await _one(session, url, job)

        samples = await asyncio.gather(*(scheduled(j) for j in jobs))
        return list(samples), time.perf_counter() - start


def steady_state_run(url: str, jobs: list[Job], run: str,
                     counters: Callable[[], tuple[float, float]]) -> dict[str, Any]:
    """The demos' measured run: ``run``'s name goes in front of every prompt (its prefixes are its own, so no run is
    served from another's cache), one unmeasured warm-up request per prefix (measured in steady state, not on the
    first sight of each prefix, which no router can avoid), then the jobs. TTFT from the streamed answers; the hit
    rate from ``counters()`` (the engines' prefix-cache hits and queries) before and after."""
    for job in jobs:
        job.body["prompt"] = f"[{run}] " + job.body["prompt"]
    firsts = {job.body["prompt"].split(" Question: ", 1)[0]: job for job in reversed(jobs)}
    asyncio.run(run_load(url, [dataclasses.replace(job, at=0.0) for job in firsts.values()]))
    before = counters()
    samples, wall = asyncio.run(run_load(url, jobs))
    after = counters()
    ok = [s for s in samples if s.error is None and s.ttft is not None]
    ttft = [s.ttft for s in ok if s.ttft is not None]
    queries = after[1] - before[1]
    return {"requests": len(samples), "errors": len(samples) - len(ok), "p50": pct(ttft, 50), "p88": pct(ttft, 88),
            "hit_rate": (after[0] - before[0]) / queries if queries else None, "wall": wall}


def comparison_lines(rows: list[tuple[str, dict[str, Any]]], hits: str = "prefix hits") -> list[str]:
    """The demos' table of :func:`steady_state_run` results, one line per router."""
    width = max(len(name) for name, _ in rows) + 2

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    lines = [f"{'router':<{width}} {'requests':>8} {'errors':>6} {'TTFT p50':>10} {'TTFT p88':>10} {hits:>{len(hits)}}"]
    for name, result in rows:
        hit = "-" if result["hit_rate"] is None else f"{result['hit_rate'] * 100:.0f} %"
        lines.append(f"{name:<{width}} {result['requests']:>8} {result['errors']:>6} {ms(result['p50']):>10} "
                     f"{ms(result['p88']):>10} {hit:>{len(hits)}}")
    return lines


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


SLO = {"ttft_s": 2.0, "itl_s": 0.05, "max_stall_s": 0.25}


def summarize(samples: list[Sample], wall: float, fleet: Fleet, before: dict[str, tuple[float, float]]) -> dict:  # type: ignore[type-arg]
    ok = [s for s in samples if s.error is None and s.ttft is not None]
    good = [s for s in ok if s.ttft <= SLO["ttft_s"] and (not s.itl or statistics.mean(s.itl) <= SLO["itl_s"])]  # type: ignore[operator]
    smooth = [s for s in good if not s.itl or max(s.itl) <= SLO["max_stall_s"]]
    ttft = [s.ttft for s in ok]  # type: ignore[misc]
    itl = [x for s in ok for x in s.itl]
    hits = queries = 0.0
    for e in fleet.engines:
        h0, q0 = before[e.url]
        hits += e.metric("vllm:prefix_cache_hits_total") - h0
        queries += e.metric("vllm:prefix_cache_queries_total") - q0

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {"requests": len(samples), "errors": len(samples) - len(ok),
            "ttft_ms": {"p50": ms(pct(ttft, 50)), "p88": ms(pct(ttft, 88)), "p99": ms(pct(ttft, 99)),
                        "cdf": quantiles(ttft, 1e3, 1)},
            "itl_ms_p50": ms(pct(itl, 50)), "e2e_ms_p50": ms(pct([s.e2e for s in ok], 50)),
            "throughput_tokens_per_s": round(sum(s.tokens for s in ok) / wall, 1),
            "requests_per_s": round(len(ok) / wall, 2),
            "goodput_requests_per_s": round(len(good) / wall, 2),
            "smooth_goodput_requests_per_s": round(len(smooth) / wall, 2),
            "kv_hit_rate": round(hits / queries, 3) if queries else None}


def measure(kind: str, strategy: str, jobs: list[Job], engines: int, blocks: int,
            pd: tuple[int, int] | None = None, fleet_kind: str = "sim") -> dict:  # type: ignore[type-arg]
    roles = None
    if pd:
        roles = ["prefill"] * pd[0] + ["decode"] * pd[1]
    fleet = start_fleet(engines if not pd else sum(pd), blocks, roles, kind=fleet_kind)
    try:
        pools = None
        if pd:
            pools = ([e.url for e in fleet.engines[:pd[0]]], [e.url for e in fleet.engines[pd[0]:]])
        url = fleet.engines[0].url
        router = None
        if kind != "direct":
            router = start_router(kind, strategy, fleet, pools)
            url = router.url
        try:
            before = {e.url: (e.metric("vllm:prefix_cache_hits_total"), e.metric("vllm:prefix_cache_queries_total"))
                      for e in fleet.engines}
            samples, wall = asyncio.run(run_load(url, jobs))
            return summarize(samples, wall, fleet, before)
        finally:
            if router is not None:
                router.close()
    finally:
        fleet.close()


# Overhead ----------------------------------------------------------------------------------------------------------
def overhead(requests: int, rounds: int = 5) -> dict:  # type: ignore[type-arg]
    """Router vs direct on a zero-latency engine: added p50 latency, router CPU per request. Every router runs at
    once (idle when not measured) and is measured in ``rounds`` interleaved rounds of ``requests`` sequential
    requests, so a slow minute of the machine falls on all of them; each figure is the median over the rounds."""
    profile = Path("/tmp/fuyao-zero-latency.yaml")
    profile.write_text("step_base_ms: 0\nprefill_per_token_ms: 0\ndecode_per_seq_ms: 0\nkv_transfer_per_token_ms: 0\n")
    fleet = start_fleet(1, 4096, profile=str(profile))
    results: dict[str, object] = {}
    routers: dict[str, Daemon] = {}
    try:
        body = {"prompt": "Measure the router, not the engine.", "max_tokens": 4}

        async def sequential(url: str, count: int) -> list[float]:
            async with aiohttp.ClientSession() as session:
                times = []
                for _ in range(count):
                    started = time.perf_counter()
                    async with session.post(url + "/v1/completions", json=body) as response:
                        await response.read()
                    times.append(time.perf_counter() - started)
                return times

        for kind, strategy in (("fuyao", "prefix-aware"), ("fuyao", "round-robin"), ("vllm-router", "cache_aware"),
                               ("vllm-router", "round_robin")):
            if kind == "vllm-router" and ensure_vllm_router() is None:
                continue
            routers[f"{kind} {strategy}"] = router = start_router(kind, strategy, fleet)
            asyncio.run(sequential(router.url, 100))  # warm up
        direct: list[float] = []
        p50: dict[str, list[float]] = {name: [] for name in routers}
        cpu: dict[str, list[float]] = {name: [] for name in routers}
        for _ in range(rounds):
            direct.append(statistics.median(asyncio.run(sequential(fleet.engines[0].url, requests))))
            for name, router in routers.items():
                proc = psutil.Process(router.proc.pid)  # type: ignore[union-attr]
                cpu0 = sum(proc.cpu_times()[:2])
                p50[name].append(statistics.median(asyncio.run(sequential(router.url, requests))))
                cpu[name].append((sum(proc.cpu_times()[:2]) - cpu0) / requests)
        direct_p50 = statistics.median(direct)
        results["direct_p50_ms"] = round(direct_p50 * 1000, 3)
        for name in routers:
            results[name] = {
                "p50_ms": round(statistics.median(p50[name]) * 1000, 3),
                "added_p50_ms": round((statistics.median(p50[name]) - direct_p50) * 1000, 3),
                "router_cpu_ms_per_request": round(statistics.median(cpu[name]) * 1000, 3)}
    finally:
        for router in routers.values():
            router.close()
        fleet.close()
    return results


# Main --------------------------------------------------------------------------------------------------------------
ROUTERS = [("fuyao", "round-robin"), ("fuyao", "intelligent"), ("fuyao", "prefix-aware"),
           ("vllm-router", "round_robin"), ("vllm-router", "cache_aware"), ("vllm-router", "kv_aware")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run")
    parser.add_argument("--rate", type=float, default=8.0, help="requests per second offered to the fleet")
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=640, help="KV blocks per engine (16 tokens each)")
    parser.add_argument("--only", default="shared-prefix,multi-turn,random,pd,overhead")
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the benchmark)")
    parser.add_argument("--vllm-rate", type=float, default=1.2, help="requests per second for vllm-pressure (two "
                        "CPU engines sharing this machine's cores serve about 1.5 at most)")
    parser.add_argument("--vllm-words", type=int, default=150, help="words per shared context for vllm-pressure")
    parser.add_argument("--rates", default="", help="per-workload rates, e.g. 'zipf=10,shared-prefix-pressure=9' "
                        "(others: --rate)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--routers", default="", help="only these, e.g. 'fuyao prefix-aware,vllm-router cache_aware'")
    parser.add_argument("--pd-rates", type=lambda v: [float(x) for x in v.split(",")], default=[3.0, 5.0, 7.0],
                        help="offered loads for the disaggregation comparison")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.duration = 8.0
    wanted = args.only.split(",")
    rates = {**DEFAULT_RATES, **{k: float(v) for k, _, v in (item.partition("=") for item in args.rates.split(",")
                                                             if item)}}
    have_vllm_router = ensure_vllm_router() is not None
    results: dict[str, object] = {"benchmark": "router", "engines": args.engines, "rate": args.rate,
                                  "duration_s": args.duration, "blocks_per_engine": args.blocks, "workloads": {}}
    for name, make in WORKLOADS.items():
        if name not in wanted:
            continue
        jobs = make(rates.get(name, args.rate), args.duration, args.seed)
        rows = {}
        for kind, strategy in ROUTERS:
            if kind == "vllm-router" and not have_vllm_router:
                continue
            if args.routers and f"{kind} {strategy}" not in args.routers.split(","):
                continue
            try:
                rows[f"{kind} {strategy}"] = measure(kind, strategy, jobs, args.engines, args.blocks)
            except RuntimeError as exc:
                rows[f"{kind} {strategy}"] = {"failed": str(exc)[:300]}
            print(f"{name:14s} {kind:12s} {strategy:18s} {json.dumps(rows[f'{kind} {strategy}'])}", flush=True)
        results["workloads"][name] = rows  # type: ignore[index]
    if "vllm-pressure" in wanted:
        # The pressure case on real vLLM CPU engines: 2 engines of 96 blocks x 32 tokens (~7 of these ~0.4k-token
        # contexts each), 24 contexts, a load near what the two engines serve on this machine.
        jobs = shared_prefix(args.vllm_rate, args.duration, args.seed, groups=24, prefix_words=args.vllm_words,
                             output=16)
        rows = {}
        from tests.support.vllm import generated_model

        for kind, strategy in (("fuyao", "round-robin"), ("fuyao", "prefix-aware"),
                               ("fuyao", f"prefix-aware +tokenizer={generated_model()}"),
                               ("vllm-router", "cache_aware"), ("vllm-router", "kv_aware")):
            if kind == "vllm-router" and not have_vllm_router:
                continue
            if args.routers and f"{kind} {strategy}" not in args.routers.split(","):
                continue
            try:
                rows[f"{kind} {strategy}"] = measure(kind, strategy, jobs, 2, 96, fleet_kind="vllm")
            except RuntimeError as exc:
                rows[f"{kind} {strategy}"] = {"failed": str(exc)[:300]}
            print(f"vllm-pressure  {kind:12s} {strategy:18s} {json.dumps(rows[f'{kind} {strategy}'])}", flush=True)
        results["vllm_pressure"] = {"engines": 2, "blocks_per_engine": 96, "block_size": 32, "rate": args.vllm_rate,
                                    "rows": rows}
    if "pd" in wanted:
        # Same 8 engines, long unique prompts and long answers (prefill-heavy: what disaggregation is for), offered
        # at several rates; the figure is the best goodput (requests/s within the SLO) each layout reaches.
        pd_rows: dict[str, dict[str, object]] = {"colocated 8x both (fuyao least-connections)": {},
                                                 "disaggregated 3 prefill : 5 decode (fuyao)": {}}
        for rate in args.pd_rates:
            jobs = random_prompts(rate, args.duration, args.seed + 1, words=2000, output=128)
            for key, pd in zip(pd_rows, (None, (3, 5)), strict=True):
                row = measure("fuyao", "least-connections" if pd is None else "prefix-aware", jobs, 8, 4096, pd=pd)
                pd_rows[key][f"{rate:g} req/s"] = row
                print(f"pd             {key:45s} {rate:g} req/s {json.dumps(row)}", flush=True)
        best = {key: max(r["smooth_goodput_requests_per_s"] for r in rows.values())  # type: ignore[index]
                for key, rows in pd_rows.items()}
        colocated, disaggregated = best.values()
        results["pd"] = {"runs": pd_rows, "best_goodput": best, "slo": SLO,
                         "ratio": round(disaggregated / colocated, 2) if colocated else None, "goal_ratio": 1.55}
    if "overhead" in wanted:
        results["overhead"] = overhead(1000 if not args.quick else 50)
        print(f"overhead       {json.dumps(results['overhead'])}", flush=True)
    emit(results, args.out, "router", charts)


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    """Per workload, TTFT CDFs of every router; TTFT p88 over round-robin's; P/D goodput by offered load; the
    router's own overhead."""
    paths = []
    tables = {name: rows for name, rows in (result.get("workloads") or {}).items()}
    if result.get("vllm_pressure"):
        tables["vllm-pressure"] = result["vllm_pressure"]["rows"]
    ratios: dict[str, dict[str, float | None]] = {}
    for name, rows in tables.items():
        ok = {router: row for router, row in rows.items() if "ttft_ms" in row and row["ttft_ms"].get("p88")}
        paths.append(plots.quantile_cdf(out / f"router-{name}-ttft.png", f"{name}: time to first token",
                                        {router: row["ttft_ms"].get("cdf", []) for router, row in ok.items()}, "ms",
                                        log_x=True))
        base = ok.get("fuyao round-robin")
        if base:
            ratios[name] = {router: row["ttft_ms"]["p88"] / base["ttft_ms"]["p88"] for router, row in ok.items()
                            if router != "fuyao round-robin"}
    if ratios:
        paths.append(plots.grouped_bars(out / "router-ttft-p88-ratio.png", "TTFT p88 / fuyao round-robin's (lower "
                                        "is better)", ratios, "ratio", goal=1.0, goal_label="round-robin"))
    if result.get("pd"):
        runs = result["pd"]["runs"]
        paths.append(plots.lines(out / "router-pd-goodput.png", "goodput within the SLO by offered load", {
            layout: ([float(rate.split()[0]) for rate in rows], [r["smooth_goodput_requests_per_s"]
                                                                 for r in rows.values()])
            for layout, rows in runs.items()}, "offered requests / s", "requests / s within the SLO"))
    if result.get("overhead"):
        over = {k: v for k, v in result["overhead"].items() if isinstance(v, dict)}
        paths.append(plots.grouped_bars(out / "router-overhead.png", "router overhead on a zero-latency engine", {
            "added p50 (ms)": {k: v["added_p50_ms"] for k, v in over.items()},
            "CPU ms / request": {k: v["router_cpu_ms_per_request"] for k, v in over.items()}}, "ms"))
    return paths


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
