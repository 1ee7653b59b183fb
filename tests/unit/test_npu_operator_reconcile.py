"""Whole reconcile passes of the NPU operator against an in-memory API server (``helm template`` replaced by a fixed
rendering): the device plugin and what uses it (vNPUs, the exporter, the validation pods) are held back while the
driver check does not pass, with what already runs left in place, and rolled out once it passes (the GPU Operator's
state order: driver, then device plugin); and the removal of a disabled QoS agent's node resources is recorded on
the policy, so an operator restarted while it waits for the agent's pods still does it."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from fuyao.contracts import (
    ACCELERATOR_ASCEND_NPU,
    ANNOTATION_NODE_USAGE,
    LABEL_ACCELERATOR,
    LABEL_APP_INSTANCE,
    LABEL_NPU_DRIVER,
    LABEL_OPERATOR_COMPONENT,
    RESOURCE_BATCH_CPU,
    RESOURCE_BATCH_MEMORY,
    RESOURCE_NPU,
)
from fuyao.npu_operator import controller, render
from fuyao.npu_operator.api import PolicyStatus, StateType
from fuyao.npu_operator.kube import KINDS, collection, object_path
from fuyao.npu_operator.render import Settings

NS = "npu-operator"
NODES = "/api/v1/nodes"
PODS = collection("v1", "pods", NS)


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class MemoryApi:
    """The operator's REST calls answered from memory: the policy, nodes, pods, and what it applies (DaemonSets
    report every pod ready at once). Records what it applied and deleted."""

    def __init__(self, spec: Mapping[str, Any], nodes: list[dict[str, Any]]):
        self.policy: dict[str, Any] = {"apiVersion": "npu.openfuyao.com/v1alpha1", "kind": "NPUClusterPolicy",
                                       "metadata": {"name": "cluster", "uid": "u-1", "generation": 1,
                                                    "resourceVersion": "1"}, "spec": dict(spec)}
        self.nodes = {n["metadata"]["name"]: n for n in nodes}
        self.pods: list[dict[str, Any]] = []
        self.objects: dict[str, dict[str, Any]] = {}
        self.applied: list[str] = []
        self.deleted: list[str] = []

    def get(self, path: str, query: Any = None) -> Any:
        return copy.deepcopy(self.policy) if path == controller.POLICY_PATH else None

    def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        if path == NODES:
            return copy.deepcopy(list(self.nodes.values()))
        if path == PODS:
            return copy.deepcopy(self.pods)
        return [copy.deepcopy(o) for p, o in self.objects.items() if p.rsplit("/", 1)[0] == path]

    def apply(self, obj: Mapping[str, Any], path: str | None = None) -> dict[str, Any]:
        stored = copy.deepcopy(dict(obj))
        if stored["kind"] == "DaemonSet":
            n = sum(1 for node in self.nodes.values()
                    if node["metadata"]["labels"].get(LABEL_ACCELERATOR) == ACCELERATOR_ASCEND_NPU)
            stored["status"] = {"desiredNumberScheduled": n, "numberReady": n, "updatedNumberScheduled": n}
        self.objects[object_path(obj)] = stored
        self.applied.append(f"{obj['kind']}/{obj['metadata']['name']}")
        return copy.deepcopy(stored)

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        self.pods.append(copy.deepcopy(dict(obj)))
        return dict(obj)

    def delete(self, obj: Mapping[str, Any]) -> bool:
        self.deleted.append(f"{obj['kind']}/{obj['metadata']['name']}")
        if obj["kind"] == "Pod":
            self.pods = [p for p in self.pods if p["metadata"]["name"] != obj["metadata"]["name"]]
            return True
        return self.objects.pop(object_path(obj), None) is not None

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> None:
        if path == controller.POLICY_PATH:
            self.policy = merge(self.policy, {k: v for k, v in patch.items()})
            self.policy["metadata"].pop("resourceVersion", None)
            self.policy["metadata"]["resourceVersion"] = "2"
        elif path == controller.POLICY_PATH + "/status":
            self.policy = merge(self.policy, patch)
        elif path.startswith(NODES + "/"):
            name = path.removeprefix(NODES + "/").removesuffix("/status")
            self.nodes[name] = merge(self.nodes[name], patch)

    def request(self, method: str, path: str, body: Any = None, **_: Any) -> None:
        return None  # Events

    def served(self, group_version: str) -> set[str]:
        return set()

    def status(self) -> dict[str, tuple[StateType, str, str]]:
        status = PolicyStatus.model_validate(self.policy["status"])
        return {s.name.value: (s.state.type, s.state.reason, s.state.message) for s in status.component_statuses}


def node(name: str, driver: str | None = "24.1.rc3", qos: bool = False) -> dict[str, Any]:
    labels = {LABEL_ACCELERATOR: ACCELERATOR_ASCEND_NPU, **({LABEL_NPU_DRIVER: driver} if driver else {})}
    resources = {"cpu": "64", RESOURCE_NPU: "8",
                 **({RESOURCE_BATCH_CPU: "12000", RESOURCE_BATCH_MEMORY: "1073741824"} if qos else {})}
    return {"metadata": {"name": name, "labels": labels,
                         "annotations": {ANNOTATION_NODE_USAGE: "{}"} if qos else {}},
            "status": {"capacity": dict(resources), "allocatable": dict(resources)}}


@pytest.fixture(autouse=True)
def charts(monkeypatch: pytest.MonkeyPatch) -> None:
    """``helm template`` of a chart: one DaemonSet named after it, its image from the values."""
    def template(chart: Any, release: str, namespace: str, values: Mapping[str, Any], **_: Any
                 ) -> list[dict[str, Any]]:
        image = values["image"]
        return [{"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": release},
                 "spec": {"selector": {"matchLabels": {LABEL_APP_INSTANCE: release}},
                          "template": {"metadata": {"labels": {LABEL_APP_INSTANCE: release}},
                                       "spec": {"containers": [{"name": "c",
                                                                "image": f"{image['repository']}:{image['tag']}"}]}}}}]

    monkeypatch.setattr(render, "helm_template", template)


def device_plugin(api: MemoryApi) -> dict[str, Any] | None:
    api_version, plural, _ = KINDS["DaemonSet"]
    return api.objects.get(f"{collection(api_version, plural, NS)}/npu-device-plugin")


SPEC = {"driver": {"version": "24.1.rc3"}, "schedulerExtender": {"enabled": False},
        "nodeFeatureDiscovery": {"enabled": False}}


def test_the_device_plugin_waits_for_the_driver_check_and_what_runs_stays() -> None:
    api = MemoryApi(SPEC, [node("npu-0"), node("npu-1", driver="23.0.5")])
    ctl = controller.Controller(api, Settings(namespace=NS))  # type: ignore[arg-type]
    ctl.reconcile()
    assert device_plugin(api) is None and api.pods == []  # no plugin, no validation pod
    got = api.status()
    assert got["driver"][:2] == (StateType.DEGRADED, "VersionMismatch")
    for name in ("devicePlugin", "exporter", "validator"):
        kind, reason, message = got[name]
        assert (kind, reason) == (StateType.PENDING, "WaitingForDriver"), name
        assert "expected driver 24.1.rc3, found 23.0.5 on npu-1" in message
    conditions = {c["type"]: c for c in api.policy["status"]["conditions"]}
    assert "devicePlugin (WaitingForDriver)" in conditions["Progressing"]["message"]

    # the driver fixed: the device plugin and its validation pods roll out
    api.nodes["npu-1"]["metadata"]["labels"][LABEL_NPU_DRIVER] = "24.1.rc3"
    ctl.reconcile()
    plugin = device_plugin(api)
    assert plugin is not None and plugin["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0")
    assert len(api.pods) == 2
    assert api.status()["devicePlugin"][0] == StateType.RUNNING

    # a new image while a node's driver is wrong again: not rolled out, and the running plugin is not pruned
    api.nodes["npu-0"]["metadata"]["labels"][LABEL_NPU_DRIVER] = "23.0.5"
    api.policy["spec"]["devicePlugin"] = {"image": "registry.example.com/fuyao:0.2.0"}
    api.applied.clear()
    ctl.reconcile()
    assert not any(a.startswith("DaemonSet/npu-device-plugin") for a in api.applied)
    plugin = device_plugin(api)
    assert plugin is not None and plugin["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0")
    assert not any("npu-device-plugin" in d for d in api.deleted) and len(api.pods) == 2
    assert api.status()["devicePlugin"][:2] == (StateType.PENDING, "WaitingForDriver")


def test_a_driver_version_not_read_yet_holds_nothing_back_and_a_disabled_check_does_not_either() -> None:
    # the device plugin labels the driver version too (and is the only one to when discovery is off or finds no
    # npu-smi): holding it back until a version is read would wait forever on a fresh install
    api = MemoryApi(SPEC, [node("npu-0", driver=None)])
    controller.Controller(api, Settings(namespace=NS)).reconcile()  # type: ignore[arg-type]
    assert device_plugin(api) is not None
    assert api.status()["devicePlugin"][1] != "WaitingForDriver"

    api = MemoryApi({**SPEC, "driver": {"enabled": False}}, [node("npu-0", driver=None)])
    controller.Controller(api, Settings(namespace=NS)).reconcile()  # type: ignore[arg-type]
    assert device_plugin(api) is not None


def test_an_operator_restarted_while_the_qos_agent_goes_still_removes_its_node_resources() -> None:
    on = {**SPEC, "driver": {"enabled": False}, "devicePlugin": {"enabled": False},
          "validator": {"enabled": False}, "exporter": {"enabled": False}, "qosAgent": {"enabled": True}}
    api = MemoryApi(on, [node("npu-0", qos=True)])
    first = controller.Controller(api, Settings(namespace=NS))  # type: ignore[arg-type]
    first.reconcile()
    assert api.status()["qosAgent"][0] == StateType.RUNNING
    api.pods = [{"metadata": {"name": "qos-agent-x1", "labels": {LABEL_APP_INSTANCE: "qos-agent",
                                                                 LABEL_OPERATOR_COMPONENT: "qosAgent"}},
                 "status": {"phase": "Running"}}]

    api.policy["spec"]["qosAgent"] = {"enabled": False}
    first.reconcile()  # prunes the agent; its pod is still terminating: the node keeps its resources for now
    assert "DaemonSet/qos-agent" in api.deleted
    assert api.status()["qosAgent"][0] == StateType.DISABLED  # the last status no longer says it ran
    assert RESOURCE_BATCH_CPU in api.nodes["npu-0"]["status"]["allocatable"]
    pending = dict(api.policy["metadata"].get("annotations") or {})

    # the operator restarts (a new process, nothing in memory); the agent's pod is gone
    api.pods = []
    controller.Controller(api, Settings(namespace=NS)).reconcile()  # type: ignore[arg-type]
    status = api.nodes["npu-0"]["status"]
    assert RESOURCE_BATCH_CPU not in status["allocatable"] and RESOURCE_BATCH_MEMORY not in status["capacity"]
    assert ANNOTATION_NODE_USAGE not in api.nodes["npu-0"]["metadata"]["annotations"]
    assert list(pending) == [controller.QOS_CLEANUP]  # it was pending on the policy, not in the old process
    assert controller.QOS_CLEANUP not in (api.policy["metadata"].get("annotations") or {})  # done: cleared

    # later an agent installed by hand writes them again: the policy no longer says a cleanup is pending
    api.nodes["npu-0"] = node("npu-0", qos=True)
    controller.Controller(api, Settings(namespace=NS)).reconcile()  # type: ignore[arg-type]
    assert RESOURCE_BATCH_CPU in api.nodes["npu-0"]["status"]["allocatable"]


def test_the_pending_cleanup_is_read_from_the_policy() -> None:
    assert controller.qos_cleanup_since({}) is None
    at = controller.qos_cleanup_since({"annotations": {controller.QOS_CLEANUP: "2026-12-07T10:00:00Z"}})
    assert at == datetime(2026, 12, 7, 10, tzinfo=UTC).timestamp()
    assert controller.qos_cleanup_since({"annotations": {controller.QOS_CLEANUP: "soon"}}) == 0.0
