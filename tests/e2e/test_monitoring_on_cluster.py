"""Monitoring and autoscaling on the real local cluster (issue 23): the Prometheus Operator's Prometheus scraping
every fuyao ServiceMonitor and evaluating the charts' PrometheusRules, metrics-server behind ``kubectl top`` and the
HPA, KEDA scaling decode engines on their queue depth, and ``kubectl logs`` / ``exec`` through the kubelet's
authenticated server. The cluster runs fuyao from its charts (``components="chart"``) with ``--monitoring`` values,
as ``hack/local-up.sh --components chart --monitoring`` and ``hack/install-charts.sh install --monitoring`` do."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fuyao.contracts import (
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_NPU,
    RESOURCE_VNPU,
    PodAssignment,
    parse_annotation,
)
from tests.support.charts import NAMESPACE, install_stack
from tests.support.cluster import LocalCluster
from tests.support.inference_service import pd_service
from tests.support.monitoring import Monitoring
from tests.support.polling import wait_for

pytestmark = pytest.mark.e2e

SERVICE = "chat"
ROUTER = "ai-inference-optimization-router"
DESIGN_DOC_QUERIES = {
    "P88 latency": "histogram_quantile(0.88, rate(inference_latency_bucket[5m]))",
    "KV hit rate": "rate(kv_cache_hits[5m]) / rate(kv_cache_requests[5m])",
    "NPU utilization": "npu_utilization",
    "extender decisions": "sum by (verb, result) (fuyao_extender_decisions_total)",
}
VNPU_DEVICE = "7"
"""The die carved into vNPUs (static mode) for the HPA's vNPU inference Deployment; the others stay whole NPUs."""


@pytest.fixture(scope="module")
def built() -> tuple[Path, str]:
    from tests.support.runtime_image import build

    return build()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, built: tuple[Path, str]) -> Iterator[LocalCluster]:
    from tests.support.cluster import running

    with running(tmp_path_factory.mktemp("monitoring-cluster", numbered=True), built[0], components="chart",
                 monitoring=True) as local:
        yield local


@pytest.fixture(scope="module")
def monitoring(cluster: LocalCluster) -> Monitoring:
    return Monitoring(cluster)


@pytest.fixture(scope="module")
def stack(cluster: LocalCluster, built: tuple[Path, str]) -> dict[str, float]:
    extra = {
        "npu-device-plugin": {
            "vnpu": {"mode": "static", "config": {"devices": [{"device_id": VNPU_DEVICE, "vnpu_count": 4,
                                                                 "vnpu_memory": "8GB"}]}},
            # short enough for a test to see it fire; the default is 5m
            "metrics": {"prometheusRule": {"unhealthyFor": "10s"}}},
        "ai-inference-optimization": {
            "monitoring": {"enginePodMonitor": {"enabled": True, "interval": "5s"}},
            "autoscaling": {"enabled": True, "pollingInterval": 5, "scaleDownStabilization": 10,
                            "targets": [{"deployment": f"{SERVICE}-decode", "namespace": "default",
                                         "minReplicas": 1, "maxReplicas": 3, "requestsPerReplica": 2}]}},
    }
    return install_stack(cluster, built[1], monitoring=True, extra=extra, log=lambda _line: None)


@pytest.fixture(scope="module")
def service(cluster: LocalCluster, stack: dict[str, float], built: tuple[Path, str]) -> Iterator[str]:
    """A P/D inference service of engine-simulator pods behind the chart's router; yields the router's URL."""
    objects = pd_service(SERVICE, built[1], replicas={"prefill": 1, "decode": 1}, time_scale=1,
                         resources={"requests": {"cpu": "50m"}, "limits": {RESOURCE_NPU: "1"}})
    path = cluster.apply({"apiVersion": "v1", "kind": "List", "items": objects}, "pd-service")
    router = cluster.get_json("service", "-n", NAMESPACE, ROUTER)
    url = f"http://{router['spec']['clusterIP']}:{router['spec']['ports'][0]['port']}"

    def roles() -> list[str] | None:
        try:
            with urllib.request.urlopen(url + "/debug/backends", timeout=5) as response:
                return sorted(b["role"] for b in json.load(response).values())
        except OSError:
            return None

    wait_for(lambda: roles() == ["decode", "prefill"], 180, "the router discovering the prefill and decode engine")
    try:
        yield url
    finally:
        cluster.kubectl("delete", "-f", str(path), "--wait=false")


