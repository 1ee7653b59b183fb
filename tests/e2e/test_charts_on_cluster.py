"""fuyao's Helm charts on the real local cluster (``components="chart"``: no fuyao host process; the charts install
everything as pods): server-side dry runs, the stack installed and Ready, NPUs advertised by the device plugin pod,
an NPU pod placed through the chart's extender, the demo's request path (router Service → P/D engine pods, with the
KV-cache index following their events), and ``helm uninstall`` leaving nothing behind."""

from __future__ import annotations

import datetime
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fuyao.contracts import ANNOTATION_POD_ASSIGNED, RESOURCE_NPU
from tests.charts.test_charts import CUSTOM_VALUES
from tests.e2e.checks import npu_pod, planned_and_visible_npus
from tests.support.apiserver import binary
from tests.support.charts import CHARTS, INSTALL_ORDER, NAMESPACE, helm, install_stack, leftovers, uninstall_stack
from tests.support.cluster import DEVICE_PLUGIN_DIR, LocalCluster
from tests.support.engines import http_json, metric_total
from tests.support.inference_service import pd_service
from tests.support.polling import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def built() -> tuple[Path, str]:
    """fuyao's runtime image: (docker archive, its content tag fuyao.local/fuyao:<hash>)."""
    from tests.support.runtime_image import build

    return build()


@pytest.fixture(scope="module")
def image(built: tuple[Path, str]) -> str:
    return built[1]


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            built: tuple[Path, str]) -> Iterator[LocalCluster]:
    """The Docker-free local cluster, or with ``--cluster=kind`` a kind cluster of one NPU worker on fuyao's node
    image (tests.support.kind; the tests marked kind run there too)."""
    if request.config.getoption("--cluster") == "kind":
        from tests.support.kind import KindCluster

        kind = KindCluster(tmp_path_factory.mktemp("kind-cluster", numbered=True), name="fuyao-e2e",
                           local_image=True)
        try:
            kind.up(log=print)
            kind.load_images(built[0])
            yield kind  # type: ignore[misc]
        finally:
            kind.down()
        return
    from tests.support.cluster import running

    with running(tmp_path_factory.mktemp("chart-cluster", numbered=True), built[0], components="chart") as local:
        yield local


@pytest.fixture(scope="module")
def stack(cluster: LocalCluster, image: str) -> Iterator[dict[str, float]]:
    took = install_stack(cluster, image, log=lambda _line: None)
    yield took
    # (uninstall is a test of its own, last; nothing to do if it ran)


@pytest.mark.kind
def test_every_chart_passes_a_server_side_dry_run_with_default_and_custom_values(cluster: LocalCluster) -> None:
    kubeconfig = cluster.dir / "admin.kubeconfig"
    for chart in INSTALL_ORDER:
        custom = cluster.dir / f"custom-{chart}.yaml"
        custom.write_text(yaml.safe_dump(CUSTOM_VALUES[chart]))
        for values in ([], ["--values", str(custom)]):
            out = helm("install", f"dry-{chart}", str(CHARTS / chart), "--namespace", "dry-run",
                       "--create-namespace", "--dry-run=server", *values, kubeconfig=kubeconfig)
            assert "STATUS: pending-install" in out, out[:400]
    assert "dry-run" not in cluster.kubectl("get", "namespaces", "-o", "name")  # nothing was created


