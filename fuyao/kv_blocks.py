"""KV-cache block hashes and vLLM's KV event wire format, shared by the engine simulator (which computes and
publishes them) and the KV-cache index and router (which reproduce and consume them).

**Block hashes.** A prompt's full blocks of ``block_size`` token ids are hashed as a chain, like vLLM's prefix
cache: ``h_i = xxh3_64(h_{i-1} as 8 bytes LE || block token ids as uint32 LE) & (2^63 - 1)`` with
``h_{-1} = root(seed)``; non-negative 63-bit integers, which every KV-event consumer accepts. A partial last block
has no hash (it is not cached). The seed plays the role of vLLM's ``PYTHONHASHSEED``: engines and index must agree.

**Events** (vllm/distributed/kv_events.py): ZMQ multipart ``[topic, seq (8-byte big-endian), payload]``; payload a
msgpack ``EventBatch`` of tagged events ``BlockStored{block_hashes, parent_block_hash, token_ids, block_size,
lora_id, medium, lora_name}``, ``BlockRemoved{block_hashes, medium}``, ``AllBlocksCleared{}``. vLLM releases
differ in the envelope: ``release`` (what vllm-router and most consumers decode) packs the batch as an array
``[ts, events, data_parallel_rank]`` and each event as a map with ``"type"``; ``main`` packs the batch as a map
too; ``array`` (older releases) packs events as arrays ``["BlockStored", ...fields]``. :func:`decode_batch`
accepts all three.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import xxhash

HASH_MASK = (1 << 63) - 1
MEDIUM_GPU = "GPU"
EventFormat = Literal["release", "main", "array"]


def root_hash(seed: int = 0) -> int:
    return xxhash.xxh3_64_intdigest(b"fuyao-kv-root" + seed.to_bytes(8, "little", signed=True)) & HASH_MASK


def block_hashes(token_ids: Sequence[int], block_size: int, seed: int = 0, parent: int | None = None,
                 limit: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (at most ``limit``), continuing from ``parent``."""
    full = len(token_ids) // block_size
    if limit is not None:
        full = min(full, limit)
    if full <= 0:
        return []
    data = array("I", token_ids[: full * block_size]).tobytes()
    step = block_size * 4
    digest = xxhash.xxh3_64_intdigest
    h = root_hash(seed) if parent is None else parent
    out = []
    for start in range(0, full * step, step):
        h = digest(h.to_bytes(8, "little") + data[start:start + step]) & HASH_MASK
        out.append(h)
    return out


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class EventBatch:
    ts: float
    events: list[KvEvent] = field(default_factory=list)
    data_parallel_rank: int | None = None


_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                    "lora_name"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}
_TYPES = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved, "AllBlocksCleared": AllBlocksCleared}


def _event_value(event: KvEvent, fmt: EventFormat) -> Any:
    name = type(event).__name__
    values = [getattr(event, f) for f in _FIELDS[name]]
    if fmt == "array":
        return [name, *values]
    return {"type": name, **dict(zip(_FIELDS[name], values, strict=True))}


def encode_batch(batch: EventBatch, fmt: EventFormat = "release") -> bytes:
    events = [_event_value(e, fmt) for e in batch.events]
    if fmt == "main":
        body: Any = {"ts": batch.ts, "events": events}
        if batch.data_parallel_rank is not None:
            body["data_parallel_rank"] = batch.data_parallel_rank
    else:
        body = [batch.ts, events] + ([batch.data_parallel_rank] if batch.data_parallel_rank is not None else [])
    return msgpack.packb(body, use_bin_type=True)


class EventDecodeError(ValueError):
    """The payload is not a KV event batch in any vLLM encoding; the message says what is wrong."""


def _event(raw: Any) -> KvEvent | None:
    if isinstance(raw, dict):
        name = raw.get("type")
        values = {k: raw.get(k) for k in _FIELDS.get(name, ())} if isinstance(name, str) else {}
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        name = raw[0]
        values = dict(zip(_FIELDS.get(name, ()), raw[1:], strict=False))
    else:
        raise EventDecodeError(f"an event must be a tagged map or array, got {type(raw).__name__}")
    kind = _TYPES.get(name)  # type: ignore[arg-type]
    if kind is None:
        return None  # an event type a newer vLLM added: skipped
    if kind is not AllBlocksCleared and not isinstance(values.get("block_hashes"), list):
        raise EventDecodeError(f"{name}.block_hashes: expected an array")
    if kind is BlockStored and (not isinstance(values.get("token_ids"), list)
                                or not isinstance(values.get("block_size"), int)):
        raise EventDecodeError("BlockStored: token_ids (array) and block_size (int) are required")
    return kind(**{k: v for k, v in values.items() if k in _FIELDS[name]})  # type: ignore[arg-type]


def decode_batch(payload: bytes) -> EventBatch:
    """An :class:`EventBatch` from any of vLLM's encodings; unknown event types are skipped."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise EventDecodeError(f"not msgpack: {exc}") from None
    if isinstance(body, dict):
        ts, events, rank = body.get("ts"), body.get("events"), body.get("data_parallel_rank")
    elif isinstance(body, list) and len(body) >= 2:
        ts, events, rank = body[0], body[1], body[2] if len(body) > 2 else None
    else:
        raise EventDecodeError("an event batch must be [ts, events, rank?] or {ts, events, data_parallel_rank?}")
    if not isinstance(ts, int | float) or not isinstance(events, list):
        raise EventDecodeError("event batch: ts must be a number and events an array")
    return EventBatch(float(ts), [e for raw in events if (e := _event(raw)) is not None],
                      rank if isinstance(rank, int) else None)


def topic(host: str, model: str) -> str:
    """vLLM's conventional topic: ``kv@<pod ip>@<model>``."""
    return f"kv@{host}@{model}"
