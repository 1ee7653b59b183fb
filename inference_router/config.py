"""The router's configuration: the design doc's ConfigMap ``inference-optimization-config`` → ``config.yaml``, with
its four sections (``router``, ``kv_cache``, ``inference``, ``pd_separation``; snake_case keys as the doc writes
them), validated; flags override the file; a changed file is reloaded, and a bad one keeps the old config.

```yaml
version: v1
router:
  listen: 127.0.0.1:9000
  strategy: prefix-aware           # round-robin | least-connections | intelligent | prefix-aware
  backends: [http://10.0.0.5:8000] # static; or discovery below
  max_concurrent_requests: 1000    # beyond: 429
  retries: 2                       # on another backend, only before the first byte
  health_check: {path: /health, interval: 5s, timeout: 2s}
  metrics_interval: 1s             # scrape of the backends' vLLM metrics
  circuit_breaker: {failure_threshold: 5, timeout: 30s}
  intelligent: {queue_weight: 0.4, cpu_weight: 0.3, memory_weight: 0.3, queue_scale: 2, running_scale: 64}
  prefix_aware: {decode_cost_tokens: 24, kv_pressure_tokens: 256, eviction_weight: 1.0, min_prefix_blocks: 1}
  discovery: {enabled: false, namespace: null}
kv_cache:
  enabled: true
  block_size: 16                   # the engines' --block-size
  hash_seed: 0                     # the content chain's seed (the simulator's --seed hashes alike)
  service: null                    # a fuyao-kvcache URL; null: the index runs in the router
  events: {}                       # engine KV event streams: {"tcp://10.0.0.5:5557": "http://10.0.0.5:8000"}
  block_hashing: {mode: content}   # content: blocks keyed by their tokens (any engine hash algorithm and seed);
                                   # vllm (+ algo, seed): the engines' own hashes, for streams without token_ids
  tokenizer: engine                # engine: the engines' /tokenize | a model directory or tokenizer.json | builtin
  tokenize_timeout: 1s
inference:
  model: null                      # answered by /v1/models when no backend is up
  prefill_timeout: 30s
  decode_timeout: 300s
  stream_idle_timeout: 60s         # a backend silent this long mid-answer is cut off (and counted against it)
  request_body_timeout: 30s        # a client must have sent its whole body by then (else 408)
  max_body_bytes: 67108864         # larger bodies: 413
pd_separation:
  enabled: false
  prefill: []                      # prefill engines
  decode: []                       # decode engines
  fallback: decode-only            # when the prefill fails: decode-only | error
```
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fuyao.config_files import ConfigError as ConfigError  # re-exported: callers catch it from here
from fuyao.config_files import HostPort, Seconds, TokenizerPath, load_versioned_yaml, merged, validated
from fuyao.kvcache.keys import BlockHashing

CONFIG_VERSION = "v1"
Strategy = Literal["round-robin", "least-connections", "intelligent", "prefix-aware"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http(s):// URL, got {value!r}")
    return value.rstrip("/")


class HealthCheck(_Section):
    path: str = Field(default="/health", pattern=r"^/\S*$")
    interval: Seconds = 5.0
    timeout: Seconds = 2.0


class CircuitBreaker(_Section):
    failure_threshold: int = Field(default=5, ge=1, description="consecutive failures that open the circuit")
    timeout: Seconds = Field(default=30.0, description="open this long, then one half-open probe")


class IntelligentWeights(_Section):
    """The design doc's health score 0.4*(1-queue) + 0.3*(1-cpu) + 0.3*(1-mem): queue = waiting requests / queue_scale
    (capped at 1), cpu = running / max_num_seqs-like saturation, mem = KV-cache usage."""

    queue_weight: float = Field(default=0.4, ge=0)
    cpu_weight: float = Field(default=0.3, ge=0)
    memory_weight: float = Field(default=0.3, ge=0)
    queue_scale: float = Field(default=2.0, gt=0, description="the queue term is queued / max(this, the most queued)")
    running_scale: float = Field(default=64.0, gt=0)


class PrefixWeights(_Section):
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


class Discovery(_Section):
    enabled: bool = False
    namespace: str | None = None


class RouterSection(_Section):
    listen: HostPort = "127.0.0.1:9000"
    strategy: Strategy = "prefix-aware"
    backends: list[str] = []
    max_concurrent_requests: int = Field(default=1000, ge=1)
    retries: int = Field(default=2, ge=0, le=10)
    health_check: HealthCheck = HealthCheck()
    metrics_interval: Seconds = 1.0
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    intelligent: IntelligentWeights = IntelligentWeights()
    prefix_aware: PrefixWeights = PrefixWeights()
    discovery: Discovery = Discovery()

    @field_validator("backends")
    @classmethod
    def _backends(cls, value: list[str]) -> list[str]:
        return [_url(u) for u in value]


class KvCacheSection(_Section):
    enabled: bool = True
    block_size: int = Field(default=16, ge=1)
    hash_seed: int = 0
    service: str | None = None
    events: dict[str, str] = Field(default_factory=dict, description="event stream URL → backend URL")
    block_hashing: BlockHashing = Field(default=BlockHashing(), description=(
        "how blocks are named: by content (any engine hash) or by the engines' own vLLM hashes"))
    tokenizer: TokenizerPath = Field(default="engine", description=(
        "how prompts become the token ids the engines cache: engine (ask an engine's /tokenize once per distinct "
        "prompt: its own tokenizer and chat template), a model directory or tokenizer.json (tokenized in the "
        "router, HF tokenizers and the model's chat template), or builtin (the engine simulator's default)"))
    tokenize_timeout: Seconds = Field(default=1.0, gt=0, description=(
        "tokenizer engine: an engine that has not tokenized a prompt by then is not waited for (the request is "
        "routed on load alone)"))

    @field_validator("service")
    @classmethod
    def _service(cls, value: str | None) -> str | None:
        return _url(value) if value else None

    @field_validator("events")
    @classmethod
    def _events(cls, value: dict[str, str]) -> dict[str, str]:
        for stream, backend in value.items():
            if not stream.startswith(("tcp://", "ipc://")):
                raise ValueError(f"event stream {stream!r}: expected tcp:// or ipc://")
            _url(backend)
        return {k: v.rstrip("/") for k, v in value.items()}


class InferenceSection(_Section):
    model: str | None = None
    prefill_timeout: Seconds = 30.0
    decode_timeout: Seconds = 300.0
    stream_idle_timeout: Seconds = Field(default=60.0, gt=0, description=(
        "a backend that sends nothing for this long in the middle of an answer is cut off: the stream counts as "
        "broken and against the backend, and the client's connection is closed"))
    request_body_timeout: Seconds = Field(default=30.0, gt=0, description=(
        "a client that has not sent its whole body by then gets 408 (a slow sender cannot hold a slot forever)"))
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="larger request bodies get 413")


class PdSection(_Section):
    enabled: bool = False
    prefill: list[str] = []
    decode: list[str] = []
    fallback: Literal["decode-only", "error"] = "decode-only"

    @field_validator("prefill", "decode")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return [_url(u) for u in value]


class RouterConfig(_Section):
    version: Literal["v1"] = CONFIG_VERSION
    kubeconfig: str | None = None
    router: RouterSection = RouterSection()
    kv_cache: KvCacheSection = KvCacheSection()
    inference: InferenceSection = InferenceSection()
    pd_separation: PdSection = PdSection()


def build_config(file_values: dict[str, Any] | None = None) -> RouterConfig:
    return validated(RouterConfig, merged(file_values, None), camel_case=False)


def load_config_file(path: str) -> dict[str, Any]:
    return load_versioned_yaml(path, CONFIG_VERSION)


def with_overrides(config: RouterConfig, **sections: dict[str, Any]) -> RouterConfig:
    """``config`` with some keys of some sections replaced (flags; None: not given), validated again."""
    data = config.model_dump()
    for section, values in sections.items():
        data[section] = {**data[section], **{k: v for k, v in values.items() if v is not None}}
    return validated(RouterConfig, data, camel_case=False)
