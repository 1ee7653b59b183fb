"""The shared KV block tier (the design doc's cross-instance cache): blocks by hash, shared by every engine started
with ``--kv-remote``. An engine asks which leading blocks of a prompt the tier holds (and "fetches" them: the
transfer cost is modelled engine-side), and stores the blocks it computed.

No KV bytes move here — the simulator has none — but capacity is accounted in bytes (``size``, a Kubernetes
quantity; ``bytes_per_token`` x ``block_size`` per block) so eviction behaves as it would with real blocks.

Eviction policies: ``LRU`` (least recently stored or fetched first), ``LFU`` (fewest fetches first, the oldest
among equals; O(1) with frequency buckets), ``FIFO`` (oldest stored first; fetching does not renew). ``ttl``: a
block older than this (since stored) is gone, whatever the policy.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fuyao.contracts import KvCachePolicy


@dataclass
class Entry:
    stored_at: float
    hits: int = 0


class SharedTier:
    def __init__(self, capacity_bytes: int, block_bytes: int, policy: KvCachePolicy = KvCachePolicy.LRU,
                 ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.capacity_blocks = max(0, capacity_bytes // max(1, block_bytes))
        self.block_bytes = block_bytes
        self.policy = policy
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[int, Entry] = {}
        self._order: OrderedDict[int, None] = OrderedDict()  # LRU / FIFO order, oldest first
        self._freq: dict[int, OrderedDict[int, None]] = {}  # LFU: hits → blocks, oldest first
        self._min_freq = 0
        self._lock = threading.Lock()
        self.evictions = 0
        self.expirations = 0
        self.requests = 0  # blocks asked for
        self.hits = 0  # blocks found

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, block: int) -> bool:
        return block in self._entries

    @property
    def used_bytes(self) -> int:
        return len(self._entries) * self.block_bytes

    # Operations ------------------------------------------------------------------------------------------------
    def put(self, blocks: Iterable[int]) -> int:
        """Store blocks (a block already there is left as it is); returns how many were new."""
        stored = 0
        now = self.clock()
        with self._lock:
            for block in blocks:
                if self.capacity_blocks <= 0:
                    break
                entry = self._entries.get(block)
                if entry is not None and not self._expired(entry, now):
                    continue
                if entry is not None:
                    self._remove(block)
                    self.expirations += 1
                while len(self._entries) >= self.capacity_blocks:
                    self._evict_one(now)
                self._entries[block] = Entry(stored_at=now)
                if self.policy == KvCachePolicy.LFU:
                    self._freq.setdefault(0, OrderedDict())[block] = None
                    self._min_freq = 0
                else:
                    self._order[block] = None
                stored += 1
        return stored

    def fetch(self, blocks: Iterable[int]) -> int:
        """How many leading ``blocks`` (a prompt's chain, in order) the tier holds; those count as used."""
        found = 0
        asked = 0
        now = self.clock()
        with self._lock:
            for block in blocks:
                asked += 1
                entry = self._entries.get(block)
                if entry is None:
                    break
                if self._expired(entry, now):
                    self._remove(block)
                    self.expirations += 1
                    break
                self._touch(block, entry)
                found += 1
            self.requests += asked
            self.hits += found
        return found

    def peek(self, blocks: Iterable[int]) -> int:
        """Like :meth:`fetch`, without using the blocks or counting the request (a router's question)."""
        found = 0
        now = self.clock()
        with self._lock:
            for block in blocks:
                entry = self._entries.get(block)
                if entry is None or self._expired(entry, now):
                    break
                found += 1
        return found

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._order.clear()
            self._freq.clear()

    # Internals -------------------------------------------------------------------------------------------------
    def _expired(self, entry: Entry, now: float) -> bool:
        return self.ttl_s is not None and now - entry.stored_at > self.ttl_s

    def _touch(self, block: int, entry: Entry) -> None:
        if self.policy == KvCachePolicy.LRU:
            self._order.move_to_end(block)
        elif self.policy == KvCachePolicy.LFU:
            bucket = self._freq[entry.hits]
            del bucket[block]
            if not bucket:
                del self._freq[entry.hits]
                if self._min_freq == entry.hits:
                    self._min_freq = entry.hits + 1
            self._freq.setdefault(entry.hits + 1, OrderedDict())[block] = None
        entry.hits += 1

    def _remove(self, block: int) -> None:
        entry = self._entries.pop(block)
        if self.policy == KvCachePolicy.LFU:
            bucket = self._freq.get(entry.hits)
            if bucket is not None:
                bucket.pop(block, None)
                if not bucket:
                    del self._freq[entry.hits]
        else:
            self._order.pop(block, None)

    def _evict_one(self, now: float) -> None:
        if self.policy == KvCachePolicy.LFU:
            if self._min_freq not in self._freq:
                self._min_freq = min(self._freq)
            victim = next(iter(self._freq[self._min_freq]))
        else:
            victim = next(iter(self._order))
        expired = self._expired(self._entries[victim], now)
        self._remove(victim)
        if expired:
            self.expirations += 1
        else:
            self.evictions += 1
