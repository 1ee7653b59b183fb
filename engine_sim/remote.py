"""The engine's client of the shared KV block tier (``--kv-remote URL``, served by ``fuyao-kvcache``): before a
request is queued, how many of its prompt's leading blocks (after those cached locally) the tier can give; after
each step, the blocks the engine stored. A tier that is down or slow costs nothing but the hits: errors are
logged (rate-limited) and treated as "none there"."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

log = logging.getLogger(__name__)


class RemoteTier:
    def __init__(self, url: str, block_size: int, timeout_s: float = 0.5):
        self.url = url.rstrip("/")
        self.block_size = block_size
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned_at = 0.0
        self.fetched_blocks = 0
        self.stored_blocks = 0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self._session

    def _warn(self, what: str, exc: BaseException) -> None:
        if time.monotonic() - self._warned_at > 10:
            self._warned_at = time.monotonic()
            log.warning("shared KV tier at %s: %s failed (%s); continuing without it", self.url, what, exc)

    async def fetchable(self, hashes: list[int]) -> int:
        """How many of ``hashes`` (leading blocks, in order) the tier gives."""
        if not hashes:
            return 0
        try:
            async with self._client().post(f"{self.url}/v1/blocks/lookup", json={"hashes": hashes}) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                found = int((await response.json()).get("found", 0))
        except (TimeoutError, aiohttp.ClientError, RuntimeError, ValueError) as exc:
            self._warn("lookup", exc)
            return 0
        self.fetched_blocks += found
        return max(0, min(found, len(hashes)))

    def store(self, hashes: list[int]) -> None:
        task = asyncio.get_running_loop().create_task(self._store(hashes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(self, hashes: list[int]) -> None:
        try:
            async with self._client().post(f"{self.url}/v1/blocks", json={"hashes": hashes}) as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
                self.stored_blocks += int((await response.json()).get("stored", 0))
        except (TimeoutError, aiohttp.ClientError, RuntimeError, ValueError) as exc:
            self._warn("store", exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1)
        if self._session is not None:
            await self._session.close()
