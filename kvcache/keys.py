"""How a prompt's blocks are named in the index: one setting (``kv_cache.block_hashing``) shared by the router and
``fuyao-kvcache``, and the function that turns token ids into those names.

- ``content`` (the default): fuyao's own chain over the blocks' tokens (``fuyao.kv_blocks``). Engines' events are
  translated into it from their ``token_ids`` (see ``fuyao.kvcache.index``), so any hash algorithm and seed match, a
  mixed fleet too.
- ``vllm``: vLLM's own block hashes (``fuyao.vllm_hashing``), for event streams that carry no ``token_ids``: the
  events' hashes are taken as they are, and prompts are hashed exactly as the engines hash them. Every engine must
  then use the same ``--prefix-caching-hash-algo`` (``algo``) and the same ``PYTHONHASHSEED`` (``seed``; null: vLLM's
  default, which exists for the SHA-256 algorithms only: the xxhash ones draw a random seed per process).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fuyao.kv_blocks import block_hashes
from fuyao.vllm_hashing import DEFAULT_SEED, VllmHasher, external

HashAlgo = Literal["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]


class BlockHashing(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["content", "vllm"] = Field(default="content", description=(
        "content: key blocks by their tokens (works with any engine hash); vllm: use the engines' own hashes "
        "(streams without token_ids)"))
    algo: HashAlgo = Field(default="sha256", description="vllm mode: the engines' --prefix-caching-hash-algo")
    seed: str | None = Field(default=None, description=(
        "vllm mode: the engines' PYTHONHASHSEED; null: vLLM's default seed (SHA-256 algorithms only)"))

    @model_validator(mode="after")
    def _seed_known(self) -> BlockHashing:
        if self.mode == "vllm" and self.algo.startswith("xxhash") and self.seed is None:
            raise ValueError(f"algo {self.algo} with no seed: vLLM's xxhash engines draw a random seed per process "
                             "unless PYTHONHASHSEED is set; give that seed, or use mode: content")
        return self


class BlockKeys(Protocol):
    exact: bool
    """True: events' block hashes are the index's keys as they are (no translation from their tokens)."""

    def chain(self, token_ids: Sequence[int], limit: int | None = None) -> list[int]:
        """The keys of the full blocks of ``token_ids`` (at most ``limit``)."""
        ...


class ContentKeys:
    exact = False

    def __init__(self, block_size: int, seed: int = 0):
        self.block_size, self.seed = block_size, seed

    def chain(self, token_ids: Sequence[int], limit: int | None = None) -> list[int]:
        return block_hashes(token_ids, self.block_size, self.seed, limit=limit)


class VllmKeys:
    """vLLM's hashes, as its events carry them (the low 64 bits)."""

    exact = True

    def __init__(self, block_size: int, algo: str = "sha256", seed: str | None = None):
        self.block_size = block_size
        self.hasher = VllmHasher(algo, seed if seed is not None else DEFAULT_SEED)

    def chain(self, token_ids: Sequence[int], limit: int | None = None) -> list[int]:
        return [external(h) for h in self.hasher.block_hashes(token_ids, self.block_size, limit=limit)]


def block_keys(block_size: int, seed: int = 0, hashing: BlockHashing | None = None) -> BlockKeys:
    """The keys for this setting (``seed``: the content chain's)."""
    hashing = hashing or BlockHashing()
    if hashing.mode == "vllm":
        return VllmKeys(block_size, hashing.algo, hashing.seed)
    return ContentKeys(block_size, seed)
