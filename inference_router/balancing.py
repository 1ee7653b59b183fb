"""How the router picks a backend: the strategies as pure functions of the candidates' load and prefix matches,
and the circuit breaker that keeps failing backends out. No I/O here (see ``proxy``).

Load signals per backend: the router's own in-flight count (updated on every request, never stale) and what the
backend's vLLM metrics said at the last scrape (``vllm:num_requests_waiting``, ``…running``,
``…kv_cache_usage_perc``). A backend's load is the larger of the two views.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from .config import IntelligentWeights, PrefixWeights, Strategy


@dataclass(frozen=True)
class Candidate:
    url: str
    in_flight: int = 0
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    prefix_blocks: int = 0

    @property
    def load(self) -> float:
        return max(float(self.in_flight), self.waiting + self.running)


@dataclass(frozen=True)
class Decision:
    url: str
    strategy: str
    scores: dict[str, float] = field(default_factory=dict)
    prefix_blocks: int = 0


class RoundRobin:
    """A counter shared by the strategies that break ties in turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, options: Sequence[str]) -> str:
        return sorted(options)[next(self._counter) % len(options)]


def choose(strategy: Strategy, candidates: Sequence[Candidate], rr: RoundRobin, *, total_blocks: int = 0,
           intelligent: IntelligentWeights | None = None, prefix: PrefixWeights | None = None) -> Decision:
    if not candidates:
        raise ValueError("no candidates")
    if strategy == "round-robin":
        return Decision(rr.pick([c.url for c in candidates]), strategy)
    if strategy == "least-connections":
        scores = {c.url: -c.load for c in candidates}
    elif strategy == "intelligent":
        scores = health_scores(candidates, intelligent or IntelligentWeights())
    else:
        scores = prefix_scores(candidates, total_blocks, prefix or PrefixWeights())
    best = max(scores.values())
    tied = [url for url, score in scores.items() if score >= best - 1e-9]
    url = rr.pick(tied) if len(tied) > 1 else tied[0]
    matched = next((c.prefix_blocks for c in candidates if c.url == url), 0)
    return Decision(url, strategy, scores, matched)


def health_scores(candidates: Sequence[Candidate], w: IntelligentWeights) -> dict[str, float]:
    """The design doc's ``0.4*(1-queue) + 0.3*(1-cpu) + 0.3*(1-mem)``: queue = queued requests / queue_scale, cpu =
    running requests / running_scale (an engine's compute saturation), mem = KV-cache usage; each in [0, 1]."""
    out = {}
    for c in candidates:
        queued = max(c.waiting, c.in_flight - c.running)
        busy = max(c.running, min(float(c.in_flight), w.running_scale))
        out[c.url] = (w.queue_weight * (1 - min(1.0, queued / w.queue_scale))
                      + w.cpu_weight * (1 - min(1.0, busy / w.running_scale))
                      + w.memory_weight * (1 - min(1.0, max(0.0, c.kv_usage))))
    return out


def prefix_scores(candidates: Sequence[Candidate], total_blocks: int, w: PrefixWeights) -> dict[str, float]:
    """Weighted sum (llm-d style scorers in [0, 1]): the share of the prompt's blocks cached on the backend, 1 - its
    load relative to the busiest candidate, 1 - its KV-cache usage. A backend loaded beyond ``max_load_ratio`` x the
    least loaded (+ 2) gets no prefix credit, so a hot prefix spreads instead of piling onto one engine."""
    loads = [c.load for c in candidates]
    least, most = min(loads), max(loads)
    out = {}
    for c in candidates:
        match = 0.0
        if total_blocks and c.prefix_blocks >= max(1, w.min_prefix_blocks) and \
                c.load <= w.max_load_ratio * least + 2:
            match = c.prefix_blocks / total_blocks
        relative = c.load / most if most > 0 else 0.0
        out[c.url] = (w.prefix_weight * match + w.load_weight * (1 - relative)
                      + w.kv_weight * (1 - min(1.0, max(0.0, c.kv_usage))))
    return out


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

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state == "half-open" or self.failures >= self.failure_threshold:
            self.state, self.opened_at, self.probing = "open", now, False
