"""The NPU operator controller's decisions against a recording fake of the API server: which policy events start a
pass at once, reading and writing a status that carries keys a newer operator wrote, what is removed from nodes
(the QoS agent's extended resources, on deletion and once a disabled agent's pods are gone; never an ``accelerator``
label someone else set), the vNPU config checked with the device plugin's own parser, the deletion wait derived
from the uninstall hook's timeout, the CRD's conditions list, and the client version the REST layer needs."""

from __future__ import annotations

import inspect
import subprocess
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from fuyao.contracts import (
    ACCELERATOR_ASCEND_NPU,
    ANNOTATION_NFD_LABELS,
    ANNOTATION_NODE_USAGE,
    LABEL_ACCELERATE_TYPE,
    LABEL_ACCELERATOR,
    LABEL_APP_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_OPERATOR_COMPONENT,
    RESOURCE_BATCH_CPU,
    RESOURCE_BATCH_MEMORY,
    RESOURCE_NPU,
)
from fuyao.npu_operator import agents, controller
from fuyao.npu_operator.api import Component, PolicySpec, StateType
from fuyao.npu_operator.render import Settings
from fuyao.npu_operator.status import Observed, Workload, component_statuses, policy_status
from tests.support.apiserver import binary

REPO = Path(__file__).resolve().parents[2]
NS = "npu-operator"
T0 = datetime(2026, 12, 7, 10, tzinfo=UTC)


class FakeRest:
    """What the controller asks the API server, answered from ``objects`` (path → list items) and recorded."""

    def __init__(self, lists: Mapping[str, list[dict[str, Any]]] | None = None):
        self.lists = dict(lists or {})
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.deleted: list[str] = []

    def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        return [dict(o) for o in self.lists.get(path, [])]

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> None:
        self.patches.append((path, dict(patch)))

    def delete(self, obj: Mapping[str, Any]) -> bool:
        self.deleted.append(obj["metadata"]["name"])
        return True


def npu_node(name: str, *, labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None,
             batch: bool = True) -> dict[str, Any]:
    resources = {"cpu": "64", RESOURCE_NPU: "8",
                 **({RESOURCE_BATCH_CPU: "12000", RESOURCE_BATCH_MEMORY: "1073741824"} if batch else {})}
    return {"metadata": {"name": name, "labels": dict(labels or {}), "annotations": dict(annotations or {})},
            "status": {"capacity": dict(resources), "allocatable": dict(resources)}}


def qos_pod(name: str, phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {LABEL_APP_INSTANCE: "qos-agent"}}, "status": {"phase": phase}}


# ---------------------------------------------------------------------------------------------------------------
# 2: policy events, and a status with keys this operator does not know
# ---------------------------------------------------------------------------------------------------------------
def policy(generation: int, resource_version: str, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": "cluster", "generation": generation, "resourceVersion": resource_version, **meta},
            "status": {"observedGeneration": generation}}


def test_only_a_spec_change_wakes_the_controller_at_once() -> None:
    woken: list[str] = []
    sink = controller.PolicyEvents(lambda: woken.append("now"))
    sink.replace([policy(1, "10")])
    assert woken == ["now"]  # first seen
    sink.replace([policy(1, "11")])  # a re-list with nothing new in the spec
    sink.upsert(policy(1, "12"))  # the operator's own status patch
    sink.upsert({**policy(1, "13"), "metadata": {**policy(1, "13")["metadata"], "finalizers": ["x"]}})
    assert woken == ["now"]
    sink.upsert(policy(2, "14"))  # the spec changed
    assert woken == ["now"] * 2
    sink.upsert(policy(2, "15", deletionTimestamp="2026-12-07T10:00:00Z"))  # deletion began
    assert woken == ["now"] * 3
    sink.delete(policy(2, "16"))
    assert woken == ["now"] * 4
    sink.upsert(policy(1, "17"))  # created again
    assert woken == ["now"] * 5


