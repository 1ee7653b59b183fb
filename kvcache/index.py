"""The global KV-cache index: which engine (endpoint) holds which block, fed by the engines' KV events.

Each engine gets a bit; the index maps a block hash to the bitmask of the engines holding it, and keeps, per
engine, its set of hashes (so ``AllBlocksCleared``, a lost stream or a departed pod drop exactly that engine's
entries). A lookup hashes the prompt's full blocks with the shared chain (``fuyao.kv_blocks``), fetches all their
masks in one pass and ANDs them cumulatively: an engine's cached prefix ends where its bit first drops out.
Blocks held in another medium than GPU (CPU offload) are remembered per (block, engine).

**Blocks are keyed by content**, not by the engine's hash: a ``BlockStored`` carries the blocks' ``token_ids`` and
its parent's hash, so the index computes its own chain (``fuyao.kv_blocks``) from the tokens, continuing from its
own hash of the parent, and remembers per engine which of its hashes each engine hash stands for (``BlockRemoved``
names engine hashes). Lookups then match whatever each engine's hash algorithm and seed are (vLLM's sha256 or
xxhash, a per-process random seed, a mixed or upgraded fleet). A block whose parent the index never saw, or an
event of another block size, cannot be placed and is skipped (fewer hits, never a wrong one). An engine that
hashes exactly as the index does (the simulator) is recognised per event by its first block, and its hashes are
taken as they are. Events without ``token_ids`` are taken as they are too (the engine must then hash like the
index), and so is every event with ``keys`` in vLLM's own hashes (``kv_cache.block_hashing.mode: vllm``, see
``fuyao.kvcache.keys``).

Single writer: the subscriber thread applies events; lookups may run in other threads (a dict read is atomic in
CPython, and a lookup racing an update sees either state of a block).
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

from fuyao.kv_blocks import (
    HASH_MASK,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvent,
    block_hashes,
    in_space,
    key_space,
)

from .keys import BlockKeys, ContentKeys

log = logging.getLogger(__name__)


@dataclass
class EndpointState:
    name: str
    bit: int
    model: str = ""
    hashes: set[int] = field(default_factory=set)
    block_size: int | None = None
    ours: dict[int, int] = field(default_factory=dict)  # engine block hash → the index's content hash
    spaces: dict[int, int] = field(default_factory=dict)  # engine block hash → its key space, when not 0 (LoRA, salt)
    removed: OrderedDict[int, int] = field(default_factory=OrderedDict)  # recently removed, for late children
    skipped: int = 0  # blocks that could not be placed (parent unknown, other block size)
    size_warned: bool = False

    def translate(self, engine_hash: int) -> int | None:
        found = self.ours.get(engine_hash)
        return found if found is not None else self.removed.get(engine_hash)


DEFAULT_RESIDENCY = ("GPU", 0)
REMEMBER_REMOVED = 4096
"""Removed blocks whose content hash is kept per engine, for children stored after their parent was evicted."""


def _residency(event: BlockStored | BlockRemoved) -> tuple[str, int]:
    """Where an event says the blocks are: (medium, KV cache group); vLLM's None is the GPU, group 0."""
    return event.medium or "GPU", event.group_idx or 0


