"""A mixed NPU + GPU cluster (the design doc's GPU layer) on KWOK nodes: a real kube-scheduler with fuyao's
extender (the documented config) places NPU pods on NPU nodes and GPU pods on GPU nodes, refuses a pod no node can
serve with a reason, and the extender scores accelerator nodes for the pods that use them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fuyao.contracts import RESOURCE_NPU, RESOURCE_NVIDIA_GPU
from tests.component.test_extender_http import Extender
from tests.integration.test_extender_kube_scheduler import kube_scheduler, wait_bound
from tests.support.apiserver import LocalApiServer, control_plane
from tests.support.k8s_objects import node, pod, topology
from tests.support.kwok import KWOK_ANNOTATION, start_kwok
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

NPU_NODES = ("npu-a", "npu-b")
GPU_NODES = ("gpu-a", "gpu-b")


def kwok_node(raw: dict) -> dict:  # type: ignore[type-arg]
    raw["metadata"]["annotations"][KWOK_ANNOTATION] = "fake"
    return raw


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalApiServer]:
    nodes = [kwok_node(node(n, topo=topology())) for n in NPU_NODES]
    nodes += [kwok_node(node(n, npus=0, extra={RESOURCE_NVIDIA_GPU: "8"},
                             labels={"nvidia.com/gpu.present": "true"})) for n in GPU_NODES]
    nodes.append(kwok_node(node("cpu-only", npus=0)))
    with control_plane(*nodes) as server:
        kwok = start_kwok(server)
        try:
            api = server.client()
            wait_for(lambda: all(any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or ())
                                 for n in api.list_node().items), 60, "KWOK nodes Ready")
            yield server
        finally:
            kwok.terminate()
            kwok.wait(10)


@pytest.fixture(scope="module")
def extender(cluster: LocalApiServer) -> Iterator[Extender]:
    ext = Extender("--kubeconfig", cluster.kubeconfig_for("admin"))
    wait_for(lambda: ext.get("/readyz")[0] == 200, 30, "the extender ready")
    try:
        with kube_scheduler(cluster, ext.url):
            yield ext
    finally:
        ext.stop()


def create(cluster: LocalApiServer, name: str, requests: dict[str, str]) -> None:
    raw = pod(name, requests={"cpu": "1", **requests})
    for key in ("uid", "creationTimestamp"):
        raw["metadata"].pop(key)
    raw.pop("status")
    cluster.client().create_namespaced_pod("default", raw)


def test_npu_pods_avoid_gpu_nodes_and_gpu_pods_avoid_npu_nodes(cluster: LocalApiServer, extender: Extender) -> None:
    for i in range(3):
        create(cluster, f"npu-{i}", {RESOURCE_NPU: "4"})
        create(cluster, f"gpu-{i}", {RESOURCE_NVIDIA_GPU: "4"})
    for i in range(3):
        assert wait_bound(cluster, f"npu-{i}").spec.node_name in NPU_NODES
        assert wait_bound(cluster, f"gpu-{i}").spec.node_name in GPU_NODES
    api = cluster.client()
    wait_for(lambda: api.read_namespaced_pod("npu-0", "default").status.phase == "Running", 30, "KWOK runs pods")
    # binpack: the three 4-NPU pods fill one node before the next (whole nodes stay free for 8-NPU pods)
    placed = [api.read_namespaced_pod(f"npu-{i}", "default").spec.node_name for i in range(3)]
    assert sorted(placed.count(n) for n in NPU_NODES) == [1, 2]
    gpu_placed = [api.read_namespaced_pod(f"gpu-{i}", "default").spec.node_name for i in range(3)]
    assert sorted(gpu_placed.count(n) for n in GPU_NODES) == [1, 2]


def test_a_pod_no_node_can_serve_stays_pending_with_a_reason(cluster: LocalApiServer, extender: Extender) -> None:
    create(cluster, "both", {RESOURCE_NPU: "1", RESOURCE_NVIDIA_GPU: "1"})  # no node has NPUs and GPUs
    api = cluster.client()

    def reason() -> str:
        events = api.list_namespaced_event("default", field_selector="involvedObject.name=both").items
        return " ".join(e.message or "" for e in events if e.reason == "FailedScheduling")

    text = wait_for(reason, 30, "a FailedScheduling event")
    assert "0/5 nodes are available" in text
    time.sleep(1)
    assert api.read_namespaced_pod("both", "default").spec.node_name is None


def test_scores_keep_accelerator_nodes_for_accelerator_pods(cluster: LocalApiServer, extender: Extender) -> None:
    """The extender's own prioritize over the mixed cluster (what Volcano and an extender without
    managedResources send): an NPU pod scores NPU nodes only, a GPU pod GPU nodes, a CPU pod the CPU node best."""
    names = [*NPU_NODES, *GPU_NODES, "cpu-only"]

    def scores(requests: dict[str, str]) -> dict[str, int]:
        raw = pod(f"probe-{time.monotonic_ns()}", requests={"cpu": "1", **requests})
        status, body = extender.post("/prioritize", {"Pod": raw, "NodeNames": names})
        assert status == 200, body
        return {entry["Host"]: entry["Score"] for entry in body}  # type: ignore[attr-defined]

    npu = scores({RESOURCE_NPU: "2"})
    assert min(npu[n] for n in NPU_NODES) > max(npu[n] for n in (*GPU_NODES, "cpu-only"))
    gpu = scores({RESOURCE_NVIDIA_GPU: "2"})
    assert min(gpu[n] for n in GPU_NODES) > max(gpu[n] for n in (*NPU_NODES, "cpu-only"))
    cpu = scores({})
    assert cpu["cpu-only"] > max(cpu[n] for n in (*NPU_NODES, *GPU_NODES))
