"""Business type (``business.workload/type``; inferred from requests when absent): place a pod where its
dominant resource is most free — accelerators (then CPU) for compute-intensive, memory for memory-sensitive, CPU
for IO-intensive — using measured usage where the QoS agent publishes it, requests otherwise; and avoid stacking
many pods of the same type on one node (they contend for the same resource)."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fuyao.contracts import BusinessType

from ..features import BUSINESS_COLUMN, NodeView
from ..framework import Cycle
from ..model import USAGE_STALE_S, PodInfo
from .registry import PluginArgs, register


class BusinessTypeArgs(PluginArgs):
    weight: float = Field(default=1.0, ge=0)
    stacking_penalty: float = Field(default=0.1, ge=0)


@register("business-type", BusinessTypeArgs)
class BusinessTypePlugin:
    """Scores only."""

    name = "business-type"

    def __init__(self, args: BusinessTypeArgs | None = None):
        self.args = args or BusinessTypeArgs()
        self.stacking_penalty = self.args.stacking_penalty

    def row_local(self, pod: PodInfo) -> bool:
        return True

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | float:
        if pod.business is None:
            return 0.5  # an invalid explicit value: neutral (the pod got an event naming it)
        free = free_share(pod.business, view, cycle.now)
        same = view.business[:, BUSINESS_COLUMN[pod.business]].astype(np.float64)
        if pod.node_name and not pod.terminal:  # the pod itself is counted on its node
            at, _ = view.positions([pod.node_name])
            same[at] -= 1
        return free / (1.0 + self.stacking_penalty * np.maximum(same, 0))


def fresh_usage(view: NodeView, now: float) -> np.ndarray:
    """Which candidates publish a measured usage recent enough to trust."""
    return view.usage_at >= now - USAGE_STALE_S


def free_share(business: BusinessType, view: NodeView, now: float) -> np.ndarray:
    fresh = fresh_usage(view, now)
    cpu_used = np.where(fresh, view.cpu_ratio, ratio(view.cpu_req, view.cpu_alloc))
    if business == BusinessType.MEMORY_SENSITIVE:
        return 1 - np.where(fresh, view.mem_ratio, ratio(view.mem_req, view.mem_alloc))
    if business == BusinessType.COMPUTE_INTENSIVE:
        alloc, free = view.alloc, view.free
        has = alloc > 0
        shares = np.where(has, 1 - ratio(alloc - free, alloc), 0.0).sum(axis=1)
        kinds = has.sum(axis=1)
        return np.where(kinds > 0, shares / np.maximum(kinds, 1), 1 - cpu_used)
    return 1 - cpu_used


def ratio(used: np.ndarray, total: np.ndarray) -> np.ndarray:
    """used / total in [0, 1]; 1 where there is no total."""
    return np.where(total > 0, np.clip(used / np.maximum(total, 1), 0.0, 1.0), 1.0)
