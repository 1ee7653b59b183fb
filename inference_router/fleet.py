"""The router's backends: who they are (static flags/config, or Kubernetes discovery), whether they are up (health
checks, circuit breakers) and how loaded (the router's in-flight counts, the engines' vLLM metrics scraped on an
interval), and which prompt prefixes they hold (the KV index, fed by engine events or asked of ``fuyao-kvcache``,
plus the router's own record of where it sent each prefix, since events only arrive once a prefill is done)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from fuyao.kv_blocks import BlockStored
from fuyao.kvcache.blockstore import METRIC_PREFIX
from fuyao.kvcache.index import KvIndex
from fuyao.kvcache.keys import block_keys
from fuyao.kvcache.subscriber import Source, Subscriber

from .balancing import Candidate, CircuitBreaker
from .config import KvCacheSection, RouterSection
from .tier_cost import TierReading, updated

log = logging.getLogger(__name__)

Role = Literal["both", "prefill", "decode"]
ENGINE_API_KEY_ENV = "FUYAO_ENGINE_API_KEY"
"""The engines' API key (vLLM's ``--api-key`` / ``VLLM_API_KEY``) for the router's own calls to their ``/v1``
routes (the models they serve); clients' requests carry their own Authorization, passed through. Never logged."""
MODELS_REFRESH_S = 2.0
"""The least time between two reads of every backend's models asked for by requests for an unknown model."""
MODELS_INTERVAL_S = 30.0
"""How often a healthy backend's /v1/models is read again (a pod can be re-pointed at another model)."""
_GAUGES = {"vllm:num_requests_waiting": "waiting", "vllm:num_requests_running": "running",
           "vllm:kv_cache_usage_perc": "kv_usage", "vllm:gpu_cache_usage_perc": "kv_usage"}
_CACHE_CONFIG = "vllm:cache_config_info"
_TIER_COUNTERS = {METRIC_PREFIX + "load_seconds_total": "load_seconds",
                  METRIC_PREFIX + "blocks_loaded_total": "blocks_loaded",
                  "vllm:request_prefill_time_seconds_sum": "prefill_seconds",
                  "vllm:request_prefill_kv_computed_tokens_sum": "computed_tokens"}
"""What tierLoadCost is measured from (``tier_cost``)."""
_READ = frozenset({*_GAUGES, _CACHE_CONFIG, *_TIER_COUNTERS})


@dataclass
class Backend:
    url: str
    role: Role = "both"
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(5, 30.0))
    healthy: bool = True
    in_flight: int = 0
    pending_tokens: int = 0  # prompt tokens sent here by the router, not prefilled yet
    prefilling: int = 0  # requests sent here still waiting for their first byte
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    num_blocks: int = 0  # the engine's KV blocks (vllm:cache_config_info)
    block_size: int = 0  # its tokens per block (vllm:cache_config_info)
    tier_reading: TierReading | None = None  # its tier and prefill counters when the last measurement ended
    tier_load_cost: float | None = None  # measured: loading a token from the shared tier / computing it (tier_cost)
    scraped_at: float = 0.0
    node: str | None = None  # where the scheduler placed it (discovery), for prefill/decode co-location
    health_path: str = "/health"
    health_interval: float = 5.0
    checked_at: float = 0.0
    models: frozenset[str] = frozenset()  # what it serves (its /v1/models); empty until known
    adapters: frozenset[str] = frozenset()  # those of its models that are LoRA adapters (listed with a parent)
    models_at: float = 0.0
    tokenize_after: float = 0.0  # monotonic time before which its /tokenize is not asked (it had none)

    def serves(self, model: str | None) -> bool:
        """Whether a request for ``model`` may go here: any model when none is named or its list is not known."""
        return model is None or not self.models or model in self.models

    def candidate(self, prefix_blocks: int = 0, cached_blocks: int = 0) -> Candidate:
        occupancy = min(1.0, cached_blocks / self.num_blocks) if self.num_blocks else 0.0
        return Candidate(self.url, self.in_flight, self.waiting, self.running, self.kv_usage, prefix_blocks,
                         self.pending_tokens, self.prefilling, occupancy, self.tier_load_cost)

    def dispatch(self, uncached: int = 0) -> Dispatch:
        """One request's stay here, as a context manager: see :class:`Dispatch`."""
        return Dispatch(self, uncached)


