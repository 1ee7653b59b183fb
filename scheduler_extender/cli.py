"""Entry point of ``fuyao-scheduler-extender``: flags + config → the HTTP server, the watches, the binder.

Exit codes: 0 after SIGTERM/SIGINT, 2 for invalid flags or config (the field is named), 1 when the listen address
cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from fuyao import __version__, logs
from fuyao.kube_client import connect

from .binder import Binder, PodWarnings
from .cluster import ClusterCache, Watcher
from .config import ConfigError, ExtenderConfig, build_config, load_config_file
from .metrics import ExtenderMetrics
from .server import build_app, ssl_context
from .service import ExtenderService

log = logging.getLogger("scheduler_extender")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fuyao-scheduler-extender",
        description="NPU-aware scheduler extender for kube-scheduler (POST /filter, /prioritize, /bind, /preempt) "
                    "and Volcano (POST /volcano/predicate, /prioritize, /preemptable, /reclaimable, "
                    "/onSessionOpen, /onSessionClose). Also /healthz, /readyz, /metrics, /explain/<ns>/<pod>.",
        epilog="Docs: docs/scheduler-extender.md")
    p.add_argument("--version", action="version", version=f"fuyao-scheduler-extender (fuyao {__version__})")
    p.add_argument("--config", help="versioned YAML config (version: v1)")
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8888; the chart sets 0.0.0.0:8888)")
    p.add_argument("--kubeconfig", help="kubeconfig for watches and binding (default: in-cluster config in a pod; "
                                        "without either, requests must carry full Node objects)")
    p.add_argument("--tls-cert-file", help="serve HTTPS with this certificate (with --tls-key-file)")
    p.add_argument("--tls-key-file", help="private key of --tls-cert-file")
    p.add_argument("--no-bind", action="store_true", help="do not act as the binder (bindVerb)")
    logs.add_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> ExtenderConfig:
    file_values = load_config_file(args.config) if args.config else {}
    overrides: dict[str, object] = {"listen": args.listen, "kubeconfig": args.kubeconfig}
    if args.no_bind:
        overrides["bind"] = False
    if args.tls_cert_file or args.tls_key_file:
        if not (args.tls_cert_file and args.tls_key_file):
            raise ConfigError("tls", "--tls-cert-file and --tls-key-file go together")
        overrides["tls.cert_file"] = args.tls_cert_file
        overrides["tls.key_file"] = args.tls_key_file
    return build_config(file_values, overrides)


async def serve(config: ExtenderConfig) -> int:
    cache = ClusterCache(config.plugins.pd_affinity.topology_key)
    metrics = ExtenderMetrics()
    api = connect(config.kubeconfig)
    watcher = None
    binder = warnings = None
    if api is not None:
        watcher = Watcher(api, cache)
        watcher.start()
        warnings = PodWarnings(api)
        if config.bind:
            binder = Binder(api, cache)
    else:
        log.info("no cluster configured: serving requests that carry full Node objects only; /readyz says so")
    service = ExtenderService(config, cache, metrics, binder=binder, warn_pod=warnings, has_cluster=api is not None)
    app = build_app(service)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    host, _, port = config.listen.rpartition(":")
    context = ssl_context(config.tls.cert_file, config.tls.key_file) if config.tls else None
    site = web.TCPSite(runner, host.strip("[]") or "0.0.0.0", int(port), ssl_context=context, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.listen, exc)
        await runner.cleanup()
        return 1
    bound = site._server.sockets[0].getsockname() if site._server and site._server.sockets else (host, port)  # type: ignore[union-attr]
    log.info("listening on %s://%s:%s", "https" if context else "http", bound[0], bound[1],
             extra={"bind": binder is not None, "cluster": api is not None})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    if watcher is not None:
        watcher.stop()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"fuyao-scheduler-extender: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(serve(config)))


if __name__ == "__main__":
    main()
