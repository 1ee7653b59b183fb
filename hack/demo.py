"""The fuyao demo (``hack/demo.sh``): the whole stack on a local single-node cluster with simulated NPUs.

1. the local cluster (``tests.support.cluster``, reused when one is running), with no fuyao host process;
2. fuyao's runtime image, built without Docker and imported into the node's containerd;
3. ``helm install`` of the four charts (device plugin, scheduler extender, QoS agent, router + KV-cache index);
4. NPUs per node as the kubelet reports them (advertised by the device plugin pod);
5. a prefill/decode-disaggregated inference service of engine-simulator pods requesting NPUs, and where each pod
   landed and why (the extender's assignment and explanation);
6. a shared-prefix workload through a round-robin router (the baseline: a second release of the same chart) and
   through the chart's prefix-aware router, on the same engines, with different prefixes per run: TTFT p50/p88 and the
   engines' prefix-cache hit rate;
7. Prometheus (the Prometheus Operator's, scraping the charts' ServiceMonitors and the engines' PodMonitor): the
   design doc's queries answered, PNG charts of TTFT and hit rate per router and of NPU allocation over the demo;
8. where to look next.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.router_bench import comparison_lines, shared_prefix, steady_state_run  # noqa: E402
from fuyao.contracts import (  # noqa: E402
    ANNOTATION_NODE_TOPOLOGY,
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_NPU,
    RESOURCE_VNPU,
    NodeTopology,
    PodAssignment,
    parse_annotation,
)
from tests.support.apiserver import binary  # noqa: E402
from tests.support.charts import CHARTS, NAMESPACE, helm, install_stack  # noqa: E402
from tests.support.cluster import EXTENDER_CLUSTER_IP, LocalCluster, down  # noqa: E402
from tests.support.engines import http_json, metric_total  # noqa: E402
from tests.support.inference_service import pd_service  # noqa: E402
from tests.support.monitoring import Monitoring  # noqa: E402
from tests.support.polling import wait_for  # noqa: E402

SERVICE = "chat"
MODEL = "fuyao-sim-7b"
STEPS = 8
BASELINE = "baseline"
"""The round-robin baseline: a second helm release of ai-inference-optimization (router only, no KV index)."""


class Progress:
    def __init__(self, steps: int = STEPS) -> None:
        self.step = 0
        self.steps = steps
        self.started = time.monotonic()
        self.wall_started = time.time()
        self.timings: list[tuple[str, float]] = []

    def begin(self, title: str) -> float:
        self.step += 1
        print(f"\n[{self.step}/{self.steps}] {title}", flush=True)
        return time.monotonic()

    def done(self, title: str, since: float) -> None:
        took = time.monotonic() - since
        self.timings.append((title, took))
        print(f"      done in {took:.1f} s", flush=True)


def say(line: str) -> None:
    print(f"      {line}", flush=True)


def cluster_up(state: Path, fresh: bool, monitoring: bool = True) -> tuple[LocalCluster, bool]:
    """The running demo cluster when there is a healthy one (components=chart), else a new one; with the monitoring
    stack (installed on a reused cluster that lacks it)."""
    running = LocalCluster.running(state)
    if running is not None:
        if not fresh and running.components == "chart":
            try:
                ready = running.node_ready()
            except Exception:
                ready = False
            if ready:
                if monitoring and not Monitoring(running).ready():
                    Monitoring(running).install()
                return running, True
        down(state)
    return LocalCluster(state, components="chart", monitoring=monitoring).up(), False


def npu_table(cluster: LocalCluster) -> None:
    nodes = cluster.get_json("nodes")["items"]
    say(f"{'NODE':<14} {'NPU capacity':>12} {'allocatable':>12} {'vNPU':>6}  labels")
    for node in nodes:
        status, labels = node["status"], node["metadata"].get("labels", {})
        shown = ", ".join(f"{k}={v}" for k, v in sorted(labels.items())
                          if k in ("accelerator", "accelerate-type", "npu.openfuyao.com/device-count",
                                   "node.kubernetes.io/npu-driver"))
        say(f"{node['metadata']['name']:<14} {status['capacity'].get(RESOURCE_NPU, '0'):>12} "
            f"{status['allocatable'].get(RESOURCE_NPU, '0'):>12} {status['allocatable'].get(RESOURCE_VNPU, '0'):>6}"
            f"  {shown}")


def deploy_service(cluster: LocalCluster, image: str, blocks: int, prefill: int, decode: int) -> list[dict[str, Any]]:
    objects = pd_service(SERVICE, image, model=MODEL, replicas={"prefill": prefill, "decode": decode}, blocks=blocks)
    cluster.apply({"apiVersion": "v1", "kind": "List", "items": objects}, "demo-service")
    say(f"prefill Deployment: {prefill} pods x 1 NPU, decode Deployment: {decode} pods x 1 NPU, Service '{SERVICE}' "
        "(inference.openfuyao.com/enable-router: true)")

    for role in ("prefill", "decode"):  # a changed spec rolls: wait until only the new pods are left
        cluster.kubectl("rollout", "status", f"deployment/{SERVICE}-{role}", "--timeout=180s")

    def ready() -> list[dict[str, Any]] | None:
        pods = cluster.get_json("pods", "-l", f"app={SERVICE}")["items"]
        up = [p for p in pods if p["metadata"].get("deletionTimestamp") is None and any(
            c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
        return up if len(up) == len(pods) == prefill + decode else None

    return wait_for(ready, 120, f"{prefill + decode} engine pods Ready")  # type: ignore[no-any-return]


def placement(cluster: LocalCluster, pods: list[dict[str, Any]]) -> None:
    """Each pod's node and devices (the extender's ``npu.openfuyao.com/assigned``), where those devices sit in the
    node's topology, and the extender's last decision for it (``/explain``)."""
    topologies = {n["metadata"]["name"]: parse_annotation(ANNOTATION_NODE_TOPOLOGY, raw, NodeTopology)
                  for n in cluster.get_json("nodes")["items"]
                  if (raw := n["metadata"].get("annotations", {}).get(ANNOTATION_NODE_TOPOLOGY))}
    say(f"{'POD':<32} {'PHASE':<8} {'NODE':<11} {'NPU':<12} {'group/NUMA':<11} extender")
    for pod in sorted(pods, key=lambda p: (p["metadata"]["labels"]["phase"], p["metadata"]["name"])):
        meta, node = pod["metadata"], pod["spec"]["nodeName"]
        raw = meta.get("annotations", {}).get(ANNOTATION_POD_ASSIGNED)
        topology = topologies.get(node)
        held = [d for d, t in topology.devices.items() if t.holder == f"{meta['namespace']}/{meta['name']}"] \
            if topology else []  # what the kubelet gave it (published by the device plugin), else the plan
        devices = held or ([d for c in parse_annotation(ANNOTATION_POD_ASSIGNED, raw, PodAssignment).containers
                            for d in c.devices] if raw else [])
        where = ",".join(f"{t.group or '-'}/{t.numa_node if t.numa_node is not None else '-'}"
                         for d in devices if topology and (t := topology.devices.get(d)))
        explained = explain(f"{meta['namespace']}/{meta['name']}")
        say(f"{meta['name']:<32} {meta['labels']['phase']:<8} {node:<11} {','.join(devices) or '-':<12} "
            f"{where or '-':<11} {why(explained)}")
    prefill_nodes = {p["spec"]["nodeName"] for p in pods if p["metadata"]["labels"]["phase"] == "prefill"}
    decode = [p for p in pods if p["metadata"]["labels"]["phase"] == "decode"]
    joined = sum(1 for p in decode if p["spec"]["nodeName"] in prefill_nodes)
    say(f"decode pods on a node of their group's prefill pods: {joined}/{len(decode)} (the extender's pd-affinity: "
        "the KV cache moves between them without leaving the node)")


def explain(pod: str, attempts: int = 8) -> dict[str, Any]:
    """The extender's /explain of ``pod`` through its Service. Each of the chart's two replicas explains the decisions
    it made itself, and kube-proxy picks one per connection: a 404 from the other replica is asked again."""
    import urllib.error

    error = ""
    for _ in range(attempts):
        try:
            return http_json(f"http://{EXTENDER_CLUSTER_IP}:8888/explain/{pod}")  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            error = str(exc)
            if exc.code != 404:
                break
        except OSError as exc:
            error = str(exc)
            break
    return {"error": error}


def why(explained: dict[str, Any]) -> str:
    if "error" in explained:
        return f"(no explanation: {explained['error']})"
    decision = explained.get("prioritize") or explained.get("filter") or {}
    rejected = decision.get("rejected") or {}
    parts = [f"filter: {len(rejected)} node(s) rejected" + (f" ({next(iter(rejected.values()))})" if rejected else
                                                           ", devices chosen and bound by the extender")]
    totals = decision.get("totals") or {}
    if len(totals) > 1:
        best = max(totals, key=totals.get)  # type: ignore[arg-type]
        parts.append(f"best of {len(totals)} scored: {best} {totals[best]:.2f}")
    return "; ".join(parts)


def engine_counters(pods: list[dict[str, Any]]) -> tuple[float, float]:
    hits = queries = 0.0
    for pod in pods:
        if pod["metadata"]["labels"]["phase"] != "prefill":
            continue
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8000/metrics", timeout=10) as response:
            text = response.read().decode()
        hits += metric_total(text, "vllm:prefix_cache_hits_total")
        queries += metric_total(text, "vllm:prefix_cache_queries_total")
    return hits, queries


def workload_run(url: str, run: str, args: argparse.Namespace, pods: list[dict[str, Any]]) -> dict[str, Any]:
    """The same arrivals and prompt shapes for every run (one seed), measured in steady state
    (``steady_state_run``); the hit rate from the prefill engines' own vLLM counters."""
    jobs = shared_prefix(args.rate, args.duration, args.seed, groups=args.groups, prefix_words=args.prefix_words,
                         output=16)
    for job in jobs:
        job.body["model"] = MODEL
    return steady_state_run(url, jobs, run, lambda: engine_counters(pods))


