"""QoS colocation of latency-sensitive (LS) and best-effort (BE) pods.

- LS pods avoid nodes whose measured usage or BE pressure is high: rejected above ``ls_max_usage``, scored down
  from ``ls_usage_watermark``.
- BE pods only go to colocation-enabled nodes (``volcano.sh/colocation=true``) with enough
  ``kubernetes.io/batch-cpu`` / ``batch-memory`` left; they prefer nodes with the most batch capacity free.
- Preemption: an LS pod may only evict BE pods (see :func:`be_victims`); BE pods evict nobody.
"""

from __future__ import annotations

from fuyao.contracts import RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY, QoSClass

from ..framework import Cycle, Rejection
from ..model import NodeInfo, PodInfo


class ColocationPlugin:
    name = "qos-colocation"

    def __init__(self, ls_usage_watermark: float = 0.7, ls_max_usage: float = 0.95,
                 be_pressure_watermark: float = 0.5):
        self.ls_usage_watermark = ls_usage_watermark
        self.ls_max_usage = ls_max_usage
        self.be_pressure_watermark = be_pressure_watermark

    def filter(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> Rejection | None:
        if pod.qos == QoSClass.BE:
            if not node.colocation:
                return Rejection("BE pods need a colocation node (label volcano.sh/colocation=true)",
                                 unresolvable=True, code="not-colocation-node")
            want_cpu, want_mem = pod.request(RESOURCE_BATCH_CPU), pod.request(RESOURCE_BATCH_MEMORY)
            free_cpu, free_mem = node.batch_free()
            if want_cpu > free_cpu or want_mem > free_mem:
                return Rejection(f"insufficient batch resources: cpu {free_cpu}m free / {want_cpu}m asked, memory "
                                 f"{free_mem} free / {want_mem} asked", code="insufficient-batch")
            return None
        usage = node.fresh_usage()
        if usage is not None and max(usage.cpu_ratio, usage.memory_ratio) > self.ls_max_usage:
            return Rejection(f"node usage cpu {usage.cpu_ratio:.0%} / memory {usage.memory_ratio:.0%} is above "
                             f"{self.ls_max_usage:.0%} for LS pods", code="node-too-busy")
        return None

    def score(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> float:
        if pod.qos == QoSClass.BE:
            total_cpu, total_mem = node.allocatable_int(RESOURCE_BATCH_CPU), node.allocatable_int(RESOURCE_BATCH_MEMORY)
            free_cpu, free_mem = node.batch_free()
            shares = [f / t for f, t in ((free_cpu, total_cpu), (free_mem, total_mem)) if t > 0]
            return min(shares) if shares else 0.0
        usage = node.fresh_usage()
        if usage is None:
            return 0.5
        load = max(usage.cpu_ratio, usage.memory_ratio)
        value = 1.0 if load <= self.ls_usage_watermark else max(
            0.0, (self.ls_max_usage - load) / max(1e-9, self.ls_max_usage - self.ls_usage_watermark))
        if usage.be_pressure > self.be_pressure_watermark:
            value *= 0.5
        return value


def be_victims(preemptor: PodInfo, victims: list[PodInfo]) -> list[PodInfo] | None:
    """The victims a preemptor may evict on one node, or None (the node is not a preemption candidate). A BE pod
    evicts nobody; an LS pod never evicts a pod marked LS — BE pods and pods without a QoS key (ordinary
    priority preemption) may go."""
    if preemptor.qos == QoSClass.BE:
        return None
    if any(v.qos == QoSClass.LS and v.qos_explicit for v in victims):
        return None
    return victims
