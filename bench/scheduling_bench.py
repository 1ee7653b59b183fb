#!/usr/bin/env python3
"""Scheduling throughput with and without fuyao's extender, one run: a real kube-scheduler against a real
kube-apiserver with N NPU nodes (node objects with NPU capacity and the topology annotation; no kubelets — binding
is what is measured) and M pods asking for 1 NPU each. Without: kube-scheduler alone. With: the documented
extender configuration (filter, prioritize and bind by fuyao; nodeCacheCapable). Figure: pods bound per second,
and the ratio with/without (goal >= 0.7; a public Go extender measured 0.11). Prints one JSON object.

Usage: bench/scheduling_bench.py [--nodes 1000] [--pods 5000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.apiserver import LocalApiServer, binary, free_port
from tests.support.k8s_objects import node, topology

REPO = Path(__file__).resolve().parents[1]


def populate(server: LocalApiServer, nodes: int) -> None:
    api = server.client()
    topo = topology()

    def make(i: int) -> None:
        raw = node(f"npu-{i:05d}", topo=topo)
        api.create_node({k: v for k, v in raw.items() if k != "status"})
        api.patch_node_status(raw["metadata"]["name"], {"status": {**raw["status"], "conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "bench"}]}})
        api.patch_node(raw["metadata"]["name"], {"spec": {"taints": None}})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(make, range(nodes)))
    server.create([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default",
                                                                           "namespace": "default"}}])


def run(server: LocalApiServer, pods: int, with_extender: bool, tag: str) -> dict[str, float]:
    extender = None
    config = {"apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
              "clientConnection": {"kubeconfig": server.kubeconfig_for("admin"), "qps": 500, "burst": 1000},
              "leaderElection": {"leaderElect": False}}
    if with_extender:
        port = free_port()
        log = open(server.root / f"extender-{tag}.log", "wb")  # noqa: SIM115
        extender = subprocess.Popen([sys.executable, "-m", "scheduler_extender.cli", "--listen",
                                     f"127.0.0.1:{port}", "--kubeconfig", server.kubeconfig_for("admin"),
                                     "--log-level", "warning"], stdout=log, stderr=log)
        example = yaml.safe_load((REPO / "docs" / "examples" / "kube-scheduler-config.yaml").read_text())
        config["extenders"] = example["extenders"]
        config["extenders"][0]["urlPrefix"] = f"http://127.0.0.1:{port}"
        import urllib.request

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
    path = server.root / f"scheduler-{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(server.root / f"scheduler-{tag}.log", "wb")  # noqa: SIM115
    scheduler = subprocess.Popen([binary("kube-scheduler"), f"--config={path}", "--secure-port=0", "--v=0"],
                                 stdout=log, stderr=log)
    api = server.client()
    namespace = f"bench-{tag}"
    api.create_namespace({"metadata": {"name": namespace}})
    server.create([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default",
                                                                           "namespace": namespace}}])
    time.sleep(3)  # the scheduler's informers sync

    def create(i: int) -> None:
        api.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p-{i:05d}"},
            "spec": {"automountServiceAccountToken": False, "containers": [{
                "name": "main", "image": "fuyao.local/busybox:1",
                "resources": {"limits": {"npu.huawei.com/NPU": "1", "cpu": "100m", "memory": "64Mi"}}}]}})

    started = time.monotonic()
    creator = threading.Thread(target=lambda: list(ThreadPoolExecutor(8).map(create, range(pods))))
    creator.start()
    bound = 0
    while time.monotonic() - started < 1800:
        items = api.list_namespaced_pod(namespace, field_selector="spec.nodeName!=", _request_timeout=60).items
        bound = len(items)
        if bound >= pods:
            break
        time.sleep(1)
    elapsed = time.monotonic() - started
    creator.join()
    scheduler.terminate()
    if extender is not None:
        extender.terminate()
    return {"pods": pods, "bound": bound, "seconds": round(elapsed, 1), "pods_per_s": round(bound / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=5000)
    args = parser.parse_args()
    server = LocalApiServer(extra_args=("--max-requests-inflight=2000", "--max-mutating-requests-inflight=1000"))
    server.start()
    try:
        populate(server, args.nodes)
        without = run(server, args.pods, False, "plain")
        with_extender = run(server, args.pods, True, "fuyao")
    finally:
        server.stop()
    print(json.dumps({"benchmark": "scheduling", "nodes": args.nodes, "kube_scheduler_alone": without,
                      "with_fuyao_extender": with_extender,
                      "ratio": round(with_extender["pods_per_s"] / without["pods_per_s"], 2), "goal_ratio": 0.7,
                      "public_go_extender_ratio": 0.11}, indent=2))


if __name__ == "__main__":
    main()