def baseline_router(cluster: LocalCluster, image: str) -> str:
    """A second release of the router chart with strategy round-robin and no KV-cache index, discovering the same
    Service (scraped by Prometheus like the first); its URL."""
    repository, _, tag = image.rpartition(":")
    values = {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
              "configMapName": f"{BASELINE}-router-config",
              "router": {"replicas": 1, "strategy": "round-robin", "pdSeparation": {"enabled": True},
                         # no KV-cache lookups at all (not even the router's record of its own choices)
                         "config": {"kv_cache": {"enabled": False}},
                         "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}}},
              "kvCache": {"enabled": False},
              "monitoring": {"serviceMonitor": {"enabled": True, "interval": "5s"}}}
    path = cluster.dir / "values-baseline.yaml"
    path.write_text(json.dumps(values))
    helm("upgrade", "--install", BASELINE, str(CHARTS / "ai-inference-optimization"), "--namespace", NAMESPACE,
         "--values", str(path), "--wait", "--timeout", "180s", kubeconfig=cluster.dir / "admin.kubeconfig")
    service = cluster.get_json("service", "-n", NAMESPACE, f"{BASELINE}-ai-inference-optimization-router")
    return f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"


def wait_serving(url: str, backends: int) -> None:
    def serving() -> bool:
        try:
            listed = http_json(url + "/debug/backends")
        except OSError:
            return False
        return sum(1 for b in listed.values() if b["healthy"]) >= backends

    wait_for(serving, 90, f"{backends} healthy backends at {url}")


DESIGN_DOC_QUERIES = (
    ("P88 latency", "histogram_quantile(0.88, sum by (le) (rate(inference_latency_bucket[5m])))"),
    ("KV hit rate (index)",
     'sum(rate(kv_cache_hits{layer="index"}[5m])) / sum(rate(kv_cache_requests{layer="index"}[5m]))'),
    ("NPU utilization", "avg(npu_utilization)"),
    ("extender decisions", 'sum(fuyao_extender_decisions_total{verb="filter"})'),
)


def design_doc_answers(prometheus: Monitoring) -> list[tuple[str, str, str]]:
    """The design doc's queries as Prometheus answers them now: (title, query, value)."""
    answers = []
    for title, expr in DESIGN_DOC_QUERIES:
        result = prometheus.query(expr)
        value = ", ".join(f"{float(r['value'][1]):.3g}" for r in result) or "(no data)"
        answers.append((title, expr, value))
    return answers


def demo_plots(prometheus: Monitoring, windows: dict[str, tuple[float, float]], since: float,
               out: Path) -> list[Path]:
    """PNG charts from Prometheus's query_range: TTFT p88 and the engines' prefix-cache hit rate of each router's
    run (x: seconds into the run), and NPUs allocated over the whole demo."""
    from bench import plots

    routers = {"round-robin": f"{BASELINE}-ai-inference-optimization-router",
               "prefix-aware": "ai-inference-optimization-router"}
    ttft, hits = {}, {}
    for run, (start, end) in windows.items():
        selector = '{service="' + routers[run] + '"}'
        expr = f"histogram_quantile(0.88, sum by (le) (rate(inference_ttft_seconds_bucket{selector}[20s])))"
        ttft[run] = _series(prometheus.query_range(expr, start, end + 10, 5), start)
        expr = "sum(rate(vllm:prefix_cache_hits_total[20s])) / sum(rate(vllm:prefix_cache_queries_total[20s]))"
        hits[run] = _series(prometheus.query_range(expr, start, end + 10, 5), start)
    now = time.time()
    held = prometheus.query_range("sum(npu_allocated)", since, now, 5)
    allocated = {"NPUs held by containers": _series(held, since)}
    return [plots.lines(out / "ttft-p88.png", "TTFT p88 through the router (Prometheus)", ttft,
                        "seconds into the run", "seconds"),
            plots.lines(out / "prefix-hit-rate.png", "engines' prefix-cache hit rate (Prometheus)", hits,
                        "seconds into the run", "hit rate", ylim=(0, 1)),
            plots.lines(out / "npu-allocation.png", "NPU allocation on the node (npu_allocated)", allocated,
                        "seconds into the demo", "NPUs", ylim=(0, 8.5), steps=True)]


def _series(result: list[dict[str, Any]], origin: float) -> tuple[list[float], list[float]]:
    if not result:
        return [], []
    points = [(float(t) - origin, float(v)) for t, v in result[0]["values"] if v not in ("NaN", "+Inf", "-Inf")]
    return [p[0] for p in points], [p[1] for p in points]


def operator_demo(args: argparse.Namespace) -> None:
    """The design doc's deployment path, timed: an empty cluster, ``helm install npu-operator`` with its flags, the
    policy's status turning ``running``, the node labelled and its NPUs allocatable, the validation pod's
    ``npu-smi info``."""
    from tests.support.charts import OPERATOR_NAMESPACE, design_doc_flags, install_operator
    from tests.support.runtime_image import build

    progress = Progress(steps=5)
    since = progress.begin("an empty local cluster (no fuyao component, no NPU label)")
    state = args.state_dir if args.state_dir != DEFAULT_STATE else Path("/tmp/fuyao-operator-demo")
    down(state)
    cluster = LocalCluster(state, components="chart").up()
    progress.done("cluster", since)

    since = progress.begin("fuyao runtime image (the operator and every component; layers cached by content)")
    archive, tag = build()
    cluster.import_image(archive)
    progress.done("image", since)

    driver = json.loads(cluster.fake_npu_smi("fake", "show"))["driver_version"]
    since = progress.begin(f"helm install npu-operator {' '.join(design_doc_flags(driver))}")
    took = install_operator(cluster, tag, log=say)
    progress.done("operator", since)

    since = progress.begin("kubectl get npuclusterpolicy cluster; NPUs per node")
    for line in cluster.kubectl("get", "npuclusterpolicy", "cluster", "-o", "wide").splitlines():
        say(line)
    out = cluster.kubectl("get", "npuclusterpolicy", "cluster", "-o",
                          "jsonpath={range .status.componentStatuses[*]}{.name}={.state.type}{' '}{end}")
    say(out)
    npu_table(cluster)
    progress.done("status", since)

    since = progress.begin("the validation pod (one NPU) ran npu-smi info")
    pod = cluster.get_json("pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/name=npu-validator")["items"][0]
    for line in cluster.pod_log(OPERATOR_NAMESPACE, pod["metadata"]["name"], "validator").splitlines()[:16]:
        say(line.split(" ", 3)[-1] if " stdout F " in line or " stderr F " in line else line)
    progress.done("validated", since)
    total = time.monotonic() - progress.started
    print(f"""
      design doc's path: helm install to every component running in {took['every component running']:.0f} s \
(goal: 3 minutes warm; the design doc says 9)
      whole demo {total:.0f} s ({', '.join(f'{t} {s:.0f} s' for t, s in progress.timings)})
      steps after helm install: {', '.join(f'{k} at {v:.0f} s' for k, v in took.items())}
      export KUBECONFIG={cluster.dir / 'admin.kubeconfig'}    (kubectl: {binary('kubectl')})
      kubectl get npuclusterpolicy cluster -o yaml     the status, per component and node
      kubectl describe npuclusterpolicy cluster        state changes as events
      docs/npu-operator.md
      stop: hack/local-down.sh --state-dir {cluster.dir}
""".rstrip())


DEFAULT_STATE = Path("/tmp/fuyao-demo")


def main() -> None:
    parser = argparse.ArgumentParser(prog="hack/demo.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["sim", "vllm"], default="sim", help="sim: engine-simulator pods on the "
                        "cluster (this demo); vllm: two real vLLM CPU engines as host processes (hack/demo_vllm.py)")
    parser.add_argument("--mode", choices=["charts", "operator"], default="charts",
                        help="charts: the four charts, then an inference service and a routing comparison; "
                             "operator: the design doc's path (helm install npu-operator on an empty cluster), timed")
    parser.add_argument("--state-dir", default=DEFAULT_STATE, type=Path,
                        help="default /tmp/fuyao-demo (operator mode: /tmp/fuyao-operator-demo, always fresh)")
    parser.add_argument("--fresh", action="store_true", help="replace a running demo cluster")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second of the workload")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run")
    parser.add_argument("--blocks", type=int, default=192, help="KV blocks per engine (16 tokens each)")
    parser.add_argument("--prefill", type=int, default=4, help="prefill engine pods (1 NPU each)")
    parser.add_argument("--decode", type=int, default=2, help="decode engine pods (1 NPU each)")
    parser.add_argument("--groups", type=int, default=8, help="distinct shared prefixes")
    parser.add_argument("--prefix-words", type=int, default=900, help="words (~tokens) per shared prefix")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.mode == "operator":
        operator_demo(args)
        return
    if args.prefill < 1 or args.decode < 1 or args.prefill + args.decode > 8:
        parser.error(f"--prefill {args.prefill} --decode {args.decode}: each at least 1, together at most the "
                     "node's 8 NPUs")
    if args.rate <= 0 or args.duration <= 0 or args.groups < 1 or args.prefix_words < 1 or args.blocks < 16:
        parser.error("--rate and --duration must be positive, --groups and --prefix-words at least 1, --blocks "
                     "at least 16")
    progress = Progress()

    since = progress.begin("local cluster: etcd, kube-apiserver, controller-manager, kube-scheduler (extender: "
                           "the chart's), kubelet + containerd, kube-proxy, CoreDNS")
    cluster, reused = cluster_up(args.state_dir, args.fresh)
    say(("reused the running cluster in " if reused else "started a new cluster in ") + str(args.state_dir))
    progress.done("cluster", since)

    since = progress.begin("fuyao runtime image (Debian minbase + python3 + fuyao; layers cached by content)")
    from tests.support.runtime_image import build

    archive, tag = build()
    cluster.import_image(archive)
    say(f"{tag} imported into the node's containerd")
    progress.done("image", since)

    since = progress.begin(f"helm install the stack into namespace {NAMESPACE}")
    took = install_stack(cluster, tag, log=say, monitoring=True, extra={  # the content tag: a changed image rolls pods
        "ai-inference-optimization": {"monitoring": {"enginePodMonitor": {"enabled": True, "interval": "5s"}}}})
    say("Ready: " + ", ".join(f"{chart} {seconds:.0f} s" for chart, seconds in took.items()))
    progress.done("charts", since)

    since = progress.begin("NPUs per node (advertised by the npu-device-plugin pod, as the kubelet reports them)")
    wait_for(lambda: cluster.node_json()["status"]["allocatable"].get(RESOURCE_NPU, "0") != "0", 60, "NPUs")
    npu_table(cluster)
    progress.done("npus", since)

    since = progress.begin("a P/D-disaggregated inference service of engine-simulator pods requesting NPUs")
    pods = deploy_service(cluster, tag, args.blocks, args.prefill, args.decode)
    placement(cluster, pods)
    progress.done("service", since)

    since = progress.begin(f"shared-prefix workload ({args.rate:g} req/s for {args.duration:g} s, {args.groups} "
                           f"prefixes of ~{args.prefix_words} tokens): round-robin vs fuyao prefix-aware, same engines")
    router = cluster.get_json("service", "-n", NAMESPACE, "ai-inference-optimization-router")
    chart_url = f"http://{router['spec']['clusterIP']}:{router['spec']['ports'][0]['port']}"
    baseline_url = baseline_router(cluster, tag)
    wait_serving(baseline_url, args.prefill + args.decode)
    wait_serving(chart_url, args.prefill + args.decode)
    windows: dict[str, tuple[float, float]] = {}
    say(f"round-robin (baseline: helm release '{BASELINE}' of the same chart, strategy round-robin) ...")
    started = time.time()
    baseline = workload_run(baseline_url, "round-robin", args, pods)
    windows["round-robin"] = (started, time.time())
    say("prefix-aware (the chart's router Service, KV-cache index fed by the engines' KV events) ...")
    started = time.time()
    fuyao = workload_run(chart_url, "prefix-aware", args, pods)
    windows["prefix-aware"] = (started, time.time())
    say("")
    for line in comparison_lines([("round-robin (baseline)", baseline), ("fuyao prefix-aware (chart)", fuyao)]):
        say(line)
    if baseline["p50"] and fuyao["p50"]:
        say(f"TTFT p50: {baseline['p50'] / fuyao['p50']:.1f}x lower with prefix-aware routing "
            f"(p88 {baseline['p88'] / fuyao['p88']:.1f}x)")
    progress.done("workload", since)

    since = progress.begin("Prometheus: the design doc's queries, and charts of the runs (query_range)")
    prometheus = Monitoring(cluster)
    time.sleep(12)  # two more scrapes and rule evaluations after the last request
    for title, expr, value in design_doc_answers(prometheus):
        say(f"{title:<20} {value:<28} {expr}")
    for path in demo_plots(prometheus, windows, progress.wall_started, args.state_dir / "plots"):
        say(f"wrote {path}")
    progress.done("prometheus", since)

    progress.begin("where to look next")
    print(f"""
      total {time.monotonic() - progress.started:.0f} s ({', '.join(f'{t} {s:.0f} s' for t, s in progress.timings)})
      export KUBECONFIG={cluster.dir / 'admin.kubeconfig'}    (kubectl: {binary('kubectl')})
      kubectl get pods -A -o wide                      the stack and the engines
      curl http://{EXTENDER_CLUSTER_IP}:8888/explain/default/<pod>   why a pod went where it did
      curl {chart_url}/debug/backends        the router's view of the engines
      curl {chart_url}/metrics                router metrics (TTFT, latency, errors)
      hack/diagnose.sh --kubeconfig {cluster.dir / 'admin.kubeconfig'}   read-only health report
      {prometheus.prometheus_url()}/api/v1/alerts   Prometheus (the operator's; docs/monitoring.md)
      kubectl top pods -A; kubectl logs / exec         metrics-server; the kubelet's authenticated server
      charts/ai-inference-optimization/dashboards/fuyao.json   Grafana dashboard (import it)
      docs/install.md (real clusters), docs/operations.md (alerts, dashboard, upgrades)
      logs: {cluster.dir / 'logs'}   pod logs: {cluster.dir / 'pod-logs'}
      stop: hack/local-down.sh --state-dir {cluster.dir}
""".rstrip())


if __name__ == "__main__":
    main()
