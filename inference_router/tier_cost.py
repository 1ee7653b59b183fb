"""What loading a token's KV from the shared tier costs on an engine, as a share of computing it there: prefix-aware's
``tierLoadCost``, measured instead of guessed.

From counters every engine with fuyao's KV connector (or the simulator's ``--kv-volume``) exposes, read at each
metrics scrape and compared with the previous scrape:

- load seconds per token: ``fuyao_kv_tier_load_seconds_total`` over ``fuyao_kv_tier_blocks_loaded_total`` x the
  engine's block size (``vllm:cache_config_info``);
- prefill seconds per computed token: vLLM's ``vllm:request_prefill_time_seconds_sum`` (which includes the
  synchronous load) less the load seconds, over ``vllm:request_prefill_kv_computed_tokens_sum`` (the tokens
  prefilled, cached ones excluded).

The ratio of the two, bounded to ``[0, MAX_COST]``, is smoothed over scrapes (an exponentially weighted mean). A
scrape interval with no load or no computed prefill leaves the estimate as it was; until the first one the
configured ``tierLoadCost`` is used. Pure functions: the fleet keeps the readings.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

MAX_COST = 4.0
"""A load can cost more than computing (a tiny model, a slow volume); beyond this the estimate is held here."""
SMOOTHING = 0.3
"""Weight of the newest interval in the running estimate."""
MIN_COMPUTED_TOKENS = 16
"""Computed prefill tokens an interval needs before its per-token time counts (one short prompt is all overhead)."""


@dataclass(frozen=True)
class TierReading:
    """Cumulative counters of one engine at one scrape."""

    load_seconds: float = 0.0
    blocks_loaded: float = 0.0
    prefill_seconds: float = 0.0
    computed_tokens: float = 0.0


def interval_cost(before: TierReading, after: TierReading, block_size: int) -> float | None:
    """Load cost as a share of prefill cost over one interval, or None when the interval cannot tell (nothing
    loaded, too little computed, a counter reset)."""
    loaded = after.blocks_loaded - before.blocks_loaded
    load_s = after.load_seconds - before.load_seconds
    computed = after.computed_tokens - before.computed_tokens
    prefill_s = after.prefill_seconds - before.prefill_seconds - load_s
    if loaded <= 0 or load_s < 0 or computed < MIN_COMPUTED_TOKENS or prefill_s <= 0 or block_size <= 0:
        return None
    per_loaded = load_s / (loaded * block_size)
    per_computed = prefill_s / computed
    return min(MAX_COST, per_loaded / per_computed)


def updated(estimate: float | None, baseline: TierReading | None, after: TierReading,
            block_size: int) -> tuple[float | None, TierReading]:
    """The running estimate and the next baseline after one more scrape. An interval that cannot tell yet keeps its
    baseline, so a load and the prefill it belongs to count together even when a scrape falls between them;
    counters that went back (the engine restarted) start a new baseline."""
    if baseline is None or any(a < b for a, b in zip(astuple(after), astuple(baseline), strict=True)):
        return estimate, after
    cost = interval_cost(baseline, after, block_size)
    if cost is None:
        return estimate, baseline
    return (cost if estimate is None else (1 - SMOOTHING) * estimate + SMOOTHING * cost), after
