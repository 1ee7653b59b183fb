#!/usr/bin/env python3
"""Colocation benchmark on the local cluster's real kubelet: node utilization and a latency-sensitive service's
latency, LS alone, LS + BE without the QoS agent, LS + BE with it; then a memory-pressure phase. Prints one JSON
object; the figures and the method are in docs/benchmarks.md and docs/qos.md. Needs root.

- LS: a CPU-bound HTTP service in fuyao's runtime image (each request: a fixed PBKDF2 computation, ~4 ms of CPU),
  `volcano.sh/qos: LS`, cpu request 500m, behind a ClusterIP Service; an open-loop client on the host sends a
  fixed rate (Poisson arrivals) and records each request's latency.
- BE: CPU burners (busybox `while :; do :; done`), `volcano.sh/qos: BE`, batch resources only (BestEffort to the
  kubelet): requests and limits of `kubernetes.io/batch-cpu` each.
- Utilization: the node's busy CPU (/proc/stat, all cores) over each phase. Latency: the client's p50 and p99.
- After 20 s of unmeasured load and 15 s of quiet (a fresh cluster's start-up settles), the BE pods are created
  once, and the three phases are measured in interleaved windows, each ``--phase-seconds`` (default 30) after a 5 s
  settle, in ``--rounds`` rounds (default 4) whose order rotates (L1 L2 L0, L2 L0 L1, L0 L1 L2, ...), so a drift of
  the machine (a fresh cluster settling, other tenants of a VM) falls on every phase alike:
  - U0/L0 LS alone: the BE pods frozen (cgroup freezer), the agent running;
  - U1/L1 LS + BE without the agent: the agent stopped and the BE pods' cgroups at what the kubelet gives a
    BestEffort pod (no CFS quota, 2 CPU shares): nothing enforces the batch limits;
  - U2/L2 LS + BE with the agent (batch limits in the cgroups, CPU suppression above its threshold), measured from
    6 s after it starts.
  A phase's latency percentiles are over all its windows' requests together; its utilization is the mean of its
  windows'. Each window's figures are printed too.
- Memory pressure: the agent restarted with watermarks around the node's memory use; an LS pod and two BE pods
  (priorities 0 and -10) each fill a memory-backed emptyDir; the report says which pods were evicted, in what
  order, and whether any LS container was OOM-killed.

Goals (issue 22): U2 >= 1.8 x U0 (the design doc's 35 % -> 65 %), L2 <= 1.15 x L0, L1 visibly worse than L0.

Why interleaved: measured one phase after the other (the first version of this bench), L0, L1 and L2 each took a
minute in that order, and on this 2-core VM LS alone's p99 moves by 2x from one minute to the next; every run then
put the agent's phase last.

Usage: bench/colocation_bench.py [--rate 100] [--phase-seconds 30] [--rounds 4] [--burners 2] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import psutil

from bench import plots
from bench.report import add_out_argument, emit, quantiles
from tests.support.cluster import LocalCluster, down
from tests.support.polling import wait_for

LS_SERVER = r"""
import hashlib, http.server, os
ITER = int(os.environ["WORK_ITERATIONS"])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # headers and body in one send: no Nagle / delayed-ACK stall between them
    disable_nagle_algorithm = True
    def do_GET(self):
        body = hashlib.pbkdf2_hmac("sha256", b"fuyao", self.path.encode(), ITER).hex().encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


def calibrate(target_ms: float) -> int:
    """PBKDF2 iterations that take ``target_ms`` of CPU here (the pod runs on this machine's CPUs)."""
    import hashlib

    n = 2000
    started = time.process_time()
    hashlib.pbkdf2_hmac("sha256", b"fuyao", b"/calibrate", n)
    took = max(time.process_time() - started, 1e-6)
    return max(100, int(n * target_ms / 1000 / took))