def test_the_monitoring_objects_pass_the_prometheus_operator_crds(cluster: LocalCluster) -> None:
    """With the Prometheus Operator's CRDs installed (the real ServiceMonitor and PrometheusRule schemas, from its
    module: hack/build-upstream.sh prometheus-crds), the charts render their monitoring objects (Helm sees the CRDs)
    and the API server accepts them in a server-side dry run."""
    from tests.support.apiserver import BIN

    found = sorted(BIN.glob("prometheus-operator-crds-*/monitoring.coreos.com_*.yaml"))
    found = [p for p in found if p.name.endswith(("_servicemonitors.yaml", "_prometheusrules.yaml"))]
    assert len(found) == 2, f"no Prometheus Operator CRDs under {BIN}: run hack/build-upstream.sh prometheus-crds"
    kubeconfig = cluster.dir / "admin.kubeconfig"
    for crd in found:
        cluster.kubectl("create", "-f", str(crd))
    try:
        cluster.wait_established("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com")
        wait_for(lambda: "monitoring.coreos.com/v1" in cluster.kubectl("api-versions"), 30, "the monitoring API")
        monitoring = {"ai-inference-optimization": ["--set", "monitoring.serviceMonitor.enabled=true",
                                                    "--set", "monitoring.prometheusRule.enabled=true"],
                      "npu-device-plugin": ["--set", "metrics.serviceMonitor.enabled=true"],
                      "scheduler-extender": ["--set", "metrics.serviceMonitor.enabled=true"],
                      "qos-agent": ["--set", "metrics.serviceMonitor.enabled=true"]}
        kinds = []
        for chart, values in monitoring.items():
            out = helm("install", f"mon-{chart}", str(CHARTS / chart), "--namespace", "dry-run",
                       "--create-namespace", "--dry-run=server", *values, kubeconfig=kubeconfig)
            docs = [d for d in yaml.safe_load_all(out.split("MANIFEST:", 1)[1].split("NOTES:", 1)[0]) if d]
            kinds += [d["kind"] for d in docs if d["apiVersion"] == "monitoring.coreos.com/v1"]
        assert sorted(kinds) == ["PrometheusRule", "ServiceMonitor", "ServiceMonitor", "ServiceMonitor",
                                 "ServiceMonitor", "ServiceMonitor"]
        # a broken rule is refused by the CRD's schema: the dry run really validates
        bad = cluster.dir / "bad-rule.yaml"
        bad.write_text(yaml.safe_dump({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                                       "metadata": {"name": "bad", "namespace": "default"},
                                       "spec": {"groups": [{"name": "g", "rules": [{"alert": "A"}]}]}}))
        refused = subprocess.run([binary("kubectl"), "--kubeconfig", str(kubeconfig), "create", "--dry-run=server",
                                  "-f", str(bad)], capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "expr" in refused.stderr
    finally:
        for crd in found:
            cluster.kubectl("delete", "-f", str(crd), "--wait=true", check=False)


@pytest.mark.kind
def test_the_stack_installs_and_the_device_plugin_pod_advertises_the_npus(cluster: LocalCluster,
                                                                         stack: dict[str, float]) -> None:
    assert set(stack) == set(INSTALL_ORDER)
    pods = cluster.get_json("pods", "-n", NAMESPACE)["items"]
    ready = {p["metadata"]["name"]: all(c["ready"] for c in p["status"].get("containerStatuses", [])) for p in pods}
    assert ready and all(ready.values()), ready
    assert {p["metadata"]["labels"]["app.kubernetes.io/name"] for p in pods} == set(INSTALL_ORDER)
    # no fuyao host process in this cluster: the NPUs on the node come from the DaemonSet's pod
    assert not [p for p in cluster.procs if p["name"].startswith("fuyao-")]
    node = wait_for(lambda: (n := cluster.node_json())["status"]["allocatable"].get(RESOURCE_NPU) == "8" and n,
                    60, "8 NPUs allocatable")
    assert node["metadata"]["labels"]["npu.openfuyao.com/device-count"] == "8"
    plugin = next(p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/name"] == "npu-device-plugin")
    log = cluster.pod_log(NAMESPACE, plugin["metadata"]["name"], "device-plugin")
    assert "registered" in log and RESOURCE_NPU in log
    # the QoS agent pod publishes batch resources from the host's cgroups
    wait_for(lambda: "kubernetes.io/batch-cpu" in cluster.node_json()["status"]["allocatable"], 60,
             "batch-cpu published by the qos-agent pod")


def explain(cluster: LocalCluster, pod: str) -> dict | None:  # type: ignore[type-arg]
    """The extender's /explain of a pod, through the Service. Each replica keeps the decisions it made: kube-proxy
    picks a replica per connection, so a miss (404 from the other replica) is retried."""
    import urllib.error

    try:
        return http_json(f"http://{cluster.extender_cluster_ip}:8888/explain/default/{pod}")  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


@pytest.mark.kind
def test_an_npu_pod_is_placed_through_the_charts_extender(cluster: LocalCluster, stack: dict[str, float]) -> None:
    cluster.apply(npu_pod("two-npus", 2))
    try:
        placed = wait_for(lambda: (p := cluster.get_json("pod", "two-npus"))["status"].get("phase") == "Running"
                          and p, 90, "the NPU pod Running")
        assignment, visible, _ = planned_and_visible_npus(cluster, placed)
        devices = assignment.containers[0].devices
        assert assignment.node == cluster.node and len(devices) == 2
        assert sorted(visible) == sorted(d.rsplit("-", 1)[1] for d in devices)
        explained = wait_for(lambda: explain(cluster, "two-npus"), 30,
                             "the /explain of the replica that filtered the pod")
        assert explained["filter"]["pod"] == "default/two-npus" and explained["filter"]["rejected"] == {}
    finally:
        cluster.kubectl("delete", "pod", "two-npus", "--wait=false")


EXTENDER = "scheduler-extender"  # the release's Deployment and its binder Lease


def extender_pods(cluster: LocalCluster, ready: bool = True) -> list[str]:
    pods = cluster.get_json("pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/name={EXTENDER}")["items"]
    return sorted(p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp") and (
        not ready or any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))))


