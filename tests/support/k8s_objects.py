"""Kubernetes objects as raw JSON dicts (what kube-scheduler sends and the watch delivers), for extender tests."""

from __future__ import annotations

import itertools
import time
from typing import Any

from fuyao.contracts import (
    ANNOTATION_NODE_TOPOLOGY,
    ANNOTATION_NODE_USAGE,
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_NPU,
    ContainerAssignment,
    DeviceHealth,
    DeviceTopology,
    InterconnectGroup,
    InterconnectKind,
    NodeTopology,
    NodeUsage,
    PodAssignment,
    VnpuSlice,
    dump_annotation,
)

_uid = itertools.count(1)


def topology(kind: str = "mesh", unhealthy: tuple[int, ...] = (), vnpus: dict[int, int] | None = None,
             aicore: int = 20, allocated: tuple[int, ...] = (), holders: dict[int, str] | None = None,
             links_down: tuple[int, ...] = ()) -> NodeTopology:
    """``mesh``: 8x 910B, one HCCS mesh, two dies per NUMA node. ``a1``: 8x 910, rings 0-3 / 4-7, a NUMA node per
    ring. ``vnpus``: die → number of static vir05 slices on it. ``holders``: die → the pod (namespace/name) the
    kubelet gave it to (the die is then allocated too)."""
    holders = holders or {}
    devices = {}
    for i in range(8):
        ring = i // 4
        slices = tuple(VnpuSlice(id=f"Ascend910-{i}-v{i * 16 + 100 + k}", vnpu_id=i * 16 + 100 + k,
                                 template="vir05_1c_8g", aicore=5, memory_mb=8192)
                       for k in range((vnpus or {}).get(i, 0)))
        devices[f"Ascend910-{i}"] = DeviceTopology(
            npu_id=i, chip_id=0, physical_id=i, chip_model="910B4" if kind == "mesh" else "910ProB",
            health=DeviceHealth.UNHEALTHY if i in unhealthy else DeviceHealth.HEALTHY,
            numa_node=(i // 2) if kind == "mesh" else ring,
            group="hccs-mesh-0" if kind == "mesh" else f"hccs-ring-{ring}", aicore=aicore, memory_mb=32768,
            vnpus=slices, allocated=i in allocated or i in holders, holder=holders.get(i),
            link_up=False if i in links_down else None)
    if kind == "mesh":
        groups = (InterconnectGroup(id="hccs-mesh-0", kind=InterconnectKind.HCCS_MESH, devices=tuple(devices)),)
    else:
        groups = tuple(InterconnectGroup(id=f"hccs-ring-{r}", kind=InterconnectKind.HCCS_RING,
                                         devices=tuple(f"Ascend910-{i}" for i in range(r * 4, r * 4 + 4)))
                       for r in range(2))
    return NodeTopology(chip_model="910B4" if kind == "mesh" else "910ProB", devices=devices, groups=groups)


def node(name: str, *, npus: int = 8, topo: NodeTopology | None = None, cpu: str = "64", memory: str = "256Gi",
         labels: dict[str, str] | None = None, extra: dict[str, str] | None = None,
         usage: NodeUsage | None = None) -> dict[str, Any]:
    annotations = {}
    if topo is not None:
        annotations[ANNOTATION_NODE_TOPOLOGY] = dump_annotation(topo)
    if usage is not None:
        annotations[ANNOTATION_NODE_USAGE] = dump_annotation(usage)
    allocatable = {"cpu": cpu, "memory": memory, "pods": "110", **({RESOURCE_NPU: str(npus)} if npus else {}),
                   **(extra or {})}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                         "annotations": annotations},
            "status": {"allocatable": allocatable, "capacity": allocatable}}


def pod(name: str, *, namespace: str = "default", requests: dict[str, str] | None = None,
        labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None, node_name: str | None = None,
        assigned: dict[str, list[str]] | None = None, phase: str = "Pending", uid: str | None = None) -> dict[str, Any]:
    requests = requests or {}
    ann = dict(annotations or {})
    if assigned:
        ann[ANNOTATION_POD_ASSIGNED] = dump_annotation(PodAssignment(node=node_name or "", containers=tuple(
            ContainerAssignment(container="main", resource=r, devices=tuple(d)) for r, d in assigned.items())))
    extended = {k: v for k, v in requests.items() if "/" in k}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{next(_uid)}",
                         "labels": labels or {}, "annotations": ann,
                         "creationTimestamp": "2026-11-30T00:00:00Z"},
            "spec": {"nodeName": node_name, "containers": [{"name": "main", "image": "vllm", "resources": {
                "requests": requests, "limits": extended}}]} if node_name else
            {"containers": [{"name": "main", "image": "vllm", "resources": {"requests": requests,
                                                                            "limits": extended}}]},
            "status": {"phase": phase, **({} if phase == "Pending" else {"startTime": "2026-11-30T00:00:01Z"})}}
    # the kubelet sets startTime when it takes a pod in: every Running or finished pod has it


def usage(cpu_ratio: float, memory_ratio: float, be: float = 0.0, age_s: float = 0.0) -> NodeUsage:
    return NodeUsage(updated_at=time.time() - age_s, cpu_capacity_milli=64000, cpu_used_milli=int(64000 * cpu_ratio),
                     memory_capacity_bytes=256 * 2**30, memory_used_bytes=int(256 * 2**30 * memory_ratio),
                     be_cpu_used_milli=int(64000 * be), be_memory_used_bytes=0)


OBJECT_META_ORDER = ("name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
                     "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations",
                     "ownerReferences", "finalizers", "managedFields")
"""metav1.ObjectMeta's fields in declaration order: the order Go's encoder writes them."""


def go_ordered_node(obj: dict[str, Any]) -> dict[str, Any]:
    """A Node as kube-scheduler's informer holds it and Go's encoder writes it: no TypeMeta (an informer's objects
    have it empty), ``metadata`` (ObjectMeta in declaration order), ``spec``, ``status``."""
    meta = obj.get("metadata") or {}
    ordered = {"metadata": {k: meta[k] for k in OBJECT_META_ORDER if k in meta}}
    ordered["metadata"].update({k: v for k, v in meta.items() if k not in ordered["metadata"]})
    for key in ("spec", "status"):
        if key in obj:
            ordered[key] = obj[key]
    return ordered


def go_extender_args(pod_obj: dict[str, Any], nodes: list[dict[str, Any]]) -> bytes:
    """kube-scheduler's ExtenderArgs body with full Nodes (nodeCacheCapable: false), byte for byte as Go writes it:
    the struct's fields in order (Pod, Nodes, NodeNames), no spaces."""
    import orjson

    items = b",".join(orjson.dumps(go_ordered_node(n)) for n in nodes)
    return (b'{"Pod":' + orjson.dumps(pod_obj) + b',"Nodes":{"metadata":{"resourceVersion":"77"},"items":[' + items
            + b']},"NodeNames":null}')
