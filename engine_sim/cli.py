"""Entry point of ``fuyao-engine-sim``: a vLLM-compatible engine simulator (``docs/engine-sim.md``).

Flags follow ``vllm serve`` where they exist. Exit codes: 0 after SIGTERM/SIGINT (within 3 s), 2 for invalid flags,
config or latency profile (the field is named), 1 when the port or the event endpoint cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid

from fuyao import daemon, tokenization
from fuyao.vllm_hashing import ALGORITHMS

from .api import EngineApi
from .engine import Engine, EngineSettings
from .metrics import EngineMetrics
from .profile import ProfileError, load_profile

log = logging.getLogger("engine_sim")


def build_parser() -> argparse.ArgumentParser:
    p = daemon.parser(
        "fuyao-engine-sim",
        "A vLLM-compatible LLM engine simulator: OpenAI API (completions, chat, streaming), vLLM metrics, paged KV "
        "cache with prefix caching, KV events over ZMQ, prefill/decode roles. No model runs: timing comes from a "
        "latency profile, text is deterministic.", "docs/engine-sim.md")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="fuyao-sim-7b", help="the served model name")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-gpu-blocks", type=int, default=4096, help="KV blocks (vLLM's --num-gpu-blocks-override)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0, help="output text and block-hash seed (like PYTHONHASHSEED)")
    p.add_argument("--role", choices=["prefill", "decode", "both"], default="both",
                   help="prefill/decode disaggregation role (vLLM's kv_role producer/consumer/both)")
    p.add_argument("--kv-events-endpoint", help="ZMQ PUB endpoint for KV events, e.g. tcp://*:5557 (binds)")
    p.add_argument("--kv-events-replay-endpoint", help="ZMQ ROUTER endpoint for replays, e.g. tcp://*:5558")
    p.add_argument("--kv-events-topic", default="",
                   help="the events' ZMQ topic (vLLM's --kv-events-config topic; default '', vLLM's)")
    p.add_argument("--kv-events-format", choices=["release", "main", "array"], default="release",
                   help="vLLM's payload envelope (see docs/engine-sim.md)")
    p.add_argument("--kv-remote", help="URL of the shared KV block tier (fuyao-kvcache)")
    p.add_argument("--kv-volume", help="directory of fuyao's shared KV tier (an RWX volume every engine mounts): "
                   "computed blocks are stored there and missing prefix blocks loaded from it, in the files of "
                   "fuyao's vLLM KV connector (docs/kv-cache.md)")
    p.add_argument("--kv-volume-bytes-per-token", type=int, default=64,
                   help="simulated KV bytes per token in the volume's files (their size, for eviction)")
    p.add_argument("--latency-profile", help="YAML latency profile (step_base_ms, prefill_per_token_ms, ...)")
    p.add_argument("--time-scale", type=float, default=1.0, help="run the clock this many times faster")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="chat completions without max_tokens, standing in for the EOS a model would sample (with "
                        "ignore_eos they run to what the context has left, as vLLM's)")
    p.add_argument("--tokenizer", help="the served model's tokenizer: a model directory or tokenizer.json (HF "
                   "tokenizers, with its chat template), as a real vLLM serving that model tokenizes; default: "
                   "fuyao's builtin tokenizer")
    p.add_argument("--prefix-caching-hash-algo", choices=["builtin", *ALGORITHMS], default="builtin",
                   help="block hashes: fuyao's chain (seeded by --seed; fast) or vLLM's own (sha256 is vLLM's default; "
                        "seeded by PYTHONHASHSEED as vLLM is)")
    p.add_argument("--enable-fault-injection", action="store_true", help="serve POST/DELETE /fault (tests only)")
    return p


def _validate(args: argparse.Namespace) -> str | None:
    if args.kv_volume and args.kv_remote:
        return "--kv-volume and --kv-remote: choose one shared tier"
    for name in ("kv_volume_bytes_per_token", "block_size", "num_gpu_blocks", "max_num_seqs",
                 "max_num_batched_tokens", "max_model_len",
                 "default_max_tokens"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')}: must be positive"
    if args.time_scale <= 0:
        return "--time-scale: must be positive"
    if not 0 <= args.port <= 65535:
        return "--port: must be 0..65535"
    return None


async def serve(args: argparse.Namespace) -> int:
    profile = load_profile(args.latency_profile)
    try:
        tokenizer = tokenization.load(args.tokenizer)
    except tokenization.TokenizerError as exc:
        log.error("--tokenizer: %s", exc)
        return 2
    settings = EngineSettings(model=args.model, block_size=args.block_size, num_gpu_blocks=args.num_gpu_blocks,
                              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                              max_model_len=args.max_model_len, seed=args.seed, time_scale=args.time_scale,
                              default_max_tokens=args.default_max_tokens, role=args.role,
                              engine_id=str(uuid.uuid4()), hash_algo=args.prefix_caching_hash_algo)
    publisher = None
    if args.kv_events_endpoint:
        from .events import KvEventPublisher

        try:
            publisher = KvEventPublisher(args.kv_events_endpoint, args.kv_events_replay_endpoint,
                                         args.kv_events_topic, args.kv_events_format)
        except Exception as exc:
            log.error("cannot open KV event endpoint %s: %s", args.kv_events_endpoint, exc)
            return 1
        log.info("KV events on %s", publisher.endpoint, extra={"replay": publisher.replay_endpoint})
    metrics = EngineMetrics(args.model, args.block_size, args.num_gpu_blocks, max_model_len=args.max_model_len)
    engine = Engine(settings, profile, metrics, publisher.publish if publisher else None,
                    output_ids=tokenizer.output_ids())
    if args.kv_remote:
        from .remote import RemoteTier

        engine.remote = RemoteTier(args.kv_remote, settings.block_size)
    if args.kv_volume:
        from .shared_volume import SharedVolume

        engine.volume = SharedVolume(args.kv_volume, args.model, settings.block_size, args.kv_volume_bytes_per_token)
        metrics.tier_stats = engine.volume.stats
    engine.start()
    api = EngineApi(engine, args.host, args.port, publisher, args.enable_fault_injection, tokenizer)

    def started(host: str, port: int) -> None:
        api.port = port
        log.info("serving %s on http://%s:%s", args.model, host, port,
                 extra={"role": args.role, "blocks": args.num_gpu_blocks, "block_size": args.block_size})

    code = await daemon.serve_until_signal(api.app(), f"{args.host}:{args.port}", log, started=started)
    await engine.stop()
    if engine.remote is not None:
        await engine.remote.close()
    if engine.volume is not None:
        await engine.volume.close()
    if publisher:
        publisher.shutdown()
    return code


def main(argv: list[str] | None = None) -> None:
    args = daemon.parse(build_parser(), argv)
    problem = _validate(args)
    if problem is None:
        try:
            load_profile(args.latency_profile)
        except ProfileError as exc:
            problem = str(exc)
    if problem:
        print(f"fuyao-engine-sim: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(serve(args)))


if __name__ == "__main__":
    main()
