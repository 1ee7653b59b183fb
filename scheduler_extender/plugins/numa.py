"""NUMA: the pod's NPUs should sit on as few NUMA nodes as the node allows (host-device transfers stay local).

Honours ``volcano.sh/numa-topology-policy``: ``single-numa-node`` rejects nodes that cannot place the NPUs on one
NUMA node; ``restricted`` rejects nodes that can only place them on more NUMA nodes than the request needs on an
empty node of the same shape; ``best-effort`` / ``none`` only score. Score: 1 / NUMA nodes needed. (CPU NUMA
placement is the kubelet's Topology Manager's job; the API does not publish per-NUMA CPUs.)
"""

from __future__ import annotations

from collections import Counter

from fuyao.contracts import RESOURCE_NPU, NumaPolicy

from .. import devices
from ..framework import Cycle, Rejection
from ..model import NodeInfo, PodInfo


class NumaPlugin:
    name = "numa"

    def _needed(self, pod: PodInfo, node: NodeInfo) -> tuple[int | None, int] | None:
        want = pod.request(RESOURCE_NPU)
        if not want or node.topology is None:
            return None
        if all(d.numa_node is None for d in node.topology.devices.values()):
            return None
        needed = devices.cover(devices.free_numa_sizes(node), want)
        ideal = devices.cover(devices.healthy_numa_sizes(node), want) or 1
        return needed, ideal

    def filter(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> Rejection | None:
        if pod.numa_policy not in (NumaPolicy.SINGLE_NUMA_NODE, NumaPolicy.RESTRICTED):
            return None
        result = self._needed(pod, node)
        if result is None:
            if pod.numa_policy == NumaPolicy.SINGLE_NUMA_NODE and pod.request(RESOURCE_NPU):
                return Rejection("single-numa-node: the node publishes no NUMA placement of its NPUs "
                                 "(no npu.openfuyao.com/topology, or npu-smi reports no CPU affinity)",
                                 unresolvable=True, code="numa-unknown")
            return None
        needed, ideal = result
        if needed is None:
            return None  # device fit reports the shortage
        unknown = devices.unplaced_npus(node)
        if unknown and pod.numa_policy == NumaPolicy.SINGLE_NUMA_NODE:
            return Rejection(f"single-numa-node: {unknown} NPUs are held by pods bound without "
                             "npu.openfuyao.com/assigned, so which NUMA nodes are free is unknown",
                             code="placement-unknown")
        if pod.numa_policy == NumaPolicy.SINGLE_NUMA_NODE and needed > 1:
            per = Counter(node.topology.devices[d].numa_node for d in devices.free_npus(node))  # type: ignore[union-attr]
            return Rejection(f"single-numa-node: {pod.request(RESOURCE_NPU)} NPUs need {needed} NUMA nodes "
                             f"(free per NUMA node: {dict(sorted(per.items(), key=str))})",
                             unresolvable=ideal > 1, code="numa-single-node")
        if pod.numa_policy == NumaPolicy.RESTRICTED and needed > ideal:
            return Rejection(f"restricted: the free NPUs span {needed} NUMA nodes, {ideal} would do",
                             code="numa-restricted")
        return None

    def score(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> float:
        result = self._needed(pod, node)
        if result is None or result[0] is None:
            return 0.5
        return 1.0 / max(1, result[0])
