"""``fuyao-kvcache`` as a service: the index (fed by the subscriber) and the shared tier behind HTTP, with metrics.

- ``POST /v1/lookup`` ``{model?, prompt? | messages? | token_ids? | hashes?}`` → ``{block_size, blocks,
  endpoints: {name: cached leading blocks}, tier_blocks}`` — what a router asks before choosing an engine;
- ``POST /v1/blocks/lookup`` ``{hashes}`` → ``{found}`` — leading blocks the shared tier holds (an engine's fetch);
- ``POST /v1/blocks`` ``{hashes}`` → ``{stored}`` — an engine publishes the blocks it computed;
- ``GET /v1/endpoints`` — per engine: model, entries, sequence, gaps, replays, drops, restarts, disconnects,
  whether connected, lag;
- ``/healthz``, ``/readyz``, ``/metrics``.

Request bodies are read with :mod:`fuyao.http_body`: over ``MAX_BODY_BYTES`` → 413, nested too deep or not JSON →
400; any field of the wrong type or out of range → 400 naming it (a client's mistake is never a 5xx).

Metrics keep the design doc's names, so its ``rate(kv_cache_hits[5m]) / rate(kv_cache_requests[5m])`` works:
``kv_cache_hits`` and ``kv_cache_requests`` (cumulative blocks, label ``layer`` = index | tier) are exposed as
untyped samples without the ``_total`` suffix a Prometheus counter would add.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from fuyao import tokenization, tokenizer
from fuyao.http_body import BodyError, read_json

from .config import KvCacheSection
from .index import KvIndex
from .keys import block_keys
from .subscriber import SourceStats, Subscriber
from .tier import SharedTier
from .volume import VolumeTier

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
"""A lookup by token ids of a 128k-token prompt is about 1.4 MB of JSON, its block hashes (8k blocks) about 170 kB:
8 MiB leaves room for long chats while bounding what one request can make the service hold."""
MAX_HASH = 2**64  # block hashes are unsigned 64-bit integers


class KvCacheService:
    def __init__(self, settings: KvCacheSection):
        self.settings = settings
        self.tokenizer = tokenization.load(settings.tokenizer)
        self.index = KvIndex(settings.block_size, settings.hash_seed,
                             block_keys(settings.block_size, settings.hash_seed, settings.block_hashing))
        self.tier = SharedTier(settings.size, settings.bytes_per_token * settings.block_size,
                               settings.eviction_policy, settings.ttl) if settings.size > 0 else None
        self.volume = (VolumeTier(settings.volume.path, settings.size, settings.eviction_policy, settings.ttl,
                                  block_size=settings.block_size if settings.block_hashing.mode == "content" else 0,
                                  seed=settings.hash_seed)
                       if settings.volume.path else None)
        self.metrics = KvCacheMetrics(self)
        self.subscriber = Subscriber(self.index, on_batch=self.metrics.batch)

    def warm(self) -> int:
        """Prefill the tier with the configured queries' blocks (once, at start)."""
        if self.tier is None or not self.settings.warming.enabled:
            return 0
        stored = 0
        for query in self.settings.warming.queries:
            stored += self.tier.put(self.index.hashes(self.tokenizer.encode(query, add_special_tokens=True)))
        log.info("warmed the shared tier with %d blocks from %d queries", stored, len(self.settings.warming.queries))
        return stored

    # Requests ----------------------------------------------------------------------------------------------------
    def _token_ids(self, body: dict[str, Any]) -> list[int]:
        if isinstance(body.get("token_ids"), list):
            ids = body["token_ids"]
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in ids):
                raise web.HTTPBadRequest(text="token_ids: expected an array of integers in 0..2^32-1")
            return list(ids)
        if isinstance(body.get("prompt"), str):
            return self.tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True)
                                         is not False)
        if isinstance(body.get("messages"), list):
            try:
                return tokenization.chat_ids(self.tokenizer, body["messages"])
            except tokenizer.ChatFormatError as exc:
                raise web.HTTPBadRequest(text=str(exc)) from None
        raise web.HTTPBadRequest(text="expected token_ids, prompt (a string) or messages")

    def lookup(self, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise web.HTTPBadRequest(text="model: expected a string")
        if body.get("hashes") not in (None, []):
            hashes = self._hashes(body)  # a router that hashed the prompt itself
        else:
            hashes = self.index.hashes(self._token_ids(body))
        found = self.index.lookup(hashes=hashes, model=model or "")
        best = max(found.values(), default=0)
        self.metrics.requests.labels("index").inc(len(hashes))
        self.metrics.hits.labels("index").inc(best)
        tier_blocks = self.tier.peek(hashes) if self.tier is not None else 0
        answer = {"block_size": self.index.block_size, "blocks": len(hashes), "endpoints": found,
                  "tier_blocks": tier_blocks,
                  "cached_blocks": {url: len(state.hashes) for url, state in list(self.index.endpoints.items())}}
        if self.volume is not None:
            answer["volume_blocks"] = self.volume.leading(hashes, model or "")
        return answer

    @staticmethod
    def _hashes(body: dict[str, Any]) -> list[int]:
        hashes = body.get("hashes")
        if not isinstance(hashes, list) or not all(isinstance(h, int) and not isinstance(h, bool) and
                                                   0 <= h < MAX_HASH for h in hashes):
            raise web.HTTPBadRequest(text="hashes: expected an array of integers in 0..2^64-1")
        return hashes

    def fetch(self, body: dict[str, Any]) -> dict[str, Any]:
        hashes = self._hashes(body)
        if self.tier is None:
            return {"found": 0}
        found = self.tier.fetch(hashes)
        self.metrics.requests.labels("tier").inc(len(hashes))
        self.metrics.hits.labels("tier").inc(found)
        return {"found": found}

    def store(self, body: dict[str, Any]) -> dict[str, Any]:
        hashes = self._hashes(body)
        return {"stored": self.tier.put(hashes) if self.tier is not None else 0}

    def endpoints(self) -> dict[str, Any]:
        out = {}
        for name, state in list(self.index.endpoints.items()):  # the subscriber thread may add one meanwhile
            stats = self.subscriber.stats.get(name)
            out[name] = {"model": state.model, "entries": len(state.hashes), "skipped_blocks": state.skipped,
                         **({"last_seq": stats.last_seq, "batches": stats.batches, "gaps": stats.gaps,
                             "replays": stats.replays, "drops": stats.drops, "decode_errors": stats.decode_errors,
                             "restarts": stats.restarts, "disconnects": stats.disconnects,
                             "connected": stats.connected, "lag_s": round(stats.lag_s, 4),
                             **({"error": stats.error} if stats.error else {})} if stats else {})}
        return out

    # HTTP --------------------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)

        def post(call: Callable[[dict[str, Any]], Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
            async def handler(request: web.Request) -> web.Response:
                started = time.perf_counter()
                try:
                    _, body = await read_json(request, MAX_BODY_BYTES)
                except BodyError as exc:
                    return web.json_response({"error": exc.message}, status=exc.status)
                if not isinstance(body, dict):
                    return web.json_response({"error": "the body must be a JSON object"}, status=400)
                try:
                    result = call(body)
                except web.HTTPBadRequest as exc:
                    return web.json_response({"error": exc.text}, status=400)
                self.metrics.latency.labels(request.path).observe(time.perf_counter() - started)
                return web.Response(body=orjson.dumps(result), content_type="application/json")
            return handler

        async def endpoints(_request: web.Request) -> web.Response:
            return web.Response(body=orjson.dumps(self.endpoints()), content_type="application/json")

        async def healthz(_request: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def metrics(_request: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

        app.router.add_post("/v1/lookup", post(self.lookup))
        app.router.add_post("/v1/blocks/lookup", post(self.fetch))
        app.router.add_post("/v1/blocks", post(self.store))
        app.router.add_get("/v1/endpoints", endpoints)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", healthz)
        app.router.add_get("/metrics", metrics)
        if self.volume is not None:
            app.cleanup_ctx.append(_for_the_apps_lifetime(self._sweeping))
        if self.settings.warming.enabled and self.settings.warming.engine and self.settings.warming.queries:
            app.cleanup_ctx.append(_for_the_apps_lifetime(self._warming))
        return app

    async def warm_engine(self, session: aiohttp.ClientSession) -> int:
        """Send each warming query to the engine as a 1-token completion (its KV connector stores the blocks on the
        volume); the number it answered. Failures are logged, never raised."""
        warming = self.settings.warming
        answered = 0
        for query in warming.queries:
            body = {"prompt": query, "max_tokens": 1, **({"model": warming.model} if warming.model else {})}
            try:
                async with session.post(f"{warming.engine}/v1/completions", json=body,
                                        timeout=aiohttp.ClientTimeout(total=120)) as response:
                    if response.status == 200:
                        answered += 1
                    else:
                        log.warning("warming query refused by %s: HTTP %s %s", warming.engine, response.status,
                                    (await response.text())[:200])
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("warming query not sent to %s: %s", warming.engine, exc or type(exc).__name__)
        self.metrics.warmed.inc(answered)
        return answered

    async def _warming(self) -> None:
        """The warming queries through the engine at start (until one round answers fully, every 10 s: the engines
        may start after this service) and then every ``warming.interval``."""
        warming = self.settings.warming
        async with aiohttp.ClientSession() as session:
            while True:
                answered = await self.warm_engine(session)
                log.info("warming: %d of %d queries computed by %s", answered, len(warming.queries), warming.engine)
                await asyncio.sleep(warming.interval if answered == len(warming.queries) else 10.0)

    async def _sweeping(self) -> None:
        """The volume tier's sweeps, every ``volume.interval``, in a thread (file I/O)."""
        assert self.volume is not None
        while True:
            try:
                report = await asyncio.to_thread(self.volume.sweep)
                if report.evicted or report.expired:
                    log.info("volume tier swept", extra={
                        "blocks": report.blocks, "bytes": report.bytes, "evicted": report.evicted,
                        "expired": report.expired, "freed_bytes": report.freed_bytes})
            except OSError as exc:  # the volume went away: said, and tried again next time
                log.warning("volume tier sweep failed: %s", exc)
            except Exception:  # a bug or a file nothing expected: said with its trace, and the sweeps go on
                log.exception("volume tier sweep failed")
            await asyncio.sleep(self.settings.volume.interval)


def _for_the_apps_lifetime(work: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[web.Application],
                                                                           AsyncIterator[None]]:
    """An aiohttp cleanup context running ``work()`` as a task from start-up until the app stops."""

    async def context(_app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(work())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context


class _DesignDocNames(Collector):
    """``kv_cache_hits`` / ``kv_cache_requests`` exactly as the design doc's PromQL names them (untyped, no
    ``_total``), mirroring the labelled counters."""

    def __init__(self, hits: Counter, requests: Counter):
        self._hits, self._requests = hits, requests

    def collect(self) -> Iterator[Metric]:
        for name, counter in (("kv_cache_hits", self._hits), ("kv_cache_requests", self._requests)):
            metric = Metric(name, f"{name.replace('_', ' ')} in blocks (cumulative; design doc name)", "unknown")
            for family in counter.collect():
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        metric.add_sample(name, sample.labels, sample.value)
            yield metric


class _StreamCounters(Collector):
    """Per engine, what happened to its event stream (the subscriber's counts, read at scrape time):
    ``fuyao_kvcache_event_{gaps,replays,drops,restarts,disconnects,decode_errors}_total{endpoint}``."""

    FIELDS = {"gaps": "Sequence gaps seen", "replays": "Replays asked from the engine's replay socket",
              "drops": "Times the engine's entries were dropped because a gap or a join could not be replayed",
              "restarts": "Engine restarts seen (its sequence numbers started over): entries dropped, resynced",
              "disconnects": "Connections to the engine's event stream lost: entries dropped, resynced on the next "
                             "batch",
              "decode_errors": "Event batches that did not decode"}

    def __init__(self, service: KvCacheService):
        self._service = service

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(dict(self._service.subscriber.stats))

    def _families(self, streams: dict[str, SourceStats]) -> Iterator[Metric]:
        connected = GaugeMetricFamily("fuyao_kvcache_event_stream_connected", "1 while the engine's KV event stream "
                                      "is connected", labels=("endpoint",))
        for name, stats in streams.items():
            connected.add_metric((name,), 1.0 if stats.connected else 0.0)
        yield connected
        for field, doc in self.FIELDS.items():
            family = CounterMetricFamily(f"fuyao_kvcache_event_{field}", doc, labels=("endpoint",))
            for name, stats in streams.items():
                family.add_metric((name,), getattr(stats, field))
            yield family


class _TierCounters(Collector):
    """The shared tier's cumulative counts, read at scrape time as counters (``rate()`` and ``increase()`` need
    counters): ``fuyao_kvcache_tier_evictions_total{policy}``, ``fuyao_kvcache_tier_expirations_total`` (the
    in-memory tier) and ``fuyao_kvcache_volume_removed_blocks_total{reason}`` (the volume tier's sweeps)."""

    def __init__(self, service: KvCacheService):
        self._service = service

    def describe(self) -> Iterator[Metric]:
        return self._families(None, None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self._service.tier, self._service.volume)

    @staticmethod
    def _families(tier: SharedTier | None, volume: VolumeTier | None) -> Iterator[Metric]:
        evictions = CounterMetricFamily("fuyao_kvcache_tier_evictions", "Blocks evicted from the shared tier",
                                        labels=("policy",))
        expirations = CounterMetricFamily("fuyao_kvcache_tier_expirations", "Blocks of the shared tier expired by "
                                          "ttl")
        removed = CounterMetricFamily("fuyao_kvcache_volume_removed_blocks", "Block files removed from the tier's "
                                      "volume, by reason", labels=("reason",))
        if tier is not None:
            evictions.add_metric((tier.policy.value,), tier.evictions)
            expirations.add_metric((), tier.expirations)
        if volume is not None:
            removed.add_metric(("evicted",), volume.evicted_total)
            removed.add_metric(("expired",), volume.expired_total)
        yield from (evictions, expirations, removed)


class KvCacheMetrics:
    def __init__(self, service: KvCacheService):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.service = service
        self.hits = Counter("fuyao_kvcache_hits", "Prompt blocks found cached (index: on the best engine; tier: in "
                            "the shared tier)", ("layer",), registry=r)
        self.requests = Counter("fuyao_kvcache_requests", "Prompt blocks asked for", ("layer",), registry=r)
        r.register(_DesignDocNames(self.hits, self.requests))
        self.events = Counter("fuyao_kvcache_events", "KV events applied to the index", ("endpoint",), registry=r)
        self.lag = Gauge("fuyao_kvcache_event_lag_seconds", "How late the newest applied event batch arrived (its "
                         "timestamp to when it was applied; staleness: fuyao_kvcache_last_event_timestamp_seconds)",
                         ("endpoint",), registry=r)
        self.last_event = Gauge("fuyao_kvcache_last_event_timestamp_seconds", "When the newest event batch of the "
                                "endpoint was applied (Unix time)", ("endpoint",), registry=r)
        self.index_blocks = Gauge("fuyao_kvcache_index_blocks", "Distinct blocks in the index", registry=r)
        self.tier_blocks = Gauge("fuyao_kvcache_tier_blocks", "Blocks in the shared tier", registry=r)
        self.warmed = Counter("fuyao_kvcache_warming_queries", "Warming queries an engine computed (their KV stored "
                              "on the volume tier by its connector)", registry=r)
        self.volume_blocks = Gauge("fuyao_kvcache_volume_blocks", "KV block files on the tier's volume (last sweep)",
                                   registry=r)
        self.volume_bytes = Gauge("fuyao_kvcache_volume_bytes", "Bytes of KV block files on the tier's volume (last "
                                  "sweep; held at kvCache.size)", registry=r)
        r.register(_StreamCounters(service))
        r.register(_TierCounters(service))
        self._labelled: set[str] = set()  # endpoints with series in the families above
        self.latency = Histogram("fuyao_kvcache_request_duration_seconds", "HTTP request time by path", ("path",),
                                 buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05), registry=r)

    def batch(self, endpoint: str, events: int, lag: float) -> None:
        self._labelled.add(endpoint)
        self.events.labels(endpoint).inc(events)
        self.lag.labels(endpoint).set(lag)
        self.last_event.labels(endpoint).set_to_current_time()

    def render(self) -> bytes:
        # engines no longer followed (pods gone): their series go too (a frozen lag would alert forever, and pod
        # churn would grow the page without bound)
        for endpoint in self._labelled - set(self.service.subscriber.stats):
            for family in (self.events, self.lag, self.last_event):
                with contextlib.suppress(KeyError):
                    family.remove(endpoint)
            self._labelled.discard(endpoint)
        self.index_blocks.set(len(self.service.index))
        tier = self.service.tier
        if tier is not None:
            self.tier_blocks.set(len(tier))
        volume = self.service.volume
        if volume is not None:
            self.volume_blocks.set(volume.last.blocks)
            self.volume_bytes.set(volume.last.bytes)
        return generate_latest(self.registry)