def free_npus(cluster: LocalCluster) -> int:
    """The node's NPUs not held by a pod on it (terminating ones still hold theirs)."""
    held = sum(int(c.get("resources", {}).get("limits", {}).get(RESOURCE_NPU, 0))
               for p in cluster.get_json("pods", "-A", "--field-selector", f"spec.nodeName={cluster.node}")["items"]
               if p["status"].get("phase") not in ("Succeeded", "Failed") for c in p["spec"]["containers"])
    return int(cluster.node_json()["status"]["allocatable"][RESOURCE_NPU]) - held


def test_killing_the_binder_replica_under_a_stream_of_npu_pods_loses_nothing_and_books_no_npu_twice(
        cluster: LocalCluster, stack: dict[str, float]) -> None:
    """The chart's two replicas: one holds the binder Lease. Its pod is force-deleted (grace period 0) while NPU pods
    keep arriving: every pod is bound once the other replica holds the Lease, each NPU to one pod, and the pause in
    binding is bounded by the lease duration plus kube-scheduler's retry backoff (printed: the figure in
    docs/scheduler-extender.md). A holder killed without releasing the Lease: tests/integration/test_extender_ha.py."""
    assert len(wait_for(lambda: len(extender_pods(cluster)) == 2 and extender_pods(cluster), 120,
                        "two extender replicas Ready")) == 2
    holder = wait_for(lambda: cluster.get_json("lease", "-n", NAMESPACE, EXTENDER)["spec"].get("holderIdentity"),
                      60, "a binder lease holder")
    assert holder in extender_pods(cluster)
    wait_for(lambda: free_npus(cluster) >= 4, 60, "four free NPUs")
    count = min(6, free_npus(cluster))
    names = [f"ha-{i}" for i in range(count)]
    killed = 0.0
    try:
        for i, name in enumerate(names):
            cluster.apply(npu_pod(name, 1))
            if i == 1:
                cluster.kubectl("delete", "pod", "-n", NAMESPACE, holder, "--grace-period=0", "--force")
                killed = time.time()
            time.sleep(0.5)
        wait_for(lambda: all(cluster.get_json("pod", n)["spec"].get("nodeName") for n in names), 120,
                 f"all {count} NPU pods bound")
        running = [wait_for(lambda n=n: (p := cluster.get_json("pod", n))["status"].get("phase") == "Running" and p,
                            90, f"{n} Running") for n in names]
        given = [d for p in running for d in planned_and_visible_npus(cluster, p)[0].containers[0].devices]
        assert len(given) == count and len(set(given)) == count, given  # every NPU to one pod
        bound_at = [datetime.datetime.fromisoformat(c["lastTransitionTime"].replace("Z", "+00:00")).timestamp()
                    for p in running for c in p["status"]["conditions"] if c["type"] == "PodScheduled"]
        pause = min(bound_at[2:]) - killed  # the first bind of a pod created after the kill
        print(f"binder replica killed: the first pod created after it bound {pause:.0f} s later (1 s resolution); "
              f"all {count} bound {max(bound_at) - killed:.0f} s after the kill")
        if pause > 15 + 10 + 15:  # leaseDuration + kube-scheduler's max pod backoff + slack
            events = [f"{e.get('lastTimestamp') or e.get('eventTime')} {e['involvedObject']['name']} {e['reason']}: "
                      f"{e.get('message', '')[:300]}" for e in cluster.get_json("events")["items"]
                      if e["involvedObject"]["name"] in names]
            lease = cluster.get_json("lease", "-n", NAMESPACE, EXTENDER)["spec"]
            raise AssertionError(f"binding paused {pause:.0f} s after the binder was killed; lease now {lease}; "
                                 "events:\n" + "\n".join(sorted(events)))
        lease = cluster.get_json("lease", "-n", NAMESPACE, EXTENDER)["spec"]
        assert lease["holderIdentity"] != holder and lease["leaseTransitions"] >= 1
    finally:
        cluster.kubectl("delete", "pod", *names, "--wait=false", "--ignore-not-found")
    wait_for(lambda: len(extender_pods(cluster)) == 2, 120, "the Deployment back at two Ready replicas")


