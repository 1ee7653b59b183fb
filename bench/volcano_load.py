"""The extender under Volcano's load (``bench/extender_bench.py --volcano``): what vc-scheduler's extender plugin sends
during one allocate cycle, against the real ``fuyao-scheduler-extender`` process.

- **Predicates as Volcano makes them** (pkg/scheduler/util/predicate_helper.go): for one task, one POST per node, 16
  at a time (``workqueue.ParallelizeUntil(ctx, 16, ...)``), until enough feasible nodes are found
  (``CalculateNumOfFeasibleNodesToFind``: max(100, n x (50 - n/125) %), so 420 of 1,000). Each call carries the
  task and the node's full ``NodeInfo`` with every task on it (the full pods, managedFields included: Volcano's
  informers keep them). The client behaves as Go's ``http.Client`` with the default transport: keep-alive, but at
  most 2 idle connections per host (``DefaultMaxIdleConnsPerHost``), so most of the 16 concurrent calls open a new
  connection.
- **Prioritize** with the full ``NodeInfo`` of 100-500 candidates in one body.

Figures: per-call predicate latency p50/p99, the cycle's predicate wall time p50/p99 over cycles, the prioritize
latency per size, the extender's CPU per predicate call; baseline: a GET /healthz on a fresh connection.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import quantiles  # noqa: E402
from fuyao.contracts import RESOURCE_NPU  # noqa: E402
from tests.support import volcano as vc  # noqa: E402
from tests.support.apiserver import free_port  # noqa: E402
from tests.support.k8s_objects import node, pod, topology  # noqa: E402

WORKERS = 16  # ParallelizeUntil's pieces in flight
IDLE_PER_HOST = 2  # net/http DefaultMaxIdleConnsPerHost


def feasible_to_find(n: int) -> int:
    """Volcano's CalculateNumOfFeasibleNodesToFind with the default options (min 100 nodes, min 5 %)."""
    if n <= 100:
        return n
    percentage = max(5, 50 - n // 125)
    return max(100, n * percentage // 100)


def _managed_fields(name: str) -> list[dict[str, Any]]:
    spec = {f"f:{k}": {} for k in ("dnsPolicy", "enableServiceLinks", "restartPolicy", "schedulerName",
                                   "securityContext", "terminationGracePeriodSeconds", "priority", "tolerations")}
    container = {f"f:{k}": {} for k in ("image", "imagePullPolicy", "name", "resources", "terminationMessagePath",
                                        "terminationMessagePolicy", "volumeMounts", "env", "command", "args")}
    return [
        {"manager": "vc-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2026-12-05T00:00:00Z",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:volcano.sh/job-name": {}},
                                                               "f:labels": {".": {}, "f:app": {}},
                                                               "f:ownerReferences": {".": {}}},
                                                "f:spec": {**spec, f'k:{{"name":"{name}"}}': container}}},
        {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-12-05T00:00:10Z",
         "fieldsType": "FieldsV1", "subresource": "status",
         "fieldsV1": {"f:status": {f"f:{k}": {} for k in ("conditions", "containerStatuses", "hostIP", "hostIPs",
                                                          "phase", "podIP", "podIPs", "startTime")}}},
    ]


