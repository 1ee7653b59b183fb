"""Entry point of ``fuyao-scheduler-extender``: flags + config → the HTTP server, the watches, the binder.

Exit codes: 0 after SIGTERM/SIGINT, 2 for invalid flags or config (the field is named), 1 when the listen address
cannot be bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
import sys
from typing import TypedDict

from fuyao import daemon, netaddr
from fuyao.kube_client import connect, rest_endpoint
from fuyao.leader import LeaderElector, Timing

from .binder import Binder, PodWarnings
from .cluster import ClusterCache, Watcher
from .config import ConfigError, ExtenderConfig, build_config, load_config_file
from .leading import LeaderBinder
from .metrics import ExtenderMetrics
from .server import build_app, ssl_context
from .service import ExtenderService, pd_topology_key

GO_IDLE_CONN_TIMEOUT_S = 90.0  # net/http DefaultTransport.IdleConnTimeout
log = logging.getLogger("scheduler_extender")


def build_parser() -> argparse.ArgumentParser:
    p = daemon.parser(
        "fuyao-scheduler-extender",
        "NPU-aware scheduler extender for kube-scheduler (POST /filter, /prioritize, /bind, /preempt) "
        "and Volcano (POST /volcano/predicate, /prioritize, /preemptable, /reclaimable, "
        "/onSessionOpen, /onSessionClose). Also /healthz, /readyz, /metrics, /explain/<ns>/<pod>.",
        "docs/scheduler-extender.md")
    p.add_argument("--config", help="versioned YAML config (version: v1)")
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8888; the chart sets :8888, every address of "
                                    "every family)")
    p.add_argument("--kubeconfig", help="kubeconfig for watches and binding (default: in-cluster config in a pod; "
                                        "without either, requests must carry full Node objects)")
    p.add_argument("--tls-cert-file", help="serve HTTPS with this certificate (with --tls-key-file)")
    p.add_argument("--tls-key-file", help="private key of --tls-cert-file")
    p.add_argument("--no-bind", action="store_true", help="do not act as the binder (bindVerb)")
    p.add_argument("--leader-elect", action="store_true",
                   help="several replicas: elect the binder with a Lease; followers forward binds to it (config "
                        "leaderElection; identity and address from POD_NAME / POD_NAMESPACE / POD_IP)")
    p.add_argument("--reuse-port", action="store_true",
                   help="let several extender processes listen on the same port (SO_REUSEPORT): each decides the "
                        "requests on the connections the kernel gives it, with its own state, metrics and /explain "
                        "(needs --no-bind; docs/scheduler-extender.md: Volcano-sized clusters)"),
    return p


def config_from_args(args: argparse.Namespace) -> ExtenderConfig:
    file_values = load_config_file(args.config) if args.config else {}
    overrides: dict[str, object] = {"listen": args.listen, "kubeconfig": args.kubeconfig}
    if args.reuse_port:
        overrides["reuse_port"] = True
    if args.no_bind:
        overrides["bind"] = False
    if args.leader_elect:
        overrides["leader_election.enabled"] = True
    if args.tls_cert_file or args.tls_key_file:
        if not (args.tls_cert_file and args.tls_key_file):
            raise ConfigError("tls", "--tls-cert-file and --tls-key-file go together")
        overrides["tls.cert_file"] = args.tls_cert_file
        overrides["tls.key_file"] = args.tls_key_file
    return build_config(file_values, overrides)


async def serve(config: ExtenderConfig) -> int:
    cache = ClusterCache(pd_topology_key(config))
    metrics = ExtenderMetrics()
    api = connect(config.kubeconfig)
    watcher = elector = None
    binder: Binder | LeaderBinder | None = None
    warnings = None
    if api is not None:
        watcher = Watcher(rest_endpoint(api), cache, bound_pods_only=True)
        await watcher.start()
        warnings = PodWarnings(api)
        if config.bind:
            binder = Binder(rest_endpoint(api), cache, metrics)
            if config.leader_election.enabled:
                elector = LeaderElector(
                    rest_endpoint(api), **election_identity(config),
                    timing=Timing(config.leader_election.lease_duration, config.leader_election.renew_deadline,
                                  config.leader_election.retry_period),
                    on_change=lambda leading: metrics.leader.set(1 if leading else 0)).start()
                binder = LeaderBinder(binder, elector, metrics, forwarding_ssl(config))
            else:
                metrics.leader.set(1)
    else:
        log.info("no cluster configured: serving requests that carry full Node objects only; /readyz says so")
    service = ExtenderService(config, cache, metrics, binder=binder, warn_pod=warnings, has_cluster=api is not None)
    context = ssl_context(config.tls.cert_file, config.tls.key_file) if config.tls else None

    def started(host: str, port: int) -> None:
        log.info("listening on %s", netaddr.url("https" if context else "http", host, port),
                 extra={"bind": binder is not None, "cluster": api is not None})

    # Go's default transport keeps idle connections for 90 s and does not retry a POST the server closed under it:
    # outlive it, so vc-scheduler and kube-scheduler never write into a connection the extender is closing
    code = await daemon.serve_until_signal(build_app(service), config.listen, log, ssl_context=context, started=started,
                                           keepalive_timeout=GO_IDLE_CONN_TIMEOUT_S + 30, reuse_port=config.reuse_port)
    if elector is not None:
        await elector.stop(release=True)  # a successor takes over at once
    if watcher is not None:
        await watcher.stop()
    if binder is not None:
        await binder.close()
    return code


class ElectionIdentity(TypedDict):
    namespace: str
    name: str
    identity: str
    url: str


def election_identity(config: ExtenderConfig) -> ElectionIdentity:
    """Where the Lease lives, who this replica is, and where followers reach it: from the config, else the pod's
    downward-API environment (POD_NAMESPACE, POD_NAME, POD_IP), else the service account's namespace and the host."""
    le = config.leader_election
    namespace = le.namespace or os.environ.get("POD_NAMESPACE") or _service_account_namespace() or "default"
    identity = le.identity or os.environ.get("POD_NAME") or socket.gethostname()
    url = le.advertise_url
    if not url:
        host, _, port = config.listen.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = os.environ.get("POD_IP") or socket.gethostbyname(socket.gethostname())
        url = netaddr.url("https" if config.tls else "http", host, port)
    return ElectionIdentity(namespace=namespace, name=le.lease_name, identity=identity, url=url)


def _service_account_namespace() -> str | None:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def forwarding_ssl(config: ExtenderConfig) -> ssl.SSLContext | None:
    """TLS for binds forwarded to the leader: every replica serves the same certificate, so that certificate is the
    one trusted (pinned; the leader is reached by pod IP, which the certificate need not name)."""
    if not config.tls:
        return None
    context = ssl.create_default_context(cafile=config.tls.cert_file)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.check_hostname = False
    return context


def main(argv: list[str] | None = None) -> None:
    args = daemon.parse(build_parser(), argv)
    config = daemon.config_or_exit("fuyao-scheduler-extender", lambda: config_from_args(args))
    daemon.keep_freed_heap()  # Volcano's 200-300 kB predicate bodies, hundreds per task
    sys.exit(daemon.run(serve(config)))


if __name__ == "__main__":
    main()