def test_a_status_with_keys_a_newer_operator_wrote_is_read_and_not_rewritten() -> None:
    first = policy_status(PolicySpec(), Observed(npu_nodes=("n1",)), 1, None, T0)
    stored = first.model_dump(mode="json", by_alias=True, exclude_none=True)
    stored["upgradeState"] = {"phase": "idle"}  # a top-level key of a newer operator (its CRD stays after a rollback)
    stored["componentStatuses"][0]["upgrade"] = {"step": 1}  # and one inside an entry
    stored["conditions"].append({"type": "Upgrading", "status": "False", "reason": "Idle",
                                 "lastTransitionTime": "2026-12-01T00:00:00Z"})  # a condition type it does not know
    previous = controller._status_model(stored)
    assert previous is not None
    assert previous.conditions == first.conditions and previous.component_statuses == first.component_statuses
    again = policy_status(PolicySpec(), Observed(npu_nodes=("n1",)), 1, previous, T0 + timedelta(seconds=2))
    assert [c.last_transition_time for c in again.conditions] == [c.last_transition_time for c in first.conditions]
    body = again.model_dump(mode="json", by_alias=True, exclude_none=True)
    clean = first.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert not controller.status_differs(body, {**clean, "upgradeState": {"phase": "idle"}})  # no write, no Event
    assert controller.status_differs(body, stored)  # its entries are the operator's: written once, then settled
    assert not controller.status_differs(body, {**stored, **body})
    assert controller._status_model({"observedGeneration": "soon"}) is not None  # a bad field takes its default
    assert controller._status_model(None) is None and controller._status_model("garbage") is None


# ---------------------------------------------------------------------------------------------------------------
# 3: the QoS agent's extended resources
# ---------------------------------------------------------------------------------------------------------------
def test_cleanup_removes_the_qos_agents_extended_resources() -> None:
    rest = FakeRest({"/api/v1/nodes": [npu_node("npu-0", annotations={ANNOTATION_NODE_USAGE: "{}"}),
                                       npu_node("cpu-0", batch=False)]})
    done = controller.cleanup(rest, NS)  # type: ignore[arg-type]
    assert ("/api/v1/nodes/npu-0/status", {"status": {
        "capacity": {RESOURCE_BATCH_CPU: None, RESOURCE_BATCH_MEMORY: None},
        "allocatable": {RESOURCE_BATCH_CPU: None, RESOURCE_BATCH_MEMORY: None}}}) in rest.patches
    assert ("/api/v1/nodes/npu-0", {"metadata": {"labels": {}, "annotations": {ANNOTATION_NODE_USAGE: None}}}) \
        in rest.patches
    assert not any(path.startswith("/api/v1/nodes/cpu-0") for path, _ in rest.patches)  # nothing of ours there
    assert any(RESOURCE_BATCH_CPU in line for line in done)


def test_a_disabled_qos_agent_leaves_no_resources_once_its_pods_are_gone() -> None:
    ds = {"apiVersion": "apps/v1", "kind": "DaemonSet",
          "metadata": {"name": "qos-agent", "namespace": NS,
                       "labels": {LABEL_OPERATOR_COMPONENT: "qosAgent", LABEL_MANAGED_BY: "fuyao-npu-operator"}}}
    rest = FakeRest({f"/apis/apps/v1/namespaces/{NS}/daemonsets": [ds]})

    def node_patches() -> list[tuple[str, dict[str, Any]]]:
        return [(path, patch) for path, patch in rest.patches if path.startswith("/api/v1/nodes")]

    ctl = controller.Controller(rest, Settings(namespace=NS))  # type: ignore[arg-type]
    ctl._prune(set(), {})  # qosAgent disabled: its DaemonSet goes
    assert rest.deleted == ["qos-agent"]
    off, nodes = PolicySpec(), [npu_node("npu-0", annotations={ANNOTATION_NODE_USAGE: "{}"})]
    ctl._remove_qos_leftovers(off, None, nodes, [qos_pod("qos-agent-x1")])
    assert node_patches() == []  # its pod would write them back: wait
    ctl._remove_qos_leftovers(off, None, nodes, [qos_pod("qos-agent-x1", "Succeeded")])
    assert [path for path, _ in node_patches()] == ["/api/v1/nodes/npu-0/status", "/api/v1/nodes/npu-0"]
    assert node_patches()[0][1] == {"status": {
        "capacity": {RESOURCE_BATCH_CPU: None, RESOURCE_BATCH_MEMORY: None},
        "allocatable": {RESOURCE_BATCH_CPU: None, RESOURCE_BATCH_MEMORY: None}}}
    rest.patches.clear()
    ctl._remove_qos_leftovers(off, None, nodes, [])  # done once: an agent installed by hand keeps its resources
    assert rest.patches == []

    # an operator restarted after the spec change: the last status showed the agent, so it is cleaned up too
    restarted = controller.Controller(rest, Settings(namespace=NS))  # type: ignore[arg-type]
    on = PolicySpec.model_validate({"qosAgent": {"enabled": True}})
    last = policy_status(on, Observed(), 1, None, T0)
    restarted._remove_qos_leftovers(off, last, nodes, [])
    assert len(node_patches()) == 2
    rest.patches.clear()
    restarted._remove_qos_leftovers(on, None, nodes, [])  # an enabled agent's resources are its own
    assert rest.patches == []


