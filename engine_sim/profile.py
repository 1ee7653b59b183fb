"""The simulated engine's latency profile (``--latency-profile FILE``, YAML; see ``docs/engine-sim.md``).

One engine step costs ``step_base_ms + prefill_per_token_ms x prefill tokens in the step + decode_per_seq_ms x
decoding sequences``; moving KV between engines (prefill/decode pairs, the shared block tier) costs
``kv_transfer_per_token_ms`` per token. Defaults: a 7B model on one accelerator (about 4k prefill tokens/s per
engine, ~10 ms per decode step at low batch). Unknown keys are an error naming the key.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class LatencyProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    step_base_ms: float = Field(default=10.0, ge=0)
    prefill_per_token_ms: float = Field(default=0.25, ge=0)
    decode_per_seq_ms: float = Field(default=0.25, ge=0)
    kv_transfer_per_token_ms: float = Field(default=0.01, ge=0)


class ProfileError(ValueError):
    pass


def load_profile(path: str | None) -> LatencyProfile:
    if not path:
        return LatencyProfile()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ProfileError(f"latency profile {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"latency profile {path}: expected a mapping of *_ms keys")
    try:
        return LatencyProfile(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ProfileError(f"latency profile {path}: {where}: {first['msg']}") from None
