"""The extender's throughput profile with a real kube-scheduler: no bindVerb (kube-scheduler binds; the device plugin
picks the dies on the node) and ``shortlist: 1`` (the filter passes only its best node, so kube-scheduler binds it
without scoring: no prioritize call). Pods with soft preferences still get a choice. docs/scheduler-extender.md."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import yaml

from fuyao.contracts import ANNOTATION_POD_ASSIGNED, RESOURCE_NPU
from tests.component.test_extender_http import Extender
from tests.integration.test_extender_kube_scheduler import kube_scheduler, wait_bound
from tests.support.apiserver import LocalApiServer, control_plane
from tests.support.engines import metric_total
from tests.support.k8s_objects import node, pod, topology

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalApiServer]:
    with control_plane(*(node(name, topo=topology(), npus=8) for name in ("npu-a", "npu-b", "npu-c"))) as server:
        # npu-b holds 6 NPUs already: binpack (the extender's default) prefers it for a small pod
        server.client().create_namespaced_pod("default", create(pod("holder", node_name="npu-b",
                                                                    requests={RESOURCE_NPU: "6", "cpu": "1"})))
        yield server


def create(raw: dict) -> dict:  # type: ignore[type-arg]
    for key in ("uid", "creationTimestamp"):
        raw["metadata"].pop(key, None)
    raw.pop("status", None)
    return raw


@pytest.fixture(scope="module")
def scheduler(cluster: LocalApiServer) -> Iterator[Extender]:
    config = cluster.root / "extender.yaml"
    config.write_text(yaml.safe_dump({"version": "v1", "shortlist": 1, "bind": False}))
    extender = Extender("--kubeconfig", cluster.kubeconfig_for("admin"), "--config", str(config))
    deadline = time.monotonic() + 30
    while extender.get("/readyz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        with kube_scheduler(cluster, extender.url, bind=False):  # the throughput profile: kube-scheduler binds
            yield extender
    finally:
        extender.stop()


def calls(extender: Extender, verb: str) -> float:
    return metric_total(extender.get("/metrics")[1], "fuyao_extender_decisions_total", verb=verb)


def test_the_extender_decides_and_kube_scheduler_binds_without_scoring(cluster: LocalApiServer,
                                                                      scheduler: Extender) -> None:
    cluster.client().create_namespaced_pod("default", create(pod("small", requests={RESOURCE_NPU: "2", "cpu": "1"})))
    bound = wait_bound(cluster, "small")
    assert bound.spec.node_name == "npu-b"  # the extender's single best node (binpack), bound by kube-scheduler
    assert ANNOTATION_POD_ASSIGNED not in (bound.metadata.annotations or {})  # no bindVerb: the device plugin picks
    assert calls(scheduler, "filter") >= 1 and calls(scheduler, "prioritize") == 0 and calls(scheduler, "bind") == 0
    status, text = scheduler.get("/explain/default/small")
    assert status == 200 and "shortlist: the 1 best-scoring of 3 feasible nodes passed" in text


def test_a_pod_with_soft_preferences_gets_a_choice_kube_scheduler_scores(cluster: LocalApiServer,
                                                                         scheduler: Extender) -> None:
    before = calls(scheduler, "prioritize")
    raw = create(pod("prefers-a", requests={RESOURCE_NPU: "1", "cpu": "1"}))
    raw["spec"]["affinity"] = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "preference": {"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": ["npu-a"]}]}}]}}
    cluster.client().create_namespaced_pod("default", raw)
    wait_bound(cluster, "prefers-a")
    # both feasible nodes (npu-b is full now) went back to kube-scheduler, which scored them: prioritize was called
    assert calls(scheduler, "prioritize") == before + 1
