"""The router's HTTP/1.1 server (``fuyao/http_server.py``) over real loopback sockets: raw clients that send exactly
the bytes a test needs (pipelining, chunked bodies, ``Expect``, HTTP/1.0, oversized heads, garbage), and the
standard library's client for the ordinary paths."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fuyao.http_body import BodyError
from fuyao.http_server import MAX_HEAD_BYTES, MAX_QUEUED, HttpServer, Request, Response, Stream


async def _server(keepalive_timeout: float = 75.0,
                  write_timeout: float = 60.0) -> tuple[HttpServer, int, dict[str, Any]]:
    seen: dict[str, Any] = {"bodies": [], "gone": []}
    release = asyncio.Event()
    seen["release"] = release

    async def echo(request: Request) -> Response:
        try:
            body = await request.read(1000, timeout_s=0.5)
        except BodyError as exc:
            return Response.text(exc.message, exc.status)
        seen["bodies"].append(body)
        return Response(body, headers=((b"X-Path", request.path.encode()), (b"X-Query", request.query.encode())),
                        content_type=b"application/octet-stream")

    async def stream(request: Request) -> Stream:
        out = request.stream(200, ((b"Content-Type", b"text/event-stream"),))
        for i in range(3):
            await out.write(b"data: %d\n\n" % i)
        await out.end()
        return out

    async def hold(request: Request) -> Stream:
        out = request.stream(200, ())
        try:
            while True:
                await out.write(b"x" * 65536)
        except ConnectionResetError:
            seen["gone"].append(request.gone)
        return out

    async def slow(_request: Request) -> Response:
        await release.wait()
        return Response.text("done")

    async def boom(_request: Request) -> Response:
        raise RuntimeError("a bug")

    async def hello(_request: Request) -> Response:
        return Response.text("hello")

    async def stream_then_fail(request: Request) -> Stream:
        out = request.stream(200, ())
        await out.write(b"part1")
        raise RuntimeError("a bug mid-stream")

    server = HttpServer(keepalive_timeout=keepalive_timeout, write_timeout=write_timeout)
    server.route("GET", "/hello", hello)
    server.route("GET", "/streamed", stream)
    server.route("GET", "/stream-then-fail", stream_then_fail)
    server.route("POST", "/echo", echo)
    server.route("POST", "/", echo)
    server.route("POST", "/stream", stream)
    server.route("POST", "/hold", hold)
    server.route("GET", "/slow", slow)
    server.route("GET", "/boom", boom)
    _, port = await server.start("127.0.0.1", 0)
    return server, port, seen


async def _exchange(port: int, data: bytes, until: Callable[[bytes], bool], timeout: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    try:
        async with asyncio.timeout(timeout):
            while not until(got):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                got += chunk
    finally:
        writer.close()
    return got


def _run(test: Callable[[HttpServer, int, dict[str, Any]], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        server, port, seen = await _server(**kwargs)
        try:
            await test(server, port, seen)
        finally:
            seen["release"].set()
            await server.stop(1.0)

    asyncio.run(main())


def test_keep_alive_and_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async def test(_server: HttpServer, port: int, seen: dict[str, Any]) -> None:
        one = b"POST http://x:80/echo?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"  # absolute form
        two = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n2\r\n!!\r\n0\r\n\r\n"
        got = await _exchange(port, one + two, lambda g: g.count(b"HTTP/1.1 200") == 2 and g.endswith(b"two!!"))
        first, second = got.split(b"HTTP/1.1 200 OK")[1:]
        assert first.endswith(b"\r\n\r\none") and b"X-Query: a=1" in first and b"X-Path: /echo" in first
        assert second.endswith(b"two!!") and b"Content-Length: 5" in second
        assert seen["bodies"] == [b"one", b"two!!"]
        assert b"Connection: close" not in got

    _run(test)


def test_routes_methods_head_and_a_failing_handler() -> None:
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        def call(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(method, path)
            response = conn.getresponse()
            result = response.status, dict(response.getheaders()), response.read()
            conn.close()
            return result

        loop = asyncio.get_running_loop()
        status, _, body = await loop.run_in_executor(None, call, "GET", "/nowhere")
        assert status == 404 and b"/nowhere" in body
        status, headers, _ = await loop.run_in_executor(None, call, "GET", "/echo")
        assert status == 405 and headers["Allow"] == "POST"
        status, _, body = await loop.run_in_executor(None, call, "GET", "/boom")
        assert status == 500 and b"a bug" not in body  # the bug is logged, not shown
        status, headers, body = await loop.run_in_executor(None, call, "POST", "/stream")
        assert status == 200 and body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        assert headers["Transfer-Encoding"] == "chunked" and headers["Content-Type"] == "text/event-stream"

    _run(test)


def test_head_gets_the_get_answers_head_without_its_body() -> None:
    async def test(_server: HttpServer, port: int, seen: dict[str, Any]) -> None:
        seen["release"].set()
        got = await _exchange(port, b"HEAD /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n",
                              lambda g: g.endswith(b"done"))
        head, rest = got.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 4" in head
        assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"\r\n\r\ndone")

    _run(test)


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", b"413"),  # declared: never read
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"100\r\n" + b"y" * 256 + b"\r\n"
     + b"400\r\n" + b"y" * 1024 + b"\r\n", b"413"),  # counted while it arrives
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", b"408"),  # never completes
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET /slow HTTP/1.1\r\nX-Big: " + b"z" * MAX_HEAD_BYTES + b"\r\n\r\n", b"431"),
])
def test_bad_requests_get_a_clear_status_and_the_connection_closes(request_bytes: bytes, status: bytes) -> None:
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        started = time.monotonic()
        got = await _exchange(port, request_bytes, lambda g: False)  # read until the server closes
        assert got.startswith(b"HTTP/1.1 " + status), got[:200]
        assert b"Connection: close" in got
        assert time.monotonic() - started < 2 + 2  # lingering (LINGER_S) until the server closes

    _run(test)


def test_an_answer_before_the_body_ends_reaches_a_client_that_keeps_sending() -> None:
    """A 413 while the client is still sending: the server reads and drops the rest (lingering close) instead of
    closing at once, which would reset the connection and could lose the answer in the client's buffers."""
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"100000\r\n" + b"z" * (1 << 20) + b"\r\n"
                for _ in range(16):  # 16 MB after a 1,000-byte cap
                    sock.sendall(chunk)
                answer = b""
                while data := sock.recv(65536):
                    answer += data
                return answer

        answer = await asyncio.get_running_loop().run_in_executor(None, client)
        assert answer.startswith(b"HTTP/1.1 413") and b"over 1000 bytes" in answer

    _run(test)