def test_with_the_whole_extender_down_npu_pods_wait_and_ignorable_lets_them_through(
        cluster: LocalCluster, stack: dict[str, float]) -> None:
    """Scaled to zero: NPU pods wait (ignorable: false, the default) and schedule when it is back; pods without NPUs
    never wait on it (managedResources); a kube-scheduler whose extender entry says ignorable: true schedules NPU
    pods without it (the device plugin then picks their NPUs itself)."""
    cpu_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "no-npus", "namespace": "default"},
               "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                        "containers": [{"name": "main", "image": "fuyao.local/busybox:1", "imagePullPolicy": "Never",
                                        "command": ["sleep", "3600"]}]}}
    cluster.kubectl("scale", "deployment", "-n", NAMESPACE, EXTENDER, "--replicas=0")
    try:
        wait_for(lambda: not extender_pods(cluster, ready=False), 90, "no extender pod left")
        wait_for(lambda: free_npus(cluster) >= 2, 60, "two free NPUs")
        cluster.apply(npu_pod("waits", 1))
        cluster.apply(cpu_pod)
        cluster.scheduler("kube-scheduler-ignorable", scheduler_name="ignorable", ignorable=True)
        cluster.apply(npu_pod("through", 1, scheduler_name="ignorable"))
        wait_for(lambda: cluster.get_json("pod", "no-npus")["spec"].get("nodeName"), 60, "the CPU pod bound")
        through = wait_for(lambda: (p := cluster.get_json("pod", "through"))["status"].get("phase") == "Running"
                           and p, 90, "the ignorable scheduler's NPU pod Running")
        assert ANNOTATION_POD_ASSIGNED not in through["metadata"].get("annotations", {})  # no extender bound it
        time.sleep(5)
        waiting = cluster.get_json("pod", "waits")
        assert not waiting["spec"].get("nodeName"), "an NPU pod was scheduled without the extender"
        events = cluster.get_json("events", "--field-selector", "involvedObject.name=waits")["items"]
        assert any(e["reason"] == "FailedScheduling" for e in events), events
    finally:
        cluster.stop("kube-scheduler-ignorable")
        cluster.kubectl("scale", "deployment", "-n", NAMESPACE, EXTENDER, "--replicas=2")
    try:
        placed = wait_for(lambda: (p := cluster.get_json("pod", "waits"))["status"].get("phase") == "Running"
                          and p, 120, "the waiting NPU pod Running once the extender is back")
        assert placed["metadata"]["annotations"][ANNOTATION_POD_ASSIGNED]  # bound by the extender
    finally:
        cluster.kubectl("delete", "pod", "waits", "through", "no-npus", "--wait=false", "--ignore-not-found")
    wait_for(lambda: len(extender_pods(cluster)) == 2, 120, "two extender replicas Ready")


