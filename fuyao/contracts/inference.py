"""Inference keys: prefill/decode roles and groups, the Service annotations that enable the router, the engine pods
the KV-cache index follows, and the router's settings from a Service."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from ..config_files import parse_duration
from .base import ContractError, parse_enum
from .labels import LABEL_APP, LABEL_ZONE

# Prefill/decode ------------------------------------------------------------------------------------------------
LABEL_PHASE = "phase"
"""``prefill`` or ``decode`` (the design doc's PD key)."""
LABEL_LLMD_ROLE = "llm-d.ai/role"
"""llm-d's key: ``prefill``, ``decode``, ``both`` or ``prefill-decode``."""
LABEL_PD_GROUP = "inference.openfuyao.com/pd-group"
"""Groups prefill and decode pods of one service when the ``app`` label is not specific enough."""
LABEL_PD_TOPOLOGY_DEFAULT = LABEL_ZONE
"""Default topology domain for prefill/decode affinity beyond the node (configurable in the extender)."""


class Phase(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


def parse_phase(labels: Mapping[str, str]) -> Phase | None:
    """Prefill/decode role of a pod: the design doc's ``phase`` label first, then llm-d's ``llm-d.ai/role``."""
    if LABEL_PHASE in labels:
        return parse_enum(Phase, LABEL_PHASE, labels[LABEL_PHASE], case_insensitive=True)
    if LABEL_LLMD_ROLE in labels:
        raw = labels[LABEL_LLMD_ROLE]
        if raw.strip().lower() == "prefill-decode":
            return Phase.BOTH
        return parse_enum(Phase, LABEL_LLMD_ROLE, raw, case_insensitive=True)
    return None


def pd_group(labels: Mapping[str, str]) -> str | None:
    """The prefill/decode group of a pod: ``inference.openfuyao.com/pd-group``, else the ``app`` label."""
    return labels.get(LABEL_PD_GROUP) or labels.get(LABEL_APP) or None


# Service annotations of the design doc (the doc writes ``inference.openFuyao.com``; keys must be lowercase) -------
ANNOTATION_ENABLE_ROUTER = "inference.openfuyao.com/enable-router"
ANNOTATION_KV_CACHE_POLICY = "inference.openfuyao.com/kv-cache-policy"
ANNOTATION_HEALTH_CHECK_PATH = "inference.openfuyao.com/health-check-path"
ANNOTATION_HEALTH_CHECK_INTERVAL = "inference.openfuyao.com/health-check-interval"


class KvCachePolicy(StrEnum):
    """Eviction policy of the shared KV block tier."""

    LRU = "LRU"
    LFU = "LFU"
    FIFO = "FIFO"


class RouterServiceSettings(BaseModel):
    """What a Service's ``inference.openfuyao.com/*`` annotations ask of the router."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = False
    kv_cache_policy: KvCachePolicy | None = None
    health_check_path: str = "/health"
    health_check_interval_s: float = 10.0

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> RouterServiceSettings:
        enabled_raw = annotations.get(ANNOTATION_ENABLE_ROUTER, "false").strip().lower()
        if enabled_raw not in ("true", "false"):
            raise ContractError(ANNOTATION_ENABLE_ROUTER, 'expected "true" or "false"',
                                value=annotations[ANNOTATION_ENABLE_ROUTER])
        settings: dict[str, object] = {"enabled": enabled_raw == "true"}
        if ANNOTATION_KV_CACHE_POLICY in annotations:
            settings["kv_cache_policy"] = parse_enum(
                KvCachePolicy, ANNOTATION_KV_CACHE_POLICY, annotations[ANNOTATION_KV_CACHE_POLICY],
                case_insensitive=True)
        if ANNOTATION_HEALTH_CHECK_PATH in annotations:
            path = annotations[ANNOTATION_HEALTH_CHECK_PATH].strip()
            if not path.startswith("/") or any(c.isspace() for c in path):
                raise ContractError(ANNOTATION_HEALTH_CHECK_PATH, "expected an absolute URL path such as /health",
                                    value=path)
            settings["health_check_path"] = path
        if ANNOTATION_HEALTH_CHECK_INTERVAL in annotations:
            raw = annotations[ANNOTATION_HEALTH_CHECK_INTERVAL]
            try:
                settings["health_check_interval_s"] = parse_duration(raw)
            except ValueError as exc:
                raise ContractError(ANNOTATION_HEALTH_CHECK_INTERVAL, str(exc), value=raw) from None
        return cls.model_validate(settings)


# Engine pods whose KV events the KV-cache index follows (fuyao-kvcache discovery) --------------------------------
LABEL_KV_EVENTS = "inference.openfuyao.com/kv-events"
"""Pod label (any value) marking an engine that publishes KV events; the index's default discovery selector."""
ANNOTATION_KV_EVENTS_PORT = "inference.openfuyao.com/kv-events-port"
"""Pod annotation: the engine's KV event PUB port (default 5557, vLLM's)."""
ANNOTATION_KV_REPLAY_PORT = "inference.openfuyao.com/kv-events-replay-port"
"""Pod annotation: the engine's KV event replay (ROUTER) port, if it has one."""
ANNOTATION_SERVED_MODEL = "inference.openfuyao.com/model"
"""Pod annotation: the model name the engine serves (``--model`` / ``--served-model-name``)."""
DEFAULT_KV_EVENTS_PORT = 5557
DEFAULT_ENGINE_HTTP_PORT = 8000
