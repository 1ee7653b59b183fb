"""Device fit: the pod's NPU / vNPU / npu-core / GPU requests fit the node's free devices, in a shape the node's
topology allows (a whole HCCS ring for 4 cards on 910 A1 boards; one die for a dynamic vNPU's cores).

Score: binpack (default) prefers nodes already busy, keeping whole cards and rings free for large jobs; spread
prefers empty nodes. A placement that stays inside one interconnect group scores higher than one that must span
groups.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU
from fuyao.placement import A1_RING_PREFERENCE

from .. import devices
from ..features import MAX_COVER, RESOURCE_COLUMN, NodeView
from ..framework import Cycle, RejectKind
from ..model import PodInfo

TOO_SMALL, SHORT, UNHEALTHY, UNPLACED, RING_NEVER, RING_NOW, CORES, VNPUS, LINKS = range(1, 10)


class DeviceFitPlugin:
    name = "device-fit"
    kinds = (
        RejectKind("node-too-small", unresolvable=True),
        RejectKind("insufficient-devices"),
        RejectKind("insufficient-healthy-devices"),
        RejectKind("placement-unknown"),
        RejectKind("ring-shape", unresolvable=True),  # a request size the board never takes
        RejectKind("ring-shape"),  # not with the rings free now
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
                ring = topo & view.ring_board
                if want > 1:
                    mark(ring & (view.unplaced > 0), UNPLACED)
                allowed = ((view.ring_ok >> want) & 1).astype(bool) if want <= 62 else np.zeros(len(view), bool)
                never = (want not in A1_RING_PREFERENCE) & (view.n_devices != want)
                mark(ring & ~allowed & never, RING_NEVER)
                mark(ring & ~allowed, RING_NOW)
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
            return [f"{n} NPUs of this 910 A1 board are held by pods bound without npu.openfuyao.com/assigned: "
                    "whether a whole ring is free is unknown" for n in view.unplaced[at].tolist()]
        if kind in (RING_NEVER, RING_NOW):
            return [devices.ring_problem(list(rings), n, want) or f"{want} cards do not fit the rings"
                    for rings, n in zip(view.ring_free[at].tolist(), view.n_devices[at].tolist(), strict=True)]
        if kind == CORES:
            cores = wanted.get(RESOURCE_NPU_CORE, 0)
            return [f"no die has {cores} free AI cores (most free on one die: {m}); a vNPU lives on one die"
                    for m in view.die_cores_max[at].tolist()]
        slices = wanted.get(RESOURCE_VNPU, 0)
        return [f"{m} free vNPU slices, {slices} requested" for m in view.vnpus_free[at].tolist()]

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | float:
        wanted = pod.accelerators
        if not wanted:
            return 0.5
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
