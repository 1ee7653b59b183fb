"""The lean HTTP client (``fuyao/http_client.py``: the router's upstream client, the extender binder's) against real
HTTP servers on loopback: an aiohttp engine-like server for the normal paths, and raw asyncio servers that misbehave
on purpose (malformed answers, closes mid-body, silence, bodies delimited by the connection's end)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from fuyao import http_client as upstream_module
from fuyao.http_client import HIGH_WATER, UpstreamError, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _raw_server(handler: Handler) -> tuple[asyncio.Server, str, list[int]]:
    """A TCP server running ``handler`` per connection; returns it, its base URL and a list of connection counts."""
    connections = [0]

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", connections


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def _sends_then_stalls(data: bytes) -> Handler:
    """A raw server's handler: reads the request, sends ``data`` (part of an answer) and then nothing for 5 s."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(5)
    return handler


async def _engine() -> tuple[web.AppRunner, str, dict[str, object]]:
    """An aiohttp server with a JSON answer, a chunked stream, and a record of what it saw."""
    seen: dict[str, object] = {"peers": set(), "headers": []}

    async def completions(request: web.Request) -> web.StreamResponse:
        seen["peers"].add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr,attr-defined]
        seen["headers"].append(request.headers.copy())  # type: ignore[attr-defined]
        body = await request.read()
        if request.query.get("stream"):
            response = web.StreamResponse()
            await response.prepare(request)
            for i in range(3):
                await response.write(b"data: %d\n\n" % i)
                await asyncio.sleep(0.05)
            await response.write_eof()
            return response
        return web.json_response({"echo": body.decode()})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", seen


def test_keep_alive_reuses_one_connection_and_passes_headers_and_body() -> None:
    async def run() -> None:
        runner, base, seen = await _engine()
        pool = UpstreamPool()
        try:
            for i in range(5):
                async with await pool.request(base, b"POST", "/v1/completions", b'{"n": %d}' % i,
                                              [(b"X-Request-Id", b"r%d" % i), (b"Content-Type", b"application/json")],
                                              total=5) as response:
                    assert response.status == 200
                    assert response.header(b"content-type") == b"application/json; charset=utf-8"
                    assert await response.read() == b'{"echo": "{\\"n\\": %d}"}' % i
            assert len(seen["peers"]) == 1  # type: ignore[arg-type]  # one connection for all five
            assert pool.idle_connections() == 1
            assert [h["X-Request-Id"] for h in seen["headers"]] == [f"r{i}" for i in range(5)]  # type: ignore[attr-defined,index]
        finally:
            await pool.close()
            await runner.cleanup()

    asyncio.run(run())


def test_a_stream_arrives_chunk_by_chunk_before_it_ends() -> None:
    async def run() -> None:
        runner, base, _ = await _engine()
        pool = UpstreamPool()
        try:
            response = await pool.request(base, b"POST", "/v1/completions?stream=1", b"{}", total=5, idle=2)
            assert response.chunked and response.content_length is None
            started = time.monotonic()
            first = await response.next_chunk()
            assert first == b"data: 0\n\n"
            assert time.monotonic() - started < 0.09  # not held until the last chunk (~0.15 s later)
            rest = []
            while (chunk := await response.next_chunk()) is not None:
                rest.append(chunk)
            assert b"".join(rest) == b"data: 1\n\ndata: 2\n\n"
            response.close()
            assert pool.idle_connections() == 1  # read to the end: back in the pool
        finally:
            await pool.close()
            await runner.cleanup()

    asyncio.run(run())


def test_a_body_delimited_by_the_connections_end_is_complete_at_eof() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()

    async def run() -> None:
        server, base, _ = await _raw_server(answer)
        pool = UpstreamPool()
        try:
            async with await pool.request(base, b"POST", "/x", b"", total=5) as response:
                assert await response.read() == b"all of it"
            assert pool.idle_connections() == 0  # Connection: close is never pooled
        finally:
            await pool.close()
            server.close()

    asyncio.run(run())


@pytest.mark.parametrize(("answer", "message"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", "closed the connection"),
    (b"NOT HTTP AT ALL\r\n\r\n", "malformed HTTP answer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\n", "malformed HTTP answer"),
])
def test_a_broken_answer_is_an_upstream_error_naming_it(answer: bytes, message: str) -> None:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def run() -> None:
        server, base, _ = await _raw_server(respond)
        pool = UpstreamPool()
        try:
            with pytest.raises(UpstreamError, match=message):
                response = await pool.request(base, b"POST", "/x", b"{}", total=5)
                await response.read()
            assert pool.idle_connections() == 0
        finally:
            await pool.close()
            server.close()

    asyncio.run(run())


