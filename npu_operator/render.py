"""What a policy wants to exist: the objects of every enabled component, owned by the policy.

The device plugin, the scheduler extender and the QoS agent are rendered from the same Helm charts a user would
install by hand (``helm template``, the one I/O here, in :func:`helm_template`), with values derived from the policy
(:func:`chart_values`); node feature discovery and the validation pods are the operator's own and built here. Every
object then gets the policy as its controller owner, the component label and the operator's field manager
(:func:`owned`), so garbage collection removes the stack when the policy goes and the controller can prune what a
spec change disabled. Everything but :func:`helm_template` is pure.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fuyao.contracts import (
    ACCELERATOR_ASCEND_NPU,
    LABEL_ACCELERATOR,
    LABEL_APP_NAME,
    LABEL_HELM_CHART,
    LABEL_HOSTNAME,
    LABEL_MANAGED_BY,
    LABEL_OPERATOR_COMPONENT,
    LABEL_OPERATOR_REVISION,
    LABEL_PART_OF,
    RESOURCE_NPU,
)
from fuyao.vnpu.plan import PlanError, parse_vnpu_config

from .api import GROUP, KIND, VERSION, Component, PolicySpec

MANAGER = "fuyao-npu-operator"
"""The operator's field manager (server-side apply) and its ``app.kubernetes.io/managed-by`` value."""

CHARTS = {
    Component.DEVICE_PLUGIN: "npu-device-plugin",
    Component.SCHEDULER_EXTENDER: "scheduler-extender",
    Component.QOS_AGENT: "qos-agent",
}
"""Components rendered from fuyao's charts (chart directory = release name). vNPU and the exporter are settings of
the device plugin's chart: they own no objects of their own."""

NFD_NAME = "npu-node-feature-discovery"
VALIDATOR_PREFIX = "npu-validator-"
VALIDATOR_CONTAINER = "validator"


class RenderError(Exception):
    """A chart could not be rendered (bad values, a missing chart, helm failing): the message says which."""


@dataclass(frozen=True)
class Settings:
    """The operator's own settings (flags of ``fuyao-npu-operator run``), which the policy does not carry."""

    namespace: str = "npu-operator"
    image: str = "ghcr.io/openfuyao/fuyao:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    charts_dir: Path = Path("/opt/fuyao/charts")
    helm: str = "helm"
    api_versions: tuple[str, ...] = ()
    """API versions the cluster serves beyond the built-in ones (``monitoring.coreos.com/v1/ServiceMonitor``...),
    passed to ``helm template --api-versions`` so charts render what the cluster can take."""
    npu_smi: str = "/usr/local/bin/npu-smi"
    sysfs_root: str = "/sys"
    driver_version_file: str = "/usr/local/Ascend/driver/version.info"
    nfd_interval: str = "30s"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    """Environment for node feature discovery's pods (the fake npu-smi's state file on the local cluster)."""
    host_dirs: tuple[str, ...] = ()
    """Host directories mounted read-only at the same path into node feature discovery's pods."""


# ---------------------------------------------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------------------------------------------
def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: maps merge key by key, anything else (lists too) is replaced, as
    Helm merges values files."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _image(settings: Settings, override: str | None) -> dict[str, str]:
    ref = override or settings.image
    repository, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # no tag (a registry port is not a tag)
        repository, tag = ref, "latest"
    return {"repository": repository, "tag": tag, "pullPolicy": settings.image_pull_policy}


RENAMING_VALUES = ("fullnameOverride", "nameOverride")
"""Chart values that rename a component's objects. The operator's ClusterRole may touch only the cluster-scoped
objects named after the charts (its chart's RBAC lists them), so a policy may not rename them."""

def chart_values(spec: PolicySpec, component: Component, settings: Settings) -> dict[str, Any]:
    """The chart values for ``component``: what the policy says, then its section's free-form ``values`` (the
    chart's own keys, for anything the policy does not model) merged over them. Raises :class:`RenderError` for
    values the operator cannot install (:data:`RENAMING_VALUES`, the extender's second scheduler)."""
    values = _chart_values(spec, component, settings)
    for key in RENAMING_VALUES:
        if values.get(key):
            raise RenderError(f"{component.value}.values.{key}: the operator names "
                              f"its components' objects after their charts ({CHARTS.get(component)}), the only "
                              "cluster-wide names its RBAC may write; install the chart yourself to rename them")
    return values


