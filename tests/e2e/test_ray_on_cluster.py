"""Ray on fuyao-scheduled NPUs (issue 25), on the real local cluster with KubeRay's operator
(``hack/local-up.sh --ray``): Ray inside a pod counts exactly the NPUs fuyao's device plugin allocated, for whole
NPUs and vNPUs; a ``RayCluster`` (``docs/examples/ray/raycluster.yaml``) whose NPU workers fuyao's extender places;
Ray's autoscaler adding a worker, placed by the extender, when tasks ask for more NPUs than the workers hold.

Memory: a Ray head takes about 1 GB; the module runs its own cluster and tears it down."""

from __future__ import annotations

import json
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fuyao.contracts import (
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_NPU,
    RESOURCE_VNPU,
    PodAssignment,
    parse_annotation,
)
from tests.e2e.checks import explain, planned_and_visible_npus
from tests.support.apiserver import free_port
from tests.support.cluster import LINK_HOST, LocalCluster
from tests.support.engines import Daemon, http_json, scrape
from tests.support.polling import wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "ray" / "raycluster.yaml"
RAY_ENV = [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}]


@pytest.fixture(scope="module")
def ray_image() -> str:
    from tests.support.runtime_image import build

    return build(ray=True)[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, ray_image: str) -> Iterator[LocalCluster]:
    from tests.support.cluster import running

    with running(tmp_path_factory.mktemp("ray-cluster", numbered=True), ray=True) as local:
        wait_for(lambda: "default" in local.kubectl("get", "sa", "-o", "name"), 60, "the default service account")
        yield local


def pod(cluster: LocalCluster, name: str) -> dict[str, Any]:
    return cluster.get_json("pod", name)


def placed_by_extender(cluster: LocalCluster, name: str, npus: int) -> list[str]:
    """The dies fuyao's extender bound a pod to: it filtered the pod (its /explain has the decision) and its bind
    wrote the assignment annotation, on this node, with ``npus`` dies."""
    decision = explain(cluster, name)
    assert decision["filter"]["pod"] == f"default/{name}" and cluster.node not in decision["filter"]["rejected"]
    meta = pod(cluster, name)["metadata"]
    assignment = parse_annotation(ANNOTATION_POD_ASSIGNED, meta["annotations"][ANNOTATION_POD_ASSIGNED],
                                  PodAssignment)
    devices = [d for c in assignment.containers for d in c.devices]
    assert assignment.node == cluster.node and len(devices) == npus, assignment
    return devices


def ray_pod(name: str, image: str, limits: dict[str, str], script: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
            "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never", "env": RAY_ENV,
                                     "command": ["bash", "-c", script],
                                     "resources": {"limits": limits}}]}}


def log_line(cluster: LocalCluster, name: str, key: str, timeout: float = 120) -> str:
    """The value of the first line ``KEY=value`` in a pod's log."""
    def found() -> str | None:
        for line in cluster.pod_log("default", name).splitlines():
            # the kubelet's log lines: "<time> stdout F <text>"
            text = line.split(" ", 3)[3] if line.count(" ") >= 3 else line
            if text.startswith(f"{key}="):
                return text[len(key) + 1:].strip()
        return None

    return wait_for(found, timeout, f"{key}= in the log of {name}")


def test_ray_in_a_pod_with_two_npus_reports_exactly_those_npus(cluster: LocalCluster, ray_image: str) -> None:
    script = textwrap.dedent("""\
        env
        echo DEVICES=$(ls -d /dev/davinci[0-9]* | tr '\\n' ' ')
        ray start --head --num-cpus=1 --object-store-memory=100000000 --include-dashboard=false >/tmp/ray.log 2>&1 \\
          || { cat /tmp/ray.log; exit 1; }
        python3 -c 'import ray; ray.init(); print("RAY_NPU=%s" % ray.cluster_resources().get("NPU"))'
        sleep 3600
        """)
    cluster.apply(ray_pod("ray-two-npus", ray_image, {RESOURCE_NPU: "2"}, script))
    try:
        assert log_line(cluster, "ray-two-npus", "RAY_NPU") == "2.0"
        _, visible, _ = planned_and_visible_npus(cluster, pod(cluster, "ray-two-npus"))
        # the container sees the two dies the extender planned and the device plugin allocated, and nothing else
        devices = sorted(log_line(cluster, "ray-two-npus", "DEVICES").split())
        assert devices == sorted(f"/dev/davinci{i}" for i in visible) and len(devices) == 2
        planned = placed_by_extender(cluster, "ray-two-npus", 2)
        assert sorted(planned) == sorted(f"Ascend910-{i}" for i in visible)
    finally:
        cluster.kubectl("delete", "pod", "ray-two-npus", "--ignore-not-found", "--wait=false")


