"""The global KV-cache index: which engine (endpoint) holds which block, fed by the engines' KV events.

``block hash → {endpoint: medium}`` plus, per endpoint, its set of hashes (so ``AllBlocksCleared``, a lost stream
or a departed pod drop exactly that endpoint's entries). A lookup hashes the prompt's full blocks with the shared
chain (``fuyao.kv_blocks``) and walks them from the start: the longest cached prefix per endpoint, in blocks.
Single-writer: the subscriber thread applies events; lookups may run in other threads (dict reads are atomic in
CPython, and a lookup racing an update sees either state of a block).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fuyao.kv_blocks import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent, block_hashes


@dataclass
class EndpointState:
    name: str
    model: str = ""
    hashes: set[int] = field(default_factory=set)
    block_size: int | None = None


class KvIndex:
    def __init__(self, block_size: int = 16, seed: int = 0):
        self.block_size = block_size
        self.seed = seed
        self.blocks: dict[int, dict[str, str]] = {}  # hash → endpoint → medium
        self.endpoints: dict[str, EndpointState] = {}
        self.events_applied = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def endpoint(self, name: str, model: str = "") -> EndpointState:
        state = self.endpoints.get(name)
        if state is None:
            state = self.endpoints[name] = EndpointState(name, model)
        elif model and not state.model:
            state.model = model
        return state

    # Events ------------------------------------------------------------------------------------------------------
    def apply(self, endpoint: str, events: Iterable[KvEvent], model: str = "") -> None:
        state = self.endpoint(endpoint, model)
        blocks = self.blocks
        for event in events:
            self.events_applied += 1
            if isinstance(event, BlockStored):
                medium = event.medium or "GPU"
                state.block_size = event.block_size
                for h in event.block_hashes:
                    holders = blocks.get(h)
                    if holders is None:
                        blocks[h] = {endpoint: medium}
                    else:
                        holders[endpoint] = medium
                state.hashes.update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    holders = blocks.get(h)
                    if holders is not None and holders.pop(endpoint, None) is not None and not holders:
                        del blocks[h]
                state.hashes.difference_update(event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self.drop(endpoint, forget=False)

    def drop(self, endpoint: str, forget: bool = True) -> int:
        """Remove every entry of ``endpoint`` (its cache was cleared, its stream lost, its pod gone)."""
        state = self.endpoints.get(endpoint)
        if state is None:
            return 0
        blocks = self.blocks
        for h in state.hashes:
            holders = blocks.get(h)
            if holders is not None and holders.pop(endpoint, None) is not None and not holders:
                del blocks[h]
        count = len(state.hashes)
        state.hashes = set()
        if forget:
            del self.endpoints[endpoint]
        return count

    # Lookups -----------------------------------------------------------------------------------------------------
    def hashes(self, token_ids: Sequence[int]) -> list[int]:
        return block_hashes(token_ids, self.block_size, self.seed)

    def lookup(self, token_ids: Sequence[int] | None = None, model: str = "",
               hashes: list[int] | None = None) -> dict[str, int]:
        """Endpoint → the number of leading blocks of the prompt it holds (endpoints holding none are left out;
        with ``model``, only endpoints serving it)."""
        chain = hashes if hashes is not None else self.hashes(token_ids or [])
        blocks = self.blocks
        result: dict[str, int] = {}
        alive: set[str] | None = None
        for depth, h in enumerate(chain):
            holders = blocks.get(h)
            if not holders:
                break
            if alive is None:
                alive = {e for e in holders if not model or self.endpoints[e].model in ("", model)}
            else:
                gone = [e for e in alive if e not in holders]
                for e in gone:
                    result[e] = depth
                    alive.discard(e)
            if not alive:
                break
        else:
            depth = len(chain)
            for e in alive or ():
                result[e] = depth
            return result
        for e in alive or ():
            result[e] = depth
        return {e: n for e, n in result.items() if n > 0}

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self.blocks), "endpoints": len(self.endpoints),
                "entries": sum(len(s.hashes) for s in self.endpoints.values())}
