"""Resource names: the extended resources fuyao advertises and schedules (integers, as Kubernetes requires), and
Ray's name for an NPU."""

from __future__ import annotations

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
BATCH_RESOURCES = (RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY)
EXTENDER_MANAGED_RESOURCES = (*ACCELERATOR_RESOURCES, *BATCH_RESOURCES)
"""What the scheduler extender decides about: a pod asking for one of these is sent to it (kube-scheduler's and
Volcano's ``managedResources``; both skip the extender for pods that ask for none of them). The chart's default
``extenderEntry.managedResources``. kube-scheduler refuses names in the ``kubernetes.io`` domain there ("an invalid
extended resource name"), so its entry leaves the batch resources out (:func:`kube_scheduler_managed`)."""


def socket_name_for(resource_name: str) -> str:
    """The device plugin's socket in the kubelet's plugin directory for a resource: ``npu.huawei.com/NPU`` →
    ``fuyao-npu.huawei.com-NPU.sock`` (unique per resource, no path separators)."""
    return "fuyao-" + resource_name.replace("/", "-") + ".sock"


def kube_scheduler_managed(resources: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The names kube-scheduler accepts in an extender's ``managedResources``."""
    return tuple(r for r in resources or EXTENDER_MANAGED_RESOURCES if not r.startswith("kubernetes.io/"))


RAY_RESOURCE_NPU = "NPU"
"""Ray's resource name for Ascend NPUs (``ray/_private/accelerators/npu.py``): what a Ray node counts from the
``/dev/davinci*`` fuyao's device plugin gave its container, and what a Serve replica asks for."""