@pytest.mark.kind
def test_the_router_service_serves_a_pd_inference_service_and_the_index_follows_its_events(
        cluster: LocalCluster, stack: dict[str, float], image: str) -> None:
    objects = pd_service("chat", image, replicas={"prefill": 1, "decode": 1}, time_scale=20)
    path = cluster.apply({"apiVersion": "v1", "kind": "List", "items": objects}, "pd-service")
    try:
        def ready_roles() -> set[str]:
            pods = cluster.get_json("pods", "-l", "app=chat")["items"]
            return {p["metadata"]["labels"]["phase"] for p in pods
                    if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}

        wait_for(lambda: ready_roles() == {"prefill", "decode"}, 120, "prefill and decode engine pods Ready")
        router = cluster.get_json("service", "-n", NAMESPACE, "ai-inference-optimization-router")
        url = f"http://{router['spec']['clusterIP']}:{router['spec']['ports'][0]['port']}"
        body = {"model": "fuyao-sim-7b", "max_tokens": 8,
                "messages": [{"role": "user", "content": "a question through the chart's router " * 8}]}

        def roles_seen_by_router() -> list[str] | None:
            try:
                return sorted(b["role"] for b in http_json(url + "/debug/backends").values())
            except OSError:
                return None

        # Pods Ready → EndpointSlice ready → the router's watch: the router may see one engine a moment before the
        # other (and would then serve the request unsplit), so wait for both before asking.
        wait_for(lambda: roles_seen_by_router() == ["decode", "prefill"], 60,
                 "the router discovering the prefill and the decode engine")

        def ask() -> dict | None:  # type: ignore[type-arg]
            try:
                return http_json(url + "/v1/chat/completions", body)
            except OSError:
                return None

        answer = wait_for(ask, 90, "a chat completion through the router Service")
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            exposition = response.read().decode()
        # split: the prompt went to the prefill engine and the answer came from the decode engine
        assert metric_total(exposition, "inference_backend_requests_total", role="prefill") >= 1
        assert metric_total(exposition, "inference_backend_requests_total", role="decode") >= 1
        kvcache = cluster.get_json("service", "-n", NAMESPACE, "ai-inference-optimization-kvcache")
        index = f"http://{kvcache['spec']['clusterIP']}:8100"
        endpoints = wait_for(lambda: len(e := http_json(index + "/v1/endpoints")) == 2 and e, 60,
                             "the KV-cache index subscribed to both engines")
        assert endpoints
        def events() -> float:
            with urllib.request.urlopen(index + "/metrics", timeout=10) as response:
                return metric_total(response.read().decode(), "fuyao_kvcache_events_total")

        wait_for(lambda: events() > 0, 60, "KV events from the engines in the index")
    finally:
        cluster.kubectl("delete", "-f", str(path), "--wait=false")



