"""The router's configuration: the design doc's ConfigMap ``inference-optimization-config`` → ``config.yaml``, with
its four sections (``router``, ``kvCache``, ``inference``, ``pdSeparation``), validated; flags override the file; a
changed file is reloaded, and a bad one keeps the old config. Keys are camelCase like every fuyao config; the
design doc's snake_case spelling (``kv_cache``, ``pd_separation``...) still loads, with a deprecation warning.

```yaml
version: v1
router:
  listen: 127.0.0.1:9000
  strategy: prefix-aware           # a registered policy: round-robin | least-connections | intelligent | prefix-aware
  backends: [http://10.0.0.5:8000] # static; or discovery below
  maxConcurrentRequests: 1000    # beyond: 429
  retries: 2                       # on another backend, only before the first byte
  healthCheck: {path: /health, interval: 5s, timeout: 2s}
  metricsInterval: 1s             # scrape of the backends' vLLM metrics
  circuitBreaker: {failureThreshold: 5, timeout: 30s}
  intelligent: {queueWeight: 0.4, cpuWeight: 0.3, memoryWeight: 0.3, queueScale: 2, runningScale: 64}
  prefixAware: {decodeCostTokens: 24, kvPressureTokens: 256, evictionWeight: 1.0, minPrefixBlocks: 1,
                tierLoadCost: 0.2, learnTierLoadCost: true}
  discovery: {enabled: false, namespace: null}
kvCache:
  enabled: true
  blockSize: 16                   # the engines' --block-size
  hashSeed: 0                     # the content chain's seed (the simulator's --seed hashes alike)
  service: null                    # a fuyao-kvcache URL; null: the index runs in the router
  events: {}                       # engine KV event streams: {"tcp://10.0.0.5:5557": "http://10.0.0.5:8000"}
  blockHashing: {mode: content}   # content: blocks keyed by their tokens (any engine hash algorithm and seed);
                                   # vllm (+ algo, seed): the engines' own hashes, for streams without token_ids
  tokenizer: engine                # engine: the engines' /tokenize | a model directory or tokenizer.json | builtin
  tokenizeTimeout: 1s
inference:
  model: null                      # answered by /v1/models when no backend is up
  prefillTimeout: 30s
  decodeTimeout: 300s
  streamIdleTimeout: 60s         # a backend silent this long mid-answer is cut off (and counted against it)
  requestBodyTimeout: 30s        # a client must have sent its whole body by then (else 408)
  maxBodyBytes: 67108864         # larger bodies: 413
pdSeparation:
  enabled: false
  prefill: []                      # prefill engines
  decode: []                       # decode engines
  fallback: decode-only            # when the prefill fails: decode-only | error
```
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

from pydantic import Field, create_model, field_validator
from pydantic.alias_generators import to_camel

from fuyao.config_files import ConfigError as ConfigError  # re-exported: callers catch it from here
from fuyao.config_files import ConfigSection, HostPort, Seconds, TokenizerPath, load_versioned_yaml, merged, validated
from fuyao.kvcache.keys import BlockHashing
from fuyao.netaddr import ZMQ_ENDPOINT

from .policies import POLICIES, PolicyArgs

CONFIG_VERSION: Final = "v1"


class _Section(ConfigSection):
    """camelCase keys (snake_case ones load with a deprecation warning), unknown keys refused, frozen."""


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


class Discovery(_Section):
    enabled: bool = False
    namespace: str | None = None


class _RouterBase(_Section):
    listen: HostPort = "127.0.0.1:9000"
    strategy: str = "prefix-aware"
    backends: list[str] = []
    max_concurrent_requests: int = Field(default=1000, ge=1)
    retries: int = Field(default=2, ge=0, le=10)
    health_check: HealthCheck = HealthCheck()
    metrics_interval: Seconds = 1.0
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    discovery: Discovery = Discovery()

    @field_validator("backends")
    @classmethod
    def _backends(cls, value: list[str]) -> list[str]:
        return [_url(u) for u in value]

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown routing policy {value!r}; registered: {', '.join(POLICIES)}")
        return value


RouterSection = create_model(
    "RouterSection", __base__=_RouterBase,
    **{r.field: (r.args, r.args()) for r in POLICIES.values()})  # type: ignore[call-overload]  # pydantic's stub types field kwargs loosely
"""``router``: its own settings, plus one section per registered policy (``prefixAware``...), that policy's args."""


def policy_args(settings: _RouterBase, name: str) -> PolicyArgs:
    """The args of policy ``name`` in the ``router`` section."""
    found: PolicyArgs = getattr(settings, POLICIES[name].field)
    return found


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
            if not re.match(ZMQ_ENDPOINT, stream):
                raise ValueError(f"event stream {stream!r}: expected tcp://host:port, tcp://[ipv6]:port or ipc://path")
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


def reloadable(old: RouterConfig, new: RouterConfig) -> tuple[RouterConfig, list[str]]:
    """What a changed config file changes in a running router: ``new`` with the settings that only take effect at a
    restart (the listen address, discovery, the KV cache's settings but ``enabled`` and ``tokenizeTimeout``) kept as
    they are, and
    the names of those that differ (the caller says so, instead of logging "reloaded" over them)."""
    held: list[str] = []
    router = new.router
    for key in ("listen", "discovery"):
        if getattr(old.router, key) != getattr(new.router, key):
            held.append(f"router.{key}")
            router = router.model_copy(update={key: getattr(old.router, key)})
    kv_cache = new.kv_cache
    live = {"enabled": new.kv_cache.enabled, "tokenize_timeout": new.kv_cache.tokenize_timeout}  # read per request
    if old.kv_cache.model_copy(update=live) != new.kv_cache:
        held.append("kvCache")
        kv_cache = old.kv_cache.model_copy(update=live)
    if old.kubeconfig != new.kubeconfig:
        held.append("kubeconfig")
    return new.model_copy(update={"router": router, "kv_cache": kv_cache, "kubeconfig": old.kubeconfig}), held


def build_config(file_values: dict[str, Any] | None = None) -> RouterConfig:
    return validated(RouterConfig, merged(file_values, None))


def load_config_file(path: str) -> dict[str, Any]:
    return load_versioned_yaml(path, CONFIG_VERSION)


def with_overrides(config: RouterConfig, **sections: dict[str, Any]) -> RouterConfig:
    """``config`` with some keys of some sections replaced (flags, snake_case names; None: not given), validated
    again."""
    data = config.model_dump(by_alias=True)
    for section, values in sections.items():
        key = to_camel(section)
        data[key] = {**data[key], **{to_camel(k): v for k, v in values.items() if v is not None}}
    return validated(RouterConfig, data)
