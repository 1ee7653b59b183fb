"""A node's NPU topology as the device plugin publishes it (dies, interconnect groups, NUMA nodes and their CPUs) and
the NUMA policy a pod asks for."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from .base import Schema, parse_enum
from .devices import DeviceHealth

ANNOTATION_NODE_TOPOLOGY = "npu.openfuyao.com/topology"
"""Node annotation (JSON, :class:`NodeTopology`) written by the device plugin."""
ANNOTATION_NUMA_POLICY = "volcano.sh/numa-topology-policy"
"""Pod annotation (Volcano's key): the NUMA policy of its NPUs and CPUs."""


INT32_MAX = 2**31 - 1
"""Counts in the annotation the extender keeps in int32 columns: larger values are refused when it is read."""

class NumaPolicy(StrEnum):
    NONE = "none"
    BEST_EFFORT = "best-effort"
    RESTRICTED = "restricted"
    SINGLE_NUMA_NODE = "single-numa-node"


def parse_numa_policy(raw: str) -> NumaPolicy:
    return parse_enum(NumaPolicy, ANNOTATION_NUMA_POLICY, raw)


class InterconnectKind(StrEnum):
    """How the devices of an interconnect group are joined (``npu-smi info -t topo``): HCCS (one mesh of the whole
    node, or several groups), UB (UnifiedBus, Ascend 950: its topo legend prints ``UB = Connection traversing
    UB``), or only PCIe."""

    HCCS_MESH = "hccs-mesh"
    HCCS_RING = "hccs-ring"
    UB = "ub"
    PCIE = "pcie"
    UNKNOWN = "unknown"


class VnpuSlice(Schema):
    """One vNPU carved out of a device."""

    id: str = Field(description="Device ID advertised to the kubelet for this slice")
    vnpu_id: int = Field(ge=0, description="The vNPU id npu-smi uses (phy_id*16+100...)")
    template: str = Field(min_length=1)
    aicore: int = Field(ge=0)
    memory_mb: int = Field(ge=0)


class DeviceTopology(Schema):
    """One schedulable NPU die as the node reports it."""

    npu_id: int = Field(ge=0, description="Card id (npu-smi -i)")
    chip_id: int = Field(ge=0, description="Chip/die index on the card (npu-smi -c)")
    physical_id: int = Field(ge=0, description="Physical (logic) id used in ASCEND_VISIBLE_DEVICES")
    chip_model: str = Field(min_length=1)
    health: DeviceHealth
    numa_node: int | None = Field(default=None, ge=0, le=INT32_MAX)
    group: str | None = Field(default=None, description="Interconnect group id (HCCS ring / mesh / PCIe)")
    aicore: int | None = Field(default=None, ge=0, le=INT32_MAX)
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


class InterconnectGroup(Schema):
    id: str = Field(min_length=1)
    kind: InterconnectKind
    devices: tuple[str, ...]


class NumaCpus(Schema):
    """CPUs of one NUMA node as the kubelet's static CPU manager sees them (pod-resources API): those it can give
    containers exclusively, and those it has given. Free = allocatable - exclusive."""

    allocatable: int = Field(ge=0, le=INT32_MAX)
    exclusive: int = Field(ge=0, le=INT32_MAX)


class NodeTopology(Schema):
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
