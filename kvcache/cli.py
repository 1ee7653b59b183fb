"""Entry point of ``fuyao-kvcache``: the global KV-cache index (fed by engines' KV events) and the shared block
tier, over HTTP (``docs/kv-cache.md``).

Exit codes: 0 after SIGTERM/SIGINT (within 3 s), 2 for invalid flags or config (the field is named), 1 when the
listen address cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fuyao import daemon, netaddr
from fuyao.config_files import check_tokenizer_path

from .config import ConfigError, EndpointConfig, KvCacheConfig, build_config, load_config_file
from .discovery import follow_pods
from .service import KvCacheService
from .subscriber import Source

log = logging.getLogger("kvcache")


def build_parser() -> argparse.ArgumentParser:
    p = daemon.parser(
        "fuyao-kvcache",
        "Global KV-cache index fed by vLLM-compatible KV events (ZMQ), plus the shared KV block tier (LRU/LFU/FIFO, "
        "ttl, warming), over HTTP: POST /v1/lookup, /v1/blocks, /v1/blocks/lookup; GET /v1/endpoints, /metrics.",
        "docs/kv-cache.md")
    p.add_argument("--config", help="versioned YAML config (version: v1) with the kv_cache: section")
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8100)")
    p.add_argument("--kubeconfig", help="for engine discovery (kv_cache.events.discovery)")
    p.add_argument("--kv-events", action="append", default=[], metavar="NAME=URL[,REPLAY_URL]",
                   help="follow the KV events at URL (tcp://host:5557) of the engine NAME (its HTTP URL); "
                        "repeatable")
    p.add_argument("--tokenizer", metavar="PATH", help="the served model's tokenizer for lookups by prompt (a model "
                   "directory or tokenizer.json; kv_cache.tokenizer; default: fuyao's builtin)")
    return p


def config_from_args(args: argparse.Namespace) -> KvCacheConfig:
    file_values = load_config_file(args.config) if args.config else {}
    config = build_config(file_values, {"listen": args.listen, "kubeconfig": args.kubeconfig})
    extra = []
    for item in args.kv_events:
        name, sep, urls = item.partition("=")
        events, _, replay = urls.partition(",")
        if not sep or not name or not events:
            raise ConfigError("kv-events", f"expected NAME=URL[,REPLAY_URL], got {item!r}")
        try:
            extra.append(EndpointConfig(name=name, events=events, replay=replay or None))
        except ValueError as exc:
            raise ConfigError("kv-events", str(exc).splitlines()[-1]) from None
    if args.tokenizer:
        try:
            config = config.model_copy(update={"kv_cache": config.kv_cache.model_copy(update={
                "tokenizer": check_tokenizer_path(args.tokenizer)})})
        except ValueError as exc:
            raise ConfigError("tokenizer", str(exc)) from None
    if extra:
        events = config.kv_cache.events
        config = config.model_copy(update={"kv_cache": config.kv_cache.model_copy(update={
            "events": events.model_copy(update={"endpoints": [*events.endpoints, *extra]})})})
    return config


async def serve(config: KvCacheConfig) -> int:
    service = KvCacheService(config.kv_cache)
    service.warm()
    for endpoint in config.kv_cache.events.endpoints:
        service.subscriber.add(Source(endpoint.name, endpoint.events, endpoint.replay, endpoint.model))
    service.subscriber.start()
    watch = None
    if config.kv_cache.events.discovery.enabled:
        watch = follow_pods(config.kubeconfig, config.kv_cache.events.discovery, service.subscriber)

    def started(host: str, port: int) -> None:
        log.info("serving on %s", netaddr.url("http", host, port),
                 extra={"endpoints": len(config.kv_cache.events.endpoints), "tier": config.kv_cache.size,
                        "policy": config.kv_cache.eviction_policy.value})

    code = await daemon.serve_until_signal(service.app(), config.listen, log, started=started)
    if watch is not None:
        watch.stop()
    service.subscriber.stop()
    return code


def main(argv: list[str] | None = None) -> None:
    args = daemon.parse(build_parser(), argv)
    config = daemon.config_or_exit("fuyao-kvcache", lambda: config_from_args(args))
    sys.exit(daemon.run(serve(config)))


if __name__ == "__main__":
    main()
