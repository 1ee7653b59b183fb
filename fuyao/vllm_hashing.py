"""vLLM's own prefix-cache block hashes (``vllm/v1/core/kv_cache_utils.py`` ``hash_block_tokens``, with the functions
of ``vllm/utils/hashing.py``), for the engine simulator's ``--prefix-caching-hash-algo`` and for lookups in an
engine's own hash space:

- ``h_i = H((h_{i-1}, tuple(block token ids), extra_keys))`` with ``h_{-1} = NONE_HASH = H(seed)``, where ``H`` is
  ``sha256`` (pickle, protocol 5, then SHA-256; vLLM's default), ``sha256_cbor`` (canonical CBOR, then SHA-256),
  ``xxhash`` / ``xxhash_cbor`` (the same serialisations, then XXH3-128);
- the seed is ``PYTHONHASHSEED`` when set; otherwise ``"vllm-none-hash"`` for the SHA-256 ones and random bytes per
  process for the xxhash ones (so two such engines never agree — why fuyao's index keys blocks by content);
- KV events carry :func:`external` of a hash: its low 64 bits, big-endian (``maybe_convert_block_hash``).

Checked against vLLM's own functions in ``tests/vllm``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any

import xxhash as _xxhash

ALGORITHMS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
DEFAULT_SEED = "vllm-none-hash"
_CRYPTO = {"sha256", "sha256_cbor"}


def _cbor(value: Any, out: bytearray) -> None:
    """Canonical CBOR (cbor2's ``canonical=True``) of what block keys hold: ints, bytes, str, None, bools, floats,
    tuples and lists."""

    def head(major: int, n: int) -> None:
        if n < 24:
            out.append(major << 5 | n)
        elif n < 0x100:
            out.extend((major << 5 | 24, n))
        elif n < 0x10000:
            out.append(major << 5 | 25)
            out.extend(n.to_bytes(2, "big"))
        elif n < 0x100000000:
            out.append(major << 5 | 26)
            out.extend(n.to_bytes(4, "big"))
        else:
            out.append(major << 5 | 27)
            out.extend(n.to_bytes(8, "big"))

    if value is None:
        out.append(0xF6)
    elif value is True or value is False:
        out.append(0xF5 if value else 0xF4)
    elif isinstance(value, int):
        if not -(2**64) <= value < 2**64:
            raise ValueError(f"integer {value} does not fit CBOR's 64 bits")
        head(0, value) if value >= 0 else head(1, -1 - value)
    elif isinstance(value, bytes | bytearray):
        head(2, len(value))
        out += value
    elif isinstance(value, str):
        raw = value.encode()
        head(3, len(raw))
        out += raw
    elif isinstance(value, tuple | list):
        head(4, len(value))
        for item in value:
            _cbor(item, out)
    elif isinstance(value, float):  # canonical: the shortest exact form (here: float64 unless it fits in 32 bits)
        packed32 = struct.pack(">f", value)
        if struct.unpack(">f", packed32)[0] == value:
            out.append(0xFA)
            out += packed32
        else:
            out.append(0xFB)
            out += struct.pack(">d", value)
    else:
        raise TypeError(f"cannot hash a {type(value).__name__} in a block key")


def cbor(value: Any) -> bytes:
    out = bytearray()
    _cbor(value, out)
    return bytes(out)


def hash_function(algo: str) -> Callable[[Any], bytes]:
    if algo == "sha256":
        return lambda v: hashlib.sha256(pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    if algo == "sha256_cbor":
        return lambda v: hashlib.sha256(cbor(v)).digest()
    if algo == "xxhash":
        return lambda v: _xxhash.xxh3_128_digest(pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL))
    if algo == "xxhash_cbor":
        return lambda v: _xxhash.xxh3_128_digest(cbor(v))
    raise ValueError(f"unknown prefix-caching hash algorithm {algo!r}; expected one of {', '.join(ALGORITHMS)}")


def resolve_seed(algo: str) -> str:
    """The seed vLLM derives ``NONE_HASH`` from in a process with this environment."""
    seed = os.environ.get("PYTHONHASHSEED")
    if seed is not None:
        return seed
    return DEFAULT_SEED if algo in _CRYPTO else os.urandom(32).hex()


class VllmHasher:
    """One engine's chain: ``algo`` and the seed it resolved (``None``: as a vLLM process here would)."""

    def __init__(self, algo: str = "sha256", seed: str | None = None):
        self.algo = algo
        self.fn = hash_function(algo)
        self.seed = resolve_seed(algo) if seed is None else seed
        self.none_hash = self.fn(self.seed)

    def block_hashes(self, token_ids: Sequence[int], block_size: int, parent: bytes | None = None,
                     extra_keys: tuple[Any, ...] | None = None, limit: int | None = None) -> list[bytes]:
        """The full blocks' hashes (at most ``limit``), continuing from ``parent`` (``None``: the first block)."""
        full = len(token_ids) // block_size
        if limit is not None:
            full = min(full, limit)
        out = []
        previous = parent or self.none_hash
        for start in range(0, full * block_size, block_size):
            previous = self.fn((previous, tuple(token_ids[start:start + block_size]), extra_keys))
            out.append(previous)
        return out


def external(block_hash: bytes) -> int:
    """What a KV event carries for a block hash: its low 64 bits, big-endian."""
    return int.from_bytes(block_hash, "big") & ((1 << 64) - 1)
