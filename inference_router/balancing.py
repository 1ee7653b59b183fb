"""What the router's choice is made of: a backend as the policies see it (:class:`Candidate`), the decision, the
round-robin tie-break, and the circuit breaker that keeps failing backends out. No I/O here (see ``proxy``); the
policies themselves are in ``policies``.

Load signals per backend: the router's own in-flight count (updated on every request, never stale) and what the
backend's vLLM metrics said at the last scrape (``vllm:num_requests_waiting``, ``…running``,
``…kv_cache_usage_perc``). A backend's load is the larger of the two views.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Candidate:
    url: str
    in_flight: int = 0
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    prefix_blocks: int = 0
    pending_tokens: int = 0  # prompt tokens the router sent there that are not prefilled yet (no first byte)
    prefilling: int = 0  # requests among in_flight still waiting for their first byte
    occupancy: float = 0.0  # share of the engine's KV blocks its prefix cache holds (from its events)
    tier_load_cost: float | None = None  # measured cost of a token loaded from the shared tier (tier_cost), or None

    @property
    def load(self) -> float:
        return max(float(self.in_flight), self.waiting + self.running)


@dataclass(frozen=True)
class Decision:
    url: str
    strategy: str
    scores: dict[str, float] = field(default_factory=dict)
    prefix_blocks: int = 0
    tier_blocks: int = 0  # the prompt's leading blocks in the shared KV tier


class RoundRobin:
    """A counter shared by the strategies that break ties in turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, options: Sequence[str]) -> str:
        return sorted(options)[next(self._counter) % len(options)]


class CircuitBreaker:
    """Closed → (``failure_threshold`` consecutive failures) → open → (after ``timeout``) half-open: one probe
    request; its success closes the circuit, its failure opens it again."""

    def __init__(self, failure_threshold: int, timeout_s: float):
        self.failure_threshold = failure_threshold
        self.timeout_s = timeout_s
        self.state: Literal["closed", "open", "half-open"] = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False

    def allows(self, now: float) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open" and now - self.opened_at >= self.timeout_s:
            self.state = "half-open"
            self.probing = False
        return self.state == "half-open" and not self.probing

    def dispatched(self) -> None:
        if self.state == "half-open":
            self.probing = True

    def success(self) -> None:
        self.state, self.failures, self.probing = "closed", 0, False

    def release(self) -> None:
        """A request ended with no verdict on the backend (its client went away): a half-open probe slot is free
        again, and nothing else changes."""
        self.probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == "half-open" or self.failures >= self.failure_threshold:
            self.state, self.opened_at, self.probing = "open", now, False