def test_engine_pods_share_kv_blocks_through_the_charts_volume(cluster: LocalCluster, stack: dict[str, float],
                                                               image: str) -> None:
    """``kvCache.volume``: the chart's RWX claim (bound here to a hostPath PV of a class of its own) is mounted by
    fuyao-kvcache and by two engine pods (the simulator's ``--kv-volume``, the files of fuyao's vLLM connector). A
    context computed by one pod is loaded by the other, not computed (vLLM's external-hit counter); the files are the
    volume group's; and the manager publishes them to lookups."""
    import os
    import shutil

    from fuyao import tokenizer
    from tests.support.charts import merge_values
    from tests.support.inference_service import tier_service

    tier = cluster.dir / "kv-tier"
    shutil.rmtree(tier, ignore_errors=True)
    tier.mkdir()
    os.chown(tier, 65534, 65534)  # hostPath ignores fsGroup: the volume's owner is the platform's to set
    os.chmod(tier, 0o2775)
    storage_class = "fuyao-e2e-kv-tier"
    pv = cluster.apply({"apiVersion": "v1", "kind": "PersistentVolume",
                        "metadata": {"name": "fuyao-e2e-kv-tier"},
                        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                                 "storageClassName": storage_class, "persistentVolumeReclaimPolicy": "Retain",
                                 "hostPath": {"path": str(tier), "type": "Directory"}}})
    kubeconfig = cluster.dir / "admin.kubeconfig"
    chart = "ai-inference-optimization"
    base = cluster.chart_values(image)[chart]
    tiered = merge_values(base, {"kvCache": {"volume": {"enabled": True, "storageClass": storage_class, "size": "1Gi",
                                                  "interval": "500ms"}}})

    def upgrade(values: dict[str, object], name: str) -> None:
        path = cluster.dir / f"values-{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        helm("upgrade", chart, str(CHARTS / chart), "--namespace", NAMESPACE, "--values",
             str(path), "--wait", "--timeout", "180s", kubeconfig=kubeconfig)

    engines = None
    try:
        upgrade(tiered, "kv-tier")
        claim = cluster.get_json("pvc", "-n", NAMESPACE, "ai-inference-optimization-kv")
        assert claim["status"]["phase"] == "Bound" and claim["spec"]["volumeName"] == "fuyao-e2e-kv-tier"
        engines = cluster.apply({"apiVersion": "v1", "kind": "List", "items": tier_service(
            "tiered", image, "ai-inference-optimization-kv", NAMESPACE, time_scale=20)}, "tier-service")

        def ready_ips() -> list[str] | None:
            pods = cluster.get_json("pods", "-n", NAMESPACE, "-l", "app=tiered")["items"]
            ips = [p["status"]["podIP"] for p in pods if p["status"].get("podIP") and any(
                c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
            return sorted(ips) if len(ips) == 2 else None

        first, second = (f"http://{ip}:8000" for ip in wait_for(ready_ips, 120, "two engine pods Ready"))

        def metric(url: str, name: str) -> float:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
                return metric_total(response.read().decode(), name)

        prompt = "A long shared context about river basins and their floods, season by season. " * 12
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        blocks = (len(ids) - 1) // 16
        assert http_json(first + "/v1/completions", {"prompt": prompt, "max_tokens": 1})["choices"]
        wait_for(lambda: metric(first, "fuyao_kv_tier_blocks_stored_total") >= blocks, 30, "the blocks stored")
        files = list(tier.rglob("*.kv"))
        assert len(files) >= blocks and all(f.stat().st_gid == 65534 for f in files)
        assert http_json(second + "/v1/completions", {"prompt": prompt, "max_tokens": 1})["choices"]
        assert metric(second, "fuyao_kv_tier_blocks_loaded_total") == blocks  # loaded, not computed
        assert metric(second, "vllm:external_prefix_cache_hits_total") == blocks * 16
        service = cluster.get_json("service", "-n", NAMESPACE, "ai-inference-optimization-kvcache")
        index = f"http://{service['spec']['clusterIP']}:8100"
        # the answer comes from the manager's last sweep, which may have run while the files were arriving: it must
        # come to the whole prompt, not just be non-zero
        wait_for(lambda: http_json(index + "/v1/lookup", {"token_ids": ids, "model": "fuyao-sim-7b"})
                 .get("volume_blocks") == blocks, 60, "the volume's blocks published by fuyao-kvcache")
        assert metric(index, "fuyao_kvcache_volume_blocks") >= blocks
    finally:
        if engines is not None:
            cluster.kubectl("delete", "-f", str(engines), "--wait=true", "--timeout=60s")
        upgrade(base, "without-kv-tier")  # the claim goes with the chart's values; the PV is released
        cluster.kubectl("delete", "-f", str(pv), "--wait=true", "--timeout=60s")


def test_the_charts_second_kube_scheduler_places_the_pods_that_ask_for_it(cluster: LocalCluster,
                                                                         stack: dict[str, float]) -> None:
    """scheduler.enabled: a second kube-scheduler (the locally built binary in an image of its own) runs in the
    cluster with the chart's RBAC and config, reaches the extender by its Service name, and binds a pod that names
    it (through the extender's bind verb: the pod carries the assigned NPUs)."""
    import os

    from tests.support.runtime_image import kube_scheduler_image

    built = Path(os.path.realpath(binary("kube-scheduler")))
    archive, tag = kube_scheduler_image(built, built.name.rsplit("-", 1)[1])
    cluster.import_image(archive)
    values = cluster.dir / "values-scheduler-extender.yaml"
    kubeconfig = cluster.dir / "admin.kubeconfig"
    helm("upgrade", "scheduler-extender", str(CHARTS / "scheduler-extender"), "--namespace", NAMESPACE,
         "--values", str(values), "--set", "scheduler.enabled=true", "--set", f"scheduler.image={tag}",
         "--set", "scheduler.leaderElect=true", "--wait", "--timeout", "180s", kubeconfig=kubeconfig)
    cluster.apply(npu_pod("by-second-scheduler", 1, scheduler_name="fuyao-scheduler"))
    try:
        placed = wait_for(lambda: (p := cluster.get_json("pod", "by-second-scheduler"))["spec"].get("nodeName")
                          and p, 120, "the pod bound by the chart's kube-scheduler")
        assignment, visible, _ = planned_and_visible_npus(cluster, wait_for(
            lambda: (p := cluster.get_json("pod", "by-second-scheduler"))["status"].get("phase") == "Running"
            and p, 60, "the pod Running"))
        assert placed["spec"]["nodeName"] == cluster.node and len(visible) == 1
        events = cluster.get_json("events", "--field-selector", "involvedObject.name=by-second-scheduler")["items"]
        scheduled = [e for e in events if e["reason"] == "Scheduled"]
        assert scheduled and all(e.get("reportingComponent") == "fuyao-scheduler"
                                 or (e.get("source") or {}).get("component") == "fuyao-scheduler"
                                 for e in scheduled), scheduled
        lease = cluster.get_json("lease", "-n", NAMESPACE, "fuyao-scheduler")  # its own leader election
        assert lease["spec"]["holderIdentity"]
        # bound through the extender's bind verb (the Scheduled events above say which scheduler asked for it)
        assert assignment.node == cluster.node and len(assignment.containers[0].devices) == 1
    finally:
        cluster.kubectl("delete", "pod", "by-second-scheduler", "--wait=false")
        helm("upgrade", "scheduler-extender", str(CHARTS / "scheduler-extender"), "--namespace", NAMESPACE,
             "--values", str(values), "--wait", "--timeout", "120s", kubeconfig=kubeconfig)


READ_ONLY = [
    {"apiGroups": ["", "apps", "discovery.k8s.io", "events.k8s.io"], "resources": ["*"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/log", "pods/proxy", "services/proxy"], "verbs": ["get"]},
]


def test_diagnose_reports_the_stack_with_read_only_rights(cluster: LocalCluster, stack: dict[str, float],
                                                          tmp_path: Path) -> None:
    """hack/diagnose.sh run as a user who may only read (impersonated through the admin kubeconfig): every section
    is there with this cluster's facts, and nothing it does needs more than reading."""
    from tests.support.cluster import REPO

    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "fuyao-diagnose"}, "rules": READ_ONLY}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "fuyao-diagnose"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "fuyao-diagnose"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "fuyao-diagnose"}]}
    cluster.apply({"apiVersion": "v1", "kind": "List", "items": [role, binding]}, "diagnose-rbac")
    config = yaml.safe_load((cluster.dir / "admin.kubeconfig").read_text())
    config["users"][0]["user"]["as"] = "fuyao-diagnose"
    reader = tmp_path / "reader.kubeconfig"
    reader.write_text(yaml.safe_dump(config))
    out = subprocess.run(["bash", str(REPO / "hack" / "diagnose.sh"), "--kubeconfig", str(reader),
                          "--output", str(tmp_path / "report")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = out.stdout
    sections = dict(re.findall(r"^=== \d+\. (.+?) ===\n(.*?)(?=^=== |\Z)", report, re.M | re.S))
    assert list(sections) == ["cluster", "NPUs per node", "fuyao components", "recent logs", "metrics excerpts",
                              "pods waiting for NPUs", f"warning events in {NAMESPACE}"]
    npus = sections["NPUs per node"]
    assert re.search(rf"^{cluster.node}\s+8\s+8\s", npus, re.M) and "huawei-ascend-npu" in npus
    assert all(chart in sections["fuyao components"] for chart in INSTALL_ORDER)
    metrics = sections["metrics excerpts"]
    assert 'fuyao_deviceplugin_devices{health="Healthy",resource="npu.huawei.com/NPU"} 8.0' in metrics
    assert "fuyao_qos_batch_resource" in metrics
    assert "Forbidden" not in report.replace("logs unavailable", "")  # reading was enough for everything else
    assert sorted(p.name for p in (tmp_path / "report").iterdir())[0].startswith("1-")
    # a bad argument is refused with its name
    bad = subprocess.run(["bash", str(REPO / "hack" / "diagnose.sh"), "--tail", "many"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--tail" in bad.stderr


def test_helm_uninstall_leaves_nothing_behind(cluster: LocalCluster, stack: dict[str, float]) -> None:
    uninstall_stack(cluster)
    wait_for(lambda: not leftovers(cluster), 90, "no object labelled part-of=fuyao")
    wait_for(lambda: not cluster.get_json("pods", "-n", NAMESPACE)["items"], 90, "the stack's pods gone")
    # the device plugin pod removed its sockets on SIGTERM; the kubelet then stops offering its NPUs
    wait_for(lambda: not list(DEVICE_PLUGIN_DIR.glob("fuyao-*.sock")), 30, "the plugin's sockets removed")
    wait_for(lambda: cluster.node_json()["status"]["allocatable"].get(RESOURCE_NPU) == "0", 60,
             "no NPU allocatable without a device plugin")
