"""Node labels the device plugin writes, the workload's business type, the keys of fuyao's operator and leases, and the
well-known Kubernetes labels fuyao reads or writes (so no component spells one)."""

from __future__ import annotations

import re
from enum import StrEnum

from .base import parse_enum

# Node labels written by the device plugin --------------------------------------------------------------------
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


class ServerUsage(StrEnum):
    TRAIN = "train"
    INFER = "infer"


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


# Business type (pod annotation of the design doc) -------------------------------------------------------------
ANNOTATION_BUSINESS_TYPE = "business.workload/type"


class BusinessType(StrEnum):
    COMPUTE_INTENSIVE = "compute-intensive"
    IO_INTENSIVE = "io-intensive"
    MEMORY_SENSITIVE = "memory-sensitive"


def parse_business_type(raw: str) -> BusinessType:
    return parse_enum(BusinessType, ANNOTATION_BUSINESS_TYPE, raw)


# The NPU operator ---------------------------------------------------------------------------------------------
ANNOTATION_NFD_LABELS = "npu.openfuyao.com/nfd-labels"
"""Node annotation written by the NPU operator's node feature discovery: the comma-separated label keys it set, so
that deleting the policy removes exactly those (and never a label an administrator set)."""
LABEL_OPERATOR_COMPONENT = "npu.openfuyao.com/component"
"""Label on every object the NPU operator applies: the policy component it belongs to (``devicePlugin``, ...)."""
LABEL_OPERATOR_REVISION = "npu.openfuyao.com/revision"
"""Label on the NPU operator's validation pods: a hash of what they validate (a new one re-runs the validation)."""

# Leader election ----------------------------------------------------------------------------------------------
ANNOTATION_LEADER_URL = "inference.openfuyao.com/leader-url"
"""On a leader-election Lease: where its holder serves (the extender's followers forward binds there)."""

# Well-known Kubernetes labels ---------------------------------------------------------------------------------
LABEL_APP = "app"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_APP_NAME = "app.kubernetes.io/name"
LABEL_APP_INSTANCE = "app.kubernetes.io/instance"
"""A Helm release's name (every fuyao chart's selector labels carry it)."""
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_HELM_CHART = "helm.sh/chart"
LABEL_HOSTNAME = "kubernetes.io/hostname"
LABEL_ZONE = "topology.kubernetes.io/zone"
LABEL_SERVICE_NAME = "kubernetes.io/service-name"
"""An EndpointSlice's Service."""
POD_INSTANCE_LABELS = frozenset({
    "statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index", "batch.kubernetes.io/job-completion-index",
    "leaderworkerset.sigs.k8s.io/worker-index", "pod-template-generation"})
"""Labels a controller sets per pod (its name, its index): they say who the pod is, like its name."""
