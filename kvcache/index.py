"""The global KV-cache index: which engine (endpoint) holds which block, fed by the engines' KV events.

Each engine gets a bit; the index maps a block hash to the bitmask of the engines holding it, and keeps, per
engine, its set of hashes (so ``AllBlocksCleared``, a lost stream or a departed pod drop exactly that engine's
entries). A lookup hashes the prompt's full blocks with the shared chain (``fuyao.kv_blocks``), fetches all their
masks in one pass and ANDs them cumulatively: an engine's cached prefix ends where its bit first drops out.
Blocks held in another medium than GPU (CPU offload) are remembered per (block, engine).

Single writer: the subscriber thread applies events; lookups may run in other threads (a dict read is atomic in
CPython, and a lookup racing an update sees either state of a block).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fuyao.kv_blocks import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, block_hashes


@dataclass
class EndpointState:
    name: str
    bit: int
    model: str = ""
    hashes: set[int] = field(default_factory=set)
    block_size: int | None = None


class KvIndex:
    def __init__(self, block_size: int = 16, seed: int = 0):
        self.block_size = block_size
        self.seed = seed
        self.blocks: dict[int, int] = {}  # hash → bitmask of endpoints
        self.media: dict[tuple[int, str], str] = {}  # (hash, endpoint) → medium, when not GPU
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
                for h in event.block_hashes:
                    blocks[h] = get(h, 0) | flag
                state.hashes.update(event.block_hashes)
                if event.medium not in (None, "GPU"):
                    for h in event.block_hashes:
                        self.media[(h, endpoint)] = event.medium
            elif isinstance(event, BlockRemoved):
                self._unset(event.block_hashes, keep)
                if self.media:
                    for h in event.block_hashes:
                        self.media.pop((h, endpoint), None)
                state.hashes.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self.drop(endpoint, forget=False)

    def drop(self, endpoint: str, forget: bool = True) -> int:
        """Remove every entry of ``endpoint`` (its cache was cleared, its stream lost, its pod gone)."""
        state = self.endpoints.get(endpoint)
        if state is None:
            return 0
        self._unset(state.hashes, ~(1 << state.bit))
        if self.media:
            for key in [k for k in self.media if k[1] == endpoint]:
                del self.media[key]
        count = len(state.hashes)
        state.hashes = set()
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
        return block_hashes(token_ids, self.block_size, self.seed)

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
            into[self._by_bit[low.bit_length() - 1]] = depth
            bits ^= low

    def _model_mask(self, model: str) -> int:
        mask = 0
        for state in self.endpoints.values():
            if state.model in ("", model):
                mask |= 1 << state.bit
        return mask

    def medium(self, block: int, endpoint: str) -> str:
        return self.media.get((block, endpoint), "GPU")

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self.blocks), "endpoints": len(self.endpoints),
                "entries": sum(len(s.hashes) for s in self.endpoints.values())}