# ---------------------------------------------------------------------------------------------------------------
# 4: the vNPU config, checked with the device plugin's parser
# ---------------------------------------------------------------------------------------------------------------
def test_a_vnpu_config_the_device_plugin_would_reject_fails_vnpu_with_its_message() -> None:
    from fuyao.vnpu.plan import PlanError, parse_vnpu_config

    bad = {"devices": [{"device_id": "0", "vnpu_count": 99}]}
    with pytest.raises(PlanError) as rejected:
        parse_vnpu_config(bad, "spec.vnpu.config")
    ds = Workload(desired=1, ready=1, updated=1)
    seen = Observed(npu_nodes=("n1",), workloads={Component.DEVICE_PLUGIN: ds, Component.VNPU: ds},
                    allocatable={"n1": 8})
    spec = PolicySpec.model_validate({"vnpu": {"enabled": True, "mode": "static", "config": bad}})
    vnpu = next(s for s in component_statuses(spec, seen) if s.name == Component.VNPU)
    assert (vnpu.state.type, vnpu.state.reason, vnpu.state.message) == (StateType.FAILED, "InvalidConfig",
                                                                        str(rejected.value))
    assert "less than or equal to 16" in vnpu.state.message
    conditions = {c.type: c for c in policy_status(spec, seen, 1).conditions}
    assert conditions["Degraded"].status == "True" and "vnpu (InvalidConfig)" in conditions["Degraded"].message
    good = PolicySpec.model_validate({"vnpu": {"enabled": True, "mode": "static",
                                               "config": {"devices": [{"device_id": "0", "vnpu_count": 4}]}}})
    assert next(s for s in component_statuses(good, seen) if s.name == Component.VNPU).state.type == StateType.RUNNING


# ---------------------------------------------------------------------------------------------------------------
# 5: an accelerator label someone else set
# ---------------------------------------------------------------------------------------------------------------
def test_discovery_neither_claims_nor_deletes_an_accelerator_label_someone_else_set() -> None:
    found = agents.Discovered(devices=(("0000:c1:00.0", "910"),), chip_model="910ProB")
    mind = {"labels": {LABEL_ACCELERATOR: "huawei-Ascend910"}}
    patch = agents.label_patch(found, mind)
    assert patch is not None and LABEL_ACCELERATOR not in patch["metadata"]["labels"]
    assert patch["metadata"]["annotations"][ANNOTATION_NFD_LABELS] == LABEL_ACCELERATE_TYPE
    labelled = {"labels": {**mind["labels"], **patch["metadata"]["labels"]},
                "annotations": patch["metadata"]["annotations"]}
    assert agents.label_patch(found, labelled) is None  # settled: left alone for good
    # discovery's own accelerator label (recorded) stays discovery's
    ours = agents.label_patch(found, {})
    assert ours is not None and ours["metadata"]["labels"][LABEL_ACCELERATOR] == ACCELERATOR_ASCEND_NPU
    # deleting the policy removes what discovery recorded, never the other accelerator value
    node = {"metadata": {"name": "npu-9", **labelled}}
    patches, _ = controller.node_cleanup(node)
    assert patches[0][1]["metadata"]["labels"] == {LABEL_ACCELERATE_TYPE: None}
    changed = {"metadata": {"name": "npu-8", "labels": {LABEL_ACCELERATOR: "huawei-Ascend910"},
                            "annotations": {ANNOTATION_NFD_LABELS: LABEL_ACCELERATOR}}}  # recorded, then changed
    assert controller.node_cleanup(changed)[0][0][1]["metadata"]["labels"] == {}
    # the status names the nodes the components therefore do not serve
    assert controller.foreign_accelerators([node, changed]) == {"npu-9": "huawei-Ascend910",
                                                                "npu-8": "huawei-Ascend910"}
    nfd = next(s for s in component_statuses(PolicySpec(), Observed(foreign_accelerators={"npu-9": "huawei-Ascend910"}))
               if s.name == Component.NODE_FEATURE_DISCOVERY)
    assert (nfd.state.type, nfd.state.reason) == (StateType.DEGRADED, "AcceleratorLabelInUse")
    assert "npu-9" in nfd.state.message and "huawei-Ascend910" in nfd.state.message


