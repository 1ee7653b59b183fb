"""NUMA: the pod's NPUs should sit on as few NUMA nodes as the node allows (host-device transfers stay local).

Honours ``volcano.sh/numa-topology-policy``: ``single-numa-node`` rejects nodes that cannot place the NPUs on one
NUMA node; ``restricted`` rejects nodes that can only place them on more NUMA nodes than the request needs on an
empty node of the same shape; ``best-effort`` / ``none`` only score. Score: 1 / NUMA nodes needed. (CPU NUMA
placement is the kubelet's Topology Manager's job; the API does not publish per-NUMA CPUs.)
"""

from __future__ import annotations

import numpy as np

from fuyao.contracts import RESOURCE_NPU, NumaPolicy

from ..features import MAX_COVER, NodeView
from ..framework import Cycle, RejectKind
from ..model import PodInfo

UNKNOWN, UNPLACED, SINGLE_NEVER, SINGLE_NOW, RESTRICTED = range(1, 6)


class NumaPlugin:
    name = "numa"
    kinds = (
        RejectKind("numa-unknown", unresolvable=True),
        RejectKind("placement-unknown"),
        RejectKind("numa-single-node", unresolvable=True),  # even the empty node needs several NUMA nodes
        RejectKind("numa-single-node"),
        RejectKind("numa-restricted"),
    )

    @staticmethod
    def _needed(pod: PodInfo, view: NodeView) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(known, needed, ideal) per candidate: whether the node places its dies on NUMA nodes, how many NUMA
        nodes the free dies need (0: not enough dies), how many the empty node would need."""
        want = pod.request(RESOURCE_NPU)
        if want <= 0:
            return None
        known = view.topo & view.numa_known
        if want > MAX_COVER:
            return known, np.zeros(len(view), np.int8), np.ones(len(view), np.int8)
        return known, view.numa_need[:, want], np.maximum(view.numa_ideal[:, want], 1)

    def filter(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | None:
        policy = pod.numa_policy
        if policy not in (NumaPolicy.SINGLE_NUMA_NODE, NumaPolicy.RESTRICTED):
            return None
        found = self._needed(pod, view)
        if found is None:
            return None
        known, needed, ideal = found
        out = np.zeros(len(view), dtype=np.int16)
        single = policy == NumaPolicy.SINGLE_NUMA_NODE
        if single:
            out[~known] = UNKNOWN
        placed = known & (needed > 0)  # not enough free dies: device fit reports the shortage
        if single:
            out[placed & (view.unplaced > 0)] = UNPLACED
            late = placed & (out == 0) & (needed > 1)
            out[late & (ideal > 1)] = SINGLE_NEVER
            out[late & (ideal <= 1)] = SINGLE_NOW
        else:
            out[placed & (needed > ideal)] = RESTRICTED
        return out

    def reasons(self, kind: int, pod: PodInfo, view: NodeView, at: np.ndarray, cycle: Cycle) -> list[str]:
        want = pod.request(RESOURCE_NPU)
        if kind == UNKNOWN:
            return ["single-numa-node: the node publishes no NUMA placement of its NPUs (no npu.openfuyao.com/"
                    "topology, or npu-smi reports no CPU affinity)"] * len(at)
        if kind == UNPLACED:
            return [f"single-numa-node: {n} NPUs are held by pods bound without npu.openfuyao.com/assigned, so "
                    "which NUMA nodes are free is unknown" for n in view.unplaced[at].tolist()]
        _, needed, ideal = self._needed(pod, view)  # type: ignore[misc]
        if kind in (SINGLE_NEVER, SINGLE_NOW):
            return [f"single-numa-node: {want} NPUs need {k} NUMA nodes (free per NUMA node: {per})"
                    for k, per in zip(needed[at].tolist(), view.numa_free[at].tolist(), strict=True)]
        return [f"restricted: the free NPUs span {k} NUMA nodes, {i} would do"
                for k, i in zip(needed[at].tolist(), ideal[at].tolist(), strict=True)]

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | float:
        found = self._needed(pod, view)
        if found is None:
            return 0.5
        known, needed, _ = found
        return np.where(known & (needed > 0), 1.0 / np.maximum(needed, 1), 0.5)
