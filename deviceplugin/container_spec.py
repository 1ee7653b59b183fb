"""What a container needs to use the NPUs it was given: environment, device nodes, driver mounts, annotations.

Whole dies get ``ASCEND_VISIBLE_DEVICES=<physical ids>`` and ``/dev/davinci<N>``; vNPUs get their vNPU ids,
``ASCEND_RUNTIME_OPTIONS=VIRTUAL`` (an existing vNPU, as Ascend's docker runtime mounts one: never
``ASCEND_VNPU_SPECS``, which asks that runtime to create another), their templates in a container annotation, and
the host's ``/dev/vdavinci<id>`` (made by the driver with the vNPU) at
``/dev/davinci<id>`` in the container, as Ascend's docker runtime mounts it (so the CANN
runtime, and Ray's NPU manager, which counts ``/dev/davinci[0-9]*``, see one device). The decision is pure
(:func:`container_spec`); the only host facts it needs, which device nodes and driver paths exist, come in through
``exists``, so a missing ``/dev/davinciN`` or ``/dev/vdavinciN`` is reported before the runtime fails on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fuyao.contracts import (
    ANNOTATION_CONTAINER_DEVICES,
    ANNOTATION_CONTAINER_VNPU_TEMPLATES,
    ENV_ASCEND_RUNTIME_OPTIONS,
    ENV_ASCEND_VISIBLE_DEVICES,
)

from .config import DriverMount
from .devices import DeviceStatus, Slot

# Device nodes every NPU container needs besides its /dev/davinciN (when the driver created them).
SHARED_DEVICE_NODES = ("davinci_manager", "devmm_svm", "hisi_hdc")


class AllocationRefused(Exception):
    """The kubelet asked for devices we cannot give; ``code`` is the gRPC status name to answer with."""

    def __init__(self, code: str, message: str):
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class DeviceNode:
    container_path: str
    host_path: str
    permissions: str = "rw"


@dataclass(frozen=True)
class BindMount:
    container_path: str
    host_path: str
    read_only: bool


@dataclass(frozen=True)
class ContainerSpec:
    """The content of one ContainerAllocateResponse."""

    envs: dict[str, str] = field(default_factory=dict)
    mounts: tuple[BindMount, ...] = ()
    devices: tuple[DeviceNode, ...] = ()
    annotations: dict[str, str] = field(default_factory=dict)


def container_spec(
    device_ids: Sequence[str],
    slots: Mapping[str, Slot],
    statuses: Mapping[str, DeviceStatus],
    *,
    dev_root: str,
    driver_mounts: Sequence[DriverMount],
    host_root: str = "/",
    extra_env: Mapping[str, str] | None = None,
    exists: Callable[[str], bool] = os.path.exists,
) -> ContainerSpec:
    """The spec for one container given whole dies or vNPU slots, or :class:`AllocationRefused` naming every
    unknown or unhealthy device."""
    if not device_ids:
        raise AllocationRefused("INVALID_ARGUMENT", "the container request names no devices")
    unknown = [d for d in device_ids if d not in slots]
    if unknown:
        raise AllocationRefused("INVALID_ARGUMENT", f"unknown device IDs {unknown}; this plugin serves "
                                                    f"{sorted(slots)}")
    unhealthy = {d: statuses[d].reason for d in device_ids if d in statuses and not statuses[d].healthy}
    if unhealthy:
        detail = "; ".join(f"{d}: {reason}" for d, reason in unhealthy.items())
        raise AllocationRefused("FAILED_PRECONDITION", f"unhealthy devices requested ({detail})")
    chosen = [slots[d] for d in dict.fromkeys(device_ids)]
    vnpus = [s for s in chosen if s.vnpu is not None]
    if vnpus and len(vnpus) != len(chosen):
        raise AllocationRefused("INVALID_ARGUMENT", "a container cannot mix whole NPUs and vNPUs")
    nodes: list[DeviceNode] = []
    envs: dict[str, str]
    annotations: dict[str, str] = {}
    if vnpus:
        ordered = sorted(vnpus, key=lambda s: s.vnpu.vnpu_id if s.vnpu else 0)
        for slot in ordered:
            assert slot.vnpu is not None
            host = os.path.join(dev_root, f"vdavinci{slot.vnpu.vnpu_id}")
            if not exists(host):  # the driver makes it with the vNPU: without it the container has no device
                raise AllocationRefused("FAILED_PRECONDITION",
                                        f"device node {host} for vNPU {slot.id} does not exist (check --dev-root, "
                                        "the Ascend driver and npu-smi info -t info-vnpu)")
            # the container path is /dev/davinci<id>, as Ascend's docker runtime mounts it (VIRTUAL)
            nodes.append(DeviceNode(container_path=f"/dev/davinci{slot.vnpu.vnpu_id}", host_path=host))
        envs = {ENV_ASCEND_VISIBLE_DEVICES: ",".join(str(s.vnpu.vnpu_id) for s in ordered if s.vnpu),
                ENV_ASCEND_RUNTIME_OPTIONS: "VIRTUAL"}
        ids = [s.id for s in ordered]
        annotations[ANNOTATION_CONTAINER_VNPU_TEMPLATES] = ",".join(s.vnpu.template for s in ordered if s.vnpu)
    else:
        whole = sorted({s.parent.physical_id: s for s in chosen}.values(), key=lambda s: s.parent.physical_id)
        for slot in whole:
            host = os.path.join(dev_root, f"davinci{slot.parent.physical_id}")
            if not exists(host):
                raise AllocationRefused("FAILED_PRECONDITION",
                                        f"device node {host} for {slot.id} does not exist (check --dev-root and "
                                        "the Ascend driver)")
            nodes.append(DeviceNode(container_path=f"/dev/davinci{slot.parent.physical_id}", host_path=host))
        envs = {ENV_ASCEND_VISIBLE_DEVICES: ",".join(str(s.parent.physical_id) for s in whole)}
        ids = [s.id for s in whole]
    for name in SHARED_DEVICE_NODES:
        host = os.path.join(dev_root, name)
        if exists(host):
            nodes.append(DeviceNode(container_path=f"/dev/{name}", host_path=host))
    mounts = tuple(
        BindMount(container_path=m.target, host_path=m.host_path, read_only=m.read_only)
        for m in driver_mounts
        if exists(os.path.join(host_root, m.host_path.lstrip("/")))
    )
    envs = {**(extra_env or {}), **envs}  # the device variables always win
    return ContainerSpec(envs=envs, mounts=mounts, devices=tuple(nodes),
                         annotations={ANNOTATION_CONTAINER_DEVICES: ",".join(ids), **annotations})
