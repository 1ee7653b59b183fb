"""The extender's own CPU per scheduled pod in the exact-devices profile, without kube-scheduler: a real kube-apiserver
with N NPU nodes, the extender process (watches, filter, prioritize, bind), and a driver that plays
kube-scheduler's part one pod at a time: create the pod, POST filter with the pod and ~42 % of the node names
(kube-scheduler's adaptive percentageOfNodesToScore at 1,000 nodes, from a rotating start, as it sends them),
prioritize with the names filter passed, bind to the best. Nothing else shares the machine's cores during the
loop, so the figure is the extender's work per pod, not its share of a saturated machine
(``bench/scheduling_bench.py`` measures that): the number to watch when changing the extender's hot path.

Usage: bench/extender_cycle_bench.py [--nodes 1000] [--pods 2000] [--rounds 3] [--out DIR|-]
  FUYAO_BENCH_PROFILE=FILE: py-spy samples of the extender during the last round (raw, folded stacks).
Prints one JSON object: per round the extender's CPU ms per pod (user + system) and its verbs' mean latency.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import add_out_argument, emit
from bench.scheduling_bench import cpu_seconds, delete_all_pods, populate
from tests.support.apiserver import LocalApiServer, free_port
from tests.support.polling import wait_for


def feasible_to_find(nodes: int) -> int:
    """kube-scheduler's numFeasibleNodesToFind with the default (adaptive) percentageOfNodesToScore."""
    if nodes < 100:
        return nodes
    percentage = max(5, 50 - nodes // 125)
    return max(100, nodes * percentage // 100)


class Driver:
    """kube-scheduler's calls to the extender, one pod at a time, over one keep-alive connection."""

    def __init__(self, port: int, names: list[str], npus: int = 8):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.names = names
        self.npus = npus  # per node (``populate``'s nodes), each pod takes one
        self.taken: dict[str, int] = {}
        self.start = 0
        self.took: dict[str, float] = {"filter": 0.0, "prioritize": 0.0, "bind": 0.0}

    def call(self, verb: str, body: bytes) -> Any:
        started = time.perf_counter()
        self.conn.request("POST", f"/{verb}", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        answer = response.read()
        self.took[verb] += time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{verb}: {response.status} {answer[:300]!r}")
        return json.loads(answer)

    def schedule(self, pod: dict[str, Any]) -> None:
        """kube-scheduler's own filters run first: a node whose NPUs are all taken is not sent (its NodeResourcesFit
        rejects it); the search stops after ``feasible_to_find`` nodes and the next pod's starts after them."""
        find, names, looked = feasible_to_find(len(self.names)), [], 0
        while len(names) < find and looked < len(self.names):
            name = self.names[(self.start + looked) % len(self.names)]
            looked += 1
            if self.taken.get(name, 0) < self.npus:
                names.append(name)
        self.start = (self.start + looked) % len(self.names)
        pod_json = json.dumps(pod, separators=(",", ":"))
        found = self.call("filter", f'{{"Pod":{pod_json},"Nodes":null,"NodeNames":{json.dumps(names)}}}'.encode())
        if found.get("Error") or not found.get("NodeNames"):
            raise RuntimeError(f"filter found no node for {pod['metadata']['name']}: {found}")
        passed = found["NodeNames"]
        best = passed[0]
        if len(passed) > 1:
            scores = self.call("prioritize",
                               f'{{"Pod":{pod_json},"Nodes":null,"NodeNames":{json.dumps(passed)}}}'.encode())
            best = max(scores, key=lambda s: s["Score"])["Host"]
        bound = self.call("bind", json.dumps({"PodName": pod["metadata"]["name"],
                                              "PodNamespace": pod["metadata"]["namespace"],
                                              "PodUID": pod["metadata"]["uid"], "Node": best}).encode())
        if bound.get("Error"):
            raise RuntimeError(f"bind: {bound['Error']}")
        self.taken[best] = self.taken.get(best, 0) + 1


def ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except OSError:
        return False


def pod_object(api: Any, namespace: str, name: str) -> dict[str, Any]:
    response = api.create_namespaced_pod(namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"automountServiceAccountToken": False, "containers": [{
            "name": "main", "image": "fuyao.local/busybox:1",
            "resources": {"limits": {"npu.huawei.com/NPU": "1", "cpu": "100m", "memory": "64Mi"}}}]}},
        _preload_content=False)
    return json.loads(response.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=2000, help="pods per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each on a freshly started extender)")
    add_out_argument(parser)
    args = parser.parse_args()
    rounds = []
    server = LocalApiServer().start()
    try:
        populate(server, args.nodes, kwok=False)
        api = server.client()
        names = sorted(n.metadata.name for n in api.list_node().items)
        for index in range(args.rounds):
            namespace = f"cycle-{index}"
            api.create_namespace({"metadata": {"name": namespace}})
            server.create([{"apiVersion": "v1", "kind": "ServiceAccount",
                            "metadata": {"name": "default", "namespace": namespace}}])
            pods = [pod_object(api, namespace, f"p-{i:05d}") for i in range(args.pods)]
            port = free_port()
            log = open(server.root / f"cycle-extender-{index}.log", "wb")  # noqa: SIM115
            extender = subprocess.Popen([sys.executable, "-m", "fuyao.scheduler_extender.cli", "--listen",
                                         f"127.0.0.1:{port}", "--kubeconfig", server.kubeconfig_for("admin"),
                                         "--log-level", "warning"], stdout=log, stderr=log)
            try:
                wait_for(functools.partial(ready, port), timeout=120, what="the extender is ready")
                driver = Driver(port, names)
                profile = os.environ.get("FUYAO_BENCH_PROFILE") if index == args.rounds - 1 else None
                profiler = subprocess.Popen(["py-spy", "record", "--pid", str(extender.pid), "--nonblocking",
                                             "-r", "500", "-f", "raw", "-o", profile],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if profile else None
                before = cpu_seconds(extender.pid)
                started = time.monotonic()
                for pod in pods:
                    driver.schedule(pod)
                time.sleep(1.0)  # the watch events of the last binds
                cpu = cpu_seconds(extender.pid) - before
                elapsed = time.monotonic() - started
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)
                    profiler.wait(60)
                rounds.append({"cpu_ms_per_pod": round(1000 * cpu / args.pods, 3),
                               "seconds": round(elapsed, 1),
                               "mean_ms": {verb: round(1000 * took / args.pods, 3)
                                           for verb, took in driver.took.items()}})
                print(json.dumps(rounds[-1]), file=sys.stderr)
            finally:
                extender.terminate()
                extender.wait(30)
            delete_all_pods(api, namespace)
    finally:
        server.stop()
    cpus = sorted(r["cpu_ms_per_pod"] for r in rounds)
    emit({"benchmark": "extender-cycle", "nodes": args.nodes, "pods": args.pods, "rounds": rounds,
          "median_cpu_ms_per_pod": cpus[len(cpus) // 2]}, args.out, "extender-cycle", None)


if __name__ == "__main__":
    main()
