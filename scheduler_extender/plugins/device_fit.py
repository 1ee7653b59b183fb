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

from fuyao.contracts import (
    ANNOTATION_NODE_TOPOLOGY,
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_NPU,
    RESOURCE_NPU_CORE,
    RESOURCE_VNPU,
)

from .. import devices
from ..features import MAX_COVER, RESOURCE_COLUMN, NodeView
from ..framework import Cycle, Reject, Verdicts
from ..model import PodInfo
from .registry import PluginArgs, register

ACCELERATOR_NODE_SCORE = 0.25  # a pod that asks for no accelerator, on a node that has some
DIE_RESOURCES = frozenset({RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU})  # the binder chooses their dies


class DeviceFitArgs(PluginArgs):
    weight: float = Field(default=3.0, ge=0)
    strategy: Literal["binpack", "spread"] = "binpack"
    require_topology: bool | None = Field(default=None, description=(
        f"refuse NPU, vNPU and npu-core requests on nodes without a usable {ANNOTATION_NODE_TOPOLOGY} annotation "
        "(the device plugin has not published it, or it does not parse): the binder cannot choose their dies, so "
        "every bind there would fail. null: true when the extender binds (bind: true)"))


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
    NO_TOPOLOGY = 10, "no-topology", True  # the binder cannot choose dies on a node that publishes none


R = DeviceFitReject


def _plan_reason(pod: PodInfo, plan: devices.NpuPlan) -> str:
    """Which of the pod's containers gets no set its product allows, after what the ones before it got."""
    name, want, beside = pod.npu_step(plan.failed)
    placed = zip((n for n, _ in pod.containers[:beside]), plan.sets, strict=False)  # beside None: all before it
    after = "; ".join(f"{n or '?'} got {', '.join(chosen)}" for n, chosen in placed if chosen)
    what = f"{'container' if beside is None else 'init container'} {name or '?'} asking for {want} NPUs"
    if beside is not None:
        what += " (it runs before the containers, beside only the sidecars started before it)"
    if plan.reused:
        what += " (the kubelet gives it the NPUs of the plain init containers before it first)"
    return (f"{what} gets no set the node's product allows"
            f"{f' after {after}' if after else ''} (the device plugin gives each container its set in turn, from "
            f"what the ones before left): {plan.problem}")


@register("device-fit", DeviceFitArgs)
class DeviceFitPlugin:
    name = "device-fit"
    kinds = DeviceFitReject

    def __init__(self, args: DeviceFitArgs | None = None):
        self.args = args or DeviceFitArgs()
        self.strategy = self.args.strategy
        self.require_topology = bool(self.args.require_topology)  # unresolved (null): not required

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
            if self.require_topology and resource in DIE_RESOURCES:
                mark(~topo, R.NO_TOPOLOGY, request)
            if resource == RESOURCE_NPU:
                # the device plugin gives each container its own set: links and product rules apply per container
                steps, counts = pod.npu_steps, pod.npu_counts
                mark(topo & (view.free_by_device < want), R.UNHEALTHY, request)
                if linked := steps.linked:
                    mark(topo & (view.free_linked < linked), R.LINKS, request)
                if max(counts) > 1:
                    mark(topo & view.shaped & (view.unplaced > 0), R.UNPLACED, request)
                ruled = topo & view.ruled
                for count in counts:
                    if count <= 62:
                        mark(ruled & ((view.counts_never >> count) & 1).astype(bool), R.COUNT_NEVER, request)
                if steps.joint:  # one after another, each from what the ones before left (as the kubelet asks)
                    dies, unplaceable = view.npu_dies, np.zeros(len(view), dtype=bool)
                    for i in np.flatnonzero(ruled & (out == 0)).tolist():
                        unplaceable[i] = devices.plan_npus(dies[i], steps).problem is not None
                    mark(unplaceable, R.SHAPE_NOW, request)
                else:
                    for count in counts:
                        if count <= 62:
                            mark(ruled & ~((view.counts_ok >> count) & 1).astype(bool), R.SHAPE_NOW, request)
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
        if kind == R.NO_TOPOLOGY:
            return [f"the node publishes no usable {ANNOTATION_NODE_TOPOLOGY} annotation"
                    f"{f' ({problem})' if problem else ''}: its dies cannot be chosen (is the device plugin running?)"
                    for problem in view.topo_problem[at].tolist()]
        want = wanted.get(RESOURCE_NPU, 0)
        if kind == R.UNHEALTHY:
            return [f"{n} healthy free NPUs by device, {want} requested" for n in view.free_by_device[at].tolist()]
        if kind == R.LINKS:
            linked = pod.npu_steps.linked
            return [f"{n} free NPUs with their RoCE link up, {linked} requested by multi-NPU containers (NPUs whose "
                    "link is down take single-NPU containers only)" for n in view.free_linked[at].tolist()]
        if kind == R.UNPLACED:
            return [f"{n} NPUs of this node are held by pods bound without {ANNOTATION_POD_ASSIGNED}: whether "
                    "dies its product lets go together are free is unknown" for n in view.unplaced[at].tolist()]
        if kind == R.SHAPE_NOW and pod.npu_steps.joint:
            return [_plan_reason(pod, devices.plan_npus(dies, pod.npu_steps)) for dies in view.npu_dies[at].tolist()]
        if kind in (R.COUNT_NEVER, R.SHAPE_NOW):
            counts = pod.npu_counts
            bits = (view.counts_never if kind == R.COUNT_NEVER else ~view.counts_ok)[at].tolist()
            out = []
            for mask, reasons in zip(bits, view.count_reasons[at].tolist(), strict=True):
                count = next((c for c in counts if c <= 62 and (mask >> c) & 1), want)
                why = dict(reasons).get(count) or f"{count} NPUs do not fit the node's product rules"
                out.append(why if len(counts) == 1 else f"a container asking for {count} NPUs: {why}")
            return out
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
