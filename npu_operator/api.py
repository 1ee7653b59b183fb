"""The NPUClusterPolicy API (``npu.openfuyao.com/v1alpha1``, cluster-scoped, one object named ``cluster``): typed
spec and status. The CRD's OpenAPI schema is generated from these models (:func:`crd`), so the API server and the
operator validate the same shape."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

from fuyao.config_files import ConfigSection

GROUP = "npu.openfuyao.com"
VERSION = "v1alpha1"
KIND = "NPUClusterPolicy"
PLURAL = "npuclusterpolicies"
POLICY_NAME = "cluster"
CRD_NAME = f"{PLURAL}.{GROUP}"


class _Api(ConfigSection):
    """camelCase keys as the API writes them (snake_case accepted), unknown fields refused, frozen."""


class Component(StrEnum):
    """The components a policy manages, in install order."""

    DRIVER = "driver"
    NODE_FEATURE_DISCOVERY = "nodeFeatureDiscovery"
    DEVICE_PLUGIN = "devicePlugin"
    VNPU = "vnpu"
    EXPORTER = "exporter"
    SCHEDULER_EXTENDER = "schedulerExtender"
    QOS_AGENT = "qosAgent"
    VALIDATOR = "validator"


class DriverSpec(_Api):
    enabled: bool = True
    version: str | None = Field(default=None, description="expected driver version (npu-smi's Software Version); "
                                "the operator checks hosts, it does not install drivers")
    firmware_version: str | None = Field(default=None, description="expected firmware version (npu-smi info -t "
                                         "board's Firmware Version); empty: reported, not checked")


def _image() -> Any:
    return Field(default=None, description="the image (repository:tag); default: the operator's own")


def _values() -> Any:
    return Field(default_factory=dict, description="the chart's own values, merged over what the policy sets "
                 "(anything the policy does not model: host paths, tolerations, resources)")


class DevicePluginSpec(_Api):
    enabled: bool = True
    image: str | None = _image()
    health_interval: str = Field(default="5s", pattern=r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$")
    values: dict[str, Any] = _values()


class VnpuSpec(_Api):
    enabled: bool = False
    mode: Literal["static", "dynamic"] = "static"
    config: dict[str, Any] = Field(default_factory=dict, description="vnpu-config.json (static mode)")


class NodeFeatureDiscoverySpec(_Api):
    enabled: bool = True


class ExporterSpec(_Api):
    enabled: bool = True
    service_monitor: bool = False


class SchedulerExtenderSpec(_Api):
    enabled: bool = True
    image: str | None = _image()
    values: dict[str, Any] = _values()


class QosAgentSpec(_Api):
    enabled: bool = False
    image: str | None = _image()
    values: dict[str, Any] = _values()


class ValidatorSpec(_Api):
    enabled: bool = True
    image: str | None = _image()


class PolicySpec(_Api):
    driver: DriverSpec = DriverSpec()
    device_plugin: DevicePluginSpec = DevicePluginSpec()
    vnpu: VnpuSpec = VnpuSpec()
    node_feature_discovery: NodeFeatureDiscoverySpec = NodeFeatureDiscoverySpec()
    exporter: ExporterSpec = ExporterSpec()
    scheduler_extender: SchedulerExtenderSpec = SchedulerExtenderSpec()
    qos_agent: QosAgentSpec = QosAgentSpec()
    validator: ValidatorSpec = ValidatorSpec()

    def enabled(self, component: Component) -> bool:
        return bool(getattr(self, _FIELD[component]).enabled)


_FIELD = {c: {"nodeFeatureDiscovery": "node_feature_discovery", "devicePlugin": "device_plugin",
              "schedulerExtender": "scheduler_extender", "qosAgent": "qos_agent"}.get(c.value, c.value)
          for c in Component}


class StateType(StrEnum):
    RUNNING = "running"
    PENDING = "pending"
    DEGRADED = "degraded"
    FAILED = "failed"
    DISABLED = "disabled"


class ComponentState(_Api):
    type: StateType
    reason: str = ""
    message: str = ""


class NodeCounts(_Api):
    desired: int = Field(default=0, ge=0)
    ready: int = Field(default=0, ge=0)


class ComponentStatus(_Api):
    name: Component
    state: ComponentState
    nodes: NodeCounts = NodeCounts()
    version: str | None = None


class Condition(_Api):
    type: Literal["Ready", "Progressing", "Degraded"]
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str


class PolicyStatus(_Api):
    observed_generation: int = 0
    component_statuses: tuple[ComponentStatus, ...] = ()
    conditions: tuple[Condition, ...] = Field(default=(), json_schema_extra={
        # metav1.Condition's convention: one entry per type, merged by type (server-side apply, kubectl)
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """A structural OpenAPI v3 schema for a CRD (no $ref, no titles; free-form maps preserved)."""
    raw = model.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[1]])
            if "anyOf" in node:  # X | None → X, nullable
                kinds = [k for k in node["anyOf"] if k.get("type") != "null"]
                if len(kinds) == 1:
                    out = {**walk(kinds[0]), "nullable": True}
                    if "description" in node:
                        out["description"] = node["description"]
                    return out
            out = {k: walk(v) for k, v in node.items() if k not in ("title", "default", "additionalProperties")}
            if node.get("type") == "object" and "properties" not in node:
                out["x-kubernetes-preserve-unknown-fields"] = True
            if "const" in out:
                out["enum"] = [out.pop("const")]
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    schema: dict[str, Any] = walk(raw)
    return schema


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition (charts/npu-operator/crds/ carries it; tests check the two are equal)."""
    columns = [{"name": c.value, "type": "string", "priority": 0 if i < 4 else 1,
                "jsonPath": f".status.componentStatuses[?(@.name=='{c.value}')].state.type"}
               for i, c in enumerate((Component.DEVICE_PLUGIN, Component.SCHEDULER_EXTENDER, Component.VALIDATOR,
                                      Component.DRIVER))]
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP, "scope": "Cluster",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": KIND.lower(),
                      "shortNames": ["npucp"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True, "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].status"},
                    *columns,
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "One policy, named 'cluster', for every NPU component of the cluster.",
                    "x-kubernetes-validations": [{"rule": f"self.metadata.name == '{POLICY_NAME}'",
                                                  "message": f"the policy must be named {POLICY_NAME}"}],
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "metadata": {"type": "object"},
                                   "spec": _schema(PolicySpec), "status": _schema(PolicyStatus)}}},
            }],
        },
    }


def crd_update(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The object to PUT so that the stored CRD ``current`` becomes ``desired``: ``desired``'s spec whole (a newer CRD
    that drops a field drops it, whoever else manages it), with ``current``'s metadata (its resourceVersion, so a
    change made meanwhile is a conflict rather than lost; its finalizers, labels and annotations, with ``desired``'s
    merged over them)."""
    meta = {k: copy.deepcopy(v) for k, v in (current.get("metadata") or {}).items() if k != "managedFields"}
    wanted = desired.get("metadata") or {}
    for key in ("labels", "annotations"):
        merged = {**(meta.get(key) or {}), **(wanted.get(key) or {})}
        if merged:
            meta[key] = merged
    return {**copy.deepcopy(dict(desired)), "metadata": meta}