def ls_objects(image: str, iterations: int) -> list[dict[str, Any]]:
    labels = {"app": "ls-server", "volcano.sh/qos": "LS"}
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ls-server", "namespace": "default", "labels": labels},
         "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1, "containers": [{
             "name": "main", "image": image, "imagePullPolicy": "Never", "command": ["python3", "-c", LS_SERVER],
             "env": [{"name": "WORK_ITERATIONS", "value": str(iterations)}],
             "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
             "resources": {"requests": {"cpu": "500m", "memory": "64Mi"}}}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ls-server", "namespace": "default"},
         "spec": {"selector": {"app": "ls-server"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]


def burner(i: int, milli: int) -> dict[str, Any]:
    batch = {"kubernetes.io/batch-cpu": str(milli), "kubernetes.io/batch-memory": str(64 * 2**20)}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"be-burner-{i}", "namespace": "default", "labels": {"volcano.sh/qos": "BE"}},
            "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": "fuyao.local/busybox:1", "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", "while :; do :; done"],
                "resources": {"requests": batch, "limits": batch}}]}}


async def open_loop(url: str, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` for ``seconds``; each request's latency (ms), errors counted."""
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    tasks = []
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def one(n: int) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with session.get(f"{url}/{n}") as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                        return
            except (TimeoutError, aiohttp.ClientError):
                errors += 1
                return
            latencies.append((time.perf_counter() - started) * 1000)

        loop = asyncio.get_running_loop()
        start = loop.time()
        at, n = start, 0
        while at - start < seconds:
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)

    return {"requests": n, "errors": errors, **latency_figures(latencies), "_latencies": latencies}


def latency_figures(latencies: list[float]) -> dict[str, Any]:
    latencies = sorted(latencies)

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))], 2) if latencies else 0.0

    return {"p50_ms": pct(50), "p99_ms": pct(99),
            "mean_ms": round(statistics.fmean(latencies), 2) if latencies else 0.0,
            "cdf_ms": quantiles(latencies, 1.0, 2)}


def phase(url: str, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    time.sleep(5)  # settle
    before = psutil.cpu_times()
    latency = asyncio.run(open_loop(url, rate, seconds, seed))
    after = psutil.cpu_times()

    def busy(t: Any) -> float:
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    total = sum(after) - sum(before)
    return {"utilization": round((busy(after) - busy(before)) / total, 3) if total else 0.0, **latency}


def memory_phase(cluster: LocalCluster, size: int = 600 * 2**20) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    used = (memory.total - memory.available) / memory.total * 100
    step = size / memory.total * 100
    config = cluster.dir / "qos-memory.yaml"
    config.write_text(f"version: v1\ninterval: 1s\nwindow: 2\nmemoryEviction: {{enabled: true, highPercent: "
                      f"{used + 2.6 * step:.2f}, lowPercent: {used + 2.4 * step:.2f}}}\n")
    for value in (0, -10):
        cluster.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                       "metadata": {"name": f"bench-be-{-value}"}, "value": value}, f"pc-{-value}")
    pods = (("mem-ls", "LS", 0), ("mem-be-high", "BE", 0), ("mem-be-low", "BE", -10))
    for name, qos, priority in pods:
        spec: dict[str, Any] = {
            "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "mem", "emptyDir": {"medium": "Memory"}}],
            "containers": [{"name": "main", "image": "fuyao.local/busybox:1", "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", f"dd if=/dev/zero of=/mem/fill bs=1048576 "
                                                         f"count={size // 2**20} 2>/dev/null; sleep 3600"],
                            "volumeMounts": [{"name": "mem", "mountPath": "/mem"}]}]}
        if qos == "BE":
            spec["containers"][0]["resources"] = {"limits": {"kubernetes.io/batch-cpu": "100"}}
            spec["priorityClassName"] = f"bench-be-{-priority}"
        cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": "default", "labels": {"volcano.sh/qos": qos}}, "spec": spec}, name)
    for name, _, _ in pods:
        wait_for(lambda n=name: cluster.get_json("pod", n)["status"].get("phase") == "Running", 90, f"{name}")
    time.sleep(3)
    cluster.stop("fuyao-qos-agent")
    cluster.start("fuyao-qos-agent", ("--config", str(config)))
    order: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(order) < 2:
        for name, _, _ in pods:
            found = cluster.kubectl("get", "pod", name, "--ignore-not-found", "-o", "json", check=False).strip()
            gone = not found or bool(json.loads(found)["metadata"].get("deletionTimestamp"))
            if gone and name not in order:
                order.append(name)
        time.sleep(0.5)
    ls = cluster.get_json("pod", "mem-ls")
    status = ls["status"]["containerStatuses"][0]
    oom = (status.get("lastState", {}).get("terminated") or {}).get("reason") == "OOMKilled"
    return {"watermarks_percent": {"high": round(used + 2.6 * step, 2), "low": round(used + 2.4 * step, 2)},
            "evicted_in_order": order, "ls_running": ls["status"]["phase"] == "Running",
            "ls_restarts": status.get("restartCount", 0), "ls_oom_killed": oom}


class BePods:
    """The BE pods' cgroups, for the phases: frozen (LS alone) or thawed, and set back to what the kubelet gives a
    BestEffort pod (no quota, 2 shares) when the agent stops (it leaves its limits in place)."""

    def __init__(self, uids: list[str]):
        from fuyao.qos import cgroups

        self.layout = cgroups.detect()
        found = cgroups.pod_cgroups(self.layout)
        self.pods = [found[uid] for uid in uids]

    def _dirs(self, controller: str) -> list[Path]:
        from fuyao.qos import cgroups

        out = []
        for pod in self.pods:
            base = cgroups.controller_dir(self.layout, pod.cpu, controller)
            out += [base, *sorted(d for d in base.iterdir() if d.is_dir())]
        return out

    def freeze(self, frozen: bool) -> None:
        """Freezing a pod's cgroup freezes its containers too (v1 freezer, v2 ``cgroup.freeze``)."""
        from fuyao.qos import cgroups

        for pod in self.pods:
            d = cgroups.controller_dir(self.layout, pod.cpu, "freezer")
            if self.layout.version == 2:
                (d / "cgroup.freeze").write_text("1" if frozen else "0")
            else:
                (d / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def kubelet_defaults(self) -> None:
        """No quota, 2 shares, every CPU of the tier (the agent's cpuset policy narrows them)."""
        from fuyao.qos import cgroups

        for d in self._dirs("cpu"):  # the pod before its containers: v1 refuses a child quota above its parent's
            if self.layout.version == 2:
                (d / "cpu.max").write_text("max")
                (d / "cpu.weight").write_text("1")
            else:
                (d / "cpu.cfs_quota_us").write_text("-1")
                (d / "cpu.shares").write_text("2")
        tier = cgroups.format_cpus(cgroups.tier_cpus(self.layout))
        for d in self._dirs("cpuset"):  # the pod widens before its containers
            (d / "cpuset.cpus").write_text("" if self.layout.version == 2 else tier)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="LS requests per second (open loop)")
    parser.add_argument("--work-ms", type=float, default=4.0, help="CPU per LS request")
    parser.add_argument("--phase-seconds", type=float, default=30.0, help="one window of one phase")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the three phases' windows, interleaved")
    parser.add_argument("--burners", type=int, default=2, help="BE CPU burner pods")
    parser.add_argument("--burner-milli", type=int, default=0, help="each burner's batch-cpu request and limit "
                        "(default: the node's allocatable batch-cpu shared among the burners, as a scheduler filling "
                        "the node would)")
    parser.add_argument("--agent-config", help="the QoS agent's config file (e.g. cpuSuppress: {policy: cpuset})")
    parser.add_argument("--state-dir", default="/tmp/fuyao-colocation")
    parser.add_argument("--seed", type=int, default=11)
    add_out_argument(parser)
    args = parser.parse_args()
    from tests.support.runtime_image import build

    archive, image = build()
    iterations = calibrate(args.work_ms)
    down(args.state_dir)
    cluster = LocalCluster(args.state_dir)
    result: dict[str, Any] = {"benchmark": "colocation", "rate": args.rate, "work_ms": args.work_ms,
                              "phase_seconds": args.phase_seconds, "cpus": psutil.cpu_count(),
                              "burners": args.burners, "burner_milli": args.burner_milli}
    try:
        cluster.up()
        if args.agent_config:
            cluster.stop("fuyao-qos-agent")
            cluster.start("fuyao-qos-agent", ("--config", str(Path(args.agent_config).resolve())))
            result["agent_config"] = Path(args.agent_config).read_text()
        cluster.import_image(archive)
        wait_for(lambda: "default" in cluster.kubectl("get", "sa", "-o", "name"), 60, "the default service account")
        for i, obj in enumerate(ls_objects(image, iterations)):
            cluster.apply(obj, f"ls-{i}")
        wait_for(lambda: any(c.get("type") == "Ready" and c.get("status") == "True" for c in cluster.get_json(
            "pod", "ls-server")["status"].get("conditions", [])), 120, "the LS server Ready")
        service = cluster.get_json("service", "ls-server")["spec"]["clusterIP"]
        url = f"http://{service}"
        # BE pods go to colocation nodes only (the extender's qos-colocation plugin)
        cluster.kubectl("label", "node", cluster.node, "volcano.sh/colocation=true", "--overwrite")
        # warm-up, unmeasured: the fresh cluster's start-up work settles, the LS server's code paths warm, and the
        # agent's window (6 samples) forgets the start-up peaks before it sizes the batch resources
        asyncio.run(open_loop(url, args.rate, 20, args.seed + 100))
        time.sleep(15)
        # the agent's estimate moves with the window's peaks: wait until it offers every burner at least 50m (or
        # the --burner-milli asked for, so that runs compare), then stop it, so what is read is what the scheduler
        # sees
        # sees. Polled every 5 s: a kubectl every 0.1 s costs a good share of a core, which the agent counts as
        # system CPU and takes off the estimate it is waiting for
        need = args.burners * (args.burner_milli or 55)
        deadline = time.monotonic() + (300 if args.burner_milli else 90)
        while (offered := int(cluster.node_json()["status"]["allocatable"].get("kubernetes.io/batch-cpu", "0"))) < need:
            if time.monotonic() > deadline:
                raise SystemExit(f"the agent offers {offered}m of batch-cpu; {args.burners} burners need {need}m")
            time.sleep(5)
        cluster.stop("fuyao-qos-agent")
        batch = int(cluster.node_json()["status"]["allocatable"]["kubernetes.io/batch-cpu"])
        milli = args.burner_milli or max(50, int(batch * 0.95) // args.burners)
        result["batch_cpu_allocatable_milli"], result["burner_milli"] = batch, milli
        for i in range(args.burners):
            cluster.apply(burner(i, milli), f"burner-{i}")
        for i in range(args.burners):
            wait_for(lambda n=i: cluster.get_json("pod", f"be-burner-{n}")["status"].get("phase") == "Running",
                     90, f"burner {i} Running ({cluster.get_json('pod', f'be-burner-{i}')['status']}; node "
                         f"allocatable {cluster.node_json()['status']['allocatable']}; each burner {milli}m)")
        be = BePods([cluster.get_json("pod", f"be-burner-{i}")["metadata"]["uid"] for i in range(args.burners)])
        agent_running = False

        def agent(running: bool) -> None:
            nonlocal agent_running
            if running and not agent_running:
                cluster.start("fuyao-qos-agent")
                time.sleep(6)  # agent cycles: limits written, suppression measured
            elif not running and agent_running:
                cluster.stop("fuyao-qos-agent")
            agent_running = running

        order = list(PHASES)[::-1]  # L1, L2, L0 first; rotated each round
        windows: list[dict[str, Any]] = []
        try:
            for r in range(args.rounds):
                for name in order[r % 3:] + order[:r % 3]:
                    if name == "ls_be_without_agent":
                        agent(False)
                        be.freeze(False)
                        be.kubelet_defaults()
                    elif name == "ls_be_with_agent":
                        be.freeze(False)
                        agent(True)
                    else:
                        agent(True)
                        be.freeze(True)
                    window = phase(url, args.rate, args.phase_seconds, args.seed + 10 * r + len(windows))
                    windows.append({"round": r, "phase": name, **window})
                    print(f"round {r + 1} {PHASES[name]:18s} utilization {window['utilization']:.3f} p50 "
                          f"{window['p50_ms']} ms p99 {window['p99_ms']} ms", file=sys.stderr, flush=True)
        finally:
            be.freeze(False)
        agent(True)
        for i in range(args.burners):
            cluster.kubectl("delete", "pod", f"be-burner-{i}", "--wait=true", "--timeout=60s")
        for name in PHASES:
            mine = [w for w in windows if w["phase"] == name]
            result[name] = {"utilization": round(statistics.fmean(w["utilization"] for w in mine), 3),
                            "requests": sum(w["requests"] for w in mine), "errors": sum(w["errors"] for w in mine),
                            **latency_figures([x for w in mine for x in w["_latencies"]])}
        for window in windows:
            del window["_latencies"], window["cdf_ms"]
        result["windows"] = windows
        result["memory_pressure"] = memory_phase(cluster)
    finally:
        down(args.state_dir)

    u0, l0 = result["ls_alone"]["utilization"], result["ls_alone"]["p99_ms"]
    u2, l2 = result["ls_be_with_agent"]["utilization"], result["ls_be_with_agent"]["p99_ms"]
    l1 = result["ls_be_without_agent"]["p99_ms"]

    def window_p99(name: str, r: int) -> float:
        return next(w["p99_ms"] for w in result["windows"] if w["round"] == r and w["phase"] == name)

    result["ratios"] = {"U2/U0": round(u2 / u0, 2) if u0 else None, "L2/L0 (p99)": round(l2 / l0, 2) if l0 else None,
                        "L1/L0 (p99)": round(l1 / l0, 2) if l0 else None,
                        "per_round": [{"L2/L0": round(window_p99("ls_be_with_agent", r) / window_p99("ls_alone", r), 2),
                                       "L1/L0": round(window_p99("ls_be_without_agent", r)
                                                      / window_p99("ls_alone", r), 2)}
                                      for r in range(args.rounds)],
                        "goals": {"U2/U0": ">= 1.8", "L2/L0": "<= 1.15", "L1/L0": "visibly > 1"}}
    emit(result, args.out, "colocation", charts)


PHASES = {"ls_alone": "LS alone", "ls_be_without_agent": "LS + BE, no agent", "ls_be_with_agent": "LS + BE, agent"}


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    paths = [plots.grouped_bars(out / "colocation-phases.png", "colocation on the real kubelet (interleaved windows)", {
        "node CPU utilization": {label: result[key]["utilization"] for key, label in PHASES.items()},
        "LS p99 / LS-alone p99": {label: result[key]["p99_ms"] / result["ls_alone"]["p99_ms"]
                                  for key, label in PHASES.items() if result["ls_alone"]["p99_ms"]}},
        "fraction / ratio", goal=1.15, goal_label="goal: L2/L0 <= 1.15")]
    if "cdf_ms" in result["ls_alone"]:
        paths.append(plots.quantile_cdf(out / "colocation-ls-latency.png", "LS request latency (all windows)",
                                        {label: result[key]["cdf_ms"] for key, label in PHASES.items()}, "ms",
                                        log_x=True))
    return paths


if __name__ == "__main__":
    main()
