"""``least-connections``: the least loaded candidate, load being the larger of the router's own in-flight count and
what the engine last reported (waiting + running)."""

from __future__ import annotations

from collections.abc import Sequence

from ..balancing import Candidate
from .base import PolicyArgs, RoutingRequest, register


@register("least-connections")
class LeastConnections:
    name, uses_prefix = "least-connections", False

    def __init__(self, args: PolicyArgs | None = None) -> None:
        pass

    def scores(self, candidates: Sequence[Candidate], request: RoutingRequest) -> dict[str, float]:
        return {c.url: -c.load for c in candidates}