def realistic_pod(name: str, node_name: str, npus: list[str], rng: random.Random) -> dict[str, Any]:
    """A running vcjob worker as the API server returns it (about 5 kB of JSON)."""
    requests = {"cpu": f"{rng.choice([1, 2, 4, 8])}", "memory": f"{rng.choice([4, 8, 16, 32])}Gi"}
    if npus:
        requests[RESOURCE_NPU] = str(len(npus))
    raw = pod(name, node_name=node_name, phase="Running", requests=requests,
              assigned={RESOURCE_NPU: npus} if npus else None,
              labels={"app": f"svc-{rng.randrange(20)}", "volcano.sh/job-name": f"job-{name[:6]}",
                      "volcano.sh/queue-name": "default", "volcano.sh/task-spec": "worker",
                      "volcano.sh/job-namespace": "default"})
    meta = raw["metadata"]
    meta.update({"resourceVersion": str(rng.randrange(10**6, 10**7)), "generateName": f"{name[:-2]}-",
                 "ownerReferences": [{"apiVersion": "batch.volcano.sh/v1alpha1", "kind": "Job", "name": "job",
                                      "uid": f"owner-{name}", "controller": True, "blockOwnerDeletion": True}],
                 "managedFields": _managed_fields("main")})
    meta["annotations"].update({"scheduling.k8s.io/group-name": f"pg-{name[:6]}", "volcano.sh/job-name": "job",
                                "volcano.sh/task-spec": "worker", "volcano.sh/template-uid": f"tpl-{name[:6]}"})
    container = raw["spec"]["containers"][0]
    container.update({"image": "registry.local/vllm-ascend:v0.11.0", "imagePullPolicy": "IfNotPresent",
                      "command": ["python", "-m", "vllm.entrypoints.openai.api_server"],
                      "args": ["--model", "/models/qwen", "--port", "8000", "--block-size", "128"],
                      "env": [{"name": f"ENV_{k}", "value": f"value-{k}-{rng.randrange(1000)}"} for k in range(8)],
                      "ports": [{"containerPort": 8000, "name": "http", "protocol": "TCP"}],
                      "volumeMounts": [{"name": v, "mountPath": f"/mnt/{v}"} for v in ("models", "dshm", "token")],
                      "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"})
    raw["spec"].update({"schedulerName": "volcano", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
                        "serviceAccountName": "default", "priority": 0, "terminationGracePeriodSeconds": 30,
                        "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                         "effect": "NoExecute", "tolerationSeconds": 300}],
                        "volumes": [{"name": "models", "hostPath": {"path": "/data/models", "type": ""}},
                                    {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                                    {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                                        "path": "token", "expirationSeconds": 3607}}]}}]})
    raw["status"].update({
        "conditions": [{"type": t, "status": "True", "lastTransitionTime": "2026-12-05T00:00:05Z"}
                       for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady",
                                 "PodScheduled")],
        "hostIP": "10.0.0.1", "hostIPs": [{"ip": "10.0.0.1"}],
        "podIP": f"10.1.{rng.randrange(255)}.{rng.randrange(255)}",
        "startTime": "2026-12-05T00:00:01Z", "qosClass": "Burstable",
        "containerStatuses": [{"name": "main", "ready": True, "restartCount": 0, "started": True,
                               "image": "registry.local/vllm-ascend:v0.11.0",
                               "imageID": "registry.local/vllm-ascend@sha256:" + "ab" * 32,
                               "containerID": "containerd://" + "cd" * 32,
                               "state": {"running": {"startedAt": "2026-12-05T00:00:04Z"}}}]})
    return raw


def realistic_node(name: str) -> dict[str, Any]:
    raw = node(name, topo=topology(), labels={
        "topology.kubernetes.io/zone": "z1", "kubernetes.io/arch": "arm64", "kubernetes.io/os": "linux",
        "node.kubernetes.io/instance-type": "atlas-800t-a2", "accelerator": "huawei-ascend-npu",
        "npu.openfuyao.com/chip-model": "910B4"})
    raw["metadata"].update({"resourceVersion": "12345", "uid": f"uid-{name}"})
    raw["status"].update({
        "conditions": [{"type": t, "status": "False" if t != "Ready" else "True",
                        "lastHeartbeatTime": "2026-12-05T00:00:00Z", "lastTransitionTime": "2026-12-01T00:00:00Z",
                        "reason": f"Kubelet{t}", "message": f"kubelet reports {t}"}
                       for t in ("MemoryPressure", "DiskPressure", "PIDPressure", "Ready")],
        "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": name}],
        "nodeInfo": {"kernelVersion": "5.10.0", "osImage": "EulerOS 2.0", "containerRuntimeVersion": "containerd://1.7",
                     "kubeletVersion": "v1.34.4", "architecture": "arm64", "operatingSystem": "linux"},
        "images": [{"names": [f"registry.local/image-{k}@sha256:{'ef' * 32}", f"registry.local/image-{k}:v1"],
                    "sizeBytes": 10**9 + k} for k in range(20)]})
    return raw


