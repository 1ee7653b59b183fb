"""fuyao.kube_watch.AsyncListWatch against a real HTTP server speaking the API server's list and watch (chunked
JSON lines): a failing API server makes the kind ``failing`` (readiness), a recovered one clears it; events reach
the sink; a watch that ends resumes from the last resourceVersion; 410 Gone re-lists."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from fuyao.kube_client import RestEndpoint
from fuyao.kube_watch import AsyncListWatch
from tests.support.apiserver import RotatingToken


class FakeApiServer:
    """Pods list + watch. ``down`` answers 503; each watch streams ``script[n]`` (lines) then ends."""

    def __init__(self) -> None:
        self.down = True
        self.lists = 0
        self.watch_versions: list[str] = []
        self.headers: list[str] = []
        self.script: list[list[bytes]] = []
        self.watch_refused = False  # list allowed, watch 403 (RBAC without the watch verb)

    async def pods(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(request.headers.get("Authorization", ""))
        if self.down:
            return web.Response(status=503, text="etcd is not ready")
        if request.query.get("watch") != "true":
            self.lists += 1
            return web.Response(body=orjson.dumps({"metadata": {"resourceVersion": "10"}, "items": [
                {"metadata": {"name": "listed", "resourceVersion": "10"}}]}), content_type="application/json")
        self.watch_versions.append(request.query["resourceVersion"])
        if self.watch_refused:
            return web.Response(status=403, text='pods is forbidden: cannot watch resource "pods"')
        lines = self.script.pop(0) if self.script else []
        if lines == [b"410"]:
            return web.Response(status=410, text="too old")
        response = web.StreamResponse()
        await response.prepare(request)
        for line in lines:
            if line == b"CUT":  # the connection drops mid-stream (a reset, a load balancer's idle cut)
                await response.write(b'{"type":"ADDED","obj')  # half an event
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write(line[: len(line) // 2])  # events arrive split across chunks
            await response.write(line[len(line) // 2:] + b"\n")
        if not lines:
            await asyncio.sleep(30)  # an idle watch
        return response


class Sink:
    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.replaced = 0

    def replace(self, items: list[dict[str, Any]]) -> None:
        self.replaced += 1
        self.names = {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in items}

    def upsert(self, obj: dict[str, Any]) -> None:
        self.names[obj["metadata"]["name"]] = obj["metadata"]["resourceVersion"]

    def delete(self, obj: dict[str, Any]) -> None:
        self.names.pop(obj["metadata"]["name"], None)


def event(kind: str, name: str, version: str) -> bytes:
    return orjson.dumps({"type": kind, "object": {"metadata": {"name": name, "resourceVersion": version}}})


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def serve(api: FakeApiServer) -> tuple[web.AppRunner, int]:
    """The fake API server on a free loopback port: its runner (to clean up) and the port."""
    app = web.Application()
    app.router.add_get("/api/v1/pods", api.pods)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def follower(port: int, sink: Sink, failing: dict[str, str] | None, backoff_s: float) -> AsyncListWatch:
    """The list + watch of pods from the fake API server on ``port``."""
    return AsyncListWatch("pods", "/api/v1/pods", sink, RestEndpoint(f"http://127.0.0.1:{port}", None, RotatingToken()),
                          failing=failing, backoff_s=backoff_s)


def test_failing_then_recovered_then_events_resumes_and_relists() -> None:
    async def scenario() -> None:
        api = FakeApiServer()
        runner, port = await serve(api)
        sink, failing = Sink(), {}  # type: ignore[var-annotated]
        watch = follower(port, sink, failing, backoff_s=0.01)
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(watch.run(session, stop))
            await until(lambda: "pods" in failing)
            assert "503" in failing["pods"] and "etcd is not ready" in failing["pods"]
            assert sink.replaced == 0  # nothing made up while the API server is down
            api.script = [[event("ADDED", "a", "11"), event("MODIFIED", "listed", "12")],  # ends: resume from 12
                          [event("DELETED", "a", "13")], [b"410"]]  # 410: re-list
            api.down = False
            await until(lambda: api.lists >= 2 and len(api.watch_versions) >= 4)
            assert "pods" not in failing
            assert api.watch_versions[:4] == ["10", "12", "13", "10"]
            assert sink.replaced == 2 and sink.names == {"listed": "10"}  # the re-list's view
            assert len(set(api.headers)) == len(api.headers)  # the token is read again for every request
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()

    asyncio.run(scenario())


def test_a_watch_that_fails_after_every_good_list_backs_off_and_is_reported_failing() -> None:
    """A good list alone does not reset the backoff: with watches refused the re-lists slow down (doubling) and the
    kind is reported failing, instead of a list (and a full replace downstream) every initial delay forever."""
    async def scenario() -> None:
        api = FakeApiServer()
        api.down, api.watch_refused = False, True
        runner, port = await serve(api)
        sink, failing = Sink(), {}  # type: ignore[var-annotated]
        watch = follower(port, sink, failing, backoff_s=0.05)
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(watch.run(session, stop))
            await asyncio.sleep(2.0)
            # delays 0.05, 0.1, 0.2, 0.4, 0.8 (+10 % jitter): at most 6 lists in 2 s; a reset after every list
            # would make ~30
            assert 3 <= api.lists <= 6, api.lists
            assert "cannot watch" in failing.get("pods", "")
            api.watch_refused = False  # RBAC fixed: the next watch works and the kind recovers
            await until(lambda: "pods" not in failing, timeout=5)
            stop.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()

    asyncio.run(scenario())


def test_a_watch_stream_cut_midway_resumes_from_its_last_event_without_a_relist() -> None:
    async def scenario() -> None:
        api = FakeApiServer()
        api.down = False
        api.script = [[event("ADDED", "a", "11"), b"CUT"], [event("MODIFIED", "a", "12")]]
        runner, port = await serve(api)
        sink = Sink()
        watch = follower(port, sink, None, backoff_s=0.01)
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(watch.run(session, stop))
            await until(lambda: len(api.watch_versions) >= 3)
            assert api.watch_versions[:3] == ["10", "11", "12"]  # resumed after the cut, not re-listed
            assert api.lists == 1 and sink.names == {"listed": "10", "a": "12"}
            stop.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()

    asyncio.run(scenario())
