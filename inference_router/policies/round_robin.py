"""``round-robin``: every candidate scores the same, so they take turns."""

from __future__ import annotations

from collections.abc import Sequence

from ..balancing import Candidate
from .base import PolicyArgs, RoutingRequest, register


@register("round-robin")
class RoundRobinPolicy:
    name, uses_prefix = "round-robin", False

    def __init__(self, args: PolicyArgs | None = None) -> None:
        pass

    def scores(self, candidates: Sequence[Candidate], request: RoutingRequest) -> dict[str, float]:
        return {c.url: 0.0 for c in candidates}