class KvIndex:
    def __init__(self, block_size: int = 16, seed: int = 0, keys: BlockKeys | None = None):
        self.block_size = block_size
        self.seed = seed
        self.keys = keys or ContentKeys(block_size, seed)
        self.blocks: dict[int, int] = {}  # hash → bitmask of endpoints
        self.where: dict[tuple[int, str], set[tuple[str, int]]] = {}
        """(hash, endpoint) → where the engine holds the block, as (medium, KV cache group), kept only when that is
        not just :data:`DEFAULT_RESIDENCY`: vLLM reports the same block per medium (GPU, and CPU when it offloads)
        and per group (hybrid models), and a removal from one leaves it in the others."""
        self.endpoints: dict[str, EndpointState] = {}
        self._by_bit: dict[int, str] = {}
        self.events_applied = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def endpoint(self, name: str, model: str = "") -> EndpointState:
        state = self.endpoints.get(name)
        if state is None:
            bit = next(b for b in itertools.count() if b not in self._by_bit)
            state = self.endpoints[name] = EndpointState(name, bit, model)
            self._by_bit[bit] = name
        elif model and not state.model:
            state.model = model
        return state

    # Events ------------------------------------------------------------------------------------------------------
    def apply(self, endpoint: str, events: Iterable[KvEvent], model: str = "") -> None:
        state = self.endpoint(endpoint, model)
        flag = 1 << state.bit
        keep = ~flag
        blocks, get = self.blocks, self.blocks.get
        for event in events:
            self.events_applied += 1
            if isinstance(event, BlockStored):
                state.block_size = event.block_size
                stored = self._content(state, event)
                residency = _residency(event)
                if residency != DEFAULT_RESIDENCY or self.where:
                    self._held(endpoint, stored, flag, residency)
                for h in stored:
                    blocks[h] = get(h, 0) | flag
                state.hashes.update(stored)
            elif isinstance(event, BlockRemoved):
                engine = event.block_hashes
                residency = _residency(event)
                if self.where or residency != DEFAULT_RESIDENCY:
                    engine = self._released(state, engine, residency)
                removed = self._forget(state, engine)
                self._unset(removed, keep)
                state.hashes.difference_update(removed)
            elif isinstance(event, AllBlocksCleared):
                self.drop(endpoint, forget=False)

    def _held(self, endpoint: str, stored: list[int], flag: int, residency: tuple[str, int]) -> None:
        """Record that the engine holds these blocks at ``residency`` too."""
        where, blocks = self.where, self.blocks
        for h in stored:
            key = (h, endpoint)
            held = where.get(key)
            if held is None:
                if residency == DEFAULT_RESIDENCY:
                    continue  # the usual case: nothing to keep
                held = where[key] = {DEFAULT_RESIDENCY} if blocks.get(h, 0) & flag else set()
            held.add(residency)
            if held == {DEFAULT_RESIDENCY}:
                del where[key]

    def _released(self, state: EndpointState, engine: list[int], residency: tuple[str, int]) -> list[int]:
        """The engine hashes of a removal at ``residency`` that the engine no longer holds anywhere (the others
        stay: held on another medium or in another KV cache group)."""
        gone = []
        for theirs in engine:
            mine = state.ours.get(theirs)
            if mine is None:
                mine = theirs
            key = (mine, state.name)
            held = self.where.get(key)
            if held is None:
                if residency != DEFAULT_RESIDENCY:
                    continue  # removed from where we never saw it: it is still where we did
                gone.append(theirs)
                continue
            held.discard(residency)
            if held:
                if held == {DEFAULT_RESIDENCY}:
                    del self.where[key]
                continue
            del self.where[key]
            gone.append(theirs)
        return gone

    def _content(self, state: EndpointState, event: BlockStored) -> list[int]:
        """The index's hashes for the blocks of ``event`` (recorded against the engine's), in order; blocks that
        cannot be placed are left out (with everything after them: a chain cannot skip a link)."""
        engine = event.block_hashes
        tokens = event.token_ids
        if not tokens or not engine or self.keys.exact:
            return list(engine)  # the engines' own hashes (block_hashing.mode vllm), or no content to key by
        if event.block_size != self.block_size or len(tokens) != len(engine) * event.block_size:
            state.skipped += len(engine)
            if event.block_size != self.block_size and not state.size_warned:
                state.size_warned = True  # else every event is skipped in silence and no lookup ever hits
                log.warning("engine %s publishes %d-token blocks, the index is configured for %d (kvCache.blockSize "
                            "must be the engines' --block-size): its blocks are not indexed", state.name,
                            event.block_size, self.block_size, extra={"endpoint": state.name})
            return []
        if event.parent_block_hash is None:
            parent = None
        else:
            parent = state.translate(event.parent_block_hash)
            if parent is None:
                state.skipped += len(engine)
                return []
        size = self.block_size
        keys = event.extra_keys or []
        extra = event.lora_name is not None or event.lora_id is not None or any(k is not None for k in keys)
        inherited = 0 if event.parent_block_hash is None else state.spaces.get(event.parent_block_hash, 0)
        if extra or inherited:  # (a salted chain's later blocks carry no extra keys: the salt is their parent's)
            space = self._space(event, inherited) if extra else inherited
            if space is not None:  # an adapter's or a salted chain: keyed as the router keys such requests
                plain = None if parent is None else parent ^ inherited  # the parent's plain-chain hash
                ours = in_space(block_hashes(tokens, size, self.seed, parent=plain), space)
                for theirs in engine:
                    state.spaces[theirs] = space
            else:
                ours = self._salted(event, parent)  # multimodal / embeddings blocks: kept apart, as in vLLM
            for theirs, mine in zip(engine, ours, strict=True):
                state.ours[theirs] = mine
            return ours
        first = block_hashes(tokens[:size], size, self.seed, parent=parent)[0]
        if first == engine[0]:
            ours = list(engine)  # this engine hashes as the index does (checked on every event's first block)
        else:
            ours = [first, *block_hashes(tokens[size:], size, self.seed, parent=first)] if len(engine) > 1 \
                else [first]
        for theirs, mine in zip(engine, ours, strict=True):
            state.ours[theirs] = mine
        return ours

    @staticmethod
    def _space(event: BlockStored, inherited: int) -> int | None:
        """The key space (:func:`fuyao.kv_blocks.key_space`) of an event's blocks when what sets them apart is a
        LoRA adapter and a ``cache_salt`` only (vLLM publishes each block's extra keys untagged: the adapter's name
        first on every block, the salt last on a request's first block); None for anything else (multimodal
        inputs, prompt embeddings, an adapter without a name), or a chain whose space the index did not see.
        ``inherited``: the parent's space (0 for none, or a plain parent)."""
        adapter = event.lora_name
        if adapter is None and event.lora_id is not None:
            return None
        keys = list(event.extra_keys or [])
        rest = []
        for extra in keys + [None] * (len(event.block_hashes) - len(keys)):
            values = list(extra or ())
            if adapter is not None:
                if not values or values[0] != adapter:
                    return None
                values = values[1:]
            rest.append(values)
        if event.parent_block_hash is None:
            first = rest[0] if rest else []
            if len(first) > 1 or (first and not isinstance(first[0], str)):
                return None
            salt = first[0] if first else None
            space = key_space(adapter, salt)
        else:
            space = inherited  # the salt is the parent's (its first block's)
            if space == 0 and adapter is not None:
                return None  # an adapter's chain whose space the index never saw (or forgot): cannot be keyed
            if rest and rest[0]:
                return None  # a salt past a request's first block: not vLLM's shape
        if any(rest[1:]):
            return None
        return space

    def _salted(self, event: BlockStored, parent: int | None) -> list[int]:
        """The chain with each block's extra keys (and the LoRA adapter) mixed in, so such blocks never match the
        same tokens without them — vLLM keeps them apart the same way (its hash covers the extra keys)."""
        size, keys = self.block_size, list(event.extra_keys or [])
        keys += [None] * (len(event.block_hashes) - len(keys))
        lora = (event.lora_id, event.lora_name)
        out: list[int] = []
        for i, extra in enumerate(keys[: len(event.block_hashes)]):
            h = block_hashes(event.token_ids[i * size:(i + 1) * size], size, self.seed, parent=parent)[0]
            if extra is not None or lora != (None, None):
                h = (h ^ xxhash.xxh64_intdigest(repr((extra, lora)).encode())) & HASH_MASK
            out.append(h)
            parent = h
        return out

    @staticmethod
    def _forget(state: EndpointState, engine: Iterable[int]) -> list[int]:
        out = []
        for theirs in engine:
            mine = state.ours.pop(theirs, None)
            if mine is None:
                if theirs not in state.hashes:
                    continue
                mine = theirs  # a block taken as the engine named it (no tokens, or vLLM-exact keys)
            out.append(mine)
            state.removed[theirs] = mine
            if len(state.removed) > REMEMBER_REMOVED:
                state.spaces.pop(state.removed.popitem(last=False)[0], None)
        return out

    def drop(self, endpoint: str, forget: bool = True) -> int:
        """Remove every entry of ``endpoint`` (its cache was cleared, its stream lost, its pod gone)."""
        state = self.endpoints.get(endpoint)
        if state is None:
            return 0
        self._unset(state.hashes, ~(1 << state.bit))
        if self.where:
            for key in [k for k in self.where if k[1] == endpoint]:
                del self.where[key]
        count = len(state.hashes)
        state.hashes = set()
        state.ours, state.removed, state.spaces = {}, OrderedDict(), {}
        if forget:
            del self.endpoints[endpoint]
            del self._by_bit[state.bit]
        return count

    def _unset(self, hashes: Iterable[int], keep: int) -> None:
        """Clear an engine's bit (``keep`` is every other bit) on these blocks; blocks nobody holds go."""
        blocks = self.blocks
        for h in hashes:
            mask = blocks.get(h)
            if mask is not None:
                mask &= keep
                if mask:
                    blocks[h] = mask
                else:
                    del blocks[h]

    # Lookups -----------------------------------------------------------------------------------------------------
    def hashes(self, token_ids: Sequence[int]) -> list[int]:
        return self.keys.chain(token_ids)

    def lookup(self, token_ids: Sequence[int] | None = None, model: str = "",
               hashes: list[int] | None = None) -> dict[str, int]:
        """Endpoint → the number of leading blocks of the prompt it holds (endpoints holding none are left out;
        with ``model``, only endpoints serving it)."""
        chain = hashes if hashes is not None else self.hashes(token_ids or [])
        if not chain:
            return {}
        first = self.blocks.get(chain[0], 0)
        if model:
            first &= self._model_mask(model)
        if not first:
            return {}
        masks = itertools.accumulate(map(self.blocks.get, chain[1:], itertools.repeat(0)), operator.and_,
                                     initial=first)
        result: dict[str, int] = {}
        previous = first
        depth = 0
        for depth, mask in enumerate(masks):
            if mask != previous:
                self._record(previous & ~mask, depth, result)
                previous = mask
                if not mask:
                    break
        else:
            depth = len(chain)
        if previous:
            self._record(previous, depth, result)
        return result

    def _record(self, bits: int, depth: int, into: dict[str, int]) -> None:
        while bits:
            low = bits & -bits
            name = self._by_bit.get(low.bit_length() - 1)  # None: dropped meanwhile by the subscriber's thread
            if name is not None:
                into[name] = depth
            bits ^= low

    def _model_mask(self, model: str) -> int:
        mask = 0
        for state in list(self.endpoints.values()):  # a snapshot: the subscriber's thread may add or drop one
            if state.model in ("", model):
                mask |= 1 << state.bit
        return mask

    def medium(self, block: int, endpoint: str) -> str:
        """Where the engine holds the block: GPU when it does there, else the other medium (CPU...)."""
        held = self.where.get((block, endpoint))
        if not held or any(m == "GPU" for m, _ in held):
            return "GPU"
        return min(m for m, _ in held)

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self.blocks), "endpoints": len(self.endpoints),
                "entries": sum(len(s.hashes) for s in self.endpoints.values())}
