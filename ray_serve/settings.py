"""The Serve application's arguments (``args:`` of a Serve config / RayService ``serveConfigV2``, or the builder's
dict), validated before anything starts: a bad value is a :class:`~fuyao.config_files.ConfigError` naming the field.
camelCase keys like every fuyao config (snake_case ones still load, with a deprecation warning).

```yaml
args:
  replicas: 2                   # engine replicas, one engine process each
  npusPerReplica: 1           # Ray resource NPU per replica (the engine's tensor-parallel size)
  maxOngoingRequests: 64
  engine:
    module: fuyao.engine_sim.cli      # python -m <module> <args>; vLLM: vllm.entrypoints.openai.api_server
    args: ["--host", "{host}", "--port", "{port}", "--model", "{model}", "--kv-events-endpoint", "tcp://*:{kv_events_port}"]
    model: fuyao-sim
    port: 8100                  # + the replica's first NPU slot: one engine per NPU slot on a node
    kvEventsPort: 5557        # + the same slot
    readTimeout: 600s           # the engine silent this long within an answer: 504
  router:
    policy: kv-index            # power-of-two (Serve's default) | prefix-tree (Serve's PrefixCacheAffinityRouter)
    kvIndexUrl: http://fuyao-kvcache:8100
```
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fuyao.config_files import ConfigSection, Seconds, validated

DEFAULT_ENGINE_ARGS = ("--host", "{host}", "--port", "{port}", "--model", "{model}",
                       "--kv-events-endpoint", "tcp://*:{kv_events_port}")
PLACEHOLDERS = ("host", "port", "kv_events_port", "model")
MAX_SLOTS = 16
"""NPU slots a node may have (an Atlas 900 A3 node's 16 dies): each adds its number to the engine's ports."""

ROUTER_CLASSES = {
    "power-of-two": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    "prefix-tree": "ray.serve.llm.request_router:PrefixCacheAffinityRouter",
    "kv-index": "fuyao.ray_serve.request_router:KvIndexRequestRouter",
}
"""Routing policies by name → Serve request-router class paths (Serve's default, Serve's own prefix router, and
fuyao's KV-index router): the factory of :func:`router_config`. ``prefix-tree`` imports Ray's LLM module, which
needs ``ray[llm]`` (vLLM or SGLang) in the Ray image."""


class EngineSettings(ConfigSection):
    module: str = Field(default="fuyao.engine_sim.cli", min_length=1,
                        description="the engine's Python module, run as python -m MODULE ARGS")
    args: tuple[str, ...] = Field(default=DEFAULT_ENGINE_ARGS,
                                  description="arguments; {host} {port} {kv_events_port} {model} are filled in")
    model: str = Field(default="fuyao-sim", min_length=1, description="the served model name")
    host: str = Field(default="0.0.0.0", description="where the engine listens (its pod's or node's address)")
    port: int = Field(default=8100, ge=1, le=65535, description="base HTTP port; + the first NPU slot")
    kv_events_port: int = Field(default=5557, ge=1, le=65535, description="base KV-events port; + the slot")
    startup_timeout: Seconds = 180.0
    read_timeout: Seconds = Field(default=600.0, description="longest silence of the engine within an answer "
                                  "before the request fails with 504 (a non-streamed answer comes in one piece at "
                                  "the end: above the longest generation)")
    stop_timeout: Seconds = Field(default=10.0, description="from SIGTERM to SIGKILL when the replica stops its "
                                  "engine (its process group and every process below it)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the engine process "
                                "(not ASCEND_RT_VISIBLE_DEVICES: the replica's NPU slots set it)")

    @field_validator("env")
    @classmethod
    def _npus_from_ray(cls, env: dict[str, str]) -> dict[str, str]:
        if "ASCEND_RT_VISIBLE_DEVICES" in env:
            raise ValueError("ASCEND_RT_VISIBLE_DEVICES is set from the NPU slots Ray gives each replica")
        return env

    @model_validator(mode="after")
    def _port_ranges_apart(self) -> EngineSettings:
        # an engine listens on port + slot and publishes on kvEventsPort + slot: a node's slots must not make the
        # two ranges meet, or run past the last port
        if abs(self.port - self.kv_events_port) < MAX_SLOTS:
            raise ValueError(f"port ({self.port}) and kvEventsPort ({self.kv_events_port}) must be at least "
                             f"{MAX_SLOTS} apart: each NPU slot of a node adds its number to both")
        for name, base in (("port", self.port), ("kvEventsPort", self.kv_events_port)):
            if base + MAX_SLOTS - 1 > 65535:
                raise ValueError(f"{name} {base} + an NPU slot up to {MAX_SLOTS - 1} is past port 65535")
        return self

    @field_validator("args")
    @classmethod
    def _placeholders_known(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        for arg in args:
            try:
                names = [name for _, name, _, _ in string.Formatter().parse(arg) if name is not None]
            except ValueError as exc:
                raise ValueError(f"engine argument {arg!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
            for name in names:
                if name not in PLACEHOLDERS:
                    raise ValueError(f"engine argument {arg!r} names {{{name}}}; known: "
                                     f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        return args

    def command_args(self, host: str, port: int, kv_events_port: int) -> list[str]:
        values = {"host": host, "port": port, "kv_events_port": kv_events_port, "model": self.model}
        return [arg.format(**values) for arg in self.args]


class RouterSettings(ConfigSection):
    policy: Literal["power-of-two", "prefix-tree", "kv-index"] = "power-of-two"
    kv_index_url: str | None = Field(default=None, pattern=r"^https?://",
                                     description="fuyao-kvcache's URL (the kv-index policy)")
    lookup_timeout: Seconds = 0.2
    index_failure_threshold: int = Field(default=3, ge=1, description="failed index lookups in a row that make the "
                                         "router stop asking it for indexCoolDown (route on load alone)")
    index_cool_down: Seconds = Field(default=10.0, description="how long the index is not asked after "
                                     "indexFailureThreshold failures; then one request probes it")
    min_hit: float = Field(default=0.0, ge=0.0, le=1.0,
                           description="below this share of the prompt cached anywhere, route on load alone")
    tolerance_blocks: int = Field(default=0, ge=0,
                                  description="replicas within this many blocks of the best hit share its rank")

    @model_validator(mode="after")
    def _index_for_kv_policy(self) -> RouterSettings:
        if self.policy == "kv-index" and not self.kv_index_url:
            raise ValueError("the kv-index policy needs kvIndexUrl (fuyao-kvcache's URL)")
        return self


class AppSettings(ConfigSection):
    replicas: int = Field(default=2, ge=1)
    npus_per_replica: float = Field(default=1.0, gt=0)
    num_cpus: float = Field(default=0.0, ge=0, description="Ray CPUs per engine replica (the engine is a process)")
    max_ongoing_requests: int = Field(default=64, ge=1)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)

    @field_validator("npus_per_replica")
    @classmethod
    def _whole_above_one(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"above 1 an engine takes whole NPUs (1, 2, 4...), got {value:g}")
        return value


def app_settings(args: Mapping[str, Any] | None) -> AppSettings:
    """The application's settings from its ``args`` (None: the defaults), or ConfigError naming the bad field."""
    return validated(AppSettings, dict(args or {}))


def router_config(settings: RouterSettings) -> dict[str, Any]:
    """Serve's ``request_router_config`` (as a dict) for the policy."""
    config: dict[str, Any] = {"request_router_class": ROUTER_CLASSES[settings.policy]}
    if settings.policy == "kv-index":
        config["request_router_kwargs"] = {
            "kv_index_url": settings.kv_index_url, "lookup_timeout": settings.lookup_timeout,
            "min_hit": settings.min_hit, "tolerance_blocks": settings.tolerance_blocks,
            "index_failure_threshold": settings.index_failure_threshold,
            "index_cool_down": settings.index_cool_down}
    return config
