"""NUMA: the pod's NPUs and its exclusive CPUs should sit on as few NUMA nodes as the node allows (host-device
transfers and memory stay local).

Exclusive CPUs are those the kubelet's static CPU manager pins for a Guaranteed pod with integer CPU requests; the
device plugin publishes, per NUMA node, how many it can give and has given (``numa_cpus`` in
``npu.openfuyao.com/topology``). Where a node publishes them, the NUMA nodes needed are the fewest that hold the
pod's NPUs *and* its exclusive CPUs together; elsewhere (none CPU manager policy, or a pod without exclusive CPUs)
the NPUs alone.

Honours ``volcano.sh/numa-topology-policy``: ``single-numa-node`` rejects nodes that cannot place the pod on one
NUMA node; ``restricted`` rejects nodes that can only place it on more NUMA nodes than it needs on an empty node of
the same shape; ``best-effort`` / ``none`` only score. Score: 1 / NUMA nodes needed.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fuyao.contracts import ANNOTATION_NODE_TOPOLOGY, ANNOTATION_POD_ASSIGNED, RESOURCE_NPU, NumaPolicy

from ..features import MAX_COVER, NodeView
from ..framework import Cycle, Reject, Verdicts
from ..model import PodInfo
from .registry import PluginArgs, register


class NumaArgs(PluginArgs):
    weight: float = Field(default=2.0, ge=0)


class NumaReject(Reject):
    UNKNOWN = 1, "numa-unknown", True
    UNPLACED = 2, "placement-unknown"
    SINGLE_NEVER = 3, "numa-single-node", True  # even the empty node needs several NUMA nodes
    SINGLE_NOW = 4, "numa-single-node"
    RESTRICTED = 5, "numa-restricted"


R = NumaReject


def _fewest(table: np.ndarray, cpus: int) -> np.ndarray:
    """Per row of a [n, k] slice of the joint table (most CPUs on at most k NUMA nodes with enough dies): the
    smallest k whose CPUs reach ``cpus`` (0: none)."""
    fits = table >= cpus
    fits[:, 0] = False  # zero NUMA nodes place nothing
    return np.where(fits.any(axis=1), fits.argmax(axis=1), 0)


@register("numa", NumaArgs)
class NumaPlugin:
    name = "numa"
    kinds = NumaReject

    def __init__(self, args: NumaArgs | None = None):
        self.args = args or NumaArgs()

    @staticmethod
    def _needed(pod: PodInfo, view: NodeView) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """(known, needed, ideal, joint) per candidate: whether the node knows where the pod would sit, how many
        NUMA nodes its free NPUs (and exclusive CPUs) need (0: not enough), how many on the empty node, and
        whether CPUs were counted."""
        want = max(0, pod.request(RESOURCE_NPU))
        cpus = pod.exclusive_cpus
        if (not want and not cpus) or want > MAX_COVER:
            return None
        n = len(view)
        needed = np.zeros(n, dtype=np.int64)
        ideal = np.ones(n, dtype=np.int64)
        known = np.zeros(n, dtype=bool)
        if want:
            known = view.topo & view.numa_known
            needed = view.numa_need[:, want].astype(np.int64)
            ideal = np.maximum(view.numa_ideal[:, want], 1).astype(np.int64)
        joint = np.zeros(n, dtype=bool)
        if cpus:
            joint = view.cpu_numa.copy()
            if joint.any():  # gather only the d = want slice of the [k, d] tables
                columns, rows = view.table.cols, view.rows
                needed = np.where(joint, _fewest(columns["numa_joint"][rows, :, want], cpus), needed)
                ideal = np.where(joint, np.maximum(_fewest(columns["numa_joint_ideal"][rows, :, want], cpus), 1),
                                 ideal)
                known = known | joint
        return known, needed, ideal, joint

    def row_local(self, pod: PodInfo) -> bool:
        return True

    def filter(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> Verdicts | None:
        policy = pod.numa_policy
        if policy not in (NumaPolicy.SINGLE_NUMA_NODE, NumaPolicy.RESTRICTED):
            return None
        found = self._needed(pod, view)
        if found is None:
            return None
        known, needed, ideal, joint = found
        want = pod.request(RESOURCE_NPU)
        out = np.zeros(len(view), dtype=np.int16)
        single = policy == NumaPolicy.SINGLE_NUMA_NODE
        if single and want > 0:
            out[~known] = R.UNKNOWN  # a pod without NPUs on a node that publishes no CPUs: the kubelet decides
        placed = known & (needed > 0)  # not enough free dies or CPUs: device fit / the scheduler report the shortage
        if single:
            if want > 0:  # one die is on one NUMA node wherever it is: unknown holders matter for more, or CPUs
                out[placed & (view.unplaced > 0) & (joint | (want > 1))] = R.UNPLACED
            late = placed & (out == 0) & (needed > 1)
            out[late & (ideal > 1)] = R.SINGLE_NEVER
            out[late & (ideal <= 1)] = R.SINGLE_NOW
        else:
            out[placed & (needed > ideal)] = R.RESTRICTED
        return Verdicts(out, np.stack([needed, ideal, joint.astype(np.int64)], axis=1))

    def reasons(self, kind: Reject, pod: PodInfo, view: NodeView, at: np.ndarray, detail: np.ndarray,
                cycle: Cycle) -> list[str]:
        want = pod.request(RESOURCE_NPU)
        if kind == R.UNKNOWN:
            return [f"single-numa-node: the node publishes no NUMA placement of its NPUs (no "
                    f"{ANNOTATION_NODE_TOPOLOGY}, or npu-smi reports no CPU affinity)"] * len(at)
        if kind == R.UNPLACED:
            return [f"single-numa-node: {n} NPUs are held by pods bound without {ANNOTATION_POD_ASSIGNED}, so "
                    "which NUMA nodes are free is unknown" for n in view.unplaced[at].tolist()]
        texts = []
        for i, (k, best, joint) in zip(at.tolist(), detail.tolist(), strict=True):  # as the filter found them
            asks = [f"{want} NPUs"] if want else []
            free = f"free NPUs per NUMA node: {view.numa_free[i]}" if want else ""
            if joint:
                asks.append(f"{pod.exclusive_cpus} exclusive CPUs")
                free = ", ".join(x for x in (free, f"free exclusive CPUs per NUMA node: {view.numa_cpus_free[i]}")
                                 if x)
            what = " + ".join(asks)
            if kind in (R.SINGLE_NEVER, R.SINGLE_NOW):
                texts.append(f"single-numa-node: {what} need {k} NUMA nodes ({free})")
            else:
                texts.append(f"restricted: {what} span {k} NUMA nodes, {best} would do ({free})")
        return texts

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | float:
        found = self._needed(pod, view)
        if found is None:
            return 0.5
        known, needed, _, _ = found
        return np.where(known & (needed > 0), 1.0 / np.maximum(needed, 1), 0.5)