def _chart_values(spec: PolicySpec, component: Component, settings: Settings) -> dict[str, Any]:
    if component == Component.DEVICE_PLUGIN:
        dp = spec.device_plugin
        values: dict[str, Any] = {
            "image": _image(settings, dp.image),
            "nodeSelector": {LABEL_ACCELERATOR: ACCELERATOR_ASCEND_NPU},
            "health": {"interval": dp.health_interval},
            "vnpu": {"mode": spec.vnpu.mode if spec.vnpu.enabled else "off"},
            "metrics": {"enabled": spec.exporter.enabled,
                        "serviceMonitor": {"enabled": spec.exporter.enabled and spec.exporter.service_monitor}},
        }
        if (config := vnpu_config(spec)) is not None:
            values["vnpu"]["config"] = config
        return deep_merge(values, dp.values)
    if component == Component.SCHEDULER_EXTENDER:
        ext = spec.scheduler_extender
        if (ext.values.get("scheduler") or {}).get("enabled"):
            raise RenderError("schedulerExtender.values.scheduler.enabled: the chart's second kube-scheduler binds "
                              "system ClusterRoles and a kube-system RoleBinding, which the operator is not granted; "
                              "install it with the scheduler-extender chart, or add the extender to your "
                              "kube-scheduler (ConfigMap scheduler-extender-scheduler-config has the snippet)")
        return deep_merge({"image": _image(settings, ext.image)}, ext.values)
    if component == Component.QOS_AGENT:
        qos = spec.qos_agent
        if (qos.values.get("nodeRestriction") or {}).get("enabled"):
            raise RenderError("qosAgent.values.nodeRestriction.enabled: the chart's ValidatingAdmissionPolicy and "
                              "its binding are cluster-wide admission objects, which the operator is not granted; "
                              "install the qos-agent chart yourself to have it")
        return deep_merge({"image": _image(settings, qos.image),
                           "nodeSelector": {LABEL_ACCELERATOR: ACCELERATOR_ASCEND_NPU}}, qos.values)
    raise ValueError(f"{component.value} is not rendered from a chart")


def vnpu_config(spec: PolicySpec) -> dict[str, Any] | None:
    """The vnpu-config.json the device plugin gets (static mode only; None otherwise)."""
    if spec.vnpu.enabled and spec.vnpu.mode == "static":
        return spec.vnpu.config or {"devices": []}
    return None


def vnpu_config_problem(spec: PolicySpec) -> str:
    """Why the device plugin would reject the policy's vnpu-config.json (its own parser's message, naming the
    field), or "" when it accepts it or gets none. The plugin keeps its current vNPUs on a rejected file."""
    config = vnpu_config(spec)
    if config is None:
        return ""
    try:
        parse_vnpu_config(config, "spec.vnpu.config")
    except PlanError as exc:
        return str(exc)
    return ""


