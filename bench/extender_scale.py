#!/usr/bin/env python3
"""What the scheduler extender needs per node and per pod, measured at 1,000 and 5,000 nodes, for the extrapolation
to 10,000 nodes and 100 pods/s in docs/scheduler-extender.md. Prints one JSON object (and writes it with --out).

- memory: Python heap of a cache holding N nodes with 4 pods each (tracemalloc), per node;
- watch bandwidth: the bytes of the pod and node events the extender's watches receive per scheduled pod (a pod's
  bind and its Running update, as the API server encodes them) and per node status update;
- CPU per decision: process time of filter + prioritize (NodeNames, a new pod shape every request: nothing reused,
  and the same shape repeated: what a workload's replicas cost), and of applying one watch event.

Baselines in the same run: the Node and Pod JSON sizes themselves, and a GET /healthz-sized orjson round trip.

Usage: bench/extender_scale.py [--sizes 1000,5000]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots
from bench.extender_bench import cluster
from bench.report import add_out_argument, emit
from fuyao.contracts import RESOURCE_NPU
from fuyao.scheduler_extender.cluster import ClusterCache
from fuyao.scheduler_extender.config import build_config
from fuyao.scheduler_extender.metrics import ExtenderMetrics
from fuyao.scheduler_extender.service import ExtenderService
from tests.support.k8s_objects import go_ordered_node, pod


def cpu(call: Any, repeat: int) -> float:
    """Median process time of ``call()`` in ms."""
    times = []
    for _ in range(repeat):
        started = time.process_time()
        call()
        times.append(time.process_time() - started)
    return round(statistics.median(times) * 1e3, 3)


def measure(n: int) -> dict[str, Any]:
    nodes, pods = cluster(n)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = ClusterCache()
    cache.replace_nodes(nodes)
    cache.replace_pods(pods)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    cache.settle()
    service = ExtenderService(build_config({}), cache, ExtenderMetrics(), has_cluster=True)
    names = [item["metadata"]["name"] for item in nodes]
    shapes = iter(range(10**6))

    def request(fresh: bool) -> None:
        i = next(shapes) if fresh else 0
        ask = pod(f"ask-{i}", requests={RESOURCE_NPU: "2", "cpu": f"{1000 + i}m", "memory": "16Gi"},
                  labels={"app": "svc1", "phase": "prefill"})
        body = orjson.dumps({"Pod": ask, "Nodes": None, "NodeNames": names})
        answer = orjson.loads(service.filter(body))
        service.prioritize(orjson.dumps({"Pod": ask, "Nodes": None, "NodeNames": answer["NodeNames"]}))

    request(False)
    bound = pods[1]
    moved = {**bound, "status": {"phase": "Running", "podIP": "10.0.0.9"},
             "metadata": {**bound["metadata"], "resourceVersion": "999"}}
    node_update = {**nodes[0], "metadata": {**nodes[0]["metadata"], "resourceVersion": "999999"}}
    return {
        "nodes": n, "pods": len(pods),
        "memory_mib": round(used / 2**20, 1), "memory_kib_per_node_with_4_pods": round(used / n / 1024, 1),
        "node_json_bytes": len(orjson.dumps(go_ordered_node(nodes[0]))), "pod_json_bytes": len(orjson.dumps(bound)),
        "cpu_ms_filter_prioritize_new_shape": cpu(lambda: request(True), 20),
        "cpu_ms_filter_prioritize_same_shape": cpu(lambda: request(False), 20),
        "cpu_ms_pod_status_event": cpu(lambda: cache.upsert_pod(moved), 200),
        "cpu_ms_node_update_event": cpu(lambda: cache.upsert_node(node_update), 50),
    }


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    rows = result["results"]
    return [plots.grouped_bars(out / "extender-scale.png", "extender CPU per decision and per event (ms)", {
        f"{r['nodes']} nodes": {"filter+prioritize, new shape": r["cpu_ms_filter_prioritize_new_shape"],
                                "same shape": r["cpu_ms_filter_prioritize_same_shape"],
                                "pod event": r["cpu_ms_pod_status_event"],
                                "node event": r["cpu_ms_node_update_event"]} for r in rows}, "CPU ms", log_y=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000")
    add_out_argument(parser)
    args = parser.parse_args()
    emit({"benchmark": "scheduler-extender-scale", "results": [measure(int(n)) for n in args.sizes.split(",")]},
         args.out, "extender-scale", charts)


if __name__ == "__main__":
    main()
