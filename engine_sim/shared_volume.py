"""The simulated engine's side of fuyao's shared KV tier on a volume (``--kv-volume DIR``): the same files, keys and
access records as fuyao's vLLM connector (``fuyao.kvcache.blockstore``), so the tier manager (``fuyao-kvcache``
with ``kvCache.volume``) holds them at size, publishes them to lookups and routers, and a fleet too big for real
engines exercises the real tier.

- **Store.** Every block the engine computes (a ``BlockStored`` event: its tokens and its parent) is written as a
  file keyed by the blockstore's SHA-256 chain of the tokens that lead to it. The payload is ``bytes_per_token`` x
  ``block_size`` bytes derived from the key (the simulator has no KV), so files have a realistic size for eviction
  and a checked digest. Writes run in the block store's background writer, off the engine's event loop, as the
  connector's do.
- **Load.** Before a request is queued, the leading blocks after the engine's own prefix-cache hit are read from the
  volume, in order, up to the first that is gone, partial or corrupt (a miss: the rest is computed, as with the
  connector's ``recompute`` policy). The engine then charges ``kv_transfer_per_token_ms`` per loaded token.
- **Namespace.** ``model`` = the served model name, dtype ``simulated``, layout ``fuyao-engine-sim``: simulated
  engines of one model and block size share files with each other, never with a real vLLM's.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from fuyao.kv_blocks import BlockStored
from fuyao.kvcache.blockstore import BlockStore, Namespace, StoreStats, Writer, chain_keys

log = logging.getLogger(__name__)

_REMEMBERED = 1 << 16
"""Engine block hashes whose volume key is remembered (a stored block's children continue its chain)."""


class SharedVolume:
    def __init__(self, root: str | Path, model: str, block_size: int, bytes_per_token: int = 64):
        self.block_size = block_size
        self.bytes_per_block = max(1, bytes_per_token * block_size)
        namespace = Namespace(model=model, dtype="simulated", block_size=block_size, num_kv_heads=0, head_size=0,
                              num_layers=0, layout="fuyao-engine-sim")
        self.store = BlockStore(Path(root), namespace, writer=f"{socket.gethostname()}-{os.getpid()}")
        if not self.store.describe():
            log.warning("shared KV volume %s: cannot write %s; stores will be retried", root, self.store.dir)
        self._keys: OrderedDict[int, tuple[str, int]] = OrderedDict()  # engine block hash → (volume key, position)
        self.writer = Writer(self.store, logger=log)

    @property
    def stats(self) -> StoreStats:
        return self.store.stats

    # Loads -------------------------------------------------------------------------------------------------------
    async def load(self, token_ids: Sequence[int], local_blocks: int, blocks: int) -> int:
        """Read blocks ``local_blocks .. blocks-1`` of the prompt from the volume, in order, stopping at the first
        miss; how many were loaded."""
        if blocks <= local_blocks:
            return 0
        return await asyncio.to_thread(self._load, list(token_ids), local_blocks, blocks)

    def _load(self, token_ids: list[int], local_blocks: int, blocks: int) -> int:
        keys = chain_keys(self.store.namespace, token_ids, blocks)
        held = self.store.leading(keys[local_blocks:])
        loaded = 0
        for block in self.store.read_many(keys[local_blocks:local_blocks + held], until_miss=True):
            if block is None:
                break  # the rest is computed (a block after a gap cannot be used)
            loaded += 1
        return loaded

    # Stores ------------------------------------------------------------------------------------------------------
    def stored(self, events: Sequence[BlockStored]) -> None:
        """The engine computed these blocks: hand them to the writer."""
        for event in events:
            parent = ("", -1) if event.parent_block_hash is None else self._keys.get(int(event.parent_block_hash))
            if parent is None:
                continue  # its parent's key is forgotten: the chain cannot be continued (fewer stores, never wrong)
            parent_key, position = parent
            tokens = list(event.token_ids)
            for i, block_hash in enumerate(event.block_hashes):
                chunk = tokens[i * self.block_size:(i + 1) * self.block_size]
                if len(chunk) < self.block_size:
                    break
                key, position = chain_keys(self.store.namespace, chunk, 1, parent=parent_key)[0], position + 1
                self._remember(int(block_hash), (key, position))
                if not self.store.has(key):
                    self.writer.put(key, parent_key, position, chunk, [("simulated", self._payload(key))])
                parent_key = key

    def _remember(self, block_hash: int, key: tuple[str, int]) -> None:
        self._keys[block_hash] = key
        self._keys.move_to_end(block_hash)
        while len(self._keys) > _REMEMBERED:
            self._keys.popitem(last=False)

    def _payload(self, key: str) -> bytes:
        """The block's stand-in KV bytes: derived from its key (so every engine writes the same file)."""
        return (hashlib.sha256(bytes.fromhex(key)).digest() * (self.bytes_per_block // 32 + 1))[:self.bytes_per_block]

    async def close(self) -> None:
        await asyncio.to_thread(self.writer.close, 2.0)