class Dispatch:
    """The router's bookkeeping of one request on one backend, the same on every path (plain, prefill, decode):
    on entry it counts as in flight, as ``uncached`` prompt tokens of pending prefill and as a half-open probe
    when the circuit is half-open; :meth:`first_byte` ends the prefill part; :meth:`succeeded` / :meth:`failed`
    give the circuit breaker its verdict. Leaving without a verdict (the client went away) frees the probe slot
    and is held against no one."""

    def __init__(self, backend: Backend, uncached: int):
        self.backend, self.uncached = backend, uncached
        self._prefilling = False
        self._verdict = False

    def __enter__(self) -> Dispatch:
        backend = self.backend
        backend.in_flight += 1
        backend.pending_tokens += self.uncached
        backend.prefilling += 1
        self._prefilling = True
        backend.breaker.dispatched()
        return self

    def first_byte(self) -> None:
        if self._prefilling:
            self._prefilling = False
            self.backend.pending_tokens -= self.uncached
            self.backend.prefilling -= 1

    def succeeded(self) -> None:
        self._verdict = True
        self.backend.breaker.success()

    def failed(self) -> None:
        self._verdict = True
        self.backend.breaker.failure(time.monotonic())

    def __exit__(self, *_exc: object) -> None:
        self.first_byte()
        self.backend.in_flight -= 1
        if not self._verdict:
            self.backend.breaker.release()


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """The load gauges of a vLLM ``/metrics`` page, summed over label sets (e.g. several data-parallel engines; the
    KV cache usage, a fraction per engine, averaged over them instead), the engine's
    KV blocks and block size (``vllm:cache_config_info``), and the counters tierLoadCost is measured from. Each
    sample of these families is parsed by ``prometheus_client``'s parser; the rest of the page is skipped unparsed
    (a vLLM page is mostly histograms the router does not read, and the scrape runs on the router's event loop
    every ``metrics_interval``), and so is a sample the parser refuses (it costs that reading only)."""
    out: dict[str, float] = {}
    usage: list[float] = []
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] not in _READ:
            continue
        try:
            samples = [sample for family in text_string_to_metric_families(line + "\n") for sample in family.samples]
        except ValueError:
            continue
        for sample in samples:
            if sample.name == _CACHE_CONFIG:
                blocks = sample.labels.get("num_gpu_blocks", "")
                if blocks.isdigit():
                    out["num_blocks"] = out.get("num_blocks", 0.0) + float(blocks)
                size = sample.labels.get("block_size", "")
                if size.isdigit():
                    out["block_size"] = float(size)
                continue
            key = _GAUGES.get(sample.name) or _TIER_COUNTERS.get(sample.name)
            if key == "kv_usage" and sample.value == sample.value:
                usage.append(sample.value)
            elif key is not None and sample.value == sample.value:  # NaN: not a reading
                out[key] = out.get(key, 0.0) + sample.value
    if usage:  # two engines at half each hold half of their caches, not a full one
        out["kv_usage"] = sum(usage) / len(usage)
    return out