def test_timeouts_to_the_headers_to_the_end_and_between_chunks() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)

    async def run() -> None:
        quiet, quiet_base, _ = await _raw_server(silent)
        stall, stall_base, _ = await _raw_server(_sends_then_stalls(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"))
        pool = UpstreamPool()
        try:
            started = time.monotonic()
            with pytest.raises(UpstreamError, match="did not start its answer in time"):
                await pool.request(quiet_base, b"POST", "/x", b"", first=0.2, total=10)
            assert time.monotonic() - started < 1.5
            response = await pool.request(stall_base, b"POST", "/x", b"", total=10, idle=0.2)
            assert await response.next_chunk() == b"hello"
            with pytest.raises(UpstreamError, match=r"no bytes from the engine for 0\.2 s"):
                await response.next_chunk()
            response = await pool.request(stall_base, b"POST", "/x", b"", total=0.3)
            assert await response.next_chunk() == b"hello"
            with pytest.raises(UpstreamError, match="did not finish its answer in time"):
                await response.next_chunk()
        finally:
            await pool.close()
            quiet.close()
            stall.close()

    asyncio.run(run())


def test_an_abandoned_answer_closes_its_connection_and_the_engine_sees_it() -> None:
    async def run() -> None:
        disconnected = asyncio.Event()

        async def streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ntoken\r\n")
            await writer.drain()
            try:
                if await reader.read(1) == b"":  # what an engine notices when its client goes away
                    disconnected.set()
            except ConnectionError:
                disconnected.set()

        server, base, _ = await _raw_server(streams)
        pool = UpstreamPool()
        try:
            response = await pool.request(base, b"POST", "/x", b"", total=10)
            assert await response.next_chunk() == b"token"
            response.close()
            await asyncio.wait_for(disconnected.wait(), 5)
            assert pool.idle_connections() == 0
        finally:
            await pool.close()
            server.close()

    asyncio.run(run())


def test_a_connection_the_engine_closed_while_idle_is_not_used_again() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # keep-alive by default in HTTP/1.1 ...
        await writer.drain()
        await asyncio.sleep(0.05)  # ... but the engine closes it soon after (its keep-alive timeout)

    async def run() -> None:
        server, base, connections = await _raw_server(once)
        pool = UpstreamPool()
        try:
            for _ in range(3):
                async with await pool.request(base, b"POST", "/x", b"", total=5) as response:
                    assert await response.read() == b"ok"
                await asyncio.sleep(0.2)  # the close arrives while the connection is idle
                assert pool.idle_connections() == 0
            assert connections[0] == 3
        finally:
            await pool.close()
            server.close()

    asyncio.run(run())


def test_idle_connections_expire_before_the_engines_keep_alive_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "IDLE_S", 0.1)

    async def run() -> None:
        runner, base, seen = await _engine()
        pool = UpstreamPool()
        try:
            for _ in range(2):
                async with await pool.request(base, b"POST", "/v1/completions", b"{}", total=5) as response:
                    await response.read()
                await asyncio.sleep(0.2)
            assert len(seen["peers"]) == 2  # type: ignore[arg-type]  # the first one had expired
        finally:
            await pool.close()
            await runner.cleanup()

    asyncio.run(run())


def test_header_values_cannot_inject_headers_and_refused_connections_name_the_engine() -> None:
    async def run() -> None:
        runner, base, seen = await _engine()
        pool = UpstreamPool()
        try:
            async with await pool.request(base, b"POST", "/v1/completions", b"{}",
                                          [(b"X-Evil", b"a\r\nX-Injected: 1"), (b"X-Fine", b"yes")],
                                          total=5) as response:
                await response.read()
            headers = seen["headers"][0]  # type: ignore[index]
            assert "X-Injected" not in headers and "X-Evil" not in headers and headers["X-Fine"] == "yes"
            closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            port = closed.sockets[0].getsockname()[1]
            closed.close()
            await closed.wait_closed()
            with pytest.raises(UpstreamError, match=f"cannot connect to 127.0.0.1:{port}"):
                await pool.request(f"http://127.0.0.1:{port}", b"POST", "/x", b"", total=5)
        finally:
            await pool.close()
            await runner.cleanup()

    asyncio.run(run())


def test_a_slow_reader_bounds_what_is_buffered() -> None:
    async def floods(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        size = 8 * HIGH_WATER
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            writer.write(b"x" * 65536)
            await writer.drain()

    async def run() -> None:
        server, base, _ = await _raw_server(floods)
        pool = UpstreamPool()
        try:
            response = await pool.request(base, b"POST", "/x", b"", total=10)
            await asyncio.sleep(0.5)  # the engine writes as fast as it can; nobody reads
            assert response._buffered <= HIGH_WATER + 256 * 1024  # paused at the mark (plus one socket read)
            total = 0
            while (chunk := await response.next_chunk()) is not None:
                total += len(chunk)
            assert total == 8 * HIGH_WATER  # and nothing was lost by pausing
        finally:
            await pool.close()
            server.close()

    asyncio.run(run())


def test_read_takes_a_body_many_times_the_back_pressure_mark_and_its_limit_refuses_more() -> None:
    """``read()`` wants the whole answer: it must never wait on the pause that bounds a streamed answer's buffer
    (the binder reads Pods this way; a body over ~256 kB once stalled until the deadline). ``limit`` refuses an
    answer over it, whether its length is announced or not."""
    size = 8 * HIGH_WATER

    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, _ = await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            chunked = b"chunked" in head
            writer.write(b"HTTP/1.1 200 OK\r\n" + (b"Transfer-Encoding: chunked\r\n\r\n" if chunked
                                                   else b"Content-Length: %d\r\n\r\n" % size))
            try:
                for _ in range(size // 65536):
                    piece = b"y" * 65536
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    await writer.drain()
                if chunked:
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
            except ConnectionError:
                return  # the client refused the answer and closed

    async def run() -> None:
        server, base, _ = await _raw_server(big)
        pool = UpstreamPool()
        try:
            response = await pool.request(base, b"GET", "/pod", b"", total=10)
            await asyncio.sleep(0.3)  # nobody reads yet: the connection pauses at the mark
            started = time.monotonic()
            assert len(await response.read()) == size
            assert time.monotonic() - started < 5  # not the deadline: it resumed
            with pytest.raises(UpstreamError, match=f"{size} bytes, over the {HIGH_WATER}"):
                await (await pool.request(base, b"GET", "/pod", b"", total=10)).read(HIGH_WATER)
            async with await pool.request(base, b"GET", "/pod", b"", [(b"X-Chunked", b"chunked")],
                                          total=10) as response:
                with pytest.raises(UpstreamError, match=f"over the {HIGH_WATER} bytes"):
                    await response.read(HIGH_WATER)
        finally:
            await pool.close()
            server.close()

    asyncio.run(run())


def test_a_get_on_a_reused_connection_closed_before_answering_is_sent_once_more_and_a_post_is_not() -> None:
    """The server (or a load balancer) closes a keep-alive connection just as the pool hands it out: a GET is sent
    again on a new connection (idempotent), a POST fails and the caller decides."""
    answered = [0]

    async def answers_once_then_drops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        answered[0] += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError):
            await _read_request(reader)  # the next request on this connection: dropped unanswered

    async def run() -> None:
        server, base, connections = await _raw_server(answers_once_then_drops)
        pool = UpstreamPool()
        try:
            async with await pool.request(base, b"GET", "/x", b"", total=5) as response:
                assert await response.read() == b"ok"
            assert pool.idle_connections() == 1
            async with await pool.request(base, b"GET", "/x", b"", total=5) as response:
                assert await response.read() == b"ok"  # the reused one was dropped; a new one answered
            assert connections[0] == 2 and answered[0] == 2
            with pytest.raises(UpstreamError, match="closed the connection"):
                await pool.request(base, b"POST", "/x", b"{}", total=5)
            assert answered[0] == 2  # never sent twice
        finally:
            await pool.close()
            server.close()

    asyncio.run(run())


def test_first_bounds_the_first_body_byte_and_idle_connections_of_every_engine_are_swept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a stream's headers come at once and its first token after the prefill: ``first`` bounds that token (it
    # stopped at the headers); and an engine nobody asks again has its idle connections closed all the same
    monkeypatch.setattr(upstream_module, "IDLE_S", 0.1)

    async def run() -> None:
        slow, slow_base, _ = await _raw_server(_sends_then_stalls(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"))
        a, a_base, _ = await _engine()
        b, b_base, _ = await _engine()
        pool = UpstreamPool()
        try:
            started = time.monotonic()
            response = await pool.request(slow_base, b"POST", "/x", b"", first=0.2, idle=30, total=10)
            with pytest.raises(UpstreamError, match="did not start its answer in time"):
                await response.next_chunk()
            assert time.monotonic() - started < 1.5  # not the 30 s idle bound
            for base in (a_base, b_base):
                async with await pool.request(base, b"POST", "/v1/completions", b"{}", total=5) as answer:
                    await answer.read()
            assert pool.idle_connections() == 2
            await asyncio.sleep(0.2)  # both idle past IDLE_S; engine b is never asked again
            async with await pool.request(a_base, b"POST", "/v1/completions", b"{}", total=5) as answer:
                await answer.read()
            assert pool.idle_connections() == 1  # a's new one; b's was swept when a's came back
        finally:
            await pool.close()
            slow.close()
            await a.cleanup()
            await b.cleanup()

    asyncio.run(run())
