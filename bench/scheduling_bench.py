#!/usr/bin/env python3
"""Scheduling throughput with and without fuyao's extender, one run: a real kube-scheduler against a real
kube-apiserver with N NPU nodes run by KWOK (node objects with NPU capacity and the topology annotation; KWOK's
controller keeps them Ready and moves bound pods to Running; no kubelets) and M pods asking for 1 NPU each.
Without: kube-scheduler alone. With: the documented extender configuration (filter, prioritize and bind by fuyao;
nodeCacheCapable). Figure: pods bound per second, and the ratio with/without (goal >= 0.7; a public Go extender
measured 0.11). Prints one JSON object.

Usage: bench/scheduling_bench.py [--nodes 1000] [--pods 5000] [--no-bind] [--shortlist N] [--repeat N] [--no-kwok]
  --no-bind --shortlist 1: the extender's throughput profile (docs/scheduler-extender.md).
  --null-extender: each pair also runs a null extender (bench/null_extender, Go: filter passes the first N names,
  prioritize scores 0, bind posts the Binding): the floor of the extender protocol itself on this machine.
  FUYAO_BENCH_PROFILE=FILE: py-spy samples of the extender during its run (raw folded stacks; needs py-spy).
  FUYAO_BENCH_PPROF=DIR: Go CPU profiles (pprof) of kube-apiserver and kube-scheduler, 20 s from each run's start
  (DIR/<run>-<process>.pprof; read with go tool pprof -top).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots
from bench.report import add_out_argument, emit
from fuyao.kube_watch import ListWatch
from tests.support.apiserver import LocalApiServer, binary, free_port
from tests.support.k8s_objects import node, topology
from tests.support.kwok import KWOK_ANNOTATION, start_kwok

REPO = Path(__file__).resolve().parents[1]


def populate(server: LocalApiServer, nodes: int, kwok: bool) -> None:
    api = server.client()
    topo = topology()

    def make(i: int) -> None:
        raw = node(f"npu-{i:05d}", topo=topo)
        if kwok:
            raw["metadata"]["annotations"][KWOK_ANNOTATION] = "fake"
        server.add_node(raw, api=api, conditions=[
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "bench"}])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(make, range(nodes)))
    server.create([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default",
                                                                           "namespace": "default"}}])


NULL_EXTENDER_SRC = REPO / "bench" / "null_extender"
NULL_EXTENDER = Path.home() / ".cache" / "fuyao" / "bin" / "null-extender"


def build_null_extender() -> Path:
    """``bench/null_extender`` built with the Go toolchain (standard library only), rebuilt when its source changes."""
    newest = max(f.stat().st_mtime for f in NULL_EXTENDER_SRC.iterdir())
    if not NULL_EXTENDER.exists() or NULL_EXTENDER.stat().st_mtime < newest:
        NULL_EXTENDER.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-buildvcs=false"}
        subprocess.run(["go", "build", "-trimpath", "-o", str(NULL_EXTENDER), "."], cwd=NULL_EXTENDER_SRC, env=env,
                       check=True)
    return NULL_EXTENDER


def start_null_extender(server: LocalApiServer, port: int, shortlist: int, log: Any) -> subprocess.Popen[bytes]:
    token = server.root / "null-extender.token"
    token.write_text(server.tokens["admin"])
    token.chmod(0o600)
    return subprocess.Popen([str(build_null_extender()), "--listen", f"127.0.0.1:{port}", "--server", server.url,
                             "--ca", str(server.root / "certs" / "apiserver.crt"), "--token-file", str(token),
                             "--shortlist", str(shortlist), *os.environ.get("FUYAO_NULL_EXTENDER_ARGS", "").split()],
                            stdout=log, stderr=log)


def run(server: LocalApiServer, pods: int, with_extender: bool | str, tag: str, bind: bool = True,
        shortlist: int | None = None, kwok: subprocess.Popen[bytes] | None = None,
        strategy: str | None = None) -> dict[str, float]:
    """One run of ``pods`` pods: kube-scheduler alone (``with_extender`` False), with fuyao's extender (True) or
    with the null extender (``"null"``)."""
    extender = None
    port = 0
    config = {"apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration",
              "clientConnection": {"kubeconfig": server.kubeconfig_for("admin"), "qps": 500, "burst": 1000},
              "leaderElection": {"leaderElect": False}}
    if with_extender:
        port = free_port()
        log = open(server.root / f"extender-{tag}.log", "wb")  # noqa: SIM115
        if with_extender == "null":
            extender = start_null_extender(server, port, 16 if shortlist is None else shortlist, log)
        else:
            extender = subprocess.Popen([sys.executable, "-m", "fuyao.scheduler_extender.cli", "--listen",
                                         f"127.0.0.1:{port}", "--kubeconfig", server.kubeconfig_for("admin"),
                                         "--log-level", "warning", *([] if bind else ["--no-bind"]),
                                         *(["--config", str(extender_config(server, shortlist, strategy))]
                                           if shortlist is not None or strategy else [])],
                                        stdout=log, stderr=log)
        example = yaml.safe_load((REPO / "docs" / "examples" / "kube-scheduler-config.yaml").read_text())
        config["extenders"] = example["extenders"]
        config["extenders"][0]["urlPrefix"] = f"http://127.0.0.1:{port}"
        if not bind:  # kube-scheduler binds; the device plugin picks the dies on the chosen node
            del config["extenders"][0]["bindVerb"]
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
    pprof_dir = os.environ.get("FUYAO_BENCH_PPROF")
    scheduler_port = free_port() if pprof_dir else 0
    serving = [f"--secure-port={scheduler_port}"] + (
        ["--bind-address=127.0.0.1", "--authorization-always-allow-paths=/healthz,/debug/pprof/*",
         "--authentication-tolerate-lookup-failure"] if scheduler_port else [])
    scheduler = subprocess.Popen([binary("kube-scheduler"), f"--config={path}", *serving, "--v=0"],
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

    counter = BoundCounter(api, namespace, pods)
    processes = {"etcd": server.procs[0].pid, "kube-apiserver": server.procs[1].pid,
                 "kube-scheduler": scheduler.pid, **({"extender": extender.pid} if extender else {}),
                 **({"kwok": kwok.pid} if kwok else {})}
    cpu_before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    api_before = api_server_counts(server)
    profile = os.environ.get("FUYAO_BENCH_PROFILE")  # py-spy samples of the extender's run (raw, folded stacks)
    profiler = subprocess.Popen(["py-spy", "record", "--pid", str(extender.pid), "--nonblocking", "-r", "200",
                                 "-f", "raw", "-o", profile], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) \
        if profile and extender is not None else None
    started = time.monotonic()
    pprofs = [threading.Thread(target=go_profile, args=(url, token, Path(pprof_dir) / f"{tag}-{name}.pprof"))
              for name, url, token in (("kube-apiserver", server.url, server.tokens["admin"]),
                                       ("kube-scheduler", f"https://127.0.0.1:{scheduler_port}", None))
              ] if pprof_dir else []
    for thread in pprofs:
        thread.start()
    creator = threading.Thread(target=lambda: list(ThreadPoolExecutor(8).map(create, range(pods))))
    creator.start()
    counter.done.wait(1800)
    elapsed = (counter.last_bound or time.monotonic()) - started
    bound = len(counter.bound)
    cpu = {name: round(1000 * (cpu_seconds(pid) - cpu_before[name]) / max(bound, 1), 2)
           for name, pid in processes.items()}
    api_after = api_server_counts(server)
    api_served = {key: value - api_before.get(key, 0.0) for key, value in sorted(api_after.items())}
    creator.join()
    for thread in pprofs:
        thread.join()
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        profiler.wait(60)
    scheduler.terminate()
    result: dict[str, Any] = {"pods": pods, "bound": bound, "seconds": round(elapsed, 1),
                              "pods_per_s": round(bound / elapsed, 1), "cpu_ms_per_pod": cpu,
                              "api_server_per_pod": {key: round(served / max(bound, 1), 3)
                                                     for key, served in api_served.items() if served >= bound / 100}}
    if extender is not None:
        if with_extender is True:
            result["extender_calls"] = extender_calls(port)
        else:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
                result["extender_calls"] = json.loads(response.read())
        extender.terminate()
    counter.stop()
    delete_all_pods(api, namespace)
    return result


def delete_all_pods(api: Any, namespace: str) -> None:
    """Free the NPUs for the next run: no kubelet runs here, so pods go at once with grace period 0. A collection of
    thousands can outlast the API server's 60 s request timeout (504, the deletion stops part way): asked again
    until none is left."""
    from kubernetes.client.exceptions import ApiException

    while api.list_namespaced_pod(namespace, limit=1, _request_timeout=60).items:
        try:
            api.delete_collection_namespaced_pod(namespace, grace_period_seconds=0, _request_timeout=120)
        except ApiException as exc:
            if exc.status != 504:
                raise
            print(f"deleting the pods of {namespace} timed out (504): asking again", file=sys.stderr)
        time.sleep(0.5)


API_SERVER_SERIES = {"apiserver_request_total": "requests", "apiserver_watch_events_total": "watch events",
                     "apiserver_watch_events_sizes_sum": "watch bytes"}


def api_server_counts(server: LocalApiServer) -> dict[str, float]:
    """What the API server served so far, from its own metrics: requests by verb and resource, watch events and their
    bytes by kind (what each configuration asks of it, per bound pod in the result)."""
    request = urllib.request.Request(server.url + "/metrics",
                                     headers={"Authorization": f"Bearer {server.tokens['admin']}"})
    context = ssl.create_default_context(cafile=str(server.root / "certs" / "apiserver.crt"))
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            what = API_SERVER_SERIES.get(sample.name)
            if what is None:
                continue
            labels = sample.labels
            if what == "requests":
                key = f"{what} {labels.get('verb')} {labels.get('resource')}" + \
                    (f"/{labels['subresource']}" if labels.get("subresource") else "")
            else:
                key = f"{what} {labels.get('resource') or labels.get('kind')}"
            counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def extender_config(server: LocalApiServer, shortlist: int | None, strategy: str | None = None) -> Path:
    path = server.root / "extender.yaml"
    config: dict[str, Any] = {"version": "v1"}
    if shortlist is not None:
        config["shortlist"] = shortlist
    if strategy:
        config["plugins"] = {"deviceFit": {"strategy": strategy}}
    path.write_text(yaml.safe_dump(config))
    return path


def go_profile(base: str, token: str | None, out: Path, seconds: int = 20) -> None:
    """A Go process's CPU profile over its /debug/pprof (the test CA is not checked: loopback, bench only)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    request = urllib.request.Request(f"{base}/debug/pprof/profile?seconds={seconds}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=seconds + 30, context=context) as response:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(response.read())
    except OSError as exc:
        print(f"no profile from {base}: {exc}", file=sys.stderr)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (this machine has 2 cores: the figure is CPU-bound)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BoundCounter:
    """Counts the pods of a namespace that have a node, fed by :class:`fuyao.kube_watch.ListWatch` (raw JSON
    events: polling lists of thousands of pods would cost the API server and this process more CPU than the
    scheduler under test; a watch the API server closes because its reader fell behind is resumed)."""

    def __init__(self, api: Any, namespace: str, want: int):
        self.bound: set[str] = set()
        self.last_bound: float | None = None
        self.done = threading.Event()
        self._want = want
        self._watch = ListWatch("bench-pods", api.list_namespaced_pod, self, kwargs={"namespace": namespace},
                                watch_timeout_s=1800).start()

    def replace(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            self.upsert(item)

    def upsert(self, obj: dict[str, Any]) -> None:
        if (obj.get("spec") or {}).get("nodeName") and obj["metadata"]["name"] not in self.bound:
            self.bound.add(obj["metadata"]["name"])
            self.last_bound = time.monotonic()
            if len(self.bound) >= self._want:
                self.done.set()

    def delete(self, obj: dict[str, Any]) -> None:
        pass  # a bound pod stays counted

    def stop(self) -> None:
        self._watch.stop()


def extender_calls(port: int) -> dict[str, dict[str, float]]:
    """Per verb: answered requests by result and mean latency, from the extender's /metrics (a pod scheduled
    more than once — a failed bind, a retry — shows as more calls than pods)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    calls: dict[str, dict[str, float]] = {}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            verb = sample.labels.get("verb", "")
            if sample.name == "fuyao_extender_decisions_total":
                calls.setdefault(verb, {})[sample.labels["result"]] = sample.value
            elif sample.name == "fuyao_extender_api_calls_total":
                calls.setdefault(f"api_{sample.labels['call']}", {})[sample.labels["code"]] = sample.value
            elif sample.name == "fuyao_extender_api_call_duration_seconds_sum":
                sums[f"api_{sample.labels['call']}"] = sample.value
            elif sample.name == "fuyao_extender_api_call_duration_seconds_count":
                counts[f"api_{sample.labels['call']}"] = sample.value
            elif sample.name == "fuyao_extender_request_duration_seconds_sum":
                sums[verb] = sample.value
            elif sample.name == "fuyao_extender_request_duration_seconds_count":
                counts[verb] = sample.value
    for verb, count in counts.items():
        if count:
            calls.setdefault(verb, {})["mean_ms"] = round(1000 * sums.get(verb, 0.0) / count, 2)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--no-bind", action="store_true",
                        help="the extender filters and scores only (no bindVerb): kube-scheduler binds")
    parser.add_argument("--shortlist", type=int, help="the extender's shortlist (default: its config default, 16)")
    parser.add_argument("--strategy", choices=("binpack", "spread"),
                        help="the extender's device-fit strategy (default: its config default, binpack; binpack fills "
                             "nodes, so kube-scheduler's own filter passes over more full nodes per pod)")
    parser.add_argument("--no-kwok", action="store_true",
                        help="plain node objects: no KWOK controller (no heartbeats, pods stay Pending after binding)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs of runs (alone and with the extender, in alternating order), on the same API "
                             "server and nodes; the ratio reported is the median of the pairs' ratios (on a shared "
                             "machine one pair can be off by 0.1 either way)")
    parser.add_argument("--null-extender", action="store_true",
                        help="each pair also runs the null extender (bench/null_extender, built with Go): the "
                             "protocol's floor, reported as null_ratios")
    add_out_argument(parser)
    args = parser.parse_args()
    if args.null_extender:
        build_null_extender()  # fail before the API server starts
    server = LocalApiServer(extra_args=("--max-requests-inflight=2000", "--max-mutating-requests-inflight=1000"))
    server.start()
    pairs = []
    nulls: list[dict[str, Any]] = []
    kwok = None
    try:
        populate(server, args.nodes, kwok=not args.no_kwok)
        kwok = None if args.no_kwok else start_kwok(server)
        for i in range(max(1, args.repeat)):
            # alternate which goes first: the second of a pair meets a bigger etcd history
            order: list[bool | str] = [False, True] if i % 2 == 0 else [True, False]
            if args.null_extender:
                order.insert(i % 3, "null")
            runs = {extended: run(server, args.pods, extended,
                                  f"{ {False: 'plain', True: 'fuyao', 'null': 'null'}[extended]}-{i}",
                                  bind=not args.no_bind, shortlist=args.shortlist, kwok=kwok,
                                  strategy=args.strategy)
                    for extended in order}
            without, with_extender = runs[False], runs[True]
            pairs.append((without, with_extender))
            floor = ""
            if "null" in runs:
                nulls.append(runs["null"])
                floor = (f", null extender {runs['null']['pods_per_s']} pods/s, ratio "
                         f"{runs['null']['pods_per_s'] / without['pods_per_s']:.2f}")
            print(f"pair {i + 1}: alone {without['pods_per_s']} pods/s, with the extender "
                  f"{with_extender['pods_per_s']} pods/s, ratio "
                  f"{with_extender['pods_per_s'] / without['pods_per_s']:.2f}{floor}", file=sys.stderr, flush=True)
    finally:
        if kwok is not None:
            kwok.terminate()
            kwok.wait(30)
        server.stop()
    ratios = [round(w["pods_per_s"] / a["pods_per_s"], 2) for a, w in pairs]
    middle = sorted(range(len(pairs)), key=lambda i: ratios[i])[len(pairs) // 2]  # the median pair (odd counts)
    result = {"benchmark": "scheduling", "nodes": args.nodes, "kwok": not args.no_kwok,
              "extender_binds": not args.no_bind,
              "shortlist": args.shortlist, "strategy": args.strategy,
              "kube_scheduler_alone": pairs[middle][0],
              "with_fuyao_extender": pairs[middle][1],
              "ratio": ratios[middle], "goal_ratio": 0.8, "public_go_extender_ratio": 0.11}
    if len(pairs) > 1:
        result["ratios"] = ratios
        result["median_pair"] = middle + 1
    result["pairs"] = [{"alone_pods_per_s": a["pods_per_s"], "with_extender_pods_per_s": w["pods_per_s"]}
                       for a, w in pairs]
    if nulls:
        null_ratios = [round(n["pods_per_s"] / a["pods_per_s"], 2) for (a, _), n in zip(pairs, nulls, strict=True)]
        result["null_extender"] = nulls[middle]
        result["null_ratios"] = null_ratios
        result["null_ratio"] = sorted(null_ratios)[len(null_ratios) // 2]
        for pair, n in zip(result["pairs"], nulls, strict=True):
            pair["null_extender_pods_per_s"] = n["pods_per_s"]
    emit(result, args.out, "scheduling", charts)


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    pairs = result.get("pairs") or [{"alone_pods_per_s": result["kube_scheduler_alone"]["pods_per_s"],
                                     "with_extender_pods_per_s": result["with_fuyao_extender"]["pods_per_s"]}]
    title = f"{result['nodes']} nodes: scheduling throughput, kube-scheduler alone and with the extender"
    return [plots.grouped_bars(out / "scheduling.png", title, {
        f"pair {i + 1}": {"kube-scheduler alone": p["alone_pods_per_s"],
                          "with the fuyao extender": p["with_extender_pods_per_s"]} for i, p in enumerate(pairs)},
        "pods / s"),
        plots.bars(out / "scheduling-ratio.png", "with the extender / alone (median pair marked)", {
            f"pair {i + 1}{' (median)' if i + 1 == result.get('median_pair', 1) else ''}":
                p["with_extender_pods_per_s"] / p["alone_pods_per_s"] for i, p in enumerate(pairs)},
            "ratio", goal=result["goal_ratio"], goal_label=f"goal {result['goal_ratio']}")]


if __name__ == "__main__":
    main()
