"""Device fit: the pod's NPU / vNPU / npu-core / GPU requests fit the node's free devices, in a shape the node's
product allows (fuyao.products: 910 A1 rings, 910B x16 halves, A3 die pairs, the counts each takes; the device
plugin applies the same rules) and one die for a dynamic vNPU's cores.

Score: binpack (default) prefers nodes already busy, keeping whole cards and rings free for large jobs; spread
prefers empty nodes. A pod that asks for no accelerator prefers nodes without NPUs or GPUs (in a mixed cluster,
accelerator nodes stay free for accelerator pods). A placement that stays inside one interconnect group scores
higher than one that must span groups.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from fuyao.contracts import ANNOTATION_POD_ASSIGNED, RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU

from ..features import MAX_COVER, RESOURCE_COLUMN, NodeView
from ..framework import Cycle, Reject, Verdicts
from ..model import PodInfo
from .registry import PluginArgs, register

ACCELERATOR_NODE_SCORE = 0.25  # a pod that asks for no accelerator, on a node that has some


class DeviceFitArgs(PluginArgs):
    weight: float = Field(default=3.0, ge=0)
    strategy: Literal["binpack", "spread"] = "binpack"


class DeviceFitReject(Reject):
    TOO_SMALL = 1, "node-too-small", True
    SHORT = 2, "insufficient-devices"
    UNHEALTHY = 3, "insufficient-healthy-devices"
    UNPLACED = 4, "placement-unknown"
    COUNT_NEVER = 5, "product-count", True  # a count the node's product never takes in one pod
    SHAPE_NOW = 6, "product-shape"  # not with the dies free now
    CORES = 7, "cores-not-on-one-die"
    VNPUS = 8, "insufficient-vnpus"
    LINKS = 9, "links-down"  # a multi-NPU request needs NPUs whose RoCE link is up


R = DeviceFitReject


@register("device-fit", DeviceFitArgs)
class DeviceFitPlugin:
    name = "device-fit"
    kinds = DeviceFitReject

    def __init__(self, args: DeviceFitArgs | None = None):
        self.args = args or DeviceFitArgs()
        self.strategy = self.args.strategy

    def row_local(self, pod: PodInfo) -> bool:
        return True

    def filter(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> Verdicts | None:
        wanted = pod.accelerators
        if not wanted:
            return None
        out = np.zeros(len(view), dtype=np.int16)
        # which of the pod's requests (its position) failed; noted only when it asks for more than one
        failed = np.zeros(len(view), dtype=np.int64) if len(wanted) > 1 else None

        def mark(condition: np.ndarray, kind: R, request: int) -> None:
            hit = (out == 0) & condition
            out[hit] = kind
            if failed is not None:
                failed[hit] = request

        # in ACCELERATOR_RESOURCES order: the first problem is reported
        for request, (resource, want) in enumerate(wanted.items()):
            column = RESOURCE_COLUMN[resource]
            mark(view.alloc[:, column] < want, R.TOO_SMALL, request)
            mark(view.free[:, column] < want, R.SHORT, request)
            topo = view.topo
            if resource == RESOURCE_NPU:
                mark(topo & (view.free_by_device < want), R.UNHEALTHY, request)
                if want > 1:
                    mark(topo & (view.free_linked < want), R.LINKS, request)
                if want > 1:
                    mark(topo & view.shaped & (view.unplaced > 0), R.UNPLACED, request)
                ruled = topo & view.ruled
                if want <= 62:
                    mark(ruled & ((view.counts_never >> want) & 1).astype(bool), R.COUNT_NEVER, request)
                    mark(ruled & ~((view.counts_ok >> want) & 1).astype(bool), R.SHAPE_NOW, request)
            elif resource == RESOURCE_NPU_CORE:
                mark(topo & (view.die_cores_max < want), R.CORES, request)
            elif resource == RESOURCE_VNPU:
                mark(topo & (view.vnpus_free < want), R.VNPUS, request)
        return Verdicts(out, failed)

    def reasons(self, kind: Reject, pod: PodInfo, view: NodeView, at: np.ndarray, detail: np.ndarray,
                cycle: Cycle) -> list[str]:
        wanted = pod.accelerators
        requests = list(wanted.items())
        failed = [requests[r] for r in detail[:, 0].tolist()]  # the request the filter found failing, per node
        alloc, free = view.alloc, view.free
        if kind == R.TOO_SMALL:
            return [f"node has {alloc[i, RESOURCE_COLUMN[r]]} {r}, the pod asks for {w}"
                    for i, (r, w) in zip(at.tolist(), failed, strict=True)]
        if kind == R.SHORT:
            return [f"insufficient {r}: {free[i, RESOURCE_COLUMN[r]]} free, {w} requested"
                    for i, (r, w) in zip(at.tolist(), failed, strict=True)]
        want = wanted.get(RESOURCE_NPU, 0)
        if kind == R.UNHEALTHY:
            return [f"{n} healthy free NPUs by device, {want} requested" for n in view.free_by_device[at].tolist()]
        if kind == R.LINKS:
            return [f"{n} free NPUs with their RoCE link up, {want} requested (NPUs whose link is down take "
                    "single-NPU pods only)" for n in view.free_linked[at].tolist()]
        if kind == R.UNPLACED:
            return [f"{n} NPUs of this node are held by pods bound without {ANNOTATION_POD_ASSIGNED}: whether "
                    "dies its product lets go together are free is unknown" for n in view.unplaced[at].tolist()]
        if kind in (R.COUNT_NEVER, R.SHAPE_NOW):
            return [dict(reasons).get(want) or f"{want} NPUs do not fit the node's product rules"
                    for reasons in view.count_reasons[at].tolist()]
        if kind == R.CORES:
            cores = wanted.get(RESOURCE_NPU_CORE, 0)
            return [f"no die has {cores} free AI cores (most free on one die: {m}); a vNPU lives on one die"
                    for m in view.die_cores_max[at].tolist()]
        slices = wanted.get(RESOURCE_VNPU, 0)
        return [f"{m} free vNPU slices, {slices} requested" for m in view.vnpus_free[at].tolist()]

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | float:
        wanted = pod.accelerators
        if not wanted:
            # a pod without accelerators keeps NPU and GPU nodes for the pods that need them (mixed clusters)
            return np.where(view.alloc.sum(axis=1) > 0, ACCELERATOR_NODE_SCORE, 1.0)
        fill = np.zeros(len(view))
        missing = np.zeros(len(view), dtype=bool)
        for resource, want in wanted.items():
            column = RESOURCE_COLUMN[resource]
            total = view.alloc[:, column]
            missing |= total <= 0
            safe = np.maximum(total, 1)
            fill += np.minimum(1.0, (total - view.free[:, column] + want) / safe)
        fill /= len(wanted)
        value = fill if self.strategy == "binpack" else 1.0 - fill
        want_npu = wanted.get(RESOURCE_NPU, 0)
        if want_npu and want_npu <= MAX_COVER:
            groups = view.group_need[:, want_npu]
            spans = view.topo & view.has_groups & (groups > 1)
            value = np.where(spans, value * 0.5, value)
        return np.where(missing, 0.0, value)
