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
    pending_tokens: int = 0  # prompt tokens the router sent there that are not prefilled yet (no first byte)
    prefilling: int = 0  # requests among in_flight still waiting for their first byte
    occupancy: float = 0.0  # share of the engine's KV blocks its prefix cache holds (from its events)

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
           intelligent: IntelligentWeights | None = None, prefix: PrefixWeights | None = None,
           prompt_tokens: int = 0, block_size: int = 16) -> Decision:
    if not candidates:
        raise ValueError("no candidates")
    if strategy == "round-robin":
        return Decision(rr.pick([c.url for c in candidates]), strategy)
    if strategy == "least-connections":
        scores = {c.url: -c.load for c in candidates}
    elif strategy == "intelligent":
        scores = health_scores(candidates, intelligent or IntelligentWeights())
    else:
        scores = prefix_scores(candidates, prompt_tokens or total_blocks * block_size, block_size,
                               prefix or PrefixWeights())
    best = max(scores.values())
    tied = [url for url, score in scores.items() if score >= best - 1e-9]
    url = rr.pick(tied) if len(tied) > 1 else tied[0]
    matched = next((c.prefix_blocks for c in candidates if c.url == url), 0)
    return Decision(url, strategy, scores, matched)


def health_scores(candidates: Sequence[Candidate], w: IntelligentWeights) -> dict[str, float]:
    """The design doc's ``0.4*(1-queue) + 0.3*(1-cpu) + 0.3*(1-mem)``, each term in [0, 1]: queue = the candidate's
    queued requests relative to the most queued candidate (at least ``queue_scale``), cpu = running requests /
    ``running_scale`` (the engine's compute saturation), mem = KV-cache usage. Queued counts the router's own
    in-flight requests beyond what the engine last reported running, so a burst is seen before the next scrape."""
    queued = {c.url: max(c.waiting, c.in_flight - c.running, 0.0) for c in candidates}
    scale = max(w.queue_scale, max(queued.values()))
    out = {}
    for c in candidates:
        busy = max(c.running, min(float(c.in_flight), w.running_scale))
        out[c.url] = (w.queue_weight * (1 - queued[c.url] / scale)
                      + w.cpu_weight * (1 - min(1.0, busy / w.running_scale))
                      + w.memory_weight * (1 - min(1.0, max(0.0, c.kv_usage))))
    return out


def prefix_scores(candidates: Sequence[Candidate], prompt_tokens: int, block_size: int,
                  w: PrefixWeights) -> dict[str, float]:
    """Estimated cost of serving this request on each candidate, in prefill tokens (higher score = cheaper): the
    prefill work already queued there by the router (``pending_tokens``), plus this prompt's tokens the candidate does
    not cache, plus ``decode_cost_tokens`` per request decoding there (decodes share each step), plus
    ``kv_pressure_tokens`` x KV-cache usage (blocks held by running requests), plus what the new blocks evict:
    ``eviction_weight`` x the uncached tokens x the share of the engine's blocks its prefix cache holds. A full
    cache drops a cached block for every block it stores, and that block is recomputed later by whoever needs it;
    an engine with room drops nothing. So under KV pressure a context stays where it is cached unless the queue
    there costs more than computing it twice, and is not copied to a second engine for a small gain; with room to
    spare a hot prefix spreads as soon as its engine's queue costs more than recomputing it elsewhere. Scores are
    ``1 - cost / the largest cost`` in [0, 1]."""
    work = {}
    for c in candidates:
        cached = c.prefix_blocks * block_size if c.prefix_blocks >= max(1, w.min_prefix_blocks) else 0
        uncached = max(0, prompt_tokens - cached)
        decoding = max(0.0, max(float(c.in_flight), c.running + c.waiting) - c.prefilling)
        work[c.url] = (c.pending_tokens + uncached * (1.0 + w.eviction_weight * c.occupancy)
                       + w.decode_cost_tokens * decoding
                       + w.kv_pressure_tokens * min(1.0, max(0.0, c.kv_usage)))
    most = max(work.values()) or 1.0
    return {url: 1.0 - value / most for url, value in work.items()}


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