def chat(url: str, text: str, max_tokens: int = 8, timeout: float = 60) -> dict[str, Any]:
    body = {"model": "fuyao-sim-7b", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)  # type: ignore[no-any-return]


def pods(cluster: LocalCluster, selector: str, namespace: str = "default") -> list[dict[str, Any]]:
    return cluster.get_json("pods", "-n", namespace, "-l", selector)["items"]  # type: ignore[no-any-return]


def ready(pod: dict[str, Any]) -> bool:
    return pod["metadata"].get("deletionTimestamp") is None and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


# ---------------------------------------------------------------------------------------------------------------
def test_kubectl_logs_exec_and_top_reach_the_kubelet(cluster: LocalCluster, stack: dict[str, float]) -> None:
    """The kubelet serves on the harness link with its certificate, client-certificate and webhook authentication
    and webhook authorization: the API server reaches it for logs and exec, metrics-server for ``kubectl top``."""
    (plugin,) = pods(cluster, "app.kubernetes.io/name=npu-device-plugin", NAMESPACE)
    name = plugin["metadata"]["name"]
    # the pod is Ready before it has registered with the kubelet: wait for that line, read through the kubelet
    logs = wait_for(lambda: "registered" in (out := cluster.kubectl("logs", "-n", NAMESPACE, name)) and out, 60,
                    "the device plugin's registration in kubectl logs")
    assert "registered npu.huawei.com/NPU with the kubelet" in logs, logs[-2000:]
    out = cluster.kubectl("exec", "-n", NAMESPACE, name, "--", "python3", "-c", "print(6 * 7)")
    assert out.strip() == "42"

    def top(*args: str) -> str | None:
        try:
            return cluster.kubectl("top", *args)
        except RuntimeError:
            return None  # metrics-server has no sample yet

    nodes = wait_for(lambda: top("nodes"), 120, "kubectl top nodes")
    line = next(row for row in nodes.splitlines() if row.startswith(cluster.node))
    cpu = line.split()[1]
    assert cpu.endswith("m") and int(cpu[:-1]) > 0, nodes
    listed = wait_for(lambda: (t := top("pods", "-n", NAMESPACE)) and name in t and t, 120, "kubectl top pods")
    assert name in listed


def test_every_service_monitor_has_an_up_target(cluster: LocalCluster, monitoring: Monitoring,
                                                stack: dict[str, float]) -> None:
    monitors = cluster.get_json("servicemonitors", "-A")["items"]
    assert len(monitors) >= 5, [m["metadata"]["name"] for m in monitors]  # plugin, extender, agent, router, index
    expected = {f"serviceMonitor/{m['metadata']['namespace']}/{m['metadata']['name']}/0" for m in monitors}

    def scraped() -> list[dict[str, str]] | None:
        """The pools' targets once every pool has an up target and every target was scraped at least once (a
        target Prometheus has just discovered, such as a second extender replica, is "unknown" until then)."""
        targets = [t for t in monitoring.targets() if t["scrapePool"] in expected]
        up = {t["scrapePool"] for t in targets if t["health"] == "up"}
        return targets if expected <= up and all(t["health"] != "unknown" for t in targets) else None

    targets = wait_for(scraped, 120, f"an up target in every ServiceMonitor's pool, all scraped: {sorted(expected)}")
    down = [(t["scrapePool"], t["health"], t["lastError"]) for t in targets if t["health"] != "up"]
    assert not down, down


