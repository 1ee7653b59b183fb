"""vLLM's metrics, same names and meanings (v1 engine), labelled ``model_name`` and ``engine``: what routers and
dashboards read from real vLLM pods. Counters are exposed with ``_total``, as prometheus_client (and vLLM) do."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from fuyao.kvcache.blockstore import COUNTERS, METRIC_PREFIX, StoreStats

# vLLM 0.32's bucket families (vllm/v1/metrics/buckets.py), so a query on an `le` means what it means on vLLM
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
         160.0, 640.0, 2560.0)
_REQUEST_LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                    480.0, 960.0, 1920.0, 7680.0)
_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
"""vLLM's FinishReason strings: every ``vllm:request_success`` series exists from the start, at 0."""


def request_tokens_buckets(max_model_len: int) -> list[int]:
    """vLLM's ``request_tokens`` family: 1, 2, 5, 10, 20, 50... up to the model's context length."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return out
            out.append(m * scale)
        scale *= 10
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class EngineMetrics:
    def __init__(self, model: str, block_size: int, num_gpu_blocks: int, engine: str = "0",
                 max_model_len: int = 32768):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ("model_name", "engine")
        self._labels = (model, engine)
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                             labels, registry=r).labels(*self._labels)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels,
                             registry=r).labels(*self._labels)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels,
                              registry=r).labels(*self._labels)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                                      "queried tokens.", labels, registry=r).labels(*self._labels)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
                                   "tokens.", labels, registry=r).labels(*self._labels)
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                   labels, registry=r).labels(*self._labels)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
                                     registry=r).labels(*self._labels)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", labels,
                                         registry=r).labels(*self._labels)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               (*labels, "finished_reason"), registry=r)
        for reason in _FINISH_REASONS:
            self.success.labels(*self._labels, reason)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=_TTFT, registry=r).labels(*self._labels)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels, buckets=_ITL, registry=r).labels(*self._labels)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             labels, buckets=_REQUEST_LATENCY, registry=r).labels(*self._labels)
        self.prefill_time = Histogram("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase "
                                      "for request.", labels, buckets=_REQUEST_LATENCY,
                                      registry=r).labels(*self._labels)
        self.prefill_computed = Histogram("vllm:request_prefill_kv_computed_tokens", "Histogram of new KV tokens "
                                          "computed during prefill (excluding cached tokens).", labels,
                                          buckets=request_tokens_buckets(max_model_len),
                                          registry=r).labels(*self._labels)
        self.external_queries = Counter("vllm:external_prefix_cache_queries", "External prefix cache queries from "
                                        "KV connector cross-instance cache sharing, in terms of number of queried "
                                        "tokens.", labels, registry=r).labels(*self._labels)
        self.external_hits = Counter("vllm:external_prefix_cache_hits", "External prefix cache hits from KV "
                                     "connector cross-instance cache sharing, in terms of number of cached tokens.",
                                     labels, registry=r).labels(*self._labels)
        self._tier = {name: Counter(METRIC_PREFIX + name, text, labels, registry=r).labels(*self._labels)
                      for name, text in COUNTERS.items()}
        self._tier_reported: dict[str, float] = {}
        self.tier_stats: StoreStats | None = None
        """The shared volume's counters (``--kv-volume``), brought into ``fuyao_kv_tier_*`` at every scrape."""
        self.kv_transferred_tokens = Counter("fuyao_engine_kv_transfer_tokens", "Prompt tokens whose KV was pulled "
                                             "from a prefill engine or the shared tier instead of computed", labels,
                                             registry=r).labels(*self._labels)
        self.request_errors = Counter("fuyao_engine_request_errors", "Requests the engine failed (an error inside "
                                      "its loop while working on them); the loop went on", labels,
                                      registry=r).labels(*self._labels)
        info = Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                     ("block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"), registry=r)
        info.labels(str(block_size), str(num_gpu_blocks), "True", engine).set(1)
        self._last_queries = self._last_hits = 0

    def external(self, queried: int, hits: int) -> None:
        """A prompt of ``queried`` tokens asked of the shared tier; ``hits`` tokens loaded (vLLM counts the same)."""
        self.external_queries.inc(queried)
        self.external_hits.inc(hits)

    def _sync_tier(self, stats: StoreStats) -> None:
        """Bring the ``fuyao_kv_tier_*`` counters (the connector's names) up to the volume's counts."""
        for name, value in stats.as_dict().items():
            delta = value - self._tier_reported.get(name, 0.0)
            if delta > 0 and name in self._tier:
                self._tier[name].inc(delta)
                self._tier_reported[name] = value

    def state(self, running: int, waiting: int, pool: Any) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(pool.usage)
        if pool.queries > self._last_queries:
            self.prefix_queries.inc(pool.queries - self._last_queries)
            self._last_queries = pool.queries
        if pool.hits > self._last_hits:
            self.prefix_hits.inc(pool.hits - self._last_hits)
            self._last_hits = pool.hits

    def token(self, request: Any, now: float) -> None:
        if request.first_token_at is None:
            self.ttft.observe(now - request.arrival)
            self.prompt_tokens.inc(len(request.prompt))
            self.prefill_time.observe(now - (request.scheduled_at or request.arrival))
            self.prefill_computed.observe(max(0, len(request.prompt) - request.cached_tokens - request.loaded_tokens))
        elif request.last_token_at is not None:
            self.itl.observe(now - request.last_token_at)
        self.generation_tokens.inc()

    def finished(self, request: Any) -> None:
        self.success.labels(*self._labels, request.finish_reason or "length").inc()
        self.e2e.observe(time.monotonic() - request.arrival)

    def render(self) -> bytes:
        if self.tier_stats is not None:
            self._sync_tier(self.tier_stats)
        return generate_latest(self.registry)
