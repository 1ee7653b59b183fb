"""The Ray Serve application's two HTTP clients, without Ray: the request router's KV-index lookup behind its circuit
breaker (:mod:`fuyao.ray_serve.kv_lookup`) and the engine replica's client to its engine with its read timeout
(:mod:`fuyao.ray_serve.engine_client`), each against a local aiohttp server that answers, fails or hangs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from fuyao.ray_serve.engine_client import EngineClient
from fuyao.ray_serve.kv_lookup import IndexLookup
from fuyao.ray_serve.ranking import OpenAiRequest, StreamHead

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(routes: dict[str, Handler]) -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_hung_index_is_skipped_after_the_threshold_and_probed_after_the_cool_down() -> None:
    # the lookup waited lookup_timeout for every request while the index hung: with Serve's 2 x replicas routing
    # tasks that capped the whole deployment's routing rate; after 3 failures it must not be asked for 10 s
    async def main() -> dict[str, Any]:
        state = {"hang": True, "asked": 0}

        async def lookup(request: web.Request) -> web.Response:
            state["asked"] += 1
            if state["hang"]:
                await asyncio.sleep(30)
            return web.json_response({"blocks": 2, "endpoints": {"http://a": 2}})

        clock = Clock()
        out: dict[str, Any] = {}
        async with serving({"/v1/lookup": lookup}) as url:
            index = IndexLookup(url, timeout=0.2, failure_threshold=3, cool_down=10.0, clock=clock)
            out["first"] = [(await index({"prompt": "p"})).outcome for _ in range(3)]
            started = time.monotonic()
            skipped = [(await index({"prompt": "p"})).outcome for _ in range(50)]
            out["skipped"], out["skip_s"], out["asked"] = skipped, time.monotonic() - started, state["asked"]
            clock.now += 9.9
            out["still_open"] = (await index({"prompt": "p"})).outcome
            clock.now += 0.2  # the cool-down is over: one request probes, the others still skip meanwhile
            probe = asyncio.ensure_future(index({"prompt": "p"}))
            await asyncio.sleep(0.05)
            out["during_probe"] = (await index({"prompt": "p"})).outcome
            out["probe"] = (await probe).outcome  # the index still hangs: open again
            out["reopened"] = (await index({"prompt": "p"})).outcome
            state["hang"] = False
            clock.now += 10.1
            recovered = await index({"prompt": "p"})
            out["recovered"], out["answer"] = recovered.outcome, recovered.answer
            out["closed"] = (await index({"prompt": "p"})).outcome
            await index.close()
        return out

    out = asyncio.run(main())
    assert out["first"] == ["failed"] * 3
    assert out["skipped"] == ["skipped"] * 50 and out["skip_s"] < 0.5 and out["asked"] == 3
    assert out["still_open"] == "skipped"
    assert out["during_probe"] == "skipped" and out["probe"] == "failed" and out["reopened"] == "skipped"
    assert out["recovered"] == "answered" and out["answer"] == {"blocks": 2, "endpoints": {"http://a": 2}}
    assert out["closed"] == "answered"


def test_index_errors_about_the_request_do_not_open_the_circuit() -> None:
    async def main() -> list[Any]:
        answers = iter([lambda: web.json_response({"error": "bad prompt"}, status=400)] * 5
                       + [lambda: web.Response(status=503)] * 2 + [lambda: web.json_response(["not", "object"])])

        async def lookup(request: web.Request) -> web.Response:
            return next(answers)()

        async with serving({"/v1/lookup": lookup}) as url:
            index = IndexLookup(url, timeout=1.0, failure_threshold=3, cool_down=10.0, clock=Clock())
            outcomes = [(await index({"prompt": "p"})).outcome for _ in range(9)]
            await index.close()
        return outcomes

    # five 4xx: the index works (answered, nothing to use); then 503, 503 and a list: three failures open it
    assert asyncio.run(main()) == ["answered"] * 5 + ["failed"] * 3 + ["skipped"]


def test_an_index_at_a_wrong_path_opens_the_circuit() -> None:
    # a 404 (a wrong kvIndexUrl or path) was taken for "the index works": every request paid the round trip and a
    # warning, forever
    async def main() -> list[Any]:
        async def elsewhere(request: web.Request) -> web.Response:
            return web.json_response({})

        async with serving({"/v2/lookup": elsewhere}) as url:  # the index's lookup is not where it is asked
            index = IndexLookup(url, timeout=1.0, failure_threshold=3, cool_down=10.0, clock=Clock())
            outcomes = [(await index({"prompt": "p"})).outcome for _ in range(4)]
            await index.close()
        return outcomes

    assert asyncio.run(main()) == ["failed"] * 3 + ["skipped"]


def test_a_cancelled_probe_frees_the_half_open_slot() -> None:
    async def main() -> list[Any]:
        async def lookup(request: web.Request) -> web.Response:
            await asyncio.sleep(30)
            return web.json_response({})

        clock = Clock()
        async with serving({"/v1/lookup": lookup}) as url:
            index = IndexLookup(url, timeout=0.1, failure_threshold=1, cool_down=5.0, clock=clock)
            outcomes = [(await index({"prompt": "p"})).outcome]
            clock.now += 5
            probe = asyncio.ensure_future(index({"prompt": "p"}))
            await asyncio.sleep(0.02)
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
            outcomes.append((await index({"prompt": "p"})).outcome)  # the next request may probe
            await index.close()
        return outcomes

    assert asyncio.run(main()) == ["failed", "failed"]


def test_a_hung_engine_fails_requests_with_504_after_the_read_timeout() -> None:
    # the replica's calls to its engine had no read timeout: a hung engine held every request (and its Serve
    # admission slot) forever
    async def main() -> dict[str, Any]:
        async def hang(request: web.Request) -> web.Response:
            await asyncio.sleep(30)
            return web.json_response({})

        async def stall_mid_stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b'data: {"choices": [{"text": "a"}]}\n\n')
            await asyncio.sleep(30)
            return response

        out: dict[str, Any] = {}
        async with serving({"/v1/completions": hang, "/v1/chat/completions": stall_mid_stream,
                            "/v1/models": hang}) as url:
            client = EngineClient(url, read_timeout=0.3)
            started = time.monotonic()
            out["complete"] = await asyncio.wait_for(client.complete(OpenAiRequest("/v1/completions", {})), 5)
            out["complete_s"] = time.monotonic() - started

            async def collect(path: str) -> list[Any]:
                return [item async for item in client.stream(OpenAiRequest(path, {"stream": True}))]

            out["no_head"] = await asyncio.wait_for(collect("/v1/completions"), 5)
            out["stalled"] = await asyncio.wait_for(collect("/v1/chat/completions"), 5)
            try:
                await asyncio.wait_for(client.models(), 5)
            except RuntimeError as exc:
                out["models"] = str(exc)
            await client.close()
        return out

    out = asyncio.run(main())
    status, payload = out["complete"]
    assert status == 504 and payload["error"]["type"] == "engine_timeout"
    assert "engine.readTimeout" in payload["error"]["message"] and 0.25 < out["complete_s"] < 3
    assert len(out["no_head"]) == 1 and isinstance(out["no_head"][0], StreamHead)
    assert out["no_head"][0].status == 504 and dict(out["no_head"][0].error or {})["error"]["code"] == 504
    head, first, last = out["stalled"]
    assert head == StreamHead(200) and first.startswith(b"data: {\"choices\"")
    events = [e for e in last.decode().split("\n\n") if e]
    assert json.loads(events[0].removeprefix("data: "))["error"]["type"] == "engine_timeout"
    assert events[-1] == "data: [DONE]"
    assert "engine.readTimeout" in out["models"]


def test_a_slow_but_talking_engine_is_not_cut_off() -> None:
    # the read timeout bounds silence, not the whole answer: a stream longer than it, chunk by chunk, goes through
    async def main() -> list[Any]:
        async def slow_stream(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            for i in range(12):  # 1.8 s in all, more than the read timeout, never silent for long
                await response.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.15)
            await response.write(b"data: [DONE]\n\n")
            return response

        async with serving({"/v1/completions": slow_stream}) as url:
            client = EngineClient(url, read_timeout=1.0)
            items = [item async for item in client.stream(OpenAiRequest("/v1/completions", {"stream": True}))]
            await client.close()
        return items

    items = asyncio.run(main())
    assert items[0] == StreamHead(200)
    body = b"".join(i for i in items[1:] if isinstance(i, bytes))
    assert body.endswith(b"data: [DONE]\n\n") and b"engine_timeout" not in body and body.count(b"data: ") == 13


def test_an_engine_that_does_not_accept_connections_is_unreachable_not_silent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # aiohttp's connect timeout is a TimeoutError too: it was reported as the engine "sent nothing for
    # {readTimeout} s", naming the wrong setting
    import socket

    from fuyao.ray_serve import engine_client

    monkeypatch.setattr(engine_client, "CONNECT_TIMEOUT", 0.5)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: once its queue is full the kernel drops further SYNs
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.2)

    async def main() -> tuple[int, dict[str, Any]]:
        client = EngineClient(f"http://127.0.0.1:{listener.getsockname()[1]}", read_timeout=30)
        try:
            return await client.complete(OpenAiRequest("/v1/completions", {}))
        finally:
            await client.close()

    try:
        status, answer = asyncio.run(main())
    finally:
        for s in (*fillers, listener):
            s.close()
    assert status == 503 and answer["error"]["type"] == "engine_unreachable"
    assert "readTimeout" not in answer["error"]["message"]
