"""The engine replica's HTTP client to its own engine process (:mod:`fuyao.ray_serve.engine`), Ray-free.

Every call has a read timeout (``engine.readTimeout``: the longest the engine may stay silent within an answer), so a
hung engine fails its requests with 504 and a message naming the setting instead of holding them, and Serve's
admission slots, forever. A streamed answer that stalls after its first bytes ends with an error event and
``[DONE]``, as vLLM ends a stream that fails midway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .ranking import OpenAiRequest, StreamHead

CONNECT_TIMEOUT = 5.0
HEALTH_TIMEOUT = 5.0


class EngineClient:
    def __init__(self, base_url: str, read_timeout: float):
        self.base_url = base_url
        self.read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                self.base_url,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=self.read_timeout),
                connector=aiohttp.TCPConnector(limit=0))
        return self._session

    def timeout_error(self) -> dict[str, Any]:
        return {"error": {"message": f"the engine at {self.base_url} sent nothing for {self.read_timeout:g} s "
                                     "(engine.readTimeout): it may be hung", "type": "engine_timeout", "code": 504}}

    def timed_out(self, exc: TimeoutError) -> tuple[int, dict[str, Any]]:
        """The answer for a call that timed out: connecting (aiohttp's ConnectionTimeoutError is a TimeoutError
        too) or reading."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return 503, {"error": {"message": f"could not connect to the engine at {self.base_url} within "
                                              f"{CONNECT_TIMEOUT:g} s: it may be overloaded or gone",
                                   "type": "engine_unreachable", "code": 503}}
        return 504, self.timeout_error()

    async def health(self) -> None:
        async with self._client().get("/health", timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT)) as response:
            if response.status != 200:
                raise RuntimeError(f"the engine's /health answered {response.status}")

    async def complete(self, request: OpenAiRequest) -> tuple[int, dict[str, Any]]:
        """A non-streamed request: the engine's status and JSON answer (504 when it stays silent too long)."""
        try:
            async with self._client().post(request.path, json=dict(request.body)) as response:
                try:
                    payload = await response.json(content_type=None)
                except ValueError:
                    payload = {"error": {"message": (await response.text())[:2000], "type": "engine_error"}}
                return response.status, payload
        except TimeoutError as exc:
            return self.timed_out(exc)

    async def stream(self, request: OpenAiRequest) -> AsyncIterator[StreamHead | bytes]:
        """A streamed request: first a :class:`StreamHead` (the engine's status; for an error, its JSON answer, so
        the ingress answers with that status as vLLM does, not a 200 stream holding an error), then, when the
        engine accepted it, the engine's server-sent-event bytes as they arrive."""
        started = False
        try:
            async with self._client().post(request.path, json=dict(request.body)) as response:
                if response.status != 200:
                    try:
                        payload = await response.json(content_type=None)
                    except ValueError:
                        payload = None
                    if not isinstance(payload, dict):
                        payload = {"error": {"message": (await response.text())[:2000], "type": "engine_error",
                                             "code": response.status}}
                    yield StreamHead(response.status, payload)
                    return
                yield StreamHead(200)
                started = True
                async for chunk in response.content.iter_any():
                    yield chunk
        except TimeoutError as exc:
            if not started:
                yield StreamHead(*self.timed_out(exc))
                return
            yield f"\n\ndata: {json.dumps(self.timeout_error())}\n\ndata: [DONE]\n\n".encode()

    async def models(self) -> dict[str, Any]:
        try:
            async with self._client().get("/v1/models") as response:
                answer: dict[str, Any] = await response.json(content_type=None)
                return answer
        except TimeoutError as exc:
            raise RuntimeError(self.timed_out(exc)[1]["error"]["message"]) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
