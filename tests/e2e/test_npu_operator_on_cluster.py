"""The NPU operator on the real local cluster (``components="chart"``, nothing of fuyao running): the design doc's
``helm install npu-operator`` with its flags turns every component ``running``; node feature discovery labels the
node; the validation pod's ``npu-smi info`` shows the node's NPUs; killing the device plugin pod makes the status
``degraded`` with the node's name, and it recovers; a driver mismatch is reported; disabling a component removes
it; ``helm uninstall`` (the policy deleted first) leaves nothing behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuyao.contracts import (
    ANNOTATION_NFD_LABELS,
    ANNOTATION_NODE_TOPOLOGY,
    LABEL_ACCELERATE_TYPE,
    LABEL_ACCELERATOR,
    LABEL_DEVICE_COUNT,
    RESOURCE_NPU,
)
from fuyao.npu_operator.render import validator_name
from tests.support.charts import (
    OPERATOR_NAMESPACE,
    POLICY,
    all_running,
    install_operator,
    policy_states,
    uninstall_operator,
)
from tests.support.cluster import LocalCluster
from tests.support.polling import wait_for

pytestmark = pytest.mark.e2e
NS = OPERATOR_NAMESPACE


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, str]]:
    from tests.support.cluster import running
    from tests.support.runtime_image import build

    archive, tag = build()
    with running(tmp_path_factory.mktemp("operator-cluster", numbered=True), archive, components="chart") as local:
        yield local, tag


@pytest.fixture(scope="module")
def installed(cluster: tuple[LocalCluster, str]) -> dict[str, float]:
    local, tag = cluster
    assert LABEL_ACCELERATOR not in local.node_json()["metadata"].get("labels", {})  # an empty cluster
    return install_operator(local, tag, log=lambda _line: None)


def events(local: LocalCluster) -> list[dict]:  # type: ignore[type-arg]
    listed = local.get_json("events", "-n", "default", "--field-selector", "involvedObject.kind=NPUClusterPolicy")
    return list(listed["items"])


def test_the_design_doc_path_turns_every_component_running(cluster: tuple[LocalCluster, str],
                                                            installed: dict[str, float]) -> None:
    local, _ = cluster
    states = policy_states(local)
    assert {name for name, (state, _) in states.items() if state == "running"} >= {
        "driver", "nodeFeatureDiscovery", "devicePlugin", "exporter", "schedulerExtender", "validator"}
    assert states["qosAgent"][0] == states["vnpu"][0] == "disabled"
    out = local.kubectl("get", "npuclusterpolicy", "cluster", "-o",
                        "jsonpath={.status.componentStatuses[*].state.type}")
    assert set(out.split()) == {"running", "disabled"}, out
    table = local.kubectl("get", "npuclusterpolicy")
    assert "True" in table.splitlines()[1] and "running" in table.splitlines()[1], table
    # discovery labelled the node from its PCI devices and npu-smi; the device plugin advertises its NPUs
    node = local.node_json()
    labels = node["metadata"]["labels"]
    assert labels[LABEL_ACCELERATOR] == "huawei-ascend-npu" and labels[LABEL_ACCELERATE_TYPE] == "910B4"
    assert set(node["metadata"]["annotations"][ANNOTATION_NFD_LABELS].split(",")) >= {LABEL_ACCELERATOR}
    assert node["status"]["allocatable"][RESOURCE_NPU] == "8"
    # the validation pod got one NPU and its npu-smi info shows the node's eight
    pod = local.get_json("pod", "-n", NS, validator_name(local.node))
    assert pod["status"]["phase"] == "Succeeded"
    log = local.pod_log(NS, pod["metadata"]["name"], "validator")
    assert "npu-smi info lists 8 NPU chip(s) (910B4)" in log and log.count("910B4") >= 8, log[:600]
    assert "ASCEND_VISIBLE_DEVICES=" in log
    assert "a one-NPU pod ran npu-smi info" in states["validator"][1]
    assert sum(installed.values()) > 0


def test_killing_the_device_plugin_pod_degrades_it_naming_the_node_then_it_recovers(
        cluster: tuple[LocalCluster, str], installed: dict[str, float]) -> None:
    local, _ = cluster
    before = {e["metadata"]["name"] for e in events(local)}
    pods = local.get_json("pods", "-n", NS, "-l", "app.kubernetes.io/name=npu-device-plugin")["items"]
    assert len(pods) == 1
    local.kubectl("delete", "pod", "-n", NS, pods[0]["metadata"]["name"], "--wait=false")

    def degraded_event() -> dict | None:  # type: ignore[type-arg]
        return next((e for e in events(local) if e["metadata"]["name"] not in before
                     and e["reason"] == "ComponentDegraded" and e["message"].startswith("devicePlugin")), None)

    event = wait_for(degraded_event, 60, "a devicePlugin degraded event")
    assert local.node in event["message"] and event["type"] == "Warning", event["message"]
    wait_for(lambda: policy_states(local).get("devicePlugin", ("",))[0] == "running", 120,
             "the device plugin running again")
    recovered = [e for e in events(local) if e["metadata"]["name"] not in before
                 and e["reason"] == "ComponentRunning" and e["message"].startswith("devicePlugin")]
    assert recovered
    wait_for(lambda: all_running(local), 120, f"every component running ({policy_states(local)})")


def test_a_driver_mismatch_is_reported_with_the_node(cluster: tuple[LocalCluster, str],
                                                     installed: dict[str, float]) -> None:
    local, _ = cluster
    found = json.loads(local.fake_npu_smi("fake", "show"))["driver_version"]
    local.kubectl("patch", "npuclusterpolicy", "cluster", "--type=merge", "-p",
                  json.dumps({"spec": {"driver": {"version": "23.0.5"}}}))
    try:
        wait_for(lambda: policy_states(local).get("driver", ("",))[0] == "degraded", 60, "the driver degraded")
        message = policy_states(local)["driver"][1]
        assert f"expected driver 23.0.5, found {found} on {local.node}" in message, message
        ready = [c for c in local.get_json(POLICY)["status"]["conditions"] if c["type"] == "Degraded"]
        assert ready[0]["status"] == "True" and "driver (VersionMismatch)" in ready[0]["message"]
    finally:
        local.kubectl("patch", "npuclusterpolicy", "cluster", "--type=merge", "-p",
                      json.dumps({"spec": {"driver": {"version": found}}}))
    wait_for(lambda: policy_states(local).get("driver", ("",))[0] == "running", 60, "the driver running")


def test_disabling_a_component_removes_it(cluster: tuple[LocalCluster, str], installed: dict[str, float]) -> None:
    local, _ = cluster
    local.kubectl("patch", "npuclusterpolicy", "cluster", "--type=merge", "-p",
                  json.dumps({"spec": {"qosAgent": {"enabled": True}}}))
    wait_for(lambda: local.get_json("daemonsets", "-n", NS, "-l", "app.kubernetes.io/name=qos-agent")["items"],
             60, "the QoS agent DaemonSet")
    local.kubectl("patch", "npuclusterpolicy", "cluster", "--type=merge", "-p",
                  json.dumps({"spec": {"qosAgent": {"enabled": False}}}))
    wait_for(lambda: not local.get_json("daemonsets,configmaps,serviceaccounts", "-n", NS, "-l",
                                        "app.kubernetes.io/name=qos-agent")["items"], 60, "the QoS agent removed")
    assert not local.get_json("clusterroles", "-l", "app.kubernetes.io/name=qos-agent")["items"]
    wait_for(lambda: policy_states(local).get("qosAgent", ("",))[0] == "disabled", 60, "qosAgent disabled")


def test_helm_uninstall_leaves_nothing_behind(cluster: tuple[LocalCluster, str], installed: dict[str, float],
                                              tmp_path: Path) -> None:
    local, _ = cluster
    uninstall_operator(local)
    assert local.get_json("npuclusterpolicies")["items"] == []

    def leftovers() -> list[str]:
        kinds = "all,configmaps,serviceaccounts,roles,rolebindings,clusterroles,clusterrolebindings"
        found = local.get_json(kinds, "-A", "-l", "app.kubernetes.io/part-of=fuyao")["items"]
        found += local.get_json(kinds, "-A", "-l", "app.kubernetes.io/managed-by=fuyao-npu-operator")["items"]
        return [f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}" for o in found
                if not o["metadata"].get("deletionTimestamp")]

    wait_for(lambda: not leftovers(), 120, f"every object gone ({leftovers()})")
    meta = local.node_json()["metadata"]
    for key in (LABEL_ACCELERATOR, LABEL_ACCELERATE_TYPE, LABEL_DEVICE_COUNT):
        assert key not in meta.get("labels", {}), key
    for key in (ANNOTATION_NFD_LABELS, ANNOTATION_NODE_TOPOLOGY):
        assert key not in (meta.get("annotations") or {}), key
