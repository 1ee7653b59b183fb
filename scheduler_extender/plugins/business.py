"""Business type (``business.workload/type``; inferred from requests when absent): place a pod where its
dominant resource is most free — accelerators (then CPU) for compute-intensive, memory for memory-sensitive, CPU
for IO-intensive — using measured usage where the QoS agent publishes it, requests otherwise; and avoid stacking
many pods of the same type on one node (they contend for the same resource)."""

from __future__ import annotations

from collections import Counter

from fuyao.contracts import ACCELERATOR_RESOURCES, BusinessType

from ..framework import Cycle, Rejection
from ..model import NodeInfo, PodInfo


class BusinessTypePlugin:
    name = "business-type"

    def __init__(self, stacking_penalty: float = 0.1):
        self.stacking_penalty = stacking_penalty

    def filter(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> Rejection | None:
        return None

    def score(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> float:
        if pod.business is None:
            return 0.5  # an invalid explicit value: neutral (the pod got an event naming it)
        free = self.free_share(pod.business, node)
        counts = node.memo.get("business_counts")
        if counts is None:
            counts = node.memo["business_counts"] = Counter(p.business for p in node.pods if not p.terminal)
        same = counts.get(pod.business, 0) - (1 if any(p.uid == pod.uid for p in node.pods) else 0)
        return free / (1.0 + self.stacking_penalty * same)

    @staticmethod
    def free_share(business: BusinessType, node: NodeInfo) -> float:
        usage = node.fresh_usage()
        cpu_used = usage.cpu_ratio if usage else _ratio(node.cpu_requested_milli, node.cpu_allocatable_milli)
        mem_used = usage.memory_ratio if usage else _ratio(node.memory_requested, node.memory_allocatable)
        if business == BusinessType.COMPUTE_INTENSIVE:
            shares = [1 - _ratio(node.allocatable_int(r) - node.free(r), node.allocatable_int(r))
                      for r in ACCELERATOR_RESOURCES if node.allocatable_int(r) > 0]
            return sum(shares) / len(shares) if shares else 1 - cpu_used
        if business == BusinessType.MEMORY_SENSITIVE:
            return 1 - mem_used
        return 1 - cpu_used


def _ratio(used: float, total: float) -> float:
    return 1.0 if total <= 0 else min(1.0, max(0.0, used / total))