def test_the_design_doc_queries_are_answered_by_prometheus(cluster: LocalCluster, monitoring: Monitoring,
                                                           service: str) -> None:
    asked = 0

    def ask() -> None:  # the same two long prompts again and again: the index finds the second ask of each cached
        nonlocal asked
        answer = chat(service, f"conversation {asked % 2}: " + "the shared context of a long support chat " * 20)
        assert answer["choices"][0]["message"]["content"]
        asked += 1
        time.sleep(0.5)

    answers: dict[str, list[dict[str, Any]]] = {}
    for title, query in DESIGN_DOC_QUERIES.items():
        def answered(query: str = query) -> list[dict[str, Any]] | None:
            ask()  # traffic while Prometheus scrapes: a rate needs the counters to move between two scrapes
            result = monitoring.query(query)
            return result if result and any(math.isfinite(float(r["value"][1])) for r in result) else None

        answers[title] = wait_for(answered, 120, f"Prometheus to answer {query}")
    assert 0 < float(answers["P88 latency"][0]["value"][1]) < 60
    assert 0 <= float(answers["KV hit rate"][0]["value"][1]) <= 1
    assert len({r["metric"]["device"] for r in answers["NPU utilization"]}) == 8  # the node's NPUs
    assert any(r["metric"].get("verb") == "filter" for r in answers["extender decisions"])
    # the engines' own metrics, through the chart's PodMonitor
    # Prometheus discovers the two targets one by one: wait for both, not for the first
    engines = wait_for(lambda: (up := monitoring.query('count(up{job=~".*engines.*"} == 1)'))
                       and float(up[0]["value"][1]) >= 2 and up, 90, "both engine pods' targets up")
    assert float(engines[0]["value"][1]) >= 2


def test_every_dashboard_panel_query_returns_data(cluster: LocalCluster, monitoring: Monitoring,
                                                  service: str) -> None:
    from tests.support.charts import CHARTS

    dashboard = json.loads((CHARTS / "ai-inference-optimization" / "dashboards" / "fuyao.json").read_text())
    chat(service, "one more question for the dashboard " * 10)
    empty = []
    for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$__interval", "1m")
            try:
                if not wait_for(lambda expr=expr: monitoring.query(expr), 60, expr):
                    empty.append((panel["title"], expr))
            except AssertionError:
                empty.append((panel["title"], expr))
    assert not empty, empty


def test_an_injected_npu_fault_fires_its_alert(cluster: LocalCluster, monitoring: Monitoring,
                                               stack: dict[str, float]) -> None:
    def firing(name: str) -> list[dict[str, Any]]:
        return [a for a in monitoring.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]

    assert not firing("NpuUnhealthy")
    cluster.fake_npu_smi("fake", "set-health", "-i", "5", "Critical", "--code", "80E01801")
    try:
        alerts = wait_for(lambda: firing("NpuUnhealthy"), 120, "NpuUnhealthy firing in Prometheus")
        assert {a["labels"]["device"] for a in alerts} == {"Ascend910-5"}, alerts
        assert alerts[0]["labels"]["severity"] == "warning"
        assert "NPU Ascend910-5 on" in alerts[0]["annotations"]["summary"]
    finally:
        cluster.fake_npu_smi("fake", "set-health", "-i", "5", "OK")
    wait_for(lambda: not firing("NpuUnhealthy"), 120, "NpuUnhealthy resolved once the NPU is healthy again")


def test_the_hpa_scales_a_vnpu_deployment_on_cpu_through_metrics_server(cluster: LocalCluster,
                                                                        stack: dict[str, float]) -> None:
    """The design doc's HPA (autoscaling/v2, CPU utilization) on a Deployment of vNPU pods: its CPU load, read from
    metrics-server, makes the HPA add a replica, and the extender places it on a free vNPU."""
    name = "vnpu-infer"
    burn = "import time\nend = time.time() + 90\nwhile time.time() < end: pass\ntime.sleep(3600)"
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": stack_image(cluster), "imagePullPolicy": "Never",
                "command": ["python3", "-c", burn],
                "resources": {"requests": {"cpu": "100m"}, "limits": {RESOURCE_VNPU: "1"}}}]}}}}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": 1, "maxReplicas": 2,
                    "metrics": [{"type": "Resource", "resource": {
                        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]}}
    path = cluster.apply({"apiVersion": "v1", "kind": "List", "items": [deployment, hpa]}, name)
    try:
        def scaled() -> dict[str, Any] | None:
            got = cluster.get_json("hpa", name)
            return got if got.get("status", {}).get("desiredReplicas", 0) >= 2 else None

        status = wait_for(scaled, 180, "the HPA to ask for a second replica on CPU utilization")["status"]
        cpu = next(m for m in status["currentMetrics"] if m["type"] == "Resource")["resource"]["current"]
        assert cpu["averageUtilization"] > 70, status
        placed = wait_for(lambda: len(r := [p for p in pods(cluster, f"app={name}") if ready(p)]) == 2 and r,
                          120, "both vNPU replicas running")
        assert len({p["metadata"]["uid"] for p in placed}) == 2
    finally:
        cluster.kubectl("delete", "-f", str(path), "--wait=false")