class Fleet:
    def __init__(self, settings: RouterSection, api_key: str | None = None):
        """``api_key``: the engines' key (default: the ``FUYAO_ENGINE_API_KEY`` environment variable)."""
        self.settings = settings
        self.api_key = api_key if api_key is not None else os.environ.get(ENGINE_API_KEY_ENV) or None
        self._refused: set[str] = set()  # backends whose /v1/models refused the router (warned once)
        self.backends: dict[str, Backend] = {}
        self._static: dict[str, Role] = {}
        self._discovered: dict[str, Backend] = {}
        self._models_refreshed = float("-inf")
        self._refreshing: asyncio.Future[Any] | None = None
        self.adapters: frozenset[str] = frozenset()
        """Every model name a backend lists as a LoRA adapter (vLLM's /v1/models gives adapters a ``parent``): vLLM
        keys an adapter's KV blocks apart from its base model's."""
        self.on_removed: list[Callable[[str], None]] = []
        """Called with a backend's URL when it left the fleet (its metric series go)."""
        self.on_reset: list[Callable[[str], None]] = []
        """Called with a backend's URL when what it held may be gone: it left the fleet, or it failed its health
        check and passes again (an engine restarted behind the same address: its KV cache is empty)."""

    # Membership --------------------------------------------------------------------------------------------------
    def configure(self, settings: RouterSection, static: Mapping[str, Role]) -> None:
        """(Re)apply settings and the static backends; discovered ones stay."""
        self.settings = settings
        self._static = dict(static)
        self._rebuild()

    def set_discovered(self, backends: Iterable[Backend]) -> None:
        self._discovered = {b.url: b for b in backends}
        self._rebuild()

    def _rebuild(self) -> None:
        wanted: dict[str, tuple[Role, Backend | None]] = {url: (role, None) for url, role in self._static.items()}
        for url, discovered in self._discovered.items():
            wanted.setdefault(url, (discovered.role, discovered))
        breaker = self.settings.circuit_breaker
        for url in list(self.backends):
            if url not in wanted:
                del self.backends[url]
                self._reset(url, self.on_removed + self.on_reset)
        self.adapters = frozenset(a for b in self.backends.values() for a in b.adapters)  # a gone engine's go too
        for url, (role, found) in wanted.items():
            backend = self.backends.get(url)
            if backend is None:
                backend = self.backends[url] = Backend(url, role)
            backend.role = role
            backend.breaker.failure_threshold, backend.breaker.timeout_s = breaker.failure_threshold, breaker.timeout
            backend.health_path = found.health_path if found else self.settings.health_check.path
            backend.health_interval = found.health_interval if found else self.settings.health_check.interval
            backend.node = found.node if found else None

    def _reset(self, url: str, callbacks: list[Callable[[str], None]] | None = None) -> None:
        for callback in self.on_reset if callbacks is None else callbacks:
            try:
                callback(url)
            except Exception:
                log.exception("forgetting what backend %s held failed", url)

    def pool(self, role: Role, exclude: Sequence[str] = (), now: float | None = None,
             model: str | None = None) -> list[Backend]:
        """Backends that can take a request of ``role`` for ``model`` now (serving it, healthy, circuit not open).
        Dedicated backends first: prefill work goes to prefill engines when there are any (else to "both" engines),
        plain requests to "both" engines when there are any (else to any)."""
        now = time.monotonic() if now is None else now
        candidates = [b for b in self.backends.values() if b.serves(model)]
        members = [b for b in candidates if b.role == role]
        if not members:
            members = [b for b in candidates if b.role == "both"] if role != "both" else candidates
        return [b for b in members if b.url not in exclude and b.healthy and b.breaker.allows(now)]

    def serves(self, model: str) -> bool:
        """Whether any backend, healthy or not, may serve ``model`` (it lists it, or its list is not known yet)."""
        return any(b.serves(model) for b in self.backends.values())

    # Checks ------------------------------------------------------------------------------------------------------
    async def watch(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Health checks (each backend on its own interval) and metric scrapes, until ``stop``."""
        while not stop.is_set():
            now = time.monotonic()
            jobs = []
            for backend in list(self.backends.values()):
                interval = backend.health_interval if backend.healthy else min(1.0, backend.health_interval)
                if now - backend.checked_at >= interval:  # a down backend is re-checked every second
                    backend.checked_at = now
                    jobs.append(self._check(session, backend))
                if now - backend.scraped_at >= self.settings.metrics_interval:
                    backend.scraped_at = now
                    jobs.append(self._scrape(session, backend))
            if jobs:
                await asyncio.gather(*jobs, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=min(0.25, self.settings.metrics_interval))

    async def _check(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.health_check.timeout)
        try:
            async with session.get(backend.url + backend.health_path, timeout=timeout) as response:
                healthy = response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            healthy = False
        if healthy != backend.healthy:
            log.warning("backend %s is now %s", backend.url, "healthy" if healthy else "unhealthy",
                        extra={"backend": backend.url, "healthy": healthy})
            if healthy:
                self._reset(backend.url)
        backend.healthy = healthy
        if healthy and backend.breaker.state == "open":
            backend.breaker.opened_at = 0.0  # a passing health check lets the half-open probe through now
        if healthy and (not backend.models or time.monotonic() - backend.models_at >= MODELS_INTERVAL_S):
            await self._models(session, backend, timeout)

    async def _models(self, session: aiohttp.ClientSession, backend: Backend, timeout: aiohttp.ClientTimeout) -> None:
        """What the backend serves, from its ``/v1/models`` (vLLM's shape: ``data[].id``); kept when unreadable."""
        try:
            async with session.get(backend.url + "/v1/models", headers=self.auth_headers(),
                                   timeout=timeout) as response:
                if response.status in (401, 403):
                    if backend.url not in self._refused:
                        self._refused.add(backend.url)
                        log.warning("backend %s refuses the router's /v1/models (HTTP %d): its models are not known, "
                                    "so requests are not routed by model; give the router the engines' API key in "
                                    "%s", backend.url, response.status, ENGINE_API_KEY_ENV,
                                    extra={"backend": backend.url})
                    return
                if response.status != 200:
                    return
                data = (await response.json(content_type=None)).get("data")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, AttributeError):
            return
        if isinstance(data, list):
            cards = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
            found = frozenset(m["id"] for m in cards)
            if found != backend.models:
                log.info("backend %s serves %s", backend.url, ", ".join(sorted(found)) or "no model",
                         extra={"backend": backend.url})
            backend.models, backend.models_at = found, time.monotonic()
            adapters = frozenset(m["id"] for m in cards if m.get("parent") and m.get("parent") != m["id"])
            if adapters != backend.adapters:
                backend.adapters = adapters
                self.adapters = frozenset(a for b in self.backends.values() for a in b.adapters)

    async def refresh_models(self, session: aiohttp.ClientSession) -> None:
        """Read every healthy backend's ``/v1/models`` now (a request named a model nobody listed: an engine may
        serve it since the last read, a LoRA adapter just loaded); at most once per :data:`MODELS_REFRESH_S`."""
        running = self._refreshing
        if running is not None and not running.done():
            await asyncio.shield(running)  # requests arriving meanwhile wait for that read, not a 404
            return
        now = time.monotonic()
        if now - self._models_refreshed < MODELS_REFRESH_S:
            return
        self._models_refreshed = now
        timeout = aiohttp.ClientTimeout(total=self.settings.health_check.timeout)
        self._refreshing = asyncio.ensure_future(asyncio.gather(
            *(self._models(session, b, timeout) for b in list(self.backends.values()) if b.healthy)))
        await asyncio.shield(self._refreshing)

    async def stop_refreshing(self) -> None:
        """Cancel a models read still running (its callers only wait on it shielded: cancelling them leaves it
        running against a session about to close) and wait for it to end."""
        running, self._refreshing = self._refreshing, None
        if running is not None and not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)

    def auth_headers(self) -> dict[str, str]:
        """The router's own Authorization for the engines' ``/v1`` routes (empty without a key)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _scrape(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        try:
            async with session.get(backend.url + "/metrics",
                                   timeout=aiohttp.ClientTimeout(total=self.settings.health_check.timeout)) as r:
                if r.status != 200:
                    return
                values = parse_vllm_metrics(await r.text())
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError):
            return
        backend.waiting = values.get("waiting", 0.0)
        backend.running = values.get("running", 0.0)
        backend.kv_usage = values.get("kv_usage", 0.0)
        backend.num_blocks = int(values.get("num_blocks", backend.num_blocks))
        backend.block_size = int(values.get("block_size", backend.block_size))
        if "load_seconds" in values:  # the engine shares a KV tier
            reading = TierReading(values.get("load_seconds", 0.0), values.get("blocks_loaded", 0.0),
                                  values.get("prefill_seconds", 0.0), values.get("computed_tokens", 0.0))
            backend.tier_load_cost, backend.tier_reading = updated(backend.tier_load_cost, backend.tier_reading,
                                                                   reading, backend.block_size)


@dataclass(frozen=True)
class Matches:
    endpoints: dict[str, int]
    """Backend URL → leading blocks of the prompt it caches."""
    tier_blocks: int = 0
    """Leading blocks of the prompt in the shared KV tier (the volume fuyao's KV connector shares)."""


class PrefixSource:
    """Which backends hold which leading blocks of a prompt: the KV index (events from the engines, or the
    ``fuyao-kvcache`` service) merged with where the router itself sent each prefix lately (two generations, each
    at most ``routed_blocks`` blocks: an approximate LRU)."""

    def __init__(self, settings: KvCacheSection, routed_blocks: int = 500_000, routed_ttl_s: float = 5.0):
        self.settings = settings
        self.block_size = settings.block_size
        self.keys = block_keys(settings.block_size, settings.hash_seed, settings.block_hashing)
        self.index = KvIndex(settings.block_size, settings.hash_seed, self.keys)
        self.subscriber: Subscriber | None = None
        self.routed_blocks = routed_blocks
        self.routed_ttl_s = routed_ttl_s
        self._routed = [KvIndex(settings.block_size, settings.hash_seed, self.keys)]
        self._routed_since = time.monotonic()
        self.remote_errors = 0
        self._held: dict[str, int] = {}
        """Blocks each engine caches, as the service said at the last lookup (``settings.service``)."""

    @property
    def event_fed(self) -> bool:
        """Engines report what they cache (events or the kvcache service): the router's own record then only
        bridges the time until a prefill's events arrive (``routed_ttl_s``), so it never outlives an eviction."""
        return bool(self.settings.events or self.settings.service)

    def start(self) -> None:
        if self.settings.events and self.subscriber is None:
            self.subscriber = Subscriber(self.index).start()
            for stream, backend in self.settings.events.items():
                self.subscriber.add(Source(backend, stream))

    def stop(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()

    # Matches -----------------------------------------------------------------------------------------------------
    async def matches(self, hashes: list[int], session: aiohttp.ClientSession | None = None) -> dict[str, int]:
        """Leading blocks of the prompt each backend holds."""
        return (await self.lookup(hashes, session)).endpoints

    async def lookup(self, hashes: list[int], session: aiohttp.ClientSession | None = None) -> Matches:
        """What each backend holds of the prompt, and (from ``fuyao-kvcache`` with a volume tier) how many leading
        blocks the shared tier holds, which any engine with fuyao's KV connector loads instead of computing."""
        self._rotate()
        found: dict[str, int] = {}
        tier = 0
        if self.settings.service and session is not None:
            try:
                async with session.post(self.settings.service + "/v1/lookup",
                                        json={"token_ids": [], "hashes": hashes},
                                        timeout=aiohttp.ClientTimeout(total=0.2)) as response:
                    if response.status == 200:
                        found, tier, held = _lookup_answer(await response.json())
                        self._held = held
            except (aiohttp.ClientError, TimeoutError, ValueError, TypeError, AttributeError):
                # unreachable, slow or an answer not of the service's shape: routed on what is known locally
                self.remote_errors += 1
                found, tier = {}, 0
        else:
            found = self.index.lookup(hashes=hashes)
        for generation in self._routed:
            for url, blocks in generation.lookup(hashes=hashes).items():
                if blocks > found.get(url, 0):
                    found[url] = blocks
        return Matches(found, tier)

    def routed(self, url: str, hashes: list[int]) -> None:
        """The router sent these blocks to ``url``: they will be cached there (until events say otherwise)."""
        if not hashes:
            return
        self._rotate()
        self._routed[-1].apply(url, [BlockStored(hashes, None, [], self.block_size)])

    def _rotate(self) -> None:
        current = self._routed[-1]
        now = time.monotonic()
        if (self.event_fed and now - self._routed_since > self.routed_ttl_s) or len(current) > self.routed_blocks // 2:
            self._routed = [current, KvIndex(self.block_size, self.settings.hash_seed, self.keys)]
            self._routed_since = now

    def cached_blocks(self, url: str) -> int:
        """Blocks the engine reports holding (its prefix-cache occupancy), from its events: followed here, or by
        the ``fuyao-kvcache`` service (its last lookup's answer)."""
        if self.settings.service:
            return self._held.get(url, 0)
        state = self.index.endpoints.get(url)
        return len(state.hashes) if state is not None else 0

    def forget(self, url: str) -> None:
        for generation in self._routed:
            generation.drop(url)


def _lookup_answer(answer: object) -> tuple[dict[str, int], int, dict[str, int]]:
    """``fuyao-kvcache``'s lookup answer as (blocks per engine, the tier's leading blocks, blocks each engine holds);
    ValueError / TypeError / AttributeError when it is not of that shape (the caller routes without it)."""
    if not isinstance(answer, dict):
        raise TypeError(f"the lookup answer is a {type(answer).__name__}, not an object")
    endpoints = {str(url): int(n) for url, n in (answer.get("endpoints") or {}).items()}
    held = {str(url): int(n) for url, n in (answer.get("cached_blocks") or {}).items()}
    return endpoints, int(answer.get("volume_blocks") or 0), held
