"""QoS colocation of latency-sensitive (LS) and best-effort (BE) pods.

- LS pods avoid nodes whose measured usage or BE pressure is high: rejected above ``ls_max_usage``, scored down
  from ``ls_usage_watermark``.
- BE pods only go to colocation-enabled nodes (``volcano.sh/colocation=true``) with enough
  ``kubernetes.io/batch-cpu`` / ``batch-memory`` left; they prefer nodes with the most batch capacity free.
- Preemption: an LS pod may only evict BE pods (see :func:`be_victims`); BE pods evict nobody.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, model_validator

from fuyao.contracts import LABEL_VOLCANO_COLOCATION, RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY, QoSClass

from ..features import NO_USAGE, NodeView
from ..framework import Cycle, Reject, Verdicts
from ..model import USAGE_STALE_S, PodInfo
from .business import fresh_usage
from .registry import PluginArgs, register


class QosColocationArgs(PluginArgs):
    weight: float = Field(default=2.0, ge=0)
    ls_usage_watermark: float = Field(default=0.7, gt=0, le=1)
    ls_max_usage: float = Field(default=0.95, gt=0, le=1)
    be_pressure_watermark: float = Field(default=0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _watermark_below_max(self) -> QosColocationArgs:
        if self.ls_usage_watermark > self.ls_max_usage:
            raise ValueError(f"lsUsageWatermark ({self.ls_usage_watermark}) is above lsMaxUsage "
                             f"({self.ls_max_usage}): LS scores go down from the watermark to 0 at the maximum")
        return self


class ColocationReject(Reject):
    NOT_COLOCATION = 1, "not-colocation-node", True
    NO_BATCH = 2, "insufficient-batch"
    TOO_BUSY = 3, "node-too-busy"
    AGENT_SILENT = 4, "qos-agent-stale"  # its batch resources may no longer be enforced (the agent stopped)


R = ColocationReject


@register("qos-colocation", QosColocationArgs)
class ColocationPlugin:
    name = "qos-colocation"
    kinds = ColocationReject

    def __init__(self, args: QosColocationArgs | None = None):
        self.args = args or QosColocationArgs()
        self.ls_usage_watermark = self.args.ls_usage_watermark
        self.ls_max_usage = self.args.ls_max_usage
        self.be_pressure_watermark = self.args.be_pressure_watermark

    def row_local(self, pod: PodInfo) -> bool:
        return True

    def filter(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> Verdicts | None:
        out = np.zeros(len(view), dtype=np.int16)
        if pod.qos == QoSClass.BE:
            want = (pod.request(RESOURCE_BATCH_CPU), pod.request(RESOURCE_BATCH_MEMORY))
            short = (view.batch_free[:, 0] < want[0]) | (view.batch_free[:, 1] < want[1])
            out[short] = R.NO_BATCH
            # the QoS agent reported usage once and has stopped: the batch resources it published stay on the Node,
            # but nothing limits BE pods there any more (Koordinator resets them when its reports go stale)
            out[(view.usage_at > NO_USAGE) & ~fresh_usage(view, cycle.now)] = R.AGENT_SILENT
            out[~view.colocation] = R.NOT_COLOCATION
            return Verdicts(out)
        load = np.maximum(view.cpu_ratio, view.mem_ratio)
        out[fresh_usage(view, cycle.now) & (load > self.ls_max_usage)] = R.TOO_BUSY
        return Verdicts(out)

    def reasons(self, kind: Reject, pod: PodInfo, view: NodeView, at: np.ndarray, detail: np.ndarray,
                cycle: Cycle) -> list[str]:
        if kind == R.NOT_COLOCATION:
            return [f"BE pods need a colocation node (label {LABEL_VOLCANO_COLOCATION}=true)"] * len(at)
        if kind == R.AGENT_SILENT:
            return [f"the node's QoS agent last reported {max(0.0, cycle.now - at):.0f} s ago (more than "
                    f"{USAGE_STALE_S:.0f} s): its batch resources are not enforced while it is down"
                    for at in view.usage_at[at].tolist()]
        if kind == R.NO_BATCH:
            want_cpu, want_mem = pod.request(RESOURCE_BATCH_CPU), pod.request(RESOURCE_BATCH_MEMORY)
            return [f"insufficient batch resources: cpu {cpu}m free / {want_cpu}m asked, memory {mem} free / "
                    f"{want_mem} asked" for cpu, mem in view.batch_free[at].tolist()]
        # no '%' in reasons: kube-scheduler puts them into its event message as a format string ("%!/(MISSING)")
        return [f"node usage (share of capacity) cpu {cpu:.2f} / memory {mem:.2f} is above {self.ls_max_usage:.2f} "
                "for LS pods"
                for cpu, mem in zip(view.cpu_ratio[at].tolist(), view.mem_ratio[at].tolist(), strict=True)]

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | float:
        if pod.qos == QoSClass.BE:
            total, free = view.batch_alloc, view.batch_free
            shares = np.where(total > 0, free / np.maximum(total, 1), np.inf).min(axis=1)
            return np.where(np.isinf(shares), 0.0, shares)
        load = np.maximum(view.cpu_ratio, view.mem_ratio)
        span = max(1e-9, self.ls_max_usage - self.ls_usage_watermark)
        value = np.where(load <= self.ls_usage_watermark, 1.0, np.maximum(0.0, (self.ls_max_usage - load) / span))
        value = np.where(view.be_pressure > self.be_pressure_watermark, value * 0.5, value)
        return np.where(fresh_usage(view, cycle.now), value, 0.5)


def be_victims(preemptor: PodInfo, victims: list[PodInfo]) -> list[PodInfo] | None:
    """The victims a preemptor may evict on one node, or None (the node is not a preemption candidate). A BE pod
    evicts nobody; an LS pod never evicts a pod marked LS — BE pods and pods without a QoS key (ordinary
    priority preemption) may go."""
    if preemptor.qos == QoSClass.BE:
        return None
    if any(v.qos == QoSClass.LS and v.qos_explicit for v in victims):
        return None
    return victims
