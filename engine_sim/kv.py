"""The simulated engine's paged KV cache with prefix caching, after vLLM v1's block pool.

- ``num_blocks`` blocks of ``block_size`` tokens. A request holds a list of blocks; a full block whose tokens are
  computed gets its chained hash (``fuyao.kv_blocks``) and enters the prefix cache (hash → block) — unless an
  identical block is already cached — and a ``BlockStored`` event is queued.
- A new request first reuses the cached blocks of its prompt's longest cached prefix (a hit: no prefill cost).
- Free blocks sit in an LRU queue; a request's blocks are freed in reverse order (its tail is evicted first). A
  block taken from the queue that still carries a hash is evicted from the cache: ``BlockRemoved``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fuyao.kv_blocks import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, block_hashes
from fuyao.vllm_hashing import VllmHasher, external


class Chain(Protocol):
    """How blocks are hashed: ``states`` continues a chain over the full blocks of ``tokens`` from ``parent`` (a
    state, or None for the first block); ``key`` is what the cache is keyed by and events carry."""

    def states(self, tokens: Sequence[int], parent: Any, limit: int | None = None) -> list[Any]: ...

    def key(self, state: Any) -> int: ...


class BuiltinChain:
    """fuyao's chain (``fuyao.kv_blocks``): the state is the key."""

    def __init__(self, block_size: int, seed: int = 0):
        self.block_size, self.seed = block_size, seed

    def states(self, tokens: Sequence[int], parent: Any, limit: int | None = None) -> list[Any]:
        return block_hashes(tokens, self.block_size, self.seed, parent=parent, limit=limit)

    @staticmethod
    def key(state: Any) -> int:
        return int(state)


class VllmChain:
    """vLLM's own (``fuyao.vllm_hashing``, ``--prefix-caching-hash-algo``): the state is the full digest, the key
    and the events its low 64 bits, as vLLM's."""

    def __init__(self, block_size: int, algo: str = "sha256", seed: str | None = None):
        self.block_size = block_size
        self.hasher = VllmHasher(algo, seed)

    def states(self, tokens: Sequence[int], parent: Any, limit: int | None = None) -> list[Any]:
        return self.hasher.block_hashes(tokens, self.block_size, parent=parent, limit=limit)

    @staticmethod
    def key(state: Any) -> int:
        return external(state)


@dataclass(eq=False)
class Block:
    id: int
    ref: int = 0
    hash: int | None = None