def build(n: int, seed: int = 7) -> tuple[list[bytes], list[dict[str, Any]]]:
    """Per node: its NodeInfo's JSON bytes (as Go marshals it: compact) and the parsed object."""
    rng = random.Random(seed)
    encoded, infos = [], []
    for i in range(n):
        name = f"node-{i:05d}"
        free = [f"Ascend910-{d}" for d in range(8)]
        rng.shuffle(free)
        tasks = []
        for k in range(rng.randint(20, 60)):
            held = [free.pop() for _ in range(min(len(free), rng.choice([0, 0, 0, 1, 2])))] if k < 6 else []
            tasks.append(vc.task(realistic_pod(f"w{i:05d}-{k:02d}", name, held, rng), vc.TaskStatus.RUNNING,
                                 node=name))
        info = vc.node_info(realistic_node(name), *tasks)
        infos.append(info)
        encoded.append(orjson.dumps(info))
    return encoded, infos


class GoTransport:
    """Keep-alive HTTP/1.1 with at most ``IDLE_PER_HOST`` idle connections kept, as net/http's default transport."""

    def __init__(self, port: int):
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.opened += 1
        writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: Go-http-client/1.1\r\n"
                     b"Content-Length: %d\r\nContent-Type: application/json\r\nAccept-Encoding: gzip\r\n\r\n"
                     % (path.encode(), self.port, len(body)) + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        data = await reader.readexactly(length)
        if len(self.idle) < IDLE_PER_HOST:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return status, data


