#!/usr/bin/env python3
"""QoS agent benchmark: CPU cost of one collection cycle with 110 pods (the kubelet's default maxPods) on a temp
cgroup tree with the real layout and files; goal < 50 ms. Prints one JSON object.

Measured per layout (v1 cgroupfs, v2 systemd): CPU time (process time) of ``Agent.cycle`` — read every pod's
cgroup, psutil for the node, the batch formula, the suppression plan (BE pods suppressed: their quota files are
compared and rewritten every other cycle), the eviction plan, the report. Baseline, same run: only reading the
same cgroup files (open + read), the floor any collector pays.

Usage: bench/qos_bench.py [--pods 110] [--cycles 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots
from bench.report import add_out_argument, emit, quantiles
from fuyao.qos import cgroups
from fuyao.qos.agent import Agent
from fuyao.qos.collect import Collector
from fuyao.qos.config import build_config
from fuyao.qos.kube import NodeState
from fuyao.qos.metrics import AgentMetrics
from tests.support.cgroups import FakeCgroupTree


def _uid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def measure(root: Path, version: int, driver: str, pods: int, cycles: int) -> dict[str, object]:
    tree = FakeCgroupTree(root, version, driver)  # type: ignore[arg-type]
    raw = []
    for i in range(pods):
        be = i % 2 == 1
        tree.add_pod(_uid(i), "besteffort" if be else "burstable", cpu_ns=i * 10**9, memory=(i + 1) * 2**26)
        raw.append({"metadata": {"uid": _uid(i), "name": f"p{i}", "namespace": "default",
                                 "labels": {"volcano.sh/qos": "BE" if be else "LS"}}, "spec": {"containers": [{}]}})
    state = NodeState()
    NodeState._Node(state).replace([{"metadata": {"name": "n"}, "status": {
        "capacity": {"cpu": "2", "memory": "8Gi"}, "allocatable": {"cpu": "2", "memory": "8Gi"}}}])
    NodeState._Pods(state).replace(raw)
    # a low suppress threshold: LS pods' usage keeps BE pods suppressed, so quota files are read and compared
    config = build_config({"cpuSuppress": {"thresholdPercent": 1}})
    agent = Agent(config, Collector(cgroups.detect(root), 6), AgentMetrics(), state)
    agent.cycle()
    costs = []
    for n in range(cycles):
        for i in range(0, pods, 2):  # LS pods burn CPU between cycles
            tree.set_usage(_uid(i), cpu_ns=(i + n + 1) * 10**9)
        started = time.process_time()
        agent.cycle()
        costs.append(time.process_time() - started)
    layout = cgroups.detect(root)
    files = []
    for group in cgroups.pod_cgroups(layout).values():
        if version == 2:
            files += [group.cpu / "cpu.stat", group.memory / "memory.current", group.memory / "memory.stat",
                      group.cpu / "cpu.weight", group.cpu / "cpu.max"]
        else:
            files += [group.cpuacct / "cpuacct.usage", group.memory / "memory.usage_in_bytes",
                      group.memory / "memory.stat", group.cpu / "cpu.shares", group.cpu / "cpu.cfs_quota_us",
                      group.cpu / "cpu.cfs_period_us"]
    floor = []
    for _ in range(cycles):
        started = time.process_time()
        for path in files:
            path.read_text()
        floor.append(time.process_time() - started)
    p50, floor50 = statistics.median(costs), statistics.median(floor)
    return {"layout": f"v{version} {driver}", "pods": pods, "cycles": cycles,
            "cycle_cpu_ms": {"p50": round(p50 * 1e3, 2), "p99": round(sorted(costs)[int(0.99 * (len(costs) - 1))]
                                                                      * 1e3, 2)},
            "baseline_read_files_cpu_ms_p50": round(floor50 * 1e3, 2), "files": len(files),
            "cdf_ms": quantiles(costs, 1e3, 2), "baseline_read_files_cdf_ms": quantiles(floor, 1e3, 2),
            "ratio_to_baseline": round(p50 / floor50, 2), "goal_ms": 50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--cycles", type=int, default=200)
    add_out_argument(parser)
    args = parser.parse_args()
    results = []
    for version, driver in ((1, "cgroupfs"), (2, "systemd")):
        with tempfile.TemporaryDirectory(prefix="qosbench") as tmp:
            results.append(measure(Path(tmp), version, driver, args.pods, args.cycles))
    emit({"benchmark": "qos-agent-cycle", "results": results}, args.out, "qos", charts)


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    curves = {}
    for row in result["results"]:
        curves[f"agent cycle, cgroup {row['layout']} ({row['pods']} pods)"] = row["cdf_ms"]
        curves[f"baseline: reading its files, {row['layout']}"] = row["baseline_read_files_cdf_ms"]
    return [plots.quantile_cdf(out / "qos-cycle.png", "QoS agent: CPU time per cycle", curves, "CPU ms")]


if __name__ == "__main__":
    main()
