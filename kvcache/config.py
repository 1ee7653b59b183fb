"""``fuyao-kvcache`` configuration: the design doc's ``kv_cache`` section as ``kvCache`` (camelCase keys like every
fuyao config; snake_case ones still load, with a deprecation warning), versioned; flags override; errors name the
field.

```yaml
version: v1
listen: 127.0.0.1:8100
kvCache:
  blockSize: 16              # must equal the engines' --block-size
  hashSeed: 0                # the content chain's seed (any value; the simulator's --seed hashes alike)
  blockHashing:              # content (default: blocks keyed by their tokens, any engine hash algorithm/seed)
    mode: content             # or vllm: the engines' own hashes, for event streams without tokenIds:
    algo: sha256              #   their --prefix-caching-hash-algo
    seed: null                #   their PYTHONHASHSEED (null: vLLM's default; xxhash algorithms need it)
  size: 10Gi                  # shared block tier capacity (Kubernetes quantity); 0 turns the tier off
  bytesPerToken: 524288     # KV bytes per token (7B, fp16: 2 x 32 layers x 4096 x 2 bytes)
  evictionPolicy: LRU        # LRU | LFU | FIFO
  ttl: 1h                     # blocks older than this are gone (none: keep until evicted)
  warming:
    enabled: true
    queries: ["You are a helpful assistant.", ...]   # prefilled into the tier once at start
    engine: http://vllm:8000  # real KV: the queries sent there (1-token completions) at start and every interval
    model: qwen
    interval: 1h
  volume:                     # real KV bytes: the directory engines' FuyaoKVConnector shares (docs/kv-cache.md)
    path: /mnt/kv             # held at size, by evictionPolicy and ttl (null: none)
    interval: 30s             # how often it is swept
  events:
    endpoints:                # engines whose KV events feed the index
      - {name: "http://10.0.0.5:8000", events: "tcp://10.0.0.5:5557", replay: "tcp://10.0.0.5:5558", model: m}
    discovery:                # or: engines found as pods
      enabled: false
      namespace: default
      labelSelector: app=vllm
```
"""

from __future__ import annotations

from typing import Any, Final, Literal

from kubernetes.utils.quantity import parse_quantity
from pydantic import Field, field_validator, model_validator

from fuyao.config_files import ConfigError as ConfigError  # re-exported: callers catch it from here
from fuyao.config_files import ConfigSection, HostPort, Seconds, TokenizerPath, load_versioned_yaml, merged, validated
from fuyao.contracts import LABEL_KV_EVENTS, KvCachePolicy
from fuyao.netaddr import ZMQ_ENDPOINT

from .keys import BlockHashing

CONFIG_VERSION: Final = "v1"


class _Section(ConfigSection):
    """camelCase keys (snake_case ones load with a deprecation warning), unknown keys refused, frozen."""


class EndpointConfig(_Section):
    name: str = Field(min_length=1, description="how the index calls the engine (the router's backend URL)")
    events: str = Field(pattern=ZMQ_ENDPOINT, description="the engine's KV event PUB endpoint (tcp://host:port, "
                        "tcp://[ipv6]:port, ipc://path)")
    replay: str | None = Field(default=None, pattern=ZMQ_ENDPOINT)
    model: str = ""


class DiscoveryConfig(_Section):
    enabled: bool = False
    namespace: str | None = None
    label_selector: str = LABEL_KV_EVENTS


class EventsConfig(_Section):
    endpoints: list[EndpointConfig] = []
    discovery: DiscoveryConfig = DiscoveryConfig()


class WarmingConfig(_Section):
    enabled: bool = False
    queries: list[str] = []
    engine: str | None = Field(default=None, pattern=r"^https?://", description=(
        "an OpenAI-compatible URL (an engine running fuyao's KV connector, or the router in front of them): the "
        "queries are sent there as completions (1 token), so their KV is computed and stored on the volume tier; "
        "null: only the simulated tier is prefilled"))
    model: str = Field(default="", description="the served model name the warming completions ask for")
    interval: Seconds = Field(default=3600.0, gt=0, description="how often the queries are sent again (a tier "
                              "evicts; engines restart)")


class VolumeConfig(_Section):
    path: str | None = Field(default=None, description=(
        "the shared tier's directory (an RWX volume the engines' FuyaoKVConnector writes to): held at size with "
        "evictionPolicy and ttl; null: no volume tier"))
    interval: Seconds = Field(default=30.0, gt=0, description="how often the volume is swept")


class KvCacheSection(_Section):
    block_size: int = Field(default=16, ge=1, le=4096)
    hash_seed: int = 0
    size: int = Field(default=10 * 2**30, ge=0, description="bytes; a Kubernetes quantity in the file")
    bytes_per_token: int = Field(default=524288, ge=1)
    eviction_policy: KvCachePolicy = KvCachePolicy.LRU
    ttl: Seconds | None = None
    warming: WarmingConfig = WarmingConfig()
    volume: VolumeConfig = VolumeConfig()
    events: EventsConfig = EventsConfig()
    block_hashing: BlockHashing = Field(default=BlockHashing(), description=(
        "how blocks are named: by content (any engine hash) or by the engines' own vLLM hashes"))
    tokenizer: TokenizerPath = Field(default=None, description=(
        "the served model's tokenizer (a model directory or tokenizer.json) for lookups by prompt or messages; null: "
        "fuyao's builtin tokenizer (the engine simulator's default)"))

    @field_validator("tokenizer")
    @classmethod
    def _local_tokenizer(cls, value: str | None) -> str | None:
        if value == "engine":
            raise ValueError("the index tokenizes lookups itself: give builtin or the model's tokenizer (a model "
                             "directory or tokenizer.json); 'engine' is the router's setting")
        return value

    @field_validator("size", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(parse_quantity(value))
            except ValueError:
                raise ValueError(f"expected a Kubernetes quantity such as 10Gi or 500M, got {value!r}") from None
        return value

    @field_validator("eviction_policy", mode="before")
    @classmethod
    def _policy(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _volume_has_room(self) -> KvCacheSection:
        if self.volume.path and self.size == 0:
            raise ValueError("size: 0 with volume.path would delete every block file at each sweep (size is the "
                             "volume's cap); give the volume a size, or no volume.path for an index only")
        return self


class KvCacheConfig(_Section):
    version: Literal["v1"] = CONFIG_VERSION
    listen: HostPort = "127.0.0.1:8100"
    kubeconfig: str | None = None
    kv_cache: KvCacheSection = KvCacheSection()


def build_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> KvCacheConfig:
    return validated(KvCacheConfig, merged(file_values, overrides))


def load_config_file(path: str) -> dict[str, Any]:
    return load_versioned_yaml(path, CONFIG_VERSION)
