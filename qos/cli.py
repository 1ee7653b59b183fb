"""Entry point of ``fuyao-qos-agent`` (a DaemonSet): LS/BE colocation on one node.

Exit codes: 0 after SIGTERM/SIGINT (or after ``--once``), 2 for invalid flags or config (the field is named), 1 when
the cgroup hierarchy cannot be found.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import orjson

from fuyao import daemon
from fuyao.contracts import ANNOTATION_NODE_USAGE, RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY
from fuyao.kube_client import connect

from . import cgroups
from .agent import Agent
from .collect import Collector
from .config import AgentConfig, ConfigError, build_config, load_config_file
from .kube import Evictor, NodeState, Publisher
from .metrics import AgentMetrics

log = logging.getLogger("qos")


def build_parser() -> argparse.ArgumentParser:
    p = daemon.parser(
        "fuyao-qos-agent",
        "LS/BE colocation on one node: measures node and pod usage (psutil, pod cgroups), publishes "
        f"{RESOURCE_BATCH_CPU} / {RESOURCE_BATCH_MEMORY} and {ANNOTATION_NODE_USAGE} on the Node, lowers BE "
        "pods' CPU weight, suppresses their CPU when LS usage is high and evicts them under memory "
        "pressure. LS pods are never throttled or evicted.", "docs/qos.md")
    p.add_argument("--config", help="versioned YAML config (version: v1)")
    p.add_argument("--node-name", default=os.environ.get("NODE_NAME"), help="this node (default: env NODE_NAME)")
    p.add_argument("--cgroup-root", help="cgroup hierarchy (default /sys/fs/cgroup)")
    p.add_argument("--interval", help="collection period, e.g. 10s (default 10s)")
    p.add_argument("--kubeconfig", help="kubeconfig (default: in-cluster config in a pod; without either the agent "
                                        "runs alone: pods count as LS, nothing is published)")
    p.add_argument("--metrics-address", help="HOST:PORT for /metrics (default 127.0.0.1:9401; empty: off)")
    p.add_argument("--once", action="store_true", help="one cycle (two samples, --sample-gap apart), print the "
                                                       "JSON report, exit")
    p.add_argument("--dry-run", action="store_true", help="change nothing (no cgroup writes, no API writes)")
    p.add_argument("--sample-gap", type=float, default=1.0, help="seconds between the two samples of --once")
    return p


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    if args.sample_gap <= 0:
        raise ConfigError("sample-gap", "must be positive")
    file_values = load_config_file(args.config) if args.config else {}
    overrides = {"node_name": args.node_name, "cgroup_root": args.cgroup_root, "interval": args.interval,
                 "kubeconfig": args.kubeconfig, "metrics_address": args.metrics_address}
    return build_config(file_values, overrides)


def main(argv: list[str] | None = None) -> None:
    args = daemon.parse(build_parser(), argv)
    config = daemon.config_or_exit("fuyao-qos-agent", lambda: config_from_args(args))
    try:
        layout = cgroups.detect(config.cgroup_root)
    except cgroups.CgroupError as exc:
        log.error("%s", exc)
        sys.exit(1)
    api = None
    try:
        api = connect(config.kubeconfig)
    except Exception as exc:
        log.error("cannot load cluster credentials (%s); running without a cluster", exc)
    if api is not None and not config.node_name:
        print("fuyao-qos-agent: node-name: required with a cluster (--node-name or env NODE_NAME)", file=sys.stderr)
        sys.exit(2)
    state = publisher = evictor = None
    if api is not None:
        state = NodeState()
        state.follow(api, config.node_name)
        publisher, evictor = Publisher(api, config.node_name), Evictor(api)
    else:
        log.info("no cluster configured: pods count as LS, nothing is published or evicted")
    metrics = AgentMetrics()
    agent = Agent(config, Collector(layout, config.window), metrics, state, publisher, evictor)
    log.info("QoS agent on %s (%s), every %gs", config.node_name or "(no node name)", layout.describe(),
             config.interval, extra={"dry_run": args.dry_run})
    if args.once:
        if state is not None:
            deadline = time.monotonic() + 10
            while not state.ready and time.monotonic() < deadline:
                time.sleep(0.1)
        agent.cycle(dry_run=True)  # the first sample: CPU rates need two
        time.sleep(args.sample_gap)
        report = agent.cycle(dry_run=args.dry_run)
        sys.stdout.buffer.write(orjson.dumps(report.model_dump(), option=orjson.OPT_INDENT_2) + b"\n")
        return
    if config.metrics_address:
        try:
            host, port = metrics.endpoint.serve(config.metrics_address)
            log.info("metrics on http://%s:%d/metrics", host, port)
        except OSError as exc:
            log.error("cannot serve metrics on %s (%s); running without metrics", config.metrics_address, exc)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    agent.run(stop, dry_run=args.dry_run)
    log.info("stopped")


if __name__ == "__main__":
    main()
