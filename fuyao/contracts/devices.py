"""What the device plugin and the scheduler extender agree on about devices: device IDs of the sub-device resources,
what a container is handed at Allocate, the extender's per-pod assignment, vNPU modes, and the faults the plugin
publishes."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator

from .base import Schema, parse_enum
from .resources import ACCELERATOR_RESOURCES


class DeviceHealth(StrEnum):
    """The kubelet's device health strings (device-plugin API v1beta1)."""

    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


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
"""Ascend's docker runtime reads it as "create a vNPU of this template on the physical chip in
ASCEND_VISIBLE_DEVICES" (its dynamic mode). fuyao creates vNPUs itself, so it never sets it (with a vNPU id in
ASCEND_VISIBLE_DEVICES the runtime refuses the container), and a user's value is refused."""
ENV_ASCEND_RUNTIME_OPTIONS = "ASCEND_RUNTIME_OPTIONS"
"""``VIRTUAL`` for vNPU containers (Ascend docker runtime convention)."""
ANNOTATION_CONTAINER_DEVICES = "npu.openfuyao.com/devices"
"""Container annotation set at Allocate: the comma-separated device IDs the container received."""
ANNOTATION_CONTAINER_VNPU_TEMPLATES = "npu.openfuyao.com/vnpu-templates"
"""Container annotation set at Allocate for vNPUs: their templates, comma-separated, in the order of the vNPU ids in
ASCEND_VISIBLE_DEVICES."""


# vNPU mode ----------------------------------------------------------------------------------------------------
ANNOTATION_VNPU_MODE = "vnpu.openfuyao.com/mode"
"""``dynamic`` asks for a vNPU created at allocation time (resource ``npu.huawei.com/npu-core``)."""


class VnpuMode(StrEnum):
    STATIC = "static"
    DYNAMIC = "dynamic"


def parse_vnpu_mode(raw: str) -> VnpuMode:
    return parse_enum(VnpuMode, ANNOTATION_VNPU_MODE, raw)


# The extender's assignment ------------------------------------------------------------------------------------
ANNOTATION_POD_ASSIGNED = "npu.openfuyao.com/assigned"
"""Pod annotation (JSON, :class:`PodAssignment`) written by the scheduler extender at bind time."""


class ContainerAssignment(Schema):
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


class PodAssignment(Schema):
    """Value of pod annotation ``npu.openfuyao.com/assigned``: the devices the scheduler chose."""

    schema_version: Literal[1] = 1
    node: str = Field(min_length=1)
    containers: tuple[ContainerAssignment, ...]


# Faults -------------------------------------------------------------------------------------------------------
ANNOTATION_NODE_FAULTS = "npu.openfuyao.com/faults"
"""Node annotation (JSON, :class:`NodeFaults`), written by the device plugin: each NPU's current fault codes, their
level, what the plugin does about them (keep, unhealthy, reset when free, isolated) and its link state."""


class FaultAction(StrEnum):
    """What the device plugin does about a fault level (docs/device-plugin.md, "Faults")."""

    KEEP = "keep"  # the device stays Healthy; the fault is published
    UNHEALTHY = "unhealthy"  # Unhealthy while the fault lasts
    RESET = "reset"  # Unhealthy; hot reset once no pod holds it
    ISOLATE = "isolate"  # Unhealthy until an operator releases it


class DeviceFault(Schema):
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


class NodeFaults(Schema):
    """Value of node annotation ``npu.openfuyao.com/faults``: the NPUs that have a fault or a link down."""

    schema_version: Literal[1] = 1
    devices: dict[str, DeviceFault] = Field(default_factory=dict)
