"""A real kube-scheduler (built from source by hack/build-upstream.sh) using fuyao's extender with the
configuration from docs/scheduler-extender.md: the pod is filtered, scored and bound through the extender, and the
binding carries the devices the extender chose."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator

import pytest
import yaml

from fuyao.contracts import ANNOTATION_POD_ASSIGNED, RESOURCE_NPU, PodAssignment, parse_annotation
from tests.component.test_extender_http import Extender
from tests.conftest import REPO
from tests.support.apiserver import LocalApiServer, binary, control_plane
from tests.support.k8s_objects import node, pod, topology

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalApiServer]:
    with control_plane(node("ring-node", topo=topology("a1"), npus=8), node("small-node", npus=2),
                       node("cpu-node", npus=0)) as server:
        yield server


@pytest.fixture(scope="module")
def scheduler(cluster: LocalApiServer) -> Iterator[Extender]:
    extender = Extender("--kubeconfig", cluster.kubeconfig_for("admin"), "--log-level", "debug")
    deadline = time.monotonic() + 30
    while extender.get("/readyz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        with kube_scheduler(cluster, extender.url):
            yield extender
    finally:
        extender.stop()


@contextlib.contextmanager
def kube_scheduler(cluster: LocalApiServer, extender_url: str, bind: bool = True) -> Iterator[None]:
    """A real kube-scheduler with the documented example config, pointed at this cluster and extender (without
    ``bindVerb`` when not ``bind``: kube-scheduler binds)."""
    example = yaml.safe_load((REPO / "docs" / "examples" / "kube-scheduler-config.yaml").read_text())
    example["clientConnection"]["kubeconfig"] = cluster.kubeconfig_for("admin")
    example["leaderElection"]["leaderElect"] = False
    example["extenders"][0]["urlPrefix"] = extender_url
    if not bind:
        del example["extenders"][0]["bindVerb"]
    config = cluster.root / "scheduler.yaml"
    config.write_text(yaml.safe_dump(example))
    log = open(cluster.root / "kube-scheduler.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([binary("kube-scheduler"), f"--config={config}", "--secure-port=0", "--v=2"],
                            stdout=log, stderr=log)
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def wait_bound(cluster: LocalApiServer, name: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = cluster.client().read_namespaced_pod(name, "default")
        if p.spec.node_name:
            return p
        time.sleep(0.2)
    log = (cluster.root / "kube-scheduler.log").read_text()[-3000:]
    raise AssertionError(f"{name} not bound; scheduler log:\n{log}")


def test_kube_scheduler_binds_through_the_extender(cluster: LocalApiServer, scheduler: Extender) -> None:
    raw = pod("four-npus", requests={RESOURCE_NPU: "4", "cpu": "1"})
    for key in ("uid", "creationTimestamp"):
        raw["metadata"].pop(key)
    raw.pop("status")
    cluster.client().create_namespaced_pod("default", raw)
    bound = wait_bound(cluster, "four-npus")
    assert bound.spec.node_name == "ring-node"
    assignment = parse_annotation(ANNOTATION_POD_ASSIGNED, bound.metadata.annotations[ANNOTATION_POD_ASSIGNED],
                                  PodAssignment)
    devices = assignment.containers[0].devices
    assert len(devices) == 4 and len({int(d.rsplit("-", 1)[1]) // 4 for d in devices}) == 1  # a whole HCCS ring
    status, text = scheduler.get("/explain/default/four-npus")
    # the extender was asked (kube-scheduler's own resource fit had already dropped the smaller nodes, and with one
    # feasible node it skips prioritize)
    assert status == 200 and '"filter"' in text
    # the scheduler's own view agrees: a second 4-NPU pod takes the other ring, a third finds no room
    for name in ("four-npus-2", "four-npus-3"):
        other = pod(name, requests={RESOURCE_NPU: "4", "cpu": "1"})
        for key in ("uid", "creationTimestamp"):
            other["metadata"].pop(key)
        other.pop("status")
        cluster.client().create_namespaced_pod("default", other)
    second = wait_bound(cluster, "four-npus-2")
    ring2 = {int(d.rsplit("-", 1)[1]) // 4 for d in parse_annotation(
        ANNOTATION_POD_ASSIGNED, second.metadata.annotations[ANNOTATION_POD_ASSIGNED],
        PodAssignment).containers[0].devices}
    assert len(ring2) == 1 and ring2 != {int(devices[0].rsplit("-", 1)[1]) // 4}
    time.sleep(3)
    assert cluster.client().read_namespaced_pod("four-npus-3", "default").spec.node_name is None
