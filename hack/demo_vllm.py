"""The fuyao demo on real vLLM engines (``hack/demo.sh --engine vllm``): the inference layer as host processes.

vLLM's CPU build is too big for the runtime image (about 6 GB), so this demo runs without the cluster:

1. the vLLM CPU venv (``hack/build-vllm.sh``, cached in ``~/.cache/fuyao``) and a tiny generated Llama model (random
   weights, its own byte-level BPE tokenizer and chat template);
2. two real vLLM engines (``python -m vllm.entrypoints.openai.api_server``) with prefix caching and KV events;
3. ``fuyao-router`` in front of them with nothing but the engines and their event streams: the tokenizer is the
   engines' own ``/tokenize``, blocks are matched by content (whatever hash the engines use);
4. a shared-prefix workload through round-robin (the baseline), then prefix-aware, on the same engines, with the
   run's own prefixes: TTFT p50/p88 from the streamed answers, the hit rate from vLLM's own counters;
5. where to look next. Everything stops at the end (Ctrl-C too).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.router_bench import comparison_lines, shared_prefix, steady_state_run  # noqa: E402
from tests.support.engines import Daemon, metric_total, router  # noqa: E402
from tests.support.vllm import BLOCK_SIZE, MODEL, generated_model, vllm_engine, vllm_python  # noqa: E402

STEPS = 5


def say(line: str) -> None:
    print(f"      {line}", flush=True)


def step(number: int, title: str) -> float:
    print(f"\n[{number}/{STEPS}] {title}", flush=True)
    return time.monotonic()


def counters(engines: list[Daemon]) -> tuple[float, float]:
    return (sum(e.metric("vllm:prefix_cache_hits_total") for e in engines),
            sum(e.metric("vllm:prefix_cache_queries_total") for e in engines))


def workload_run(url: str, run: str, args: argparse.Namespace, engines: list[Daemon]) -> dict[str, Any]:
    """Same arrivals and prompt shapes for both runs (one seed), measured in steady state (``steady_state_run``)."""
    jobs = shared_prefix(args.rate, args.duration, args.seed, groups=args.groups, prefix_words=args.prefix_words,
                         output=16)
    for job in jobs:
        job.body["model"] = MODEL
    return steady_state_run(url, jobs, run, lambda: counters(engines))


def main() -> None:
    parser = argparse.ArgumentParser(prog="hack/demo.sh --engine vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm"], default="vllm")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second of the workload (two CPU "
                        "engines sharing a 2-core machine serve about 1.5)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    parser.add_argument("--groups", type=int, default=8, help="distinct shared prefixes")
    parser.add_argument("--prefix-words", type=int, default=300, help="words per shared prefix")
    parser.add_argument("--blocks", type=int, default=96, help=f"KV blocks per engine ({BLOCK_SIZE} tokens each)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0 or args.groups < 1 or args.prefix_words < 1 or args.blocks < 64:
        parser.error("--rate and --duration must be positive, --groups and --prefix-words at least 1, --blocks at "
                     "least 64 (vLLM needs room for one 2048-token request)")
    started = time.monotonic()
    since = step(1, "the vLLM CPU venv (built once: a few minutes, ~6 GB in ~/.cache/fuyao) and a tiny model")
    python = vllm_python()
    say(f"python: {python}")
    say(f"model:  {generated_model()} (random weights; its own tokenizer.json and chat template)")
    say(f"done in {time.monotonic() - since:.1f} s")

    engines: list[Daemon] = []
    routers: list[Daemon] = []
    try:
        since = step(2, "two real vLLM engines: prefix caching, KV events over ZMQ (about 40 s each to start)")
        for _ in range(2):
            engines.append(vllm_engine("--num-gpu-blocks-override", str(args.blocks)).start(timeout=300))
            say(f"vLLM at {engines[-1].url}, KV events {engines[-1].events}")  # type: ignore[attr-defined]
        say(f"done in {time.monotonic() - since:.1f} s")

        since = step(3, "fuyao-router in front: only the engines and their event streams (tokenizer: the engines' "
                        "/tokenize; blocks matched by content)")
        common = [a for e in engines for a in ("--backend", e.url)]
        events = [f"--kv-events={e.events}={e.url}" for e in engines]  # type: ignore[attr-defined]
        baseline = router(*common, "--strategy", "round-robin").start()
        routers.append(baseline)
        fuyao = router(*common, *events, "--strategy", "prefix-aware", "--config", str(_config())).start()
        routers.append(fuyao)
        say(f"round-robin router {baseline.url}, prefix-aware router {fuyao.url}")
        say(f"done in {time.monotonic() - since:.1f} s")

        since = step(4, f"shared-prefix workload ({args.rate:g} req/s for {args.duration:g} s, {args.groups} prefixes "
                        f"of {args.prefix_words} words): round-robin vs prefix-aware, same engines")
        say("round-robin ...")
        rr = workload_run(baseline.url, "round-robin", args, engines)
        say("prefix-aware ...")
        pa = workload_run(fuyao.url, "prefix-aware", args, engines)
        say("")
        for line in comparison_lines([("round-robin (baseline)", rr), ("fuyao prefix-aware", pa)],
                                     "vLLM prefix hits"):
            say(line)
        page = fuyao.get("/metrics")[1]
        counts = {source: metric_total(page, "inference_prompt_tokenizations_total", source=source)
                  for source in ("engine", "cache", "failed")}
        say("prompts through prefix-aware: {engine:.0f} tokenized by an engine's /tokenize, {cache:.0f} from the "
            "router's cache, {failed:.0f} routed on load alone".format(**counts))
        say(f"done in {time.monotonic() - since:.1f} s")

        step(5, "where to look next")
        print(f"""
      total {time.monotonic() - started:.0f} s
      docs/router.md ("Behind a real vLLM fleet"), docs/kv-cache.md, docs/benchmarks.md (the workload table)
      tests/vllm/ (the real-engine tests: hashing, events, routing back to the holding engine)
      bench/router_bench.py --only vllm-pressure   (the KV-pressure case on two real engines)
      engine logs: {', '.join(str(e.log_path) for e in engines)}
      everything started here is stopped now""".rstrip())
    finally:
        for daemon in routers + engines:
            daemon.close()


def _config() -> Path:
    path = Path("/tmp/fuyao-demo-vllm-router.yaml")
    path.write_text(f"version: v1\nkvCache:\n  blockSize: {BLOCK_SIZE}\n")
    return path


if __name__ == "__main__":
    main()
