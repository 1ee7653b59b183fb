#!/usr/bin/env python3
"""Scheduler extender benchmark: prints one JSON object with the figures of docs/benchmarks.md.

The real HTTP server (aiohttp, in this process, on one event loop) with a cluster cache filled with N synthetic
NPU nodes (8 dies each, topology annotation, 4 pods per node holding devices). A client on a keep-alive connection
sends kube-scheduler's filter then prioritize for a 2-NPU pod, in both modes:

- ``NodeNames`` (nodeCacheCapable: true): names only, state from the cache;
- ``Nodes`` (nodeCacheCapable: false, kube-scheduler's default): every filter carries the full NodeList, byte for
  byte as kube-scheduler's Go encoder writes it (real-sized Nodes: ~7.6 kB each with their conditions, images and
  node info); the extender uses its cached rows for nodes whose resourceVersion it holds, and parses the others
  (``Nodes_no_cluster``: an extender without cluster access parses all).

As kube-scheduler does, the prioritize that follows a filter carries the nodes that filter passed (the shortlist: 16
by default); a prioritize over all N nodes (the worst case: ``shortlist: 0`` and every node feasible) is timed too.
Reported per N: filter+prioritize latency p50/p99 (goals: p99 <= 5 ms at 500 and <= 25 ms at 5,000 nodes with
NodeNames; with full Nodes p99 <= 50 ms at 500 and <= 250 ms at 5,000) and requests/s, for one pod repeated and for a
new pod every request; baselines: a GET /healthz round trip on the same connection (the HTTP floor) and the NodeNames
path (the ratio of each mode to it).

Usage: bench/extender_bench.py [--sizes 100,500,5000] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots
from bench.report import add_out_argument, emit, quantiles
from fuyao.contracts import RESOURCE_NPU
from fuyao.scheduler_extender.cluster import ClusterCache
from fuyao.scheduler_extender.config import build_config
from fuyao.scheduler_extender.metrics import ExtenderMetrics
from fuyao.scheduler_extender.server import build_app
from fuyao.scheduler_extender.service import ExtenderService
from tests.support.k8s_objects import go_extender_args, node, pod, topology


def full_node(item: dict, i: int) -> dict:  # type: ignore[type-arg]
    """What a real Node carries besides what the extender reads, as kube-scheduler sends it (~7.5 kB: the issue's
    500 full Nodes were 3.8 MB): well-known labels, conditions, addresses, node info, images, daemon endpoints."""
    name = item["metadata"]["name"]
    item["metadata"].update(uid=f"6f1c2b4e-0000-4000-8000-{i:012d}", creationTimestamp="2026-11-01T08:00:00Z")
    item["metadata"]["labels"].update({
        "beta.kubernetes.io/arch": "arm64", "beta.kubernetes.io/os": "linux", "kubernetes.io/arch": "arm64",
        "kubernetes.io/os": "linux", "node.kubernetes.io/instance-type": "atlas-800i-a2",
        "topology.kubernetes.io/region": "cn-east-1", "accelerator": "huawei-Ascend910",
        "node-role.kubernetes.io/worker": "", "servertype": "Ascend910B-20"})
    item["metadata"]["annotations"].update({
        "node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///run/containerd/containerd.sock"})
    cidr = f"10.{i // 256 % 256}.{i % 256}.0/24"
    item["spec"] = {"podCIDR": cidr, "podCIDRs": [cidr], "providerID": f"atlas://cn-east-1/{name}"}
    beat, since = "2026-12-05T09:00:00Z", "2026-11-01T08:01:00Z"
    conditions = [{"type": t, "status": "False", "lastHeartbeatTime": beat, "lastTransitionTime": since,
                   "reason": f"KubeletHas{r}", "message": f"kubelet has {m}"}
                  for t, r, m in (("MemoryPressure", "SufficientMemory", "sufficient memory available"),
                                  ("DiskPressure", "NoDiskPressure", "no disk pressure"),
                                  ("PIDPressure", "SufficientPID", "sufficient PID available"))]
    conditions.append({"type": "Ready", "status": "True", "lastHeartbeatTime": beat,
                       "lastTransitionTime": "2026-11-01T08:01:00Z", "reason": "KubeletReady",
                       "message": "kubelet is posting ready status"})
    images = [{"names": [f"registry.example.com/ai/{repo}@sha256:{(i * 31 + k) % 10**8:064d}",
                         f"registry.example.com/ai/{repo}:v{k}.{i % 7}.0"], "sizeBytes": 10**9 + k * 7919}
              for k, repo in enumerate(("vllm-ascend", "mindie-server", "fuyao", "cann-toolkit", "pause", "coredns",
                                        "kube-proxy", "node-exporter", "ascend-device-plugin", "npu-exporter",
                                        "fluent-bit", "calico-node", "calico-cni", "busybox", "mindspore"))]
    item["status"].update(
        conditions=conditions, images=images,
        addresses=[{"type": "InternalIP", "address": f"192.168.{i // 256 % 256}.{i % 256}"},
                   {"type": "Hostname", "address": name}],
        daemonEndpoints={"kubeletEndpoint": {"Port": 10250}},
        nodeInfo={"machineID": f"{i:032x}", "systemUUID": f"4c4c4544-{i:04x}-0000-8000-000000000000",
                  "bootID": f"{i * 7:032x}", "kernelVersion": "5.10.0-182.0.0.95.oe2203sp3.aarch64",
                  "osImage": "openEuler 22.03 (LTS-SP3)", "containerRuntimeVersion": "containerd://1.7.24",
                  "kubeletVersion": "v1.34.4", "kubeProxyVersion": "", "operatingSystem": "linux",
                  "architecture": "arm64"})
    return item


def cluster(n: int) -> tuple[list[dict], list[dict]]:  # type: ignore[type-arg]
    topo = topology()
    nodes = [full_node(node(f"node-{i:05d}", topo=topo, labels={"topology.kubernetes.io/zone": f"z{i % 8}"}), i)
             for i in range(n)]
    for i, item in enumerate(nodes):
        item["metadata"]["resourceVersion"] = str(1000 + i)  # as the API server sets it
    pods = []
    for i in range(n):
        for k in range(4):
            held = [f"Ascend910-{(k * 2 + j) % 8}" for j in range((i + k) % 2)]
            pods.append(pod(f"p-{i}-{k}", node_name=f"node-{i:05d}", phase="Running",
                            requests={"cpu": "2", "memory": "8Gi", **({RESOURCE_NPU: str(len(held))} if held else {})},
                            assigned={RESOURCE_NPU: held} if held else None,
                            labels={"app": f"svc{k}", "phase": "decode" if k % 2 else "prefill"}))
    return nodes, pods


def serve(service: ExtenderService) -> tuple[int, asyncio.AbstractEventLoop]:
    """The extender's app on its own event loop thread: uvloop, as the daemon runs it (fuyao.daemon.run)."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        _, bound = loop.run_until_complete(build_app(service).start("127.0.0.1", 0))
        port.append(bound)
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(30)
    return port[0], loop