def raycluster(image: str) -> dict[str, Any]:
    """The example RayCluster with the image built for this run."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = image
    for group in spec["spec"]["workerGroupSpecs"]:
        group["template"]["spec"]["containers"][0]["image"] = image
    return spec  # type: ignore[no-any-return]


def ray_pods(cluster: LocalCluster, node_type: str) -> list[dict[str, Any]]:
    return cluster.get_json("pods", "-l", f"ray.io/cluster=npu-ray,ray.io/node-type={node_type}")["items"]  # type: ignore[no-any-return]


def head_exec(cluster: LocalCluster, code: str, timeout: float = 300) -> str:
    head = ray_pods(cluster, "head")[0]["metadata"]["name"]
    return cluster.kubectl("exec", head, "-c", "ray-head", "--", "python3", "-c", code, timeout=timeout)


def ready(p: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])


def test_a_raycluster_gets_npu_workers_placed_by_the_extender_and_scales_out(cluster: LocalCluster,
                                                                             ray_image: str) -> None:
    cluster.apply(raycluster(ray_image), "raycluster")
    try:
        wait_for(lambda: (h := ray_pods(cluster, "head")) and ready(h[0]), 240, "the Ray head Ready")
        workers = wait_for(lambda: (w := ray_pods(cluster, "worker")) and all(ready(p) for p in w) and w, 240,
                           "the NPU worker Ready")
        first = workers[0]["metadata"]["name"]
        # placed by the extender: it filtered, scored and bound the worker, with the dies it chose
        first_dies = set(placed_by_extender(cluster, first, 2))
        # Ray sees the worker's 2 NPUs (the head has none)
        totals = json.loads(head_exec(cluster, textwrap.dedent("""\
            import json, ray
            ray.init()
            print(json.dumps(ray.cluster_resources()))
            """)).strip().splitlines()[-1])
        assert totals.get("NPU") == 2.0
        # two 2-NPU bundles on two nodes at once (a placement group): the autoscaler adds a worker, the extender
        # places it on the dies left
        started = time.monotonic()
        out = head_exec(cluster, textwrap.dedent("""\
            import json, os, socket, ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            ray.init()
            group = placement_group([{"NPU": 2}, {"NPU": 2}], strategy="STRICT_SPREAD")
            ray.get(group.ready(), timeout=280)
            @ray.remote(resources={"NPU": 2}, num_cpus=0)
            def where():
                return {"host": socket.gethostname(), "rt": os.environ.get("ASCEND_RT_VISIBLE_DEVICES"),
                        "phys": os.environ.get("ASCEND_VISIBLE_DEVICES")}
            print(json.dumps(ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=i)).remote() for i in range(2)], timeout=60)))
            """))
        took = time.monotonic() - started
        results = json.loads(out.strip().splitlines()[-1])
        workers = ray_pods(cluster, "worker")
        assert len(workers) == 2, [w["metadata"]["name"] for w in workers]
        assert {r["host"] for r in results} == {w["metadata"]["name"] for w in workers}
        # Ray hands each task its slots 0,1 of the pod; the pods hold different physical dies
        assert all(r["rt"] == "0,1" for r in results)
        physical = [set(r["phys"].split(",")) for r in results]
        assert all(len(p) == 2 for p in physical) and not physical[0] & physical[1]
        new = next(w["metadata"]["name"] for w in workers if w["metadata"]["name"] != first)
        assert not set(placed_by_extender(cluster, new, 2)) & first_dies
        print(f"scale-out: two 2-NPU tasks done in {took:.0f} s with a second worker")
    finally:
        cluster.kubectl("delete", "raycluster", "npu-ray", "--ignore-not-found", "--wait=false")
        wait_for(lambda: not cluster.get_json("pods", "-l", "ray.io/cluster=npu-ray")["items"], 120,
                 "the Ray cluster's pods gone")


def test_a_vnpu_pod_gets_one_device_node_that_ray_and_cann_count(cluster: LocalCluster, ray_image: str) -> None:
    """A vNPU is mounted as Ascend's docker runtime mounts one: the host's /dev/vdavinci<id> at /dev/davinci<id>,
    with ASCEND_VISIBLE_DEVICES=<id> and ASCEND_RUNTIME_OPTIONS=VIRTUAL; Ray's NPU manager counts 1."""
    config = cluster.dir / "vnpu-config.json"
    config.write_text(json.dumps({"devices": [{"device_id": "7", "vnpu_count": 4, "vnpu_memory": "8GB"}]}))
    cluster.stop("fuyao-device-plugin")
    cluster.start("fuyao-device-plugin", ("--vnpu-config", str(config)))
    try:
        wait_for(lambda: int(cluster.node_json()["status"]["allocatable"].get(RESOURCE_VNPU, "0")) == 4, 90,
                 "4 vNPU slices on the node")
        script = textwrap.dedent("""\
            env
            echo DEVICES=$(ls -d /dev/davinci[0-9]* | tr '\\n' ' ')
            python3 -c 'from ray._private.accelerators.npu import NPUAcceleratorManager as m; \\
            print("RAY_NPU=%d" % m.get_current_node_num_accelerators())'
            sleep 3600
            """)
        cluster.apply(ray_pod("ray-vnpu", ray_image, {RESOURCE_VNPU: "1"}, script))
        assert log_line(cluster, "ray-vnpu", "RAY_NPU") == "1"
        vnpu_id = log_line(cluster, "ray-vnpu", "ASCEND_VISIBLE_DEVICES")
        assert int(vnpu_id) in range(7 * 16 + 100, 7 * 16 + 116)  # die 7's vNPU ids
        assert log_line(cluster, "ray-vnpu", "DEVICES") == f"/dev/davinci{vnpu_id}"
        assert log_line(cluster, "ray-vnpu", "ASCEND_RUNTIME_OPTIONS") == "VIRTUAL"
        assert (cluster.dir / "dev" / f"vdavinci{vnpu_id}").exists()  # the simulated driver made it
    finally:
        cluster.kubectl("delete", "pod", "ray-vnpu", "--ignore-not-found", "--wait=true", "--timeout=60s")
        cluster.stop("fuyao-device-plugin")
        record = next(p for p in cluster.procs if p["name"] == "fuyao-device-plugin")
        record["command"] = [a for a in record["command"] if a not in ("--vnpu-config", str(config))]
        cluster.start("fuyao-device-plugin")