def stack_image(cluster: LocalCluster) -> str:
    (plugin,) = pods(cluster, "app.kubernetes.io/name=npu-device-plugin", NAMESPACE)
    return plugin["spec"]["containers"][0]["image"]  # type: ignore[no-any-return]


def test_keda_scales_the_decode_engines_on_queue_depth_and_back_without_client_errors(
        cluster: LocalCluster, monitoring: Monitoring, service: str) -> None:
    """Load rises: the decode engines' in-flight requests (Prometheus, from their vLLM metrics) pass two per pod, KEDA
    raises the decode Deployment to three replicas and the extender places them on free NPUs while the prefill
    Deployment stays at one. Load falls: back to one replica, the router drains the removed pods, and no client
    request fails at any point."""
    errors: list[str] = []
    done = 0
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int, tokens: int) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                chat(service, f"client {i} asks about scaling " * 4, max_tokens=tokens, timeout=120)
                with lock:
                    done += 1
            except (OSError, urllib.error.HTTPError) as exc:
                with lock:
                    errors.append(f"client {i}: {exc}")

    def decode_replicas() -> int:
        return int(cluster.get_json("deployment", f"{SERVICE}-decode")["spec"].get("replicas", 0))

    heavy = [threading.Thread(target=client, args=(i, 400), daemon=True) for i in range(8)]
    for thread in heavy:
        thread.start()
    try:
        wait_for(lambda: decode_replicas() == 3, 240, "KEDA to scale the decode engines to 3")
        running = wait_for(lambda: len(r := [p for p in pods(cluster, f"app={SERVICE},phase=decode") if ready(p)])
                           == 3 and r, 180, "three decode engines Ready")
        for pod in running:  # placed by the chart's extender, which chose each one's NPU
            assert int(pod["spec"]["containers"][0]["resources"]["limits"][RESOURCE_NPU]) == 1
            assert pod["spec"].get("nodeName") == cluster.node
            assert ANNOTATION_POD_ASSIGNED in pod["metadata"].get("annotations", {}), pod["metadata"]
        chosen = [d for p in running for c in parse_annotation(
            ANNOTATION_POD_ASSIGNED, p["metadata"]["annotations"][ANNOTATION_POD_ASSIGNED], PodAssignment).containers
            for d in c.devices]
        assert len(chosen) == len(set(chosen)) == 3, f"three different NPUs: {chosen}"
        prefill = cluster.get_json("deployment", f"{SERVICE}-prefill")["spec"]["replicas"]
        assert prefill == 1, "only the decode Deployment is a KEDA target"
        wait_for(lambda: len(json.load(urllib.request.urlopen(service + "/debug/backends", timeout=5))) == 4, 60,
                 "the router using the three decode engines")
    finally:
        stop.set()
        for thread in heavy:
            thread.join(timeout=150)
    # a trickle of requests keeps flowing while KEDA scales in
    stop.clear()
    light = threading.Thread(target=client, args=(99, 4), daemon=True)
    light.start()
    try:
        wait_for(lambda: decode_replicas() == 1, 240, "KEDA to scale the decode engines back to 1")
        wait_for(lambda: len(json.load(urllib.request.urlopen(service + "/debug/backends", timeout=5))) == 2, 60,
                 "the router dropping the removed decode engines")
        time.sleep(5)
    finally:
        stop.set()
        light.join(timeout=60)
    assert done > 20, done
    assert not errors, errors[:5]
