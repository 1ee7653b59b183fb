"""Entry point of ``fuyao-router`` (a Deployment): the OpenAI-compatible inference router (``docs/router.md``).

Flags override the config file; the file is re-read when it changes (a bad file keeps the running config and logs
why). Exit codes: 0 after SIGTERM/SIGINT (in-flight requests drained first), 2 for invalid flags or config (the
field is named), 1 when the listen address cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

from fuyao import daemon, netaddr

from .config import ConfigError, RouterConfig, build_config, load_config_file, reloadable, with_overrides
from .fleet import Fleet, PrefixSource, Role
from .proxy import Router

log = logging.getLogger("inference_router")
STRATEGIES = ("round-robin", "least-connections", "intelligent", "prefix-aware")


def build_parser() -> argparse.ArgumentParser:
    p = daemon.parser(
        "fuyao-router",
        "OpenAI-compatible inference router: round-robin, least-connections, intelligent (health score) and "
        "prefix-aware (KV-cache index + load) routing, prefill/decode disaggregation, circuit breakers and retries. "
        "POST /v1/completions, /v1/chat/completions; GET /v1/models, /health, /metrics.", "docs/router.md")
    p.add_argument("--config", help="config.yaml (version: v1) with router / kv_cache / inference / pd_separation")
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:9000)")
    p.add_argument("--backend", action="append", default=[], metavar="URL", help="an engine (repeatable)")
    p.add_argument("--prefill", action="append", default=[], metavar="URL",
                   help="a prefill engine (repeatable; turns on prefill/decode disaggregation)")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode engine (repeatable)")
    p.add_argument("--strategy", choices=STRATEGIES)
    p.add_argument("--kvcache", metavar="URL", help="a fuyao-kvcache service for prefix lookups (default: the index "
                                                    "runs in the router, fed by --kv-events)")
    p.add_argument("--kv-events", action="append", default=[], metavar="ENDPOINT=URL",
                   help="the KV event stream ENDPOINT (tcp://host:5557) belongs to the backend at URL (repeatable)")
    p.add_argument("--tokenizer", metavar="engine|PATH|builtin", help="how prompts become the engines' token ids "
                   "(kv_cache.tokenizer): engine (default: ask an engine's /tokenize once per distinct prompt), the "
                   "served model's directory or tokenizer.json (tokenized in the router), or builtin (the engine "
                   "simulator's)")
    p.add_argument("--kubeconfig", help="for backend discovery (router.discovery.enabled)")
    return p


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    config = build_config(load_config_file(args.config) if args.config else {})
    events = dict(config.kv_cache.events)
    for item in args.kv_events:
        endpoint, sep, url = item.partition("=")
        if not sep or not endpoint or not url:
            raise ConfigError("kv-events", f"expected ENDPOINT=URL, got {item!r}")
        events[endpoint] = url
    router: dict[str, Any] = {"listen": args.listen, "strategy": args.strategy}
    if args.backend:
        router["backends"] = args.backend
    pd: dict[str, Any] = {}
    if args.prefill or args.decode:
        pd = {"enabled": True, "prefill": args.prefill, "decode": args.decode}
    config = with_overrides(config, router=router, kv_cache={"service": args.kvcache, "events": events,
                                                             "tokenizer": args.tokenizer}, pd_separation=pd)
    if args.kubeconfig:
        config = config.model_copy(update={"kubeconfig": args.kubeconfig})
    return config


def static_backends(config: RouterConfig) -> dict[str, Role]:
    out: dict[str, Role] = {url: "both" for url in config.router.backends}
    if config.pd_separation.enabled:
        out.update({url: "prefill" for url in config.pd_separation.prefill})
        out.update({url: "decode" for url in config.pd_separation.decode})
    return out


class ConfigWatcher:
    """Re-reads ``path`` when its mtime changes; a valid file replaces the config (flags still win), a bad one is
    logged and ignored."""

    def __init__(self, path: str, args: argparse.Namespace, apply: Any):
        self.path, self.args, self.apply = path, args, apply
        self._mtime = self._stat()

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            mtime = self._stat()
            if mtime is None or mtime == self._mtime:
                continue
            self._mtime = mtime
            try:
                config = config_from_args(self.args)
            except ConfigError as exc:
                log.error("config %s changed but is invalid, keeping the running config: %s", self.path, exc)
                continue
            self.apply(config)
            log.info("config %s reloaded", self.path, extra={"strategy": config.router.strategy})


async def serve(config: RouterConfig, args: argparse.Namespace) -> int:
    fleet = Fleet(config.router)
    fleet.configure(config.router, static_backends(config))
    prefix = PrefixSource(config.kv_cache)
    fleet.on_reset.append(prefix.forget)  # the router's record of what it sent there: gone with the engine
    prefix.start()
    router = Router(config, fleet, prefix)
    fleet.on_removed.append(lambda url: router.metrics.backend_requests.forget(0, url))  # its series go with it
    await router.open()

    def apply(new: RouterConfig) -> None:
        new, held = reloadable(router.config, new)
        if held:
            log.warning("config: %s changed but take effect only when the router restarts; running with the old "
                        "values", ", ".join(held), extra={"restart_needed": held})
        router.config = new
        if router.server is not None:
            router.server.write_timeout = new.inference.stream_idle_timeout
        fleet.configure(new.router, static_backends(new))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    discovery = None
    if config.router.discovery.enabled:
        from .discovery import Discovery

        try:
            discovery = Discovery(config.kubeconfig or args.kubeconfig, config.router.discovery.namespace,
                                  lambda found: loop.call_soon_threadsafe(fleet.set_discovered, found)).start()
        except RuntimeError as exc:
            log.error("%s", exc)
    assert router.session is not None  # opened above
    tasks = [loop.create_task(fleet.watch(router.session, stop))]
    if args.config:
        tasks.append(loop.create_task(ConfigWatcher(args.config, args, apply).run(stop)))

    def started(host: str, port: int) -> None:
        log.info("routing on %s", netaddr.url("http", host, port),
                 extra={"strategy": config.router.strategy, "backends": list(fleet.backends),
                        "pd": config.pd_separation.enabled})

    def draining() -> None:
        log.info("draining", extra={"in_flight": router.in_flight})
        router.draining = True
        stop.set()

    code = await daemon.serve_until_signal(router.app(), config.router.listen, log, backlog=2048,
                                           shutdown_timeout=min(30.0, config.inference.decode_timeout),
                                           started=started, stopping=draining)
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if discovery is not None:
        discovery.stop()
    await router.close()
    prefix.stop()
    return code


def main(argv: list[str] | None = None) -> None:
    args = daemon.parse(build_parser(), argv)
    config = daemon.config_or_exit("fuyao-router", lambda: config_from_args(args))
    if not (config.router.backends or config.pd_separation.enabled or config.router.discovery.enabled):
        print("fuyao-router: backends: none configured (--backend URL, --prefill/--decode URL, or "
              "router.discovery.enabled)", file=sys.stderr)
        sys.exit(2)
    sys.exit(daemon.run(serve(config, args)))


if __name__ == "__main__":
    main()
