"""KV-cache block hashes and vLLM's KV event wire format, shared by the engine simulator (which computes and
publishes them) and the KV-cache index and router (which reproduce and consume them).

**Block hashes.** A prompt's full blocks of ``block_size`` token ids are hashed as a chain, like vLLM's prefix
cache (each block's hash depends on its tokens and its parent's hash): ``h_i = (h_{i-1} x P + c_i) mod 2^63``,
``c_i = mix(sum_k (t_ik + 1) x W_k mod 2^64)`` with ``mix`` splitmix64's finalizer, ``W_k = mix(k + 1) | 1``,
``P`` the 64-bit golden-ratio constant and ``h_{-1} = root(seed)``: non-negative 63-bit integers, which every
KV-event consumer accepts. The chain is linear in the block contents, so long prompts are hashed with numpy in one
pass (an 8k-token prompt in tens of microseconds) — same values as the scalar path. A partial last block has no
hash (it is not cached). The seed plays the role of vLLM's ``PYTHONHASHSEED``: engines and index must agree.

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
from functools import lru_cache
from typing import Any, Literal

import msgpack
import numpy as np
import orjson
import xxhash

HASH_MASK = (1 << 63) - 1
_M64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
_PRIME = 0x9E3779B97F4A7C15  # odd: invertible modulo 2^64
_PRIME_INV = pow(_PRIME, -1, 1 << 64)
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MEDIUM_GPU = "GPU"
EventFormat = Literal["release", "main", "array"]
VECTOR_FROM_BLOCKS = 24
"""From this many blocks on, hashes are computed with numpy (same values, several times faster)."""


def _mix(x: int) -> int:
    """splitmix64's finalizer (a bijection of 64-bit integers)."""
    x = (x + _PRIME) & _M64
    x = ((x ^ (x >> 30)) * _C1) & _M64
    x = ((x ^ (x >> 27)) * _C2) & _M64
    return x ^ (x >> 31)


@lru_cache(maxsize=64)
def _weights(block_size: int) -> tuple[int, ...]:
    return tuple(_mix(k + 1) | 1 for k in range(block_size))


def root_hash(seed: int = 0) -> int:
    return _mix((seed & _M64) ^ 0x66757961) & HASH_MASK  # "fuya"


def _content(tokens: Sequence[int], weights: tuple[int, ...]) -> int:
    total = 0
    for token, weight in zip(tokens, weights, strict=False):
        total += (token + 1) * weight
    return _mix(total & _M64)


