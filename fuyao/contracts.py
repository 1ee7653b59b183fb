"""The single home of every Kubernetes name fuyao reads or writes, and of the schemas of their values.

Like Koordinator's ``apis/extension``: resource names, node labels, pod and Service annotation keys, and a
pydantic model (with a schema version) for every JSON value. Components import names from here and never spell a
key themselves, so the device plugin, the scheduler extender, the vNPU manager, the QoS agent and the router can
never disagree on one. Parsing a bad value raises :class:`ContractError`, which names the key and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# --------------------------------------------------------------------------------------------------------------
# Extended resources (integers, as Kubernetes requires)
# --------------------------------------------------------------------------------------------------------------
RESOURCE_NPU = "npu.huawei.com/NPU"
"""A whole NPU die (a 910C card with two dies is two units)."""
RESOURCE_VNPU = "npu.huawei.com/vNPU"
"""A static vNPU slice created from a template (see ``vnpu``)."""
RESOURCE_NPU_CORE = "npu.huawei.com/npu-core"
"""Dynamic vNPU: one unit is one AICore; the vNPU is created when the pod is admitted."""
RESOURCE_BATCH_CPU = "kubernetes.io/batch-cpu"
"""Spare CPU for best-effort pods, in millicores (Koordinator / Volcano name)."""
RESOURCE_BATCH_MEMORY = "kubernetes.io/batch-memory"
"""Spare memory for best-effort pods, in bytes (Koordinator / Volcano name)."""
RESOURCE_NVIDIA_GPU = "nvidia.com/gpu"
"""NVIDIA GPUs, for heterogeneous NPU/GPU clusters."""

NPU_RESOURCES = (RESOURCE_NPU, RESOURCE_VNPU, RESOURCE_NPU_CORE)
ACCELERATOR_RESOURCES = (*NPU_RESOURCES, RESOURCE_NVIDIA_GPU)
EXTENDER_MANAGED_RESOURCES = (*ACCELERATOR_RESOURCES, RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY)
"""What the scheduler extender decides about: a pod asking for one of these is sent to it (kube-scheduler's and
Volcano's ``managedResources``; both skip the extender for pods that ask for none of them). The chart's default
``extenderEntry.managedResources``. kube-scheduler refuses names in the ``kubernetes.io`` domain there ("an invalid
extended resource name"), so its entry leaves the batch resources out (:func:`kube_scheduler_managed`)."""


def kube_scheduler_managed(resources: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The names kube-scheduler accepts in an extender's ``managedResources``."""
    return tuple(r for r in resources or EXTENDER_MANAGED_RESOURCES if not r.startswith("kubernetes.io/"))

# --------------------------------------------------------------------------------------------------------------
# Node labels written by the device plugin
# --------------------------------------------------------------------------------------------------------------
LABEL_ACCELERATOR = "accelerator"
ACCELERATOR_ASCEND_NPU = "huawei-ascend-npu"
LABEL_ACCELERATE_TYPE = "accelerate-type"
"""Chip model, e.g. ``910B4``."""
LABEL_DEVICE_COUNT = "npu.openfuyao.com/device-count"
LABEL_NPU_DRIVER = "node.kubernetes.io/npu-driver"
LABEL_NPU_FIRMWARE = "npu.openfuyao.com/firmware-version"
"""The NPU firmware version (``npu-smi info -t board``), written by the NPU operator's node feature discovery."""
LABEL_SERVER_USAGE = "server-usage"
"""``train`` or ``infer``; written only when configured."""
LABEL_VOLCANO_COLOCATION = "volcano.sh/colocation"
"""Node label (``"true"``) that admits best-effort pods on the node (Volcano's key)."""


class ServerUsage(StrEnum):
    TRAIN = "train"
    INFER = "infer"


# --------------------------------------------------------------------------------------------------------------
# Pod keys read by the scheduler extender, the QoS agent and the router
# --------------------------------------------------------------------------------------------------------------
ANNOTATION_BUSINESS_TYPE = "business.workload/type"
LABEL_VOLCANO_QOS = "volcano.sh/qos"
"""The design doc's pod label: ``LS`` or ``BE``."""
ANNOTATION_VOLCANO_QOS_LEVEL = "volcano.sh/qos-level"
"""Volcano's annotation: LC | HLS | LS | BE, or Huawei CCE's integers -7..7 (negative = offline)."""
LABEL_KOORDINATOR_QOS = "koordinator.sh/qosClass"
"""Koordinator's label: LSE | LSR | LS | BE | SYSTEM."""
LABEL_APP = "app"
LABEL_PHASE = "phase"
"""``prefill`` or ``decode`` (the design doc's PD key)."""
LABEL_LLMD_ROLE = "llm-d.ai/role"
"""llm-d's key: ``prefill``, ``decode``, ``both`` or ``prefill-decode``."""
LABEL_PD_GROUP = "inference.openfuyao.com/pd-group"
"""Groups prefill and decode pods of one service when the ``app`` label is not specific enough."""
ANNOTATION_NUMA_POLICY = "volcano.sh/numa-topology-policy"
ANNOTATION_VNPU_MODE = "vnpu.openfuyao.com/mode"
"""``dynamic`` asks for a vNPU created at allocation time (resource ``npu.huawei.com/npu-core``)."""


class BusinessType(StrEnum):
    COMPUTE_INTENSIVE = "compute-intensive"
    IO_INTENSIVE = "io-intensive"
    MEMORY_SENSITIVE = "memory-sensitive"


class QoSClass(StrEnum):
    """The two classes fuyao schedules and enforces: latency-sensitive and best-effort."""

    LS = "LS"
    BE = "BE"


class Phase(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


class NumaPolicy(StrEnum):
    NONE = "none"
    BEST_EFFORT = "best-effort"
    RESTRICTED = "restricted"
    SINGLE_NUMA_NODE = "single-numa-node"


class VnpuMode(StrEnum):
    STATIC = "static"
    DYNAMIC = "dynamic"


# --------------------------------------------------------------------------------------------------------------
# fuyao's own keys
# --------------------------------------------------------------------------------------------------------------
ANNOTATION_NODE_TOPOLOGY = "npu.openfuyao.com/topology"
"""Node annotation (JSON, :class:`NodeTopology`) written by the device plugin."""
ANNOTATION_POD_ASSIGNED = "npu.openfuyao.com/assigned"
"""Pod annotation (JSON, :class:`PodAssignment`) written by the scheduler extender at bind time."""
ANNOTATION_NODE_USAGE = "qos.openfuyao.com/usage"
"""Node annotation (JSON, :class:`NodeUsage`) written by the QoS agent: measured CPU/memory use, LS and BE."""
ANNOTATION_NODE_FAULTS = "npu.openfuyao.com/faults"
"""Node annotation (JSON, :class:`NodeFaults`), written by the device plugin: each NPU's current fault codes, their
level, what the plugin does about them (keep, unhealthy, reset when free, isolated) and its link state."""
ANNOTATION_NFD_LABELS = "npu.openfuyao.com/nfd-labels"
"""Node annotation written by the NPU operator's node feature discovery: the comma-separated label keys it set, so
that deleting the policy removes exactly those (and never a label an administrator set)."""
LABEL_OPERATOR_COMPONENT = "npu.openfuyao.com/component"
"""Label on every object the NPU operator applies: the policy component it belongs to (``devicePlugin``, ...)."""
LABEL_OPERATOR_REVISION = "npu.openfuyao.com/revision"
"""Label on the NPU operator's validation pods: a hash of what they validate (a new one re-runs the validation)."""
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PD_TOPOLOGY_DEFAULT = "topology.kubernetes.io/zone"
"""Default topology domain for prefill/decode affinity beyond the node (configurable in the extender)."""

# Device IDs of the sub-device resources (the whole-NPU form ``Ascend910-3`` is ``fuyao.inventory.device_id``).
# They appear in pod annotations, the kubelet's checkpoint and its pod-resources API, so their form is a contract.
_VNPU_DEVICE = re.compile(r"^(?P<parent>.+)-v(?P<vnpu>\d+)$")
_CORE_DEVICE = re.compile(r"^(?P<parent>.+)-c(?P<core>\d+)$")


def vnpu_device_id(parent: str, vnpu_id: int) -> str:
    """``npu.huawei.com/vNPU`` device: ``Ascend910-0-v100`` (parent device, npu-smi vNPU id)."""
    return f"{parent}-v{vnpu_id}"


def core_device_id(parent: str, core: int) -> str:
    """``npu.huawei.com/npu-core`` device: ``Ascend910-0-c7`` (parent device, AICore index)."""
    return f"{parent}-c{core}"


def parse_vnpu_device_id(device: str) -> tuple[str, int] | None:
    m = _VNPU_DEVICE.match(device)
    return (m.group("parent"), int(m.group("vnpu"))) if m else None


def parse_core_device_id(device: str) -> tuple[str, int] | None:
    m = _CORE_DEVICE.match(device)
    return (m.group("parent"), int(m.group("core"))) if m else None


# What the device plugin's Allocate hands the container runtime (Ascend runtime conventions + fuyao's own key)
ENV_ASCEND_VISIBLE_DEVICES = "ASCEND_VISIBLE_DEVICES"
"""Comma-separated physical (logic) ids of the NPUs given to a container (MindCluster/HAMi convention)."""
ENV_ASCEND_VNPU_SPECS = "ASCEND_VNPU_SPECS"
"""vNPU template of a container's slice (HAMi convention)."""
ENV_ASCEND_RUNTIME_OPTIONS = "ASCEND_RUNTIME_OPTIONS"
"""``VIRTUAL`` for vNPU containers (Ascend docker runtime convention)."""
ANNOTATION_CONTAINER_DEVICES = "npu.openfuyao.com/devices"
"""Container annotation set at Allocate: the comma-separated device IDs the container received."""

# Ray (fuyao_ray, docs/ray.md)
RAY_RESOURCE_NPU = "NPU"
"""Ray's resource name for Ascend NPUs (``ray/_private/accelerators/npu.py``): what a Ray node counts from the
``/dev/davinci*`` fuyao's device plugin gave its container, and what a Serve replica asks for."""

# Service annotations of the design doc (the doc writes ``inference.openFuyao.com``; keys must be lowercase)
ANNOTATION_ENABLE_ROUTER = "inference.openfuyao.com/enable-router"
ANNOTATION_LEADER_URL = "inference.openfuyao.com/leader-url"
"""On a leader-election Lease: where its holder serves (the extender's followers forward binds there)."""
ANNOTATION_KV_CACHE_POLICY = "inference.openfuyao.com/kv-cache-policy"
ANNOTATION_HEALTH_CHECK_PATH = "inference.openfuyao.com/health-check-path"
ANNOTATION_HEALTH_CHECK_INTERVAL = "inference.openfuyao.com/health-check-interval"


# Engine pods whose KV events the KV-cache index follows (fuyao-kvcache discovery)
LABEL_KV_EVENTS = "inference.openfuyao.com/kv-events"
"""Pod label (any value) marking an engine that publishes KV events; the index's default discovery selector."""
ANNOTATION_KV_EVENTS_PORT = "inference.openfuyao.com/kv-events-port"
"""Pod annotation: the engine's KV event PUB port (default 5557, vLLM's)."""
ANNOTATION_KV_REPLAY_PORT = "inference.openfuyao.com/kv-events-replay-port"
"""Pod annotation: the engine's KV event replay (ROUTER) port, if it has one."""
ANNOTATION_SERVED_MODEL = "inference.openfuyao.com/model"
"""Pod annotation: the model name the engine serves (``--model`` / ``--served-model-name``)."""
DEFAULT_KV_EVENTS_PORT = 5557
DEFAULT_ENGINE_HTTP_PORT = 8000


class KvCachePolicy(StrEnum):
    """Eviction policy of the shared KV block tier."""

    LRU = "LRU"
    LFU = "LFU"
    FIFO = "FIFO"


class DeviceHealth(StrEnum):
    """The kubelet's device health strings (device-plugin API v1beta1)."""

    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class InterconnectKind(StrEnum):
    HCCS_MESH = "hccs-mesh"
    HCCS_RING = "hccs-ring"
    PCIE = "pcie"
    UNKNOWN = "unknown"


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------
class ContractError(ValueError):
    """A label, annotation or JSON value that does not follow its contract. Names the key and the field."""

    def __init__(self, key: str, message: str, field: str | None = None, value: object = None):
        self.key = key
        self.field = field
        self.value = value
        where = f"{key!r}" + (f" field {field!r}" if field else "")
        shown = "" if value is None else f" (got {_short(value)})"
        super().__init__(f"invalid value for {where}: {message}{shown}")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validation_to_contract_error(key: str, exc: ValidationError) -> ContractError:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    return ContractError(key, first["msg"], field=field, value=first.get("input"))


# --------------------------------------------------------------------------------------------------------------
# JSON value schemas
# --------------------------------------------------------------------------------------------------------------
class _Schema(BaseModel):
    """Base of every JSON contract value: unknown fields from newer writers are ignored, versions are checked."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class VnpuSlice(_Schema):
    """One vNPU carved out of a device."""

    id: str = Field(description="Device ID advertised to the kubelet for this slice")
    vnpu_id: int = Field(ge=0, description="The vNPU id npu-smi uses (phy_id*16+100...)")
    template: str = Field(min_length=1)
    aicore: int = Field(ge=0)
    memory_mb: int = Field(ge=0)


class DeviceTopology(_Schema):
    """One schedulable NPU die as the node reports it."""

    npu_id: int = Field(ge=0, description="Card id (npu-smi -i)")
    chip_id: int = Field(ge=0, description="Chip/die index on the card (npu-smi -c)")
    physical_id: int = Field(ge=0, description="Physical (logic) id used in ASCEND_VISIBLE_DEVICES")
    chip_model: str = Field(min_length=1)
    health: DeviceHealth
    numa_node: int | None = Field(default=None, ge=0)
    group: str | None = Field(default=None, description="Interconnect group id (HCCS ring / mesh / PCIe)")
    aicore: int | None = Field(default=None, ge=0)
    memory_mb: int | None = Field(default=None, ge=0)
    vnpus: tuple[VnpuSlice, ...] = ()
    holder: str | None = Field(default=None, description="namespace/name of the pod holding it, per the kubelet's "
                               "pod-resources API: what the pod really got, which the extender trusts over the "
                               "pod's planned npu.openfuyao.com/assigned")
    allocated: bool = Field(default=False, description="Held by a container, per the kubelet's pod-resources API "
                                                       "(published by the device plugin, seconds behind)")
    link_up: bool | None = Field(default=None, description="The die's RoCE link (hccn_tool -link -g); None where the "
                                 "node has no hccn_tool. A die whose link is down is left out of multi-die "
                                 "placements only")


class InterconnectGroup(_Schema):
    id: str = Field(min_length=1)
    kind: InterconnectKind
    devices: tuple[str, ...]


class NumaCpus(_Schema):
    """CPUs of one NUMA node as the kubelet's static CPU manager sees them (pod-resources API): those it can give
    containers exclusively, and those it has given. Free = allocatable - exclusive."""

    allocatable: int = Field(ge=0)
    exclusive: int = Field(ge=0)


class NodeTopology(_Schema):
    """Value of node annotation ``npu.openfuyao.com/topology``."""

    schema_version: Literal[1] = 1
    chip_model: str = Field(min_length=1)
    driver_version: str | None = None
    devices: dict[str, DeviceTopology]
    groups: tuple[InterconnectGroup, ...] = ()
    numa_cpus: dict[int, NumaCpus] = Field(
        default_factory=dict, description="NUMA node → exclusive-CPU accounting; present only when the kubelet runs "
        "the static CPU manager policy and the devices' NUMA nodes come from sysfs")

    @model_validator(mode="after")
    def _groups_name_known_devices(self) -> NodeTopology:
        for group in self.groups:
            unknown = [d for d in group.devices if d not in self.devices]
            if unknown:
                raise ValueError(f"group {group.id!r} names unknown devices {unknown}")
        return self


class ContainerAssignment(_Schema):
    container: str = Field(min_length=1)
    resource: str = Field(min_length=1)
    devices: tuple[str, ...] = Field(min_length=1)
    vnpu_template: str | None = Field(default=None, description="Dynamic vNPU: the template to create")

    @field_validator("resource")
    @classmethod
    def _known_resource(cls, value: str) -> str:
        if value not in ACCELERATOR_RESOURCES:
            raise ValueError(f"unknown resource, expected one of {list(ACCELERATOR_RESOURCES)}")
        return value


class PodAssignment(_Schema):
    """Value of pod annotation ``npu.openfuyao.com/assigned``: the devices the scheduler chose."""

    schema_version: Literal[1] = 1
    node: str = Field(min_length=1)
    containers: tuple[ContainerAssignment, ...]


class NodeUsage(_Schema):
    """Value of node annotation ``qos.openfuyao.com/usage``: real usage measured by the QoS agent (LS and BE), so
    the scheduler extender can place by what nodes do, not only by what pods requested."""

    schema_version: Literal[1] = 1
    updated_at: float = Field(description="Unix seconds of the measurement; stale values are ignored")
    cpu_capacity_milli: int = Field(gt=0)
    cpu_used_milli: int = Field(ge=0)
    memory_capacity_bytes: int = Field(gt=0)
    memory_used_bytes: int = Field(ge=0)
    be_cpu_used_milli: int = Field(default=0, ge=0)
    be_memory_used_bytes: int = Field(default=0, ge=0)

    @property
    def cpu_ratio(self) -> float:
        return min(1.0, self.cpu_used_milli / self.cpu_capacity_milli)

    @property
    def memory_ratio(self) -> float:
        return min(1.0, self.memory_used_bytes / self.memory_capacity_bytes)

    @property
    def be_pressure(self) -> float:
        """The larger of BE's CPU and memory share of the node."""
        return min(1.0, max(self.be_cpu_used_milli / self.cpu_capacity_milli,
                            self.be_memory_used_bytes / self.memory_capacity_bytes))


class FaultAction(StrEnum):
    """What the device plugin does about a fault level (docs/device-plugin.md, "Faults")."""

    KEEP = "keep"  # the device stays Healthy; the fault is published
    UNHEALTHY = "unhealthy"  # Unhealthy while the fault lasts
    RESET = "reset"  # Unhealthy; hot reset once no pod holds it
    ISOLATE = "isolate"  # Unhealthy until an operator releases it


class DeviceFault(_Schema):
    """One NPU's faults as the device plugin sees and handles them."""

    codes: tuple[str, ...] = Field(default=(), description="npu-smi error codes, uppercase hex (80E01801)")
    level: str | None = Field(default=None, description="The fault table's level of the worst code (MindCluster's "
                              "names: NotHandleFault ... SeparateNPU); None when only the link is down")
    action: FaultAction | None = None
    state: str = Field(default="", description="What the plugin does or waits for, for the operator")
    since: str | None = Field(default=None, description="RFC 3339 time the fault was first seen")
    resets: int = Field(default=0, ge=0, description="Hot resets tried in the fault table's reset window")
    holder: str | None = Field(default=None, description="namespace/name of the pod holding the NPU")
    isolated: bool = False
    link_up: bool | None = None


class NodeFaults(_Schema):
    """Value of node annotation ``npu.openfuyao.com/faults``: the NPUs that have a fault or a link down."""

    schema_version: Literal[1] = 1
    devices: dict[str, DeviceFault] = Field(default_factory=dict)


M = TypeVar("M", bound=_Schema)
E = TypeVar("E", bound=StrEnum)

ANNOTATION_SCHEMAS: dict[str, type[_Schema]] = {
    ANNOTATION_NODE_TOPOLOGY: NodeTopology,
    ANNOTATION_POD_ASSIGNED: PodAssignment,
    ANNOTATION_NODE_USAGE: NodeUsage,
    ANNOTATION_NODE_FAULTS: NodeFaults,
}


def parse_annotation(key: str, raw: str | bytes, model: type[M] | None = None) -> M:
    """Parse a JSON annotation value into its model; raise :class:`ContractError` naming key and field."""
    schema = model or ANNOTATION_SCHEMAS.get(key)
    if schema is None:
        raise ContractError(key, "not a JSON annotation known to fuyao")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(key, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ContractError(key, "expected a JSON object", value=data)
    version = data.get("schema_version", 1)
    if version != 1:
        raise ContractError(key, "unsupported schema version (this build reads 1)", "schema_version", version)
    try:
        return schema.model_validate(data)  # type: ignore[return-value]
    except ValidationError as exc:
        raise _validation_to_contract_error(key, exc) from None


def dump_annotation(value: _Schema) -> str:
    """Compact, deterministic JSON for an annotation value (so unchanged values compare equal)."""
    return json.dumps(value.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)


# --------------------------------------------------------------------------------------------------------------
# Scalar values
# --------------------------------------------------------------------------------------------------------------
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def label_value(raw: str) -> str:
    """Turn free text (a chip model, a driver version) into a valid label value, keeping it readable."""
    text = re.sub(r"[^-A-Za-z0-9_.]", "-", raw.strip())[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", text)


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_VALUE.match(value))


def npu_node_labels(
    chip_model: str, device_count: int, driver_version: str | None, server_usage: ServerUsage | None = None
) -> dict[str, str]:
    """The labels the device plugin writes on an NPU node."""
    labels = {
        LABEL_ACCELERATOR: ACCELERATOR_ASCEND_NPU,
        LABEL_ACCELERATE_TYPE: label_value(chip_model),
        LABEL_DEVICE_COUNT: str(device_count),
    }
    if driver_version:
        labels[LABEL_NPU_DRIVER] = label_value(driver_version)
    if server_usage is not None:
        labels[LABEL_SERVER_USAGE] = ServerUsage(server_usage).value
    return labels


def _parse_enum(enum: type[E], key: str, raw: str, *, case_insensitive: bool = False) -> E:
    value = raw.strip()
    for member in enum:
        if member.value == value or (case_insensitive and member.value.lower() == value.lower()):
            return member
    raise ContractError(key, f"expected one of {[m.value for m in enum]}", value=raw)


def parse_business_type(raw: str) -> BusinessType:
    return _parse_enum(BusinessType, ANNOTATION_BUSINESS_TYPE, raw)


def parse_numa_policy(raw: str) -> NumaPolicy:
    return _parse_enum(NumaPolicy, ANNOTATION_NUMA_POLICY, raw)


def parse_vnpu_mode(raw: str) -> VnpuMode:
    return _parse_enum(VnpuMode, ANNOTATION_VNPU_MODE, raw)


def parse_phase(labels: Mapping[str, str]) -> Phase | None:
    """Prefill/decode role of a pod: the design doc's ``phase`` label first, then llm-d's ``llm-d.ai/role``."""
    if LABEL_PHASE in labels:
        return _parse_enum(Phase, LABEL_PHASE, labels[LABEL_PHASE], case_insensitive=True)
    if LABEL_LLMD_ROLE in labels:
        raw = labels[LABEL_LLMD_ROLE]
        if raw.strip().lower() == "prefill-decode":
            return Phase.BOTH
        return _parse_enum(Phase, LABEL_LLMD_ROLE, raw, case_insensitive=True)
    return None


def pd_group(labels: Mapping[str, str]) -> str | None:
    """The prefill/decode group of a pod: ``inference.openfuyao.com/pd-group``, else the ``app`` label."""
    return labels.get(LABEL_PD_GROUP) or labels.get(LABEL_APP) or None


# QoS ------------------------------------------------------------------------------------------------------------
_VOLCANO_QOS_LEVELS = {"LC": QoSClass.LS, "HLS": QoSClass.LS, "LS": QoSClass.LS, "BE": QoSClass.BE}
_KOORDINATOR_QOS = {"LSE": QoSClass.LS, "LSR": QoSClass.LS, "LS": QoSClass.LS, "SYSTEM": QoSClass.LS,
                    "BE": QoSClass.BE}


def parse_volcano_qos_label(raw: str) -> QoSClass:
    return _parse_enum(QoSClass, LABEL_VOLCANO_QOS, raw, case_insensitive=True)


def parse_volcano_qos_level(raw: str) -> QoSClass:
    """Volcano's names, or Huawei CCE's integers (-7..7, negative = offline/BE)."""
    value = raw.strip()
    if value.upper() in _VOLCANO_QOS_LEVELS:
        return _VOLCANO_QOS_LEVELS[value.upper()]
    try:
        level = int(value)
    except ValueError:
        raise ContractError(ANNOTATION_VOLCANO_QOS_LEVEL, "expected LC, HLS, LS, BE or an integer -7..7",
                            value=raw) from None
    if not -7 <= level <= 7:
        raise ContractError(ANNOTATION_VOLCANO_QOS_LEVEL, "integer level out of range -7..7", value=raw)
    return QoSClass.BE if level < 0 else QoSClass.LS


def parse_koordinator_qos(raw: str) -> QoSClass:
    value = raw.strip().upper()
    if value not in _KOORDINATOR_QOS:
        raise ContractError(LABEL_KOORDINATOR_QOS, f"expected one of {list(_KOORDINATOR_QOS)}", value=raw)
    return _KOORDINATOR_QOS[value]


class QoSResolution(BaseModel):
    """The QoS class of a pod, the key it came from, and values that were ignored because they are invalid."""

    model_config = ConfigDict(frozen=True)

    qos: QoSClass
    source: str | None = Field(description="The key that decided, or None for the default")
    problems: tuple[str, ...] = ()


def resolve_qos(labels: Mapping[str, str], annotations: Mapping[str, str]) -> QoSResolution:
    """QoS class by documented precedence.

    1. label ``volcano.sh/qos`` (the design doc's key), 2. annotation ``volcano.sh/qos-level``,
    3. label ``koordinator.sh/qosClass``, 4. default ``LS`` (never demote a pod we cannot classify).
    An invalid value is reported in ``problems`` and the next key is tried.
    """
    sources = (
        (LABEL_VOLCANO_QOS, labels, parse_volcano_qos_label),
        (ANNOTATION_VOLCANO_QOS_LEVEL, annotations, parse_volcano_qos_level),
        (LABEL_KOORDINATOR_QOS, labels, parse_koordinator_qos),
    )
    problems: list[str] = []
    for key, where, parse in sources:
        if key not in where:
            continue
        try:
            return QoSResolution(qos=parse(where[key]), source=key, problems=tuple(problems))
        except ContractError as exc:
            problems.append(str(exc))
    return QoSResolution(qos=QoSClass.LS, source=None, problems=tuple(problems))


# Durations ------------------------------------------------------------------------------------------------------
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(key: str, raw: str) -> float:
    """Seconds from a Go-style duration (``10s``, ``1m30s``, ``500ms``) or a bare number of seconds."""
    text = raw.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ContractError(key, "expected a duration such as 10s, 1m30s or 500ms", value=raw) from None
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ContractError(key, "duration must be positive", value=raw)
    return seconds


# Service annotations ---------------------------------------------------------------------------------------------
class RouterServiceSettings(BaseModel):
    """What a Service's ``inference.openfuyao.com/*`` annotations ask of the router."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = False
    kv_cache_policy: KvCachePolicy | None = None
    health_check_path: str = "/health"
    health_check_interval_s: float = 10.0

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> RouterServiceSettings:
        enabled_raw = annotations.get(ANNOTATION_ENABLE_ROUTER, "false").strip().lower()
        if enabled_raw not in ("true", "false"):
            raise ContractError(ANNOTATION_ENABLE_ROUTER, 'expected "true" or "false"',
                                value=annotations[ANNOTATION_ENABLE_ROUTER])
        settings: dict[str, object] = {"enabled": enabled_raw == "true"}
        if ANNOTATION_KV_CACHE_POLICY in annotations:
            settings["kv_cache_policy"] = _parse_enum(
                KvCachePolicy, ANNOTATION_KV_CACHE_POLICY, annotations[ANNOTATION_KV_CACHE_POLICY],
                case_insensitive=True)
        if ANNOTATION_HEALTH_CHECK_PATH in annotations:
            path = annotations[ANNOTATION_HEALTH_CHECK_PATH].strip()
            if not path.startswith("/") or any(c.isspace() for c in path):
                raise ContractError(ANNOTATION_HEALTH_CHECK_PATH, "expected an absolute URL path such as /health",
                                    value=path)
            settings["health_check_path"] = path
        if ANNOTATION_HEALTH_CHECK_INTERVAL in annotations:
            settings["health_check_interval_s"] = parse_duration(
                ANNOTATION_HEALTH_CHECK_INTERVAL, annotations[ANNOTATION_HEALTH_CHECK_INTERVAL])
        return cls.model_validate(settings)