async def predicate_cycle(transport: GoTransport, task: bytes, nodes: list[bytes], start: int,
                          latencies: list[float]) -> tuple[float, list[int]]:
    """One task's predicates over the nodes from ``start``: 16 at a time until enough are feasible."""
    target = feasible_to_find(len(nodes))
    feasible: list[int] = []
    cursor = [0]
    began = time.perf_counter()

    async def worker() -> None:
        while len(feasible) < target and cursor[0] < len(nodes):
            index = (start + cursor[0]) % len(nodes)
            cursor[0] += 1
            body = b'{"task":' + task + b',"node":' + nodes[index] + b"}"
            sent = time.perf_counter()
            status, data = await transport.post("/volcano/predicate", body)
            latencies.append(time.perf_counter() - sent)
            if status != 200:
                raise RuntimeError(f"predicate: HTTP {status}: {data[:200]!r}")
            if orjson.loads(data)["code"] == 0:
                feasible.append(index)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return time.perf_counter() - began, feasible


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run(n: int, cycles: int, prioritize_sizes: list[int], extra_args: list[str], processes: int = 1) -> dict[str, Any]:
    started = time.perf_counter()
    encoded, _infos = build(n)
    built_s = time.perf_counter() - started
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "fuyao.scheduler_extender.cli", "--listen", f"127.0.0.1:{port}",
                               "--log-level", "warning", *(["--reuse-port", "--no-bind"] if processes > 1 else []),
                               *extra_args],
                              cwd=REPO, env={k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"})
             for _ in range(processes)]
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        servers = [psutil.Process(p.pid) for p in procs]

        def server_cpu() -> float:
            return sum(sum(s.cpu_times()[:2]) for s in servers)

        rng = random.Random(11)
        tasks = [orjson.dumps(vc.task(pod(f"ask-{c}", requests={RESOURCE_NPU: "2", "cpu": "4", "memory": "16Gi"},
                                          labels={"app": "svc-1"}))) for c in range(cycles + 2)]

        async def session() -> dict[str, Any]:
            transport = GoTransport(port)
            await transport.post("/volcano/predicate", b'{"task":' + tasks[-1] + b',"node":' + encoded[0] + b"}")

            def figures(latencies: list[float], walls: list[float], calls: int, cpu: float,
                        opened: int, cycles: int) -> dict[str, Any]:
                return {
                    "calls_per_cycle": round(calls / cycles),
                    "new_connections_per_cycle": round(opened / cycles),
                    "predicate_call_ms": {"p50": round(pct(latencies, 50) * 1e3, 2),
                                          "p99": round(pct(latencies, 99) * 1e3, 2),
                                          "cdf": quantiles(latencies, 1e3, 2)},
                    "cycle_wall_ms": {"p50": round(pct(walls, 50) * 1e3, 1), "p99": round(pct(walls, 99) * 1e3, 1),
                                      "max": round(max(walls) * 1e3, 1)},
                    "extender_cpu_ms_per_call": round(cpu / calls * 1e3, 3)}

            async def measure(count: int, first_task: int, random_start: bool) -> dict[str, Any]:
                latencies: list[float] = []
                walls: list[float] = []
                cpu0, opened0 = server_cpu(), transport.opened
                for c in range(count):
                    wall, _ = await predicate_cycle(transport, tasks[first_task + c], encoded,
                                                    rng.randrange(n) if random_start else 0, latencies)
                    walls.append(wall)
                return figures(latencies, walls, len(latencies), server_cpu() - cpu0,
                               transport.opened - opened0, count)

            out: dict[str, Any] = {"feasible_to_find": feasible_to_find(n)}
            # cold: the extender has seen none of these nodes or pods (its first cycle after a start)
            out["cold_cycle"] = await measure(1, 0, random_start=False)
            # Volcano runs a session every second over the same nodes: once every node was sent, later cycles
            # meet nodes (and pods) the extender parsed before
            # (each extender process keeps what it parsed: with several, every node is sent a few times, as
            # sessions do, before the warm figures)
            for start in [s for _ in range(1 if processes == 1 else 3 * processes) for s in range(0, n, 16)]:
                await asyncio.gather(*(transport.post("/volcano/predicate", b'{"task":' + tasks[-1] + b',"node":'
                                                      + encoded[i] + b"}") for i in range(start, min(n, start + 16))))
            out["warm_cycles"] = await measure(cycles, 1, random_start=True)
            prio = {}
            for size in prioritize_sizes:
                body = b'{"task":' + tasks[0] + b',"nodes":[' + b",".join(encoded[:size]) + b"]}"
                times = []
                for _ in range(3):
                    sent = time.perf_counter()
                    status, data = await transport.post("/volcano/prioritize", body)
                    times.append(time.perf_counter() - sent)
                    if status != 200:
                        raise RuntimeError(f"prioritize {size}: HTTP {status}: {data[:200]!r}")
                prio[str(size)] = {"body_mb": round(len(body) / 2**20, 1),
                                   "ms_median_of_3": round(statistics.median(times) * 1e3, 1)}
            out["prioritize"] = prio
            healthz = []
            for _ in range(50):
                sent = time.perf_counter()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                await reader.read()
                writer.close()
                healthz.append(time.perf_counter() - sent)
            out["baseline_healthz_fresh_connection_ms"] = round(statistics.median(healthz) * 1e3, 3)
            return out

        result = asyncio.run(session())
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
    sizes = [len(b) for b in encoded]
    return {"benchmark": "scheduler-extender-volcano", "nodes": n, "extender_processes": processes,
            "pods_per_node": "20-60",
            "nodeinfo_kb": {"median": round(statistics.median(sizes) / 1024), "max": round(max(sizes) / 1024)},
            "built_s": round(built_s, 1), **result}
