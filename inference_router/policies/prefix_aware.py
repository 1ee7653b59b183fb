"""``prefix-aware``: the backend where this request's first token comes soonest, counting the prefill work queued
there, the part of the prompt it does not cache, the decodes it runs, its KV pressure and what the new blocks evict."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from ..balancing import Candidate
from .base import PolicyArgs, RoutingRequest, register


class PrefixAwareArgs(PolicyArgs):
    """The prefix-aware cost model: estimated prefill tokens before this request's first token on each engine."""

    decode_cost_tokens: float = Field(default=24.0, ge=0, description="prefill-token equivalent of one request "
                                      "decoding on the engine (it shares every step)")
    kv_pressure_tokens: float = Field(default=256.0, ge=0, description="penalty at 100% KV-cache usage (blocks held "
                                      "by running requests)")
    eviction_weight: float = Field(default=1.0, ge=0, description=(
        "cost of the cached blocks a request's new blocks evict, per uncached token, at a full prefix cache (share "
        "of its blocks from the engine's events and vllm:cache_config_info): 0 ignores it, 1 counts each evicted "
        "block as recomputed once later"))
    min_prefix_blocks: int = Field(default=1, ge=0, description="shorter matches count as none")
    tier_load_cost: float = Field(default=0.2, ge=0, le=4, description=(
        "cost of loading a token's KV from the shared tier (fuyao's KV connector), as a share of computing it: used "
        "for an engine until its own is measured (learnTierLoadCost), or always when learning is off"))
    learn_tier_load_cost: bool = Field(default=True, description=(
        "measure each engine's tier load cost from its metrics (fuyao_kv_tier_load_seconds_total per token loaded "
        "against vllm:request_prefill_time_seconds per computed token; docs/router.md)"))

    def load_cost(self, measured: float | None) -> float:
        """The tier load cost to use for an engine whose measured one is ``measured`` (None: not measured yet)."""
        return measured if self.learn_tier_load_cost and measured is not None else self.tier_load_cost


def prefill_tokens(prompt_tokens: int, cached_tokens: int, tier_tokens: int, load_cost: float) -> float:
    """A request's prefill work on one engine, in prefill tokens: the prompt tokens it computes (neither cached there
    nor in the shared tier) plus ``load_cost`` x those it loads from the tier. What prefix-aware weighs, and what the
    router counts as queued on the engine until its first byte."""
    loaded = max(0, min(prompt_tokens, tier_tokens) - cached_tokens)
    return max(0, prompt_tokens - cached_tokens - loaded) + load_cost * loaded


def prefix_scores(candidates: Sequence[Candidate], prompt_tokens: int, block_size: int,
                  w: PrefixAwareArgs, tier_blocks: int = 0) -> dict[str, float]:
    """Estimated cost of serving this request on each candidate, in prefill tokens (higher score = cheaper): the
    prefill work already queued there by the router (``pending_tokens``), plus this prompt's tokens the candidate does
    not cache, plus ``decode_cost_tokens`` per request decoding there (decodes share each step), plus
    ``kv_pressure_tokens`` x KV-cache usage (blocks held by running requests), plus what the new blocks evict:
    ``eviction_weight`` x the uncached tokens x the share of the engine's blocks its prefix cache holds. A full
    cache drops a cached block for every block it stores, and that block is recomputed later by whoever needs it;
    an engine with room drops nothing. So under KV pressure a context stays where it is cached unless the queue
    there costs more than computing it twice, and is not copied to a second engine for a small gain; with room to
    spare a hot prefix spreads as soon as its engine's queue costs more than recomputing it elsewhere.

    Three cases for each part of the prompt: on the engine itself (free), in the shared tier beyond what the engine
    holds (``tier_blocks``: loaded at the engine's measured tier load cost, else ``tier_load_cost``, of computing
    it), or nowhere (a full prefill). With a tier, a context need not stay pinned to the engine that computed it:
    another engine loads it cheaply, and the blocks its new ones evict are in the tier too (every computed block is
    stored), so they cost a load later, not a prefill: the eviction term is weighed by the load cost. Load spreads.
    Scores are ``1 - cost / the largest cost`` in [0, 1]."""
    work = {}
    tier_tokens = tier_blocks * block_size
    for c in candidates:
        cached = c.prefix_blocks * block_size if c.prefix_blocks >= max(1, w.min_prefix_blocks) else 0
        new_tokens = max(0, prompt_tokens - cached)  # computed or loaded: each takes a block, which may evict one
        decoding = max(0.0, max(float(c.in_flight), c.running + c.waiting) - c.prefilling)
        load_cost = w.load_cost(c.tier_load_cost)
        evicted_cost = load_cost if tier_tokens else 1.0  # with a tier, what is evicted is loaded back, not recomputed
        work[c.url] = (c.pending_tokens + prefill_tokens(prompt_tokens, cached, tier_tokens, load_cost)
                       + new_tokens * w.eviction_weight * c.occupancy * evicted_cost
                       + w.decode_cost_tokens * decoding
                       + w.kv_pressure_tokens * min(1.0, max(0.0, c.kv_usage)))
    most = max(work.values()) or 1.0
    return {url: 1.0 - value / most for url, value in work.items()}


@register("prefix-aware", PrefixAwareArgs)
class PrefixAware:
    name, uses_prefix = "prefix-aware", True

    def __init__(self, args: PrefixAwareArgs | None = None) -> None:
        self.args = args or PrefixAwareArgs()

    def scores(self, candidates: Sequence[Candidate], request: RoutingRequest) -> dict[str, float]:
        tokens = request.prompt_tokens or request.prompt_blocks * request.block_size
        return prefix_scores(candidates, tokens, request.block_size, self.args, request.tier_blocks)