def helm_template(chart: Path, release: str, namespace: str, values: Mapping[str, Any], *, helm: str = "helm",
                  api_versions: Sequence[str] = (), timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """``helm template`` of one chart: the objects it renders, in order (values go in on stdin, never a file)."""
    if not (chart / "Chart.yaml").is_file():
        raise RenderError(f"chart {chart} not found (is --charts-dir right?)")
    command = [helm, "template", release, str(chart), "--namespace", namespace, "--values", "-"]
    for version in api_versions:
        command += ["--api-versions", version]
    try:
        done = subprocess.run(command, input=json.dumps(values), capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise RenderError(f"helm not found: {helm!r}") from None
    except subprocess.TimeoutExpired:
        raise RenderError(f"helm template {chart.name} took longer than {timeout_s:.0f}s") from None
    if done.returncode != 0:
        raise RenderError(f"helm template {chart.name}: {(done.stderr or done.stdout).strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if isinstance(doc, dict) and doc.get("kind")]


# ---------------------------------------------------------------------------------------------------------------
# Ownership
# ---------------------------------------------------------------------------------------------------------------
CLUSTER_SCOPED = frozenset({"ClusterRole", "ClusterRoleBinding", "Namespace", "PriorityClass",
                            "CustomResourceDefinition", "Node", "StorageClass"})


def owner_reference(policy: Mapping[str, Any]) -> dict[str, Any]:
    meta = policy["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def owned(objects: Iterable[Mapping[str, Any]], policy: Mapping[str, Any], component: Component,
          namespace: str) -> list[dict[str, Any]]:
    """Copies of ``objects`` owned by ``policy``: ownerReference, component label, managed-by the operator, and
    the namespace on every namespaced object (Helm leaves it out where a template does)."""
    out = []
    for original in objects:
        obj = copy.deepcopy(dict(original))
        meta = obj.setdefault("metadata", {})
        labels = meta.setdefault("labels", {}) or {}
        meta["labels"] = {k: v for k, v in labels.items() if k != LABEL_HELM_CHART}
        meta["labels"][LABEL_OPERATOR_COMPONENT] = component.value
        meta["labels"][LABEL_MANAGED_BY] = MANAGER
        meta["ownerReferences"] = [owner_reference(policy)]
        if obj["kind"] in CLUSTER_SCOPED:
            meta.pop("namespace", None)
        else:
            meta["namespace"] = namespace
        out.append(obj)
    return out


def key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): one object's identity."""
    meta = obj["metadata"]
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


# ---------------------------------------------------------------------------------------------------------------
# Node feature discovery
# ---------------------------------------------------------------------------------------------------------------
def nfd_objects(settings: Settings) -> list[dict[str, Any]]:
    """A DaemonSet on every node that labels NPU nodes (and their driver version), with the RBAC it needs:
    get and patch nodes, nothing else."""
    labels = {LABEL_APP_NAME: NFD_NAME, LABEL_PART_OF: "fuyao"}
    npu_smi_dir = str(Path(settings.npu_smi).parent)
    driver_dir = str(Path(settings.driver_version_file).parent)
    env = [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
           *({"name": k, "value": v} for k, v in sorted(settings.extra_env.items()))]
    container: dict[str, Any] = {
        "name": "nfd", "image": settings.image, "imagePullPolicy": settings.image_pull_policy,
        "command": ["fuyao-npu-operator", "nfd"],
        "args": ["--sysfs-root=/host/sys", f"--npu-smi=/host/npu-smi/{Path(settings.npu_smi).name}",
                 f"--driver-version-file=/host/driver/{Path(settings.driver_version_file).name}",
                 f"--interval={settings.nfd_interval}"],
        "env": env,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "160Mi"}},
        "volumeMounts": [{"name": "sys", "mountPath": "/host/sys", "readOnly": True},
                         {"name": "npu-smi", "mountPath": "/host/npu-smi", "readOnly": True},
                         {"name": "driver", "mountPath": "/host/driver", "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    volumes = [{"name": "sys", "hostPath": {"path": settings.sysfs_root, "type": "Directory"}},
               # directories, unchecked: a node without npu-smi or the driver still runs discovery (PCI only)
               {"name": "npu-smi", "hostPath": {"path": npu_smi_dir}},
               {"name": "driver", "hostPath": {"path": driver_dir}},
               {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}}]
    for i, path in enumerate(settings.host_dirs):
        container["volumeMounts"].append({"name": f"host-{i}", "mountPath": path, "readOnly": True})
        volumes.append({"name": f"host-{i}", "hostPath": {"path": path, "type": "Directory"}})
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NFD_NAME, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": NFD_NAME, "labels": labels},
         "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": NFD_NAME, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NFD_NAME},
         "subjects": [{"kind": "ServiceAccount", "name": NFD_NAME, "namespace": settings.namespace}]},
        {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": NFD_NAME, "labels": labels},
         "spec": {"selector": {"matchLabels": {LABEL_APP_NAME: NFD_NAME}},
                  "updateStrategy": {"type": "RollingUpdate"},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "serviceAccountName": NFD_NAME, "priorityClassName": "system-node-critical",
                      "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
                      "terminationGracePeriodSeconds": 5,
                      "containers": [container], "volumes": volumes}}}},
    ]


# ---------------------------------------------------------------------------------------------------------------
# Validation pods
# ---------------------------------------------------------------------------------------------------------------
def revision(*parts: Any) -> str:
    """A short stable hash of what a validation checks (a new value re-runs it)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def validator_name(node: str) -> str:
    """A pod name per node, within the 63-character limit of a label value and a DNS label."""
    digest = hashlib.sha256(node.encode()).hexdigest()[:8]
    stem = node.lower().replace(".", "-")[: 63 - len(VALIDATOR_PREFIX) - 9].strip("-")
    return f"{VALIDATOR_PREFIX}{stem}-{digest}"


def validator_pod(node: str, settings: Settings, rev: str, image: str | None = None,
                  resource: str = RESOURCE_NPU) -> dict[str, Any]:
    """A pod on ``node`` that asks for one NPU (or one vNPU / core: ``resource``) and runs ``npu-smi info``
    (through the scheduler and its extender, as any NPU pod; its result lands in the pod's termination message,
    which the operator reads)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": validator_name(node),
                     "labels": {LABEL_APP_NAME: "npu-validator", LABEL_PART_OF: "fuyao",
                                LABEL_OPERATOR_REVISION: rev}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "nodeSelector": {LABEL_HOSTNAME: node},
            "tolerations": [{"key": RESOURCE_NPU, "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": VALIDATOR_CONTAINER, "image": image or settings.image,
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["fuyao-npu-operator", "validate"],
                "terminationMessagePolicy": "File",
                "resources": {"limits": {resource: "1", "memory": "128Mi"},
                              "requests": {resource: "1", "cpu": "10m", "memory": "48Mi"}},
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
            }],
        },
    }

