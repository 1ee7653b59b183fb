"""A scripted HTTP backend in a thread of the test process, for what a simulator does not do on purpose: answer
fixed bytes in timed chunks (to check a proxy relays them exactly), break off mid-stream, fail before answering,
count what it received."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .apiserver import free_port


@dataclass
class Script:
    chunks: list[bytes] = field(default_factory=lambda: [b"data: {\"x\": 1}\n\n", b"data: [DONE]\n\n"])
    delay_s: float = 0.01
    status: int = 200
    break_after: int | None = None  # close the connection after this many chunks
    content_type: str = "text/event-stream"
    head_delay_s: float = 0.0  # before the headers (vLLM's non-streamed answers: headers when generation ends)
    first_delay_s: float = 0.0  # after the headers, before the first chunk (a stream's prefill)


class FakeBackend:
    def __init__(self) -> None:
        self.port = free_port()
        self.script = Script()
        self.received: list[bytes] = []
        self.paths: list[str] = []  # every request's path, in order (routes it does not have too)
        self.headers: list[dict[str, str]] = []  # the headers of every request, in order
        self.health_status = 200
        self.api_key: str | None = None  # as vLLM's --api-key: every /v1 request must carry "Bearer <key>"
        self.models: list[str] = []  # what its /v1/models lists
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.paths.append(request.path)
            self.headers.append(dict(request.headers))
            if self.api_key and request.path.startswith("/v1") and \
                    request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
            return await handler(request)  # type: ignore[no-any-return]

        app = web.Application(middlewares=[record])
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/embeddings", self._generate)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        ready.set()
        self._loop.run_forever()

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(text="vllm:num_requests_waiting 0\n")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        self.received.append(await request.read())
        script = self.script
        await asyncio.sleep(script.head_delay_s)
        response = web.StreamResponse(status=script.status, headers={"Content-Type": script.content_type})
        await response.prepare(request)
        await asyncio.sleep(script.first_delay_s)
        for n, chunk in enumerate(script.chunks):
            if script.break_after is not None and n >= script.break_after:
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(chunk)
            await asyncio.sleep(script.delay_s)
        await response.write_eof()
        return response

    def close(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