def timed(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None) -> float:
    return exchange(conn, method, path, body)[0]


def exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None) -> tuple[float, bytes]:
    """(seconds, answer) of one request on a kept-alive connection."""
    started = time.perf_counter()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {data[:200]!r}")
    return elapsed, data


def prioritize_body(pod_json: bytes, answer: bytes) -> bytes:
    """What kube-scheduler sends to prioritize after this filter answer: the nodes the filter passed (kube-scheduler
    scores only the feasible nodes), in the form the filter used (Go's field order: Pod, Nodes, NodeNames)."""
    nodes_at = answer.index(b',"NodeNames":')
    nodes = answer[len(b'{"Nodes":'):nodes_at]
    names_end = answer.index(b',"FailedNodes":')
    names = answer[nodes_at + len(b',"NodeNames":'):names_end]
    return b'{"Pod":' + pod_json + b',"Nodes":' + nodes + b',"NodeNames":' + names + b"}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,500,5000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--volcano", action="store_true", help="Volcano's allocate-cycle load instead "
                        "(bench/volcano_load.py): per-node predicates 16 at a time, prioritize with full NodeInfos")
    parser.add_argument("--nodes", type=int, default=1000, help="--volcano: nodes in the cluster")
    parser.add_argument("--cycles", type=int, default=10, help="--volcano: allocate cycles (one task each)")
    parser.add_argument("--prioritize-sizes", default="100,250,500", help="--volcano: NodeInfos per prioritize")
    parser.add_argument("--extender-arg", action="append", default=[], help="--volcano: extra extender flags")
    parser.add_argument("--processes", type=int, default=1, help="--volcano: extender processes sharing the port "
                        "(--reuse-port)")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.volcano:
        from bench.volcano_load import run

        sizes = [int(x) for x in args.prioritize_sizes.split(",") if x]
        emit(run(args.nodes, args.cycles, sizes, args.extender_arg, args.processes), args.out, "extender-volcano",
             charts)
        return
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        nodes, pods = cluster(n)
        cache = ClusterCache()
        cache.replace_nodes(nodes)
        cache.replace_pods(pods)
        cache.settle()  # what the watcher does after each full list
        service = ExtenderService(build_config({}), cache, ExtenderMetrics(), has_cluster=True)
        port, loop = serve(service)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        # the same requests to an extender without cluster access (every Nodes request is parsed in full)
        bare_port, bare_loop = serve(ExtenderService(build_config({}), ClusterCache(), ExtenderMetrics()))
        bare = http.client.HTTPConnection("127.0.0.1", bare_port, timeout=120)
        ask = pod("bench", requests={RESOURCE_NPU: "2", "cpu": "4", "memory": "16Gi"},
                  labels={"app": "svc1", "phase": "prefill"})
        names = [n["metadata"]["name"] for n in nodes]
        pod_json = orjson.dumps(ask)
        full = go_extender_args(ask, nodes)  # byte for byte as kube-scheduler writes it
        bodies = {
            "NodeNames": (conn, orjson.dumps({"Pod": ask, "Nodes": None, "NodeNames": names})),
            "Nodes": (conn, full),  # the cache holds these node versions: its rows are used
            "Nodes_no_cluster": (bare, full),  # no cache: every node parsed from the request
        }
        # A new pod shape every request (no reuse of per-node results): the cold case.
        cold = [orjson.dumps({"Pod": pod(f"cold-{i}", requests={RESOURCE_NPU: "2", "cpu": f"{1000 + i}m",
                                                                "memory": "16Gi"},
                                         labels={"app": "svc1", "phase": "prefill"}),
                              "Nodes": None, "NodeNames": names}) for i in range(max(20, args.requests // 5))]
        health = [timed(conn, "GET", "/healthz", None) for _ in range(max(50, args.requests))]
        row: dict[str, object] = {"nodes": n, "baseline_healthz_ms": {"p50": round(pct(health, 50) * 1e3, 3),
                                                                      "p99": round(pct(health, 99) * 1e3, 3)}}
        for mode, (client, body) in bodies.items():
            count = args.requests if n <= 500 else max(20, args.requests // 10)
            if mode == "Nodes_no_cluster":
                count = max(5, count // 4)
            for _ in range(3):  # warm up
                timed(client, "POST", "/filter", body)
            samples, filters, prios = [], [], []
            wall = time.perf_counter()
            for _ in range(count):
                f, answer = exchange(client, "POST", "/filter", body)
                p = timed(client, "POST", "/prioritize", prioritize_body(pod_json, answer))
                filters.append(f)
                prios.append(p)
                samples.append(f + p)
            wall = time.perf_counter() - wall
            # the worst case: a prioritize over every node (shortlist: 0 and every node feasible)
            everything = [timed(client, "POST", "/prioritize", body) for _ in range(max(3, count // 10))]
            row[mode] = {
                "filter_plus_prioritize_ms": {"p50": round(pct(samples, 50) * 1e3, 2),
                                              "p99": round(pct(samples, 99) * 1e3, 2)},
                "filter_ms_p50": round(statistics.median(filters) * 1e3, 2),
                "prioritize_ms_p50": round(statistics.median(prios) * 1e3, 2),
                "prioritize_all_nodes_ms_p50": round(statistics.median(everything) * 1e3, 2),
                "requests_per_s": round(2 * count / wall, 1),
                "request_bytes": len(body),
                "ratio_p50_to_healthz": round(pct(samples, 50) / pct(health, 50), 1),
                **({"ratio_p99_to_nodenames": round(pct(samples, 99) * 1e3
                                                    / row["NodeNames"]["filter_plus_prioritize_ms"]["p99"], 1)}
                   if mode != "NodeNames" else {}),
                "cdf_ms": quantiles(samples, 1e3, 2),
            }
        cold_samples = []
        for body in cold:
            f, answer = exchange(conn, "POST", "/filter", body)
            cold_samples.append(f + timed(conn, "POST", "/prioritize",
                                          prioritize_body(body[len(b'{"Pod":'):body.index(b',"Nodes":')], answer)))
        row["NodeNames_new_shape_each_request"] = {
            "filter_plus_prioritize_ms": {"p50": round(pct(cold_samples, 50) * 1e3, 2),
                                          "p99": round(pct(cold_samples, 99) * 1e3, 2)},
            "requests": len(cold_samples)}
        goal = {500: 5.0, 5000: 25.0}.get(n)
        if goal:
            row["goal_nodenames_p99_ms"] = goal
            row["goal_nodes_p99_ms"] = {500: 50.0, 5000: 250.0}[n]
        results.append(row)
        conn.close()
        bare.close()
        loop.call_soon_threadsafe(loop.stop)
        bare_loop.call_soon_threadsafe(bare_loop.stop)
    emit({"benchmark": "scheduler-extender", "pod": "2 NPUs", "results": results}, args.out, "extender", charts)


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    if result["benchmark"] == "scheduler-extender-volcano":
        return volcano_charts(result, out)
    rows = result["results"]
    modes = [m for m in rows[0] if isinstance(rows[0][m], dict) and "filter_plus_prioritize_ms" in rows[0][m]]
    sizes = [row["nodes"] for row in rows]
    p99 = {m: (sizes, [row[m]["filter_plus_prioritize_ms"]["p99"] for row in rows]) for m in modes}
    p99["baseline: GET /healthz"] = (sizes, [row["baseline_healthz_ms"]["p99"] for row in rows])
    largest = rows[-1]
    return [
        plots.lines(out / "extender-p99.png", "filter + prioritize p99 by cluster size (2-NPU pod)", p99, "nodes",
                    "ms", log=True),
        plots.quantile_cdf(out / "extender-cdf.png", f"filter + prioritize at {largest['nodes']} nodes",
                           {m: largest[m]["cdf_ms"] for m in modes if "cdf_ms" in largest[m]}, "ms", log_x=True),
    ]


def volcano_charts(result: dict[str, Any], out: Path) -> list[Path]:
    phases = {"cold cycle": result["cold_cycle"], "warm cycles": result["warm_cycles"]}
    prioritize = result.get("prioritize") or {}
    paths = [plots.quantile_cdf(
        out / "extender-volcano-predicate.png",
        f"Volcano per-node predicate calls, {result['nodes']} nodes, {result['extender_processes']} process(es)",
        {name: p["predicate_call_ms"]["cdf"] for name, p in phases.items() if "cdf" in p["predicate_call_ms"]},
        "ms per call", log_x=True)]
    if prioritize:
        paths.append(plots.bars(out / "extender-volcano-prioritize.png", "Volcano prioritize with full NodeInfos", {
            f"{size} NodeInfos ({p['body_mb']} MB)": p["ms_median_of_3"] for size, p in prioritize.items()},
            "ms (median of 3)"))
    return paths


if __name__ == "__main__":
    main()
