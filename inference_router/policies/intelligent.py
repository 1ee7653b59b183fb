"""``intelligent``: the design doc's health score ``0.4*(1-queue) + 0.3*(1-cpu) + 0.3*(1-mem)``."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from ..balancing import Candidate
from .base import PolicyArgs, RoutingRequest, register


class IntelligentArgs(PolicyArgs):
    """The design doc's health score 0.4*(1-queue) + 0.3*(1-cpu) + 0.3*(1-mem): queue = waiting requests / queue_scale
    (capped at 1), cpu = running / max_num_seqs-like saturation, mem = KV-cache usage."""

    queue_weight: float = Field(default=0.4, ge=0)
    cpu_weight: float = Field(default=0.3, ge=0)
    memory_weight: float = Field(default=0.3, ge=0)
    queue_scale: float = Field(default=2.0, gt=0, description="the queue term is queued / max(this, the most queued)")
    running_scale: float = Field(default=64.0, gt=0)


def health_scores(candidates: Sequence[Candidate], w: IntelligentArgs) -> dict[str, float]:
    """Each term in [0, 1]: queue = the candidate's queued requests relative to the most queued candidate (at least
    ``queue_scale``), cpu = running requests / ``running_scale`` (the engine's compute saturation), mem = KV-cache
    usage. Queued counts the router's own in-flight requests beyond what the engine last reported running, so a
    burst is seen before the next scrape."""
    queued = {c.url: max(c.waiting, c.in_flight - c.running, 0.0) for c in candidates}
    scale = max(w.queue_scale, max(queued.values()))
    out = {}
    for c in candidates:
        busy = max(c.running, min(float(c.in_flight), w.running_scale))
        out[c.url] = (w.queue_weight * (1 - queued[c.url] / scale)
                      + w.cpu_weight * (1 - min(1.0, busy / w.running_scale))
                      + w.memory_weight * (1 - min(1.0, max(0.0, c.kv_usage))))
    return out


@register("intelligent", IntelligentArgs)
class Intelligent:
    name, uses_prefix = "intelligent", False

    def __init__(self, args: IntelligentArgs | None = None) -> None:
        self.args = args or IntelligentArgs()

    def scores(self, candidates: Sequence[Candidate], request: RoutingRequest) -> dict[str, float]:
        return health_scores(candidates, self.args)
