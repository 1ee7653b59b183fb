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

from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU

from ..features import MAX_COVER, RESOURCE_COLUMN, NodeView
from ..framework import Cycle, RejectKind
from ..model import PodInfo

ACCELERATOR_NODE_SCORE = 0.25  # a pod that asks for no accelerator, on a node that has some

TOO_SMALL, SHORT, UNHEALTHY, UNPLACED, COUNT_NEVER, SHAPE_NOW, CORES, VNPUS, LINKS = range(1, 10)


class DeviceFitPlugin:
    name = "device-fit"
    kinds = (
        RejectKind("node-too-small", unresolvable=True),
        RejectKind("insufficient-devices"),
        RejectKind("insufficient-healthy-devices"),
        RejectKind("placement-unknown"),
        RejectKind("product-count", unresolvable=True),  # a count the node's product never takes in one pod
        RejectKind("product-shape"),  # not with the dies free now
        RejectKind("cores-not-on-one-die"),
        RejectKind("insufficient-vnpus"),
        RejectKind("links-down"),  # a multi-NPU request needs NPUs whose RoCE link is up
    )

    def __init__(self, strategy: Literal["binpack", "spread"] = "binpack"):
        self.strategy = strategy

    def row_local(self, pod: PodInfo) -> bool:
        return True

    def filter(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | None:
        wanted = pod.accelerators
        if not wanted:
            return None
        out = np.zeros(len(view), dtype=np.int16)

        def mark(condition: np.ndarray, kind: int) -> None:
            out[(out == 0) & condition] = kind

        for resource, want in wanted.items():  # in ACCELERATOR_RESOURCES order: the first problem is reported
            column = RESOURCE_COLUMN[resource]
            mark(view.alloc[:, column] < want, TOO_SMALL)
            mark(view.free[:, column] < want, SHORT)
            topo = view.topo
            if resource == RESOURCE_NPU:
                mark(topo & (view.free_by_device < want), UNHEALTHY)
                if want > 1:
                    mark(topo & (view.free_linked < want), LINKS)
                if want > 1:
                    mark(topo & view.shaped & (view.unplaced > 0), UNPLACED)
                ruled = topo & view.ruled
                if want <= 62:
                    mark(ruled & ((view.counts_never >> want) & 1).astype(bool), COUNT_NEVER)
                    mark(ruled & ~((view.counts_ok >> want) & 1).astype(bool), SHAPE_NOW)
            elif resource == RESOURCE_NPU_CORE:
                mark(topo & (view.die_cores_max < want), CORES)
            elif resource == RESOURCE_VNPU:
                mark(topo & (view.vnpus_free < want), VNPUS)
        return out

    def reasons(self, kind: int, pod: PodInfo, view: NodeView, at: np.ndarray, cycle: Cycle) -> list[str]:
        wanted = pod.accelerators
        # the resource that failed at each position: the first whose check matches (same order as filter)
        def first(check) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
            found = []
            for i in at.tolist():
                for resource, want in wanted.items():
                    if check(resource, want, i):
                        found.append((resource, want))
                        break
                else:
                    found.append(next(iter(wanted.items())))
            return found

        alloc, free = view.alloc, view.free
        if kind == TOO_SMALL:
            return [f"node has {alloc[i, RESOURCE_COLUMN[r]]} {r}, the pod asks for {w}"
                    for i, (r, w) in zip(at.tolist(), first(lambda r, w, i: alloc[i, RESOURCE_COLUMN[r]] < w),
                                         strict=True)]
        if kind == SHORT:
            return [f"insufficient {r}: {free[i, RESOURCE_COLUMN[r]]} free, {w} requested"
                    for i, (r, w) in zip(at.tolist(), first(lambda r, w, i: free[i, RESOURCE_COLUMN[r]] < w),
                                         strict=True)]
        want = wanted.get(RESOURCE_NPU, 0)
        if kind == UNHEALTHY:
            return [f"{n} healthy free NPUs by device, {want} requested" for n in view.free_by_device[at].tolist()]
        if kind == LINKS:
            return [f"{n} free NPUs with their RoCE link up, {want} requested (NPUs whose link is down take "
                    "single-NPU pods only)" for n in view.free_linked[at].tolist()]
        if kind == UNPLACED:
            return [f"{n} NPUs of this node are held by pods bound without npu.openfuyao.com/assigned: whether "
                    "dies its product lets go together are free is unknown" for n in view.unplaced[at].tolist()]
        if kind in (COUNT_NEVER, SHAPE_NOW):
            return [dict(reasons).get(want) or f"{want} NPUs do not fit the node's product rules"
                    for reasons in view.count_reasons[at].tolist()]
        if kind == CORES:
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