@dataclass
class Allocation:
    """One request's blocks and how far they are hashed."""

    blocks: list[Block] = field(default_factory=list)
    hashed: int = 0  # leading blocks that carry their hash (cached or duplicates of cached ones)
    parent: Any = None  # the chain state of the last hashed block (see :class:`Chain`)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, seed: int = 0, chain: Chain | None = None):
        self.block_size = block_size
        self.seed = seed
        self.chain: Chain = chain or BuiltinChain(block_size, seed)
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, Block] = OrderedDict((b.id, b) for b in self.blocks)  # LRU first
        self.cached: dict[int, Block] = {}
        self.events: list[KvEvent] = []
        self.queries = 0  # prompt tokens asked of the prefix cache
        self.hits = 0  # prompt tokens found in it

    # Queries -----------------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Share of blocks held by running requests (vLLM's ``kv_cache_usage_perc``, 0..1)."""
        return 1.0 - len(self.free) / len(self.blocks) if self.blocks else 0.0

    def cached_prefix(self, hashes: list[int]) -> list[Block]:
        found = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # Allocation --------------------------------------------------------------------------------------------------
    def start(self, prompt: list[int], count_query: bool = True) -> tuple[Allocation, int]:
        """Reuse the prompt's longest cached prefix; returns the allocation and the number of cached tokens (never
        the whole prompt: the last token is always computed, as in vLLM)."""
        states = self.chain.states(prompt, None, limit=(len(prompt) - 1) // self.block_size)
        hit = self.cached_prefix([self.chain.key(s) for s in states])
        for block in hit:
            self._take(block)
        allocation = Allocation(blocks=list(hit), hashed=len(hit), parent=states[len(hit) - 1] if hit else None)
        cached_tokens = len(hit) * self.block_size
        if count_query:
            self.queries += len(prompt)
            self.hits += cached_tokens
        return allocation, cached_tokens

    def grow(self, allocation: Allocation, tokens: int) -> bool:
        """Make room for ``tokens`` tokens in total; False (nothing taken) when the pool cannot."""
        need = self.blocks_for(tokens) - len(allocation.blocks)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        for _ in range(need):
            _, block = self.free.popitem(last=False)
            self._evict(block)
            block.ref = 1
            allocation.blocks.append(block)
        return True

    def computed(self, allocation: Allocation, tokens: list[int], upto: int) -> None:
        """The first ``upto`` tokens of ``tokens`` have their KV computed: hash and cache the full blocks."""
        full = min(upto // self.block_size, len(allocation.blocks))
        if full <= allocation.hashed:
            return
        start = allocation.hashed * self.block_size
        new = self.chain.states(tokens[start: full * self.block_size], allocation.parent)
        stored_hashes: list[int] = []
        stored_tokens: list[int] = []
        parent = self.chain.key(allocation.parent) if allocation.parent is not None else None
        first_parent = parent
        for offset, state in enumerate(new):
            h = self.chain.key(state)
            index = allocation.hashed + offset
            block = allocation.blocks[index]
            existing = self.cached.get(h)
            if existing is None:
                block.hash = h
                self.cached[h] = block
                if not stored_hashes:
                    first_parent = parent
                stored_hashes.append(h)
                stored_tokens.extend(tokens[index * self.block_size:(index + 1) * self.block_size])
            elif stored_hashes:  # a gap in what is new: publish the run so far
                self.events.append(self._stored(stored_hashes, first_parent, stored_tokens))
                stored_hashes, stored_tokens = [], []
            parent = h
        if stored_hashes:
            self.events.append(self._stored(stored_hashes, first_parent, stored_tokens))
        allocation.hashed = full
        allocation.parent = new[-1]

    def _stored(self, hashes: list[int], parent: int | None, tokens: list[int]) -> BlockStored:
        """The event as vLLM 0.32 writes it (one KV cache group of full attention, no extra keys)."""
        return BlockStored(hashes, parent, tokens, self.block_size, extra_keys=[None] * len(hashes), group_idx=0,
                           kv_cache_spec_kind="full_attention")

    def hashes(self, tokens: Sequence[int], limit: int | None = None) -> list[int]:
        """The cache keys of the full blocks of ``tokens`` (at most ``limit``)."""
        return [self.chain.key(s) for s in self.chain.states(tokens, None, limit=limit)]

    def release(self, allocation: Allocation) -> None:
        """The request is done (or preempted): its blocks go back to the free queue, tail first."""
        for block in reversed(allocation.blocks):
            block.ref -= 1
            if block.ref <= 0:
                block.ref = 0
                self.free[block.id] = block
        allocation.blocks = []
        allocation.hashed = 0
        allocation.parent = None

    def clear(self) -> bool:
        """Drop the whole prefix cache (``AllBlocksCleared``); False, and nothing dropped, while requests hold blocks
        (vLLM's ``BlockPool.reset_prefix_cache``)."""
        if len(self.free) != len(self.blocks):
            return False
        for block in self.blocks:
            block.hash = None
        self.cached.clear()
        self.events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KvEvent]:
        events, self.events = self.events, []
        return events

    # Internals ---------------------------------------------------------------------------------------------------
    def _take(self, block: Block) -> None:
        if block.ref == 0:
            self.free.pop(block.id, None)
        block.ref += 1

    def _evict(self, block: Block) -> None:
        if block.hash is not None:
            if self.cached.get(block.hash) is block:
                del self.cached[block.hash]
                last = self.events[-1] if self.events else None
                if isinstance(last, BlockRemoved):  # one event for a run of evictions
                    last.block_hashes.append(block.hash)
                else:
                    self.events.append(BlockRemoved([block.hash]))
            block.hash = None