def test_expect_100_continue_is_answered_when_the_handler_reads() -> None:
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ping")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(4) == b"ping"
        writer.close()

    _run(test)


def test_http_1_0_gets_its_stream_until_close_and_no_chunking() -> None:
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        got = await _exchange(port, b"POST /stream HTTP/1.0\r\nContent-Length: 0\r\n\r\n", lambda g: False)
        head, body = got.split(b"\r\n\r\n", 1)
        assert b"Transfer-Encoding" not in head and b"Content-Length" not in head and b"Connection: close" in head
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"

    _run(test)


def test_a_client_that_leaves_mid_stream_makes_writes_fail_and_shows_as_gone() -> None:
    async def test(_server: HttpServer, port: int, seen: dict[str, Any]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        await reader.read(1024)
        writer.transport.abort()
        deadline = time.monotonic() + 5
        while not seen["gone"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert seen["gone"] == [True]

    _run(test)


def test_an_idle_connection_and_a_head_that_never_completes_are_closed_after_the_keepalive_timeout() -> None:
    async def test(server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        idle = await asyncio.open_connection("127.0.0.1", port)
        partial = await asyncio.open_connection("127.0.0.1", port)
        partial[1].write(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for reader, _ in (idle, partial):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        assert 0.25 < time.monotonic() - started < 3
        assert not server.connections

    _run(test, keepalive_timeout=0.4)


def test_stop_lets_a_running_request_finish_and_refuses_new_connections() -> None:
    async def test(server: HttpServer, port: int, seen: dict[str, Any]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        stopping = asyncio.create_task(server.stop(5.0))
        await asyncio.sleep(0.1)
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        seen["release"].set()
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"done") and b"Connection: close" in answer
        await stopping
        writer.close()

    _run(test)


def test_an_upgrade_is_ignored_and_the_request_answered_in_http_1_1() -> None:
    """``curl --http2`` on an http:// URL asks to upgrade to h2c, a websocket client to websocket: the server does not
    switch (RFC 9110 §7.8) and answers the request itself, in HTTP/1.1, then closes; a body of declared length is
    still the request's."""
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        h2c = await _exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
                              lambda g: False)
        assert h2c.startswith(b"HTTP/1.1 200") and h2c.endswith(b"hello") and b"Connection: close" in h2c
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                     b"Content-Length: 5\r\n\r\nhel")
        await asyncio.sleep(0.05)
        writer.write(b"lo")  # the rest of the body in another segment
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello"), answer

    _run(test)


def test_bytes_after_a_last_request_are_dropped_and_garbage_after_valid_ones_is_refused_after_their_answers() -> None:
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        closing = await _exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n", lambda g: False)
        assert closing.count(b"HTTP/1.1 ") == 1 and closing.endswith(b"hello")  # answered, the rest dropped
        refused = await _exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n", lambda g: False)
        assert refused.startswith(b"HTTP/1.1 200") and b"hello" in refused  # the valid one's answer first
        assert b"HTTP/1.1 400" in refused.split(b"hello", 1)[1], refused

    _run(test)


def test_a_handler_that_raises_mid_stream_cuts_the_connection_instead_of_answering_500_inside_it() -> None:
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        got = await _exchange(port, b"GET /stream-then-fail HTTP/1.1\r\nHost: x\r\n\r\n"
                                    b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n", lambda g: False)
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"5\r\npart1\r\n"), got  # no end chunk: cut short
        assert got.count(b"HTTP/1.1") == 1 and b"500" not in got

    _run(test)


def test_a_client_that_half_closes_after_its_request_still_gets_the_answer() -> None:
    async def test(_server: HttpServer, port: int, seen: dict[str, Any]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.write_eof()
        await asyncio.sleep(0.2)
        seen["release"].set()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"done") and b"Connection: close" in answer

    _run(test)


def test_a_streams_head_says_close_when_the_connection_will_close_and_head_gets_no_stream_body() -> None:
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        # the handler streams without reading the body: the rest of it cannot be told from a next request
        unread = await _exchange(port, b"POST /stream HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
                                 lambda g: False)
        assert b"Transfer-Encoding: chunked" in unread and b"Connection: close" in unread.split(b"\r\n\r\n")[0]
        head = await _exchange(port, b"HEAD /streamed HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n", lambda g: g.endswith(b"hello"))
        first, second = head.split(b"\r\n\r\n", 1)
        assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200"), head  # no body after HEAD

    _run(test)


def test_a_header_line_that_never_ends_is_refused_431_once_over_the_limit() -> None:
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: ")
        answer = b""
        for _ in range(100):  # up to 100 x 8 kB = 800 kB of one header value, no end of line
            writer.write(b"a" * 8192)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.sleep(0.005)
            with contextlib.suppress(TimeoutError):
                answer += await asyncio.wait_for(reader.read(65536), 0.01)
            if answer:
                break
        if not answer:  # a busy machine: the answer may come after the last write
            answer = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 431"), answer

    _run(test)


def test_a_client_that_pipelines_without_reading_is_not_parsed_far_ahead() -> None:
    async def test(server: HttpServer, port: int, seen: dict[str, Any]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
        count = 30_000  # ~1 MB, all waiting on the first: parsed ahead, they would all be queued
        writer.write(request * count)
        await asyncio.sleep(1.0)
        [conn] = list(server.connections)
        # the mark, plus what one read held (at most 256 kB: ~7,900 of these requests)
        assert len(conn.queue) <= MAX_QUEUED + (256 * 1024) // len(request) + 1, len(conn.queue)
        seen["release"].set()
        got, carry = 0, b""
        while got < count:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
            assert chunk
            carry += chunk
            got += carry.count(b"done")
            carry = carry[-3:]  # a "done" cut between two reads is counted with the next
        writer.close()
        assert got == count

    _run(test)


def test_http_1_0_keep_alive_is_confirmed_and_an_absolute_target_keeps_its_query() -> None:
    async def test(_server: HttpServer, port: int, _seen: dict[str, Any]) -> None:
        got = await _exchange(port, b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                                    b"GET /hello HTTP/1.0\r\n\r\n", lambda g: False)
        first, _, second = got.partition(b"hello")
        assert b"Connection: keep-alive" in first and second.startswith(b"HTTP/1.1 200") and got.endswith(b"hello")
        absolute = await _exchange(port, b"POST http://x?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                                   lambda g: b"X-Query" in g)
        assert b"X-Path: /\r\n" in absolute and b"X-Query: a=1\r\n" in absolute

    _run(test)


def test_stop_cuts_a_stream_whose_client_stopped_reading() -> None:
    async def test(server: HttpServer, port: int, seen: dict[str, Any]) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        await asyncio.sleep(0.3)  # the stream fills the socket buffers; nobody reads
        started = time.monotonic()
        await asyncio.wait_for(server.stop(0.3), 5)
        await asyncio.sleep(0.1)
        assert time.monotonic() - started < 3 and server.active == 0 and seen["gone"] == [True]
        writer.close()

    _run(test)


def test_a_client_that_stops_reading_a_stream_is_cut_after_the_write_timeout() -> None:
    # the socket stays open, nothing is read: the handler must not wait forever on its writes (in the router it
    # held a concurrency slot and the backend's in-flight count until the client closed)
    async def test(server: HttpServer, port: int, seen: dict[str, Any]) -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        started = time.monotonic()
        deadline = started + 5
        while not seen["gone"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert seen["gone"] == [True] and 0.4 < time.monotonic() - started < 4
        writer.close()

    _run(test, write_timeout=0.5)