# ---------------------------------------------------------------------------------------------------------------
# 6: the deletion wait and the uninstall hook's timeout
# ---------------------------------------------------------------------------------------------------------------
def test_the_operator_stops_waiting_before_the_uninstall_hook_gives_up(capsys: pytest.CaptureFixture[str]) -> None:
    from fuyao.npu_operator.cli import main

    assert controller.stop_wait(controller.CLEANUP_TIMEOUT_S) == controller.STOP_WAIT_S
    assert controller.STOP_WAIT_S + controller.CLEANUP_MARGIN_S <= controller.CLEANUP_TIMEOUT_S
    assert controller.stop_wait(300) == 270
    with pytest.raises(ValueError, match="too short"):
        controller.stop_wait(45)
    for argv in (["run", "--cleanup-timeout", "45s"], ["cleanup", "--timeout", "30s"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2 and "too short" in capsys.readouterr().err
    # the wait the controller applies is its own setting (the run command derives it from the hook's timeout)
    pods = [{"metadata": {"name": "npu-device-plugin-x", "labels": {LABEL_APP_INSTANCE: "npu-device-plugin"}},
             "status": {"phase": "Running"}}]
    rest = FakeRest({f"/api/v1/namespaces/{NS}/pods": pods})
    waiting = controller.Controller(rest, Settings(namespace=NS), stop_wait_s=60.0)  # type: ignore[arg-type]
    assert waiting._stop_components() == ["npu-device-plugin-x"]
    assert controller.Controller(rest, Settings(namespace=NS),  # type: ignore[arg-type]
                                 stop_wait_s=-1.0)._stop_components() == []


def _rendered(*sets: str) -> list[dict[str, Any]]:
    command = [binary("helm"), "template", "npu-operator", str(REPO / "charts" / "npu-operator"), "--namespace", NS]
    for value in sets:
        command += ["--set", value]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("sets", [(), ("operator.cleanupTimeout=4m",)])
def test_the_chart_gives_the_operator_and_its_hook_the_same_timeout(sets: tuple[str, ...]) -> None:
    docs = _rendered(*sets)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    hook = next(d for d in docs if d["kind"] == "Job"
                and d["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete")  # not the CRD hook
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    given = [a.split("=", 1)[1] for a in args if a.startswith("--cleanup-timeout=")]
    hook_timeout = [a.split("=", 1)[1] for a in hook["spec"]["template"]["spec"]["containers"][0]["command"]
                    if a.startswith("--timeout=")]
    assert given == hook_timeout == [sets[0].split("=")[1] if sets else "150s"]
    from fuyao.npu_operator.cli import build_parser

    parsed = build_parser().parse_args(["run", *args])  # the operator takes what the chart gives it
    assert controller.stop_wait(parsed.cleanup_timeout) + controller.CLEANUP_MARGIN_S == parsed.cleanup_timeout


def test_the_chart_refuses_a_cleanup_timeout_the_operator_would() -> None:
    with pytest.raises(subprocess.CalledProcessError) as refused:
        _rendered("operator.cleanupTimeout=59s")
    assert "operator.cleanupTimeout (59s) must be at least 60s" in refused.value.stderr
    with pytest.raises(SystemExit):
        from fuyao.npu_operator.cli import build_parser

        build_parser().parse_args(["cleanup", "--timeout=59s"])


# ---------------------------------------------------------------------------------------------------------------
# 7: the CRD's conditions, 1: the client the REST layer needs
# ---------------------------------------------------------------------------------------------------------------
def test_the_crds_conditions_are_a_map_keyed_by_type() -> None:
    from fuyao.npu_operator.api import crd

    status = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]  # a map key must be required
    committed = yaml.safe_load((REPO / "charts" / "npu-operator" / "crds" / "npuclusterpolicies.yaml").read_text())
    assert committed == crd()


def test_the_declared_kubernetes_client_has_what_the_rest_layer_calls() -> None:
    from kubernetes.client import ApiClient
    from packaging.requirements import Requirement

    from fuyao.npu_operator.kube import Rest

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    client = next(Requirement(d) for d in deps if Requirement(d).name == "kubernetes")
    # 36.0.3 is the last client generated as python-legacy: call_api(resource_path, method, ...), no param_serialize
    assert not client.specifier.contains("36.0.3") and client.specifier.contains("37.0.0")
    assert callable(ApiClient.param_serialize)
    assert list(inspect.signature(ApiClient.call_api).parameters)[1:3] == ["method", "url"]

    class Legacy:
        def call_api(self, resource_path: str, method: str) -> None: ...

    with pytest.raises(TypeError, match="kubernetes client 37 or later"):
        Rest(Legacy())