def block_hashes(token_ids: Sequence[int], block_size: int, seed: int = 0, parent: int | None = None,
                 limit: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (at most ``limit``), continuing from ``parent``:
    ``h_i = (h_{i-1} x P + c_i) mod 2^63`` with ``c_i = mix(sum_k (t_ik + 1) x W_k mod 2^64)``. Token ids are
    unsigned 32-bit integers; any other value in the hashed blocks is a ``ValueError`` naming it (on both paths)."""
    full = len(token_ids) // block_size
    if limit is not None:
        full = min(full, limit)
    if full <= 0:
        return []
    previous = root_hash(seed) if parent is None else parent
    weights = _weights(block_size)
    if full >= VECTOR_FROM_BLOCKS:
        return _block_hashes_vector(token_ids, block_size, full, previous, weights)
    hashed = token_ids[: full * block_size]
    if min(hashed) < 0 or max(hashed) > _U32:
        raise ValueError(f"token ids must be in 0..{_U32}: got {min(hashed) if min(hashed) < 0 else max(hashed)}")
    out = []
    for start in range(0, full * block_size, block_size):
        previous = (previous * _PRIME + _content(token_ids[start:start + block_size], weights)) & HASH_MASK
        out.append(previous)
    return out


def key_space(adapter: str | None, salt: str | None) -> int:
    """The space a request's block keys live in apart from the plain chain (0: the plain chain itself). vLLM's block
    hash covers more than the tokens (0.32 ``generate_block_hash_extra_keys``): the LoRA adapter on every block and
    the request's ``cache_salt`` on the first (so, through the parents, on the whole chain); the same tokens under
    another adapter or salt never share blocks there. The router (from a request's ``model`` and ``cache_salt``) and
    the KV index (from an event's ``lora_name`` and ``extra_keys``) both key such blocks as the plain chain xor this,
    so that each finds the other's. The adapter is named, not numbered (``lora_id`` is per engine)."""
    if adapter is None and not salt:
        return 0
    return xxhash.xxh3_64_intdigest(orjson.dumps(["lora", adapter, "cache_salt", salt or None])) & HASH_MASK


def in_space(hashes: Sequence[int], space: int) -> list[int]:
    """``hashes`` (a plain chain) moved into ``space`` (:func:`key_space`); a chain's prefixes stay its prefixes."""
    return [(h ^ space) & HASH_MASK for h in hashes] if space else list(hashes)


_powers: dict[str, np.ndarray] = {}


def _power_table(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P^i and P^-i modulo 2^64 for i < n (grown on demand)."""
    have = _powers.get("up")
    if have is None or len(have) < n:
        size = max(n, 1024)
        up = np.full(size, _PRIME, dtype=np.uint64)
        up[0] = 1
        down = np.full(size, _PRIME_INV, dtype=np.uint64)
        down[0] = 1
        _powers["up"], _powers["down"] = np.multiply.accumulate(up), np.multiply.accumulate(down)
    return _powers["up"][:n], _powers["down"][:n]


def _block_hashes_vector(token_ids: Sequence[int], block_size: int, full: int, previous: int,
                         weights: tuple[int, ...]) -> list[int]:
    """The same chain with numpy: ``h_i = P^i (P h_{-1} + sum_{j<=i} c_j P^-j)``, all modulo 2^64, then 2^63."""
    try:
        packed = array("I", token_ids[: full * block_size])
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in 0..{_U32}: {exc}") from None
    tokens = np.frombuffer(packed, dtype=np.uint32).astype(np.uint64)
    x = (tokens.reshape(full, block_size) + np.uint64(1)) * np.array(weights, dtype=np.uint64)
    x = x.sum(axis=1, dtype=np.uint64) + np.uint64(_PRIME)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_C1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_C2)
    content = x ^ (x >> np.uint64(31))
    up, down = _power_table(full)
    chain = up * (np.uint64(previous * _PRIME & _M64) + np.add.accumulate(content * down, dtype=np.uint64))
    hashes: list[int] = (chain & np.uint64(HASH_MASK)).tolist()
    return hashes


@dataclass(frozen=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None
    extra_keys: list[Any] | None = None  # per block (vLLM 0.32: LoRA, multimodal and cache-salt keys, or None)
    group_idx: int | None = None  # the KV cache group (vLLM 0.32)
    kv_cache_spec_kind: str | None = None  # e.g. "full_attention" (vLLM 0.32)


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU
    group_idx: int | None = None  # the KV cache group (vLLM 0.32)


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
                    "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}
_TYPES = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved, "AllBlocksCleared": AllBlocksCleared}


_NEWER = ("extra_keys", "group_idx", "kv_cache_spec_kind")
"""Fields vLLM 0.32 added to BlockStored: written when set (never in the older ``array`` envelope)."""


def _event_value(event: KvEvent, fmt: EventFormat) -> Any:
    name = type(event).__name__
    fields = [f for f in _FIELDS[name] if f not in _NEWER or (fmt != "array" and getattr(event, f) is not None)]
    values = [getattr(event, f) for f in fields]
    if fmt == "array":
        return [name, *values]
    return {"type": name, **dict(zip(fields, values, strict=True))}


def encode_batch(batch: EventBatch, fmt: EventFormat = "release") -> bytes:
    events = [_event_value(e, fmt) for e in batch.events]
    if fmt == "main":
        body: Any = {"ts": batch.ts, "events": events}
        if batch.data_parallel_rank is not None:
            body["data_parallel_rank"] = batch.data_parallel_rank
    else:
        body = [batch.ts, events] + ([batch.data_parallel_rank] if batch.data_parallel_rank is not None else [])
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


class EventDecodeError(ValueError):
    """The payload is not a KV event batch in any vLLM encoding; the message says what is wrong."""


def _int_hash(value: Any) -> Any:
    return int.from_bytes(value, "big") & 0xFFFF_FFFF_FFFF_FFFF if isinstance(value, bytes) else value


def _event(raw: Any) -> KvEvent | None:
    if isinstance(raw, dict):
        name = raw.get("type")
        values = {k: raw.get(k) for k in _FIELDS.get(name, ())} if isinstance(name, str) else {}
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        name = raw[0]
        values = dict(zip(_FIELDS.get(name, ()), raw[1:], strict=False))
    else:
        raise EventDecodeError(f"an event must be a tagged map or array, got {type(raw).__name__}")
    kind = _TYPES.get(name) if isinstance(name, str) else None
    if kind is None:
        return None  # an event type a newer vLLM added: skipped
    if kind is not AllBlocksCleared and not isinstance(values.get("block_hashes"), list):
        raise EventDecodeError(f"{name}.block_hashes: expected an array")
    if kind is BlockStored and (not isinstance(values.get("token_ids"), list)
                                or not isinstance(values.get("block_size"), int)):
        raise EventDecodeError("BlockStored: token_ids (array) and block_size (int) are required")
    if kind is not AllBlocksCleared:  # bytes hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0): their low 64 bits,
        # the integer vLLM publishes otherwise, so either stream meets the same lookups
        values["block_hashes"] = [_int_hash(h) for h in values["block_hashes"] or ()]
        if isinstance(values.get("parent_block_hash"), bytes):
            values["parent_block_hash"] = _int_hash(values["parent_block_hash"])
    event: KvEvent = kind(**{k: v for k, v in values.items() if k in _FIELDS[kind.__name__]})
    return event


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