SERVE_EXAMPLE = REPO / "docs" / "examples" / "ray" / "rayservice.yaml"


def host_daemon(cluster: LocalCluster, module: str, name: str, config: dict[str, Any], host: str, port: int,
                health: str) -> Daemon:
    """A fuyao daemon on the host with the admin kubeconfig and a config file (its discovery watches the cluster)."""
    path = cluster.dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return Daemon(module, ["--config", str(path), "--kubeconfig", str(cluster.dir / "admin.kubeconfig")], port,
                  health, host=host)


def router_backends(router: Daemon) -> list[str]:
    return sorted(url for url, state in http_json(f"{router.url}/debug/backends").items() if state["healthy"])


def engine_requests(url: str) -> float:
    return scrape(url, "vllm:request_success_total")


def complete(url: str, prompt: str, timeout: float = 60) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/v1/completions", json.dumps(
        {"model": "fuyao-sim-7b", "prompt": prompt, "max_tokens": 3}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def answers(url: str) -> bool:
    """Whether ``url`` answers at all. A ClusterIP that kube-proxy has not programmed yet is forwarded by the
    harness namespace, which has no route for it: ENETUNREACH, then REJECT (refused) until endpoints are ready."""
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def test_a_serve_app_on_npu_workers_answers_through_fuyaos_router_and_serve(cluster: LocalCluster,
                                                                            ray_image: str) -> None:
    """docs/examples/ray/rayservice.yaml: two Serve replicas on two 1-NPU workers (placed by the extender), each
    running an engine; fuyao's KV index follows their KV events (pod discovery); fuyao's router finds them through
    the annotated Service and answers; Serve's own endpoint routes a shared prefix to the replica that holds it."""
    documents = list(yaml.safe_load_all(SERVE_EXAMPLE.read_text()))
    service, engines_service = documents
    kv_port, router_port = free_port(), free_port()
    kv_url = f"http://{LINK_HOST}:{kv_port}"  # the host's end of the link: pods reach it
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    serve_config["applications"][0]["args"]["router"]["kvIndexUrl"] = kv_url
    serve_config["applications"][0]["args"]["engine"]["args"] = [
        "--host", "{host}", "--port", "{port}", "--model", "{model}", "--kv-events-endpoint",
        "tcp://*:{kv_events_port}", "--time-scale", "20"]
    service["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config)
    ray_spec = service["spec"]["rayClusterConfig"]
    ray_spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = ray_image
    ray_spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = ray_image
    index = host_daemon(cluster, "fuyao.kvcache.cli", "kvcache", {
        "version": "v1", "listen": f"{LINK_HOST}:{kv_port}",
        "kv_cache": {"size": 0, "events": {"discovery": {"enabled": True, "namespace": "default"}}}},
        LINK_HOST, kv_port, "/healthz")
    router = host_daemon(cluster, "fuyao.inference_router.cli", "router", {
        "version": "v1", "router": {"listen": f"127.0.0.1:{router_port}", "strategy": "prefix-aware",
                                    "discovery": {"enabled": True, "namespace": "default"},
                                    "health_check": {"interval": "1s"}},
        "kv_cache": {"service": kv_url, "tokenizer": "builtin"}}, "127.0.0.1", router_port, "/livez")
    cluster.apply(engines_service, "npu-llm-engines")
    cluster.apply(service, "rayservice")
    try:
        index.start(timeout=30)
        router.start(timeout=30)
        workers = wait_for(lambda: len(w := cluster.get_json(
            "pods", "-l", "app.kubernetes.io/name=npu-llm-engine")["items"]) == 2 and all(ready(p) for p in w) and w,
            300, "two Ready NPU workers")
        for worker in workers:
            placed_by_extender(cluster, worker["metadata"]["name"], 1)
        engine_urls = sorted(f"http://{w['status']['podIP']}:8100" for w in workers)

        def serving() -> bool:
            status = cluster.get_json("rayservice", "npu-llm").get("status") or {}
            apps = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
            return (apps.get("llm") or {}).get("status") == "RUNNING"

        wait_for(serving, 420, "the Serve application RUNNING")
        # the index follows both engines' KV events
        wait_for(lambda: sorted(n for n, s in http_json(f"{kv_url}/v1/endpoints").items()
                                if s.get("connected")) == engine_urls, 60, "the index connected to both engines")
        # a. through fuyao's router, which found both engines through the annotated Service
        wait_for(lambda: router_backends(router) == engine_urls, 60, "the router's healthy backends = the engines")
        assert complete(router.url, "hello from the router")["choices"][0]["text"]

        def serve_url() -> str | None:
            url = f"http://{cluster.get_json('service', 'npu-llm-serve-svc')['spec']['clusterIP']}:8000"
            return url if answers(f"{url}/-/routes") else None

        serve = wait_for(serve_url, 60, "Serve's Service programmed by kube-proxy")
        # each way in: a shared prefix goes to the engine that holds it, whichever replica that is
        for way, url in (("router", router.url), ("serve", serve)):
            prefix = f"[{way}] " + " ".join(f"basin{i % 17} levee{i % 5}" for i in range(300))
            before = [engine_requests(u) for u in engine_urls]
            complete(url, prefix + " first")
            after = [engine_requests(u) for u in engine_urls]
            holder = next(i for i in range(2) if after[i] > before[i])
            wait_for(lambda p=prefix, h=holder: http_json(f"{kv_url}/v1/lookup", {"prompt": p})["endpoints"].get(
                engine_urls[h], 0) > 10, 30, "the index to learn the holder's blocks")
            before = after
            for i in range(5):
                assert complete(url, f"{prefix} question {i}")["choices"][0]["text"]
            after = [engine_requests(u) for u in engine_urls]
            assert (after[holder] - before[holder], after[1 - holder] - before[1 - holder]) == (5, 0), way
    finally:
        router.close()
        index.close()
        cluster.kubectl("delete", "rayservice", "npu-llm", "--ignore-not-found", "--wait=false")
        cluster.kubectl("delete", "service", "npu-llm-engines", "--ignore-not-found")
        wait_for(lambda: not cluster.get_json("pods", "-l", "app.kubernetes.io/name=npu-llm-engine")["items"], 180,
                 "the Serve workers gone")
