"""A lean HTTP/1.1 server for the router's request path: requests parsed by ``httptools`` (llhttp, the parser
uvicorn uses), answers written as one buffer, streams relayed as chunked frames with back-pressure.

Why not ``aiohttp.web`` here: a profile of the router put about 40 % of its CPU per proxied request in aiohttp's
server (request objects, header multidicts, stream readers, the response machinery), for features a reverse proxy
never uses. The other daemons keep aiohttp; only the router, whose every request pays this, serves from here.

What a client can rely on (the same as aiohttp gave the router):

- keep-alive (HTTP/1.1 by default, HTTP/1.0 with ``Connection: keep-alive``) and pipelined requests, answered in
  order; an idle connection is closed after ``keepalive_timeout``, and so is one whose headers do not complete in
  that time (a slow client cannot hold a socket forever);
- the request line and headers together are at most :data:`MAX_HEAD_BYTES` (else 431); a malformed request is
  answered 400 and the connection closed;
- the body is read only when the handler asks for it (:meth:`Request.read`), with its own cap (413 before reading
  when ``Content-Length`` says so) and deadline (408); ``Expect: 100-continue`` is answered then; at most
  :data:`HIGH_WATER` bytes are buffered before the socket stops being read. An answer sent before the whole body
  arrived closes the connection (the rest of the body cannot be told from a next request), lingering for
  :data:`LINGER_S` so the client reads it;
- routes by exact path, then by the longest registered prefix (:meth:`HttpServer.route_prefix`); unknown paths are
  404 and known paths with another method 405 with ``Allow``; ``HEAD`` is served by the ``GET`` handler without
  the body;
- a handler that raises answers 500 (logged); a client that goes away shows as :attr:`Request.gone` and makes
  stream writes raise :class:`ConnectionResetError`, and so does one that reads nothing of an answer for
  ``write_timeout`` (its connection is cut);
- shutdown: no new connections, idle ones closed, running handlers given ``timeout`` to finish, then cut;
- what a proxy in front may send: an ``Upgrade`` (``curl --http2``'s h2c, websocket) is ignored (RFC 9110 §7.8):
  the request is answered in HTTP/1.1 and the connection closed after it; bytes after a request that closes the
  connection are dropped; a malformed request after valid pipelined ones is answered 400 after their answers; a
  client that half-closes after its request still gets the answer (unless the handler asked to be cancelled when
  its client goes: the router takes an EOF as the client leaving, as most servers do); past :data:`MAX_QUEUED`
  pipelined requests waiting for their answers the socket stops being read (what one read held is still parsed),
  and answers wait while the client does not read them; a head line that never ends is refused 431 once over the limit;
- a handler that raises after its stream's head went out cuts the connection (the client sees the answer end short,
  never a second status line inside its body).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus

import httptools

from fuyao import netaddr
from fuyao.http_body import BodyError

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
"""Request line plus headers; aiohttp's limit was 8,190 bytes per line."""
HIGH_WATER = 256 * 1024
"""Body bytes buffered ahead of the handler before the socket stops being read."""
MAX_QUEUED = 16
"""Pipelined requests parsed ahead of the one being answered before the socket stops being read."""
LINGER_S = 2.0
"""After an answer sent before its request's body ended, the rest is read and dropped for this long before the
connection closes (a lingering close, RFC 9112 §9.6): closing at once would make the kernel reset the connection
and the client could lose the answer."""

Headers = Iterable[tuple[bytes, bytes]]
Handler = Callable[["Request"], Awaitable["Response | Stream"]]

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus} | {499: b"Client Closed Request"}
_HOP = frozenset({b"connection", b"content-length", b"transfer-encoding", b"keep-alive"})


class _Clock:
    """The ``Date`` header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def date(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.value = now, formatdate(now, usegmt=True).encode()
        return cls.value


def _head(status: int, headers: Headers, content_type: bytes | None, length: int | None, keep_alive: bool,
          chunked: bool = True, http10: bool = False) -> bytes:
    """The status line and headers; the body's framing is ``length``, else chunked, else (``chunked=False``) the
    connection's end. ``http10``: an HTTP/1.0 client is told when the connection stays open."""
    lines = [b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, _REASONS.get(status, b"Unknown"), _Clock.date())]
    for name, value in headers:
        if name.lower() in _HOP or b"\n" in value or b"\r" in value:
            continue  # framing is the server's; no header injection
        lines.append(b"%s: %s\r\n" % (name, value))
    if content_type is not None:
        lines.append(b"Content-Type: %s\r\n" % content_type)
    if length is not None:
        lines.append(b"Content-Length: %d\r\n" % length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif http10:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class Response:
    """A complete answer, written in one buffer."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, body: bytes = b"", status: int = 200, headers: Headers = (),
                 content_type: bytes | None = None):
        self.body, self.status, self.headers, self.content_type = body, status, headers, content_type

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(text.encode(), status, content_type=b"text/plain; charset=utf-8")

    @classmethod
    def json(cls, body: bytes, status: int = 200) -> Response:
        return cls(body, status, content_type=b"application/json")


class Stream:
    """An answer relayed as it is produced: its head goes out with the first chunk (one write); HTTP/1.1 clients
    get chunked frames, HTTP/1.0 ones the bytes until the connection closes. :meth:`write` waits while the client's
    socket buffer is full and raises :class:`ConnectionResetError` once the client is gone."""

    __slots__ = ("_conn", "_framed", "_head", "_head_only", "_request", "ended", "status")

    def __init__(self, request: Request, status: int, headers: Headers):
        self._request, self._conn = request, request._conn
        self.status = status
        self._framed = request.version != "1.0"
        self._head_only = request.method == "HEAD"
        conn = request._conn
        if not self._framed or not request._body_done or conn.server.closing or conn.client_done:
            request.keep_alive = False  # the connection closes after this answer: its head says so
        # HTTP/1.0: no length and no chunking, the end of the connection ends the body
        self._head: bytes | None = _head(status, headers, None, None, request.keep_alive, chunked=self._framed)
        self.ended = False

    def _take_head(self, data: bytes) -> bytes:
        head, self._head = self._head, None
        if head is not None:
            self._request.streamed = True
            return head if self._head_only else head + data
        return b"" if self._head_only else data

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        conn = self._conn
        if conn.lost:
            raise ConnectionResetError("the client closed the connection")
        data = self._take_head(b"%x\r\n%s\r\n" % (len(chunk), chunk) if self._framed else chunk)
        if data:
            conn.transport.write(data)
        if conn.paused:
            await conn.drain()

    async def end(self) -> None:
        """The end of the answer (the head too, when no chunk was written)."""
        conn = self._conn
        if conn.lost:
            raise ConnectionResetError("the client closed the connection")
        tail = self._take_head(b"0\r\n\r\n" if self._framed else b"")
        if tail:
            conn.transport.write(tail)
        self.ended = True


class Request:
    """One request: method, path (without the query), query, HTTP version, headers as sent (raw pairs), the peer;
    the body through :meth:`read`."""

    __slots__ = (
        "_body",
        "_body_done",
        "_body_size",
        "_broken",
        "_cancel_when_gone",
        "_conn",
        "_limit",
        "_waiter",
        "content_length",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query",
        "read_started",
        "refusal",
        "streamed",
        "version",
    )

    def __init__(self, conn: _Connection, method: str, url: bytes, version: str, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool, content_length: int | None, expect_continue: bool):
        self._conn = conn
        self.method, self.version, self.headers = method, version, headers
        if not url.startswith(b"/") and b"://" in url:  # absolute form (RFC 9112 §3.2.2): the path is what follows
            rest = url.split(b"://", 1)[1]
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=-1)
            url = b"/" if cut < 0 else rest[cut:] if rest.startswith(b"/", cut) else b"/" + rest[cut:]
        path, _, query = url.partition(b"?")
        self.path, self.query = path.decode("latin-1"), query.decode("latin-1")
        self.keep_alive, self.content_length, self.expect_continue = keep_alive, content_length, expect_continue
        self._body: list[bytes] = []
        self._body_size = 0
        self._body_done = False
        self._waiter: asyncio.Future[None] | None = None
        self._limit: int | None = None  # the cap of the read in progress
        self._broken: str | None = None  # why its body will never complete (a malformed chunk, the client's EOF)
        self._cancel_when_gone = False
        self.read_started = False
        self.refusal: tuple[int, str] | None = None  # not a request: the connection's refusal, answered in turn
        self.streamed = False  # a stream's head went out

    @property
    def remote(self) -> str | None:
        peer = self._conn.transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None

    @property
    def gone(self) -> bool:
        """The client closed its side (or the server is dropping the connection)."""
        return self._conn.lost or self._conn.transport.is_closing()

    def cancel_when_gone(self) -> None:
        """Have the handler cancelled (``asyncio.CancelledError`` where it waits) if the client's connection is lost
        while this request is answered: a proxy then drops its upstream request at once instead of when its
        answer would be written (the engine aborts the generation and frees its KV blocks)."""
        self._cancel_when_gone = True

    def abort(self) -> None:
        """Cut the connection: the client sees its answer end short (never a duplicated or a made-up end)."""
        self._conn.transport.close()

    def stream(self, status: int, headers: Headers) -> Stream:
        return Stream(self, status, headers)

    # The body -----------------------------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._body.append(data)
        self._body_size += len(data)
        if self._body_size > HIGH_WATER and not self.read_started:
            self._conn.pause_reading()  # nobody reads it yet: no more of it is buffered
        elif self._limit is not None and self._body_size > self._limit:
            self._conn.pause_reading()  # over the cap: no more of it is read (the answer closes the connection)
            self._wake()
        # otherwise the reader sleeps on: it wakes when the body is complete (one wake-up, not one per chunk)

    def _complete(self) -> None:
        self._body_done = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _arrived(self, max_bytes: int) -> None:
        """Until the body is complete or over ``max_bytes``."""
        while not self._body_done:
            if self._body_size > max_bytes:
                break
            if self._conn.lost:
                raise BodyError(400, "the client closed the connection before its body arrived")
            if self._broken is not None:
                raise BodyError(400, self._broken)
            self._waiter = self._conn.loop.create_future()
            await self._waiter

    async def read(self, max_bytes: int, timeout_s: float | None = None) -> bytes:
        """The whole body, at most ``max_bytes`` (else :class:`BodyError` 413, refused before reading when the
        length is declared), all of it within ``timeout_s`` when given (else 408)."""
        if self.content_length is not None and self.content_length > max_bytes:
            raise BodyError(413, f"the request body is {self.content_length} bytes; at most {max_bytes} are accepted")
        self.read_started = True
        self._limit = max_bytes
        if not self._body_done:
            if self.expect_continue:
                self._conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._conn.resume_reading()
            try:
                if timeout_s is None:
                    await self._arrived(max_bytes)
                else:
                    async with asyncio.timeout(timeout_s):
                        await self._arrived(max_bytes)
            except TimeoutError:
                raise BodyError(408, f"the request body did not arrive within {timeout_s:g} s "
                                     f"({self._body_size} bytes came)") from None
            finally:
                self._waiter = None
        if self._body_size > max_bytes:
            raise BodyError(413, f"the request body is over {max_bytes} bytes; at most {max_bytes} are accepted")
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = [body] if body else []
        return body


class _Connection(asyncio.Protocol):
    """One client connection: parses requests as bytes arrive and answers them in order, one at a time."""

    def __init__(self, server: HttpServer):
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in connection_made
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[Request] = deque()
        self.current: Request | None = None  # being parsed
        self.task: asyncio.Task[None] | None = None
        self.lost = False
        self.discarding = False  # lingering: what arrives is dropped
        self.no_more = False  # no request after those queued is read (a last request, an upgrade, a refusal)
        self.refused = False  # a refusal is queued: the parser is done with this connection
        self.client_done = False  # the client half-closed: answer what it asked, then close
        self._upgrade_body: Request | None = None  # an ignored upgrade's request, its body read without the parser
        self._upgrade_left = 0
        self.paused = False
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = False  # a request's head began and has not completed
        self._began = False  # a head began in the bytes being fed
        self._head_fed = 0  # bytes of chunks that were all head (llhttp buffers a long header line unseen)
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol ------------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.server.connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        self._disarm()
        for request in ([self.current] if self.current else []) + list(self.queue):
            request._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.queue and self.queue[0]._cancel_when_gone and self.task is not None:
            self.task.cancel()  # the request being answered asked for it

    def data_received(self, data: bytes) -> None:
        if self._upgrade_body is not None:
            self._feed_upgrade_body(data)
            return
        if self.discarding or self.no_more:
            return
        was_in_head = self._in_head
        self._began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._ignore_upgrade(data[exc.args[0]:] if exc.args and isinstance(exc.args[0], int) else b"")
            return
        except httptools.HttpParserError as exc:
            if not self.no_more:  # (after a last request, what follows is dropped, not refused)
                self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head and was_in_head and not self._began:
            self._head_fed += len(data)  # all of it was head, and it is not over yet
            if self._head_fed > MAX_HEAD_BYTES:
                self._refuse(431, f"the request head is over {MAX_HEAD_BYTES} bytes")

    def eof_received(self) -> bool:
        """The client half-closed: what it asked is still answered (then the connection closes); a body that had
        not all arrived never will. A closed socket and a half-closed one look the same here, so a handler that
        asked to be cancelled when its client goes (:meth:`Request.cancel_when_gone`) takes the EOF as that."""
        self.client_done = True
        current = self.current
        if current is not None and not current._body_done:
            current._broken = "the client closed its side before its body arrived"
            current._wake()
        if self.queue and self.queue[0]._cancel_when_gone:
            return False  # closed: connection_lost cancels the handler
        return self.task is not None or bool(self.queue)  # True: keep our side open for the answers

    def _ignore_upgrade(self, rest: bytes) -> None:
        """llhttp stops at a request asking to upgrade (``Upgrade`` named in ``Connection``) and takes what follows
        as the new protocol. We do not switch (RFC 9110 §7.8 lets a server ignore it): the request is answered in
        HTTP/1.1 and the connection closes after it; its body, of declared length, is read as such."""
        self.no_more = True
        request = self.queue[-1] if self.queue else None
        if request is None:
            self.transport.close()
            return
        request.keep_alive = False
        if any(k.lower() == b"transfer-encoding" for k, _ in request.headers):
            self.queue.pop()  # not dispatched yet (this runs before its task does)
            self._refuse(400, "a chunked body with an Upgrade is not served")
            return
        if request.content_length:
            request._body_done = False  # llhttp took the body for the new protocol's bytes
            self._upgrade_body, self._upgrade_left = request, request.content_length
            self._feed_upgrade_body(rest)

    def _feed_upgrade_body(self, data: bytes) -> None:
        request = self._upgrade_body
        assert request is not None
        take = data[:self._upgrade_left]
        if take:
            self._upgrade_left -= len(take)
            request._feed(take)
        if self._upgrade_left == 0:
            self._upgrade_body = None
            request._complete()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        deadline = self.loop.time() + self.server.write_timeout
        while self.paused and not self.lost:
            self._drain = self.loop.create_future()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._drain
            except TimeoutError:
                self.transport.abort()  # connection_lost follows: the connection is gone for every handler
                self.lost = True
                raise ConnectionResetError(f"the client read nothing for {self.server.write_timeout:g} s") from None
        if self.lost:
            raise ConnectionResetError("the client closed the connection")

    def pause_reading(self) -> None:
        if not self._reading_paused and not self.lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and not self.lost:
            self._reading_paused = False
            self.transport.resume_reading()

    # Timers -------------------------------------------------------------------------------------------------------
    def _arm_idle(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.server.keepalive_timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.task is None and not self.queue:
            self.transport.close()  # idle, or a head that never completed

    # httptools callbacks ------------------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url.clear()
        self._headers = []
        self._head_bytes = 0
        self._in_head = self._began = True
        self._head_fed = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._grow(len(name) + len(value) + 4)

    def _grow(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
            raise httptools.HttpParserCallbackError("head too large")  # stop parsing this connection (no_more)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_head = False
        length: int | None = None
        expect = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif lowered == b"expect":
                expect = value.lower() == b"100-continue"
        parser = self.parser
        request = Request(self, parser.get_method().decode("latin-1"), bytes(self._url), parser.get_http_version(),
                          self._headers, parser.should_keep_alive(), length, expect)
        self.current = request
        self.queue.append(request)
        if len(self.queue) > MAX_QUEUED:
            self.pause_reading()  # a client pipelining without reading its answers: parse no further ahead
        if self.task is None:
            self.task = self.loop.create_task(self._answer_all())

    def on_body(self, body: bytes) -> None:
        if self.current is not None:
            self.current._feed(body)

    def on_message_complete(self) -> None:
        if self.current is not None:
            if not self.current.keep_alive:
                self.no_more = True  # the last request of this connection: nothing after it is read
            self.current._complete()
            self.current = None

    # Answering ----------------------------------------------------------------------------------------------------
    def _refuse(self, status: int, message: str) -> None:
        """Answer what the parser could not take, after the answers to the requests before it, and close: nothing
        more is read as HTTP. A request whose body it broke off answers 400 to a handler that reads it."""
        if self.lost or self.discarding or self.refused:
            return
        self.refused = self.no_more = True
        current = self.current
        if current is not None and not current._body_done:
            current._broken = message
            current._wake()
        self.current = None
        refusal = Request(self, "", b"/", "1.1", [], False, None, False)
        refusal.refusal = (status, message)
        self.queue.append(refusal)
        if self.task is None:
            self.task = self.loop.create_task(self._answer_all())

    async def _answer_all(self) -> None:
        try:
            while self.queue and not self.lost:
                request = self.queue[0]
                keep = await self._answer(request)
                self.queue.popleft()
                if not keep:
                    self._close(lingering=not request._body_done)
                    return
                if len(self.queue) <= MAX_QUEUED // 2:
                    self.resume_reading()
            if self.client_done:
                self.transport.close()  # it half-closed: everything it asked is answered
            elif not self.lost:
                self.resume_reading()
                self._arm_idle()
        finally:
            self.task = None

    def _close(self, lingering: bool) -> None:
        if not lingering or self.lost or self.client_done or self.transport.is_closing() \
                or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.discarding = True
        self.queue.clear()
        self.transport.write_eof()  # the answer is out; the client sees the end of it
        self.resume_reading()
        self._disarm()
        self._timer = self.loop.call_later(LINGER_S, self.transport.close)

    async def _answer(self, request: Request) -> bool:
        """Run the request's handler and send its answer; whether the connection stays open."""
        server = self.server
        server.active += 1
        try:
            if request.refusal is not None:
                status, message = request.refusal
                self.transport.write(_head(status, (), b"text/plain; charset=utf-8", len(message) + 1, False)
                                     + message.encode() + b"\n")
                return False
            try:
                response = await server.dispatch(request)
            except Exception:
                log.exception("request %s %s failed in its handler", request.method, request.path)
                if request.streamed:  # its head and part of its body are out: cutting it is the only honest end
                    self.transport.close()
                    return False
                response = Response.text("internal server error", 500)
            if self.lost:
                return False
            keep = request.keep_alive and request._body_done and not server.closing and not self.client_done
            if isinstance(response, Stream):
                if not response.ended:
                    return False  # a stream the handler gave up on: its end is the connection's
                return keep
            body = b"" if request.method == "HEAD" else response.body
            self.transport.write(_head(response.status, response.headers, response.content_type,
                                       len(response.body), keep, http10=request.version == "1.0") + body)
            if self.paused:
                try:
                    await self.drain()  # the client is not reading its answers: answer no further ahead
                except ConnectionResetError:
                    return False
            return keep
        finally:
            server.active -= 1
            if server.active == 0 and server.idle is not None:
                server.idle.set()


class HttpServer:
    """Routes by exact path (or prefix) and method; :meth:`start` listens, :meth:`stop` drains and then runs
    :attr:`on_stop`."""

    def __init__(self, keepalive_timeout: float = 75.0, write_timeout: float = 60.0):
        """``write_timeout``: how long an answer may wait for a client that reads nothing (its socket buffers full)
        before the connection is cut and the handler's write raises :class:`ConnectionResetError` (a client that
        stops reading a stream but keeps its socket open must not hold the handler, and what it holds, forever)."""
        self.keepalive_timeout = keepalive_timeout
        self.write_timeout = write_timeout
        self.routes: dict[str, dict[str, Handler]] = {}
        self.prefixes: dict[str, dict[str, Handler]] = {}
        self.on_stop: list[Callable[[], None]] = []
        self.connections: set[_Connection] = set()
        self.active = 0
        self.idle: asyncio.Event | None = None
        self.closing = False
        self._server: asyncio.Server | None = None

    def route(self, method: str, path: str, handler: Handler) -> None:
        methods = self.routes.setdefault(path, {})
        methods[method] = handler
        if method == "GET":
            methods.setdefault("HEAD", handler)

    def route_prefix(self, method: str, prefix: str, handler: Handler) -> None:
        """Every path under ``prefix`` (the handler reads the rest of :attr:`Request.path`)."""
        methods = self.prefixes.setdefault(prefix, {})
        methods[method] = handler
        if method == "GET":
            methods.setdefault("HEAD", handler)

    async def dispatch(self, request: Request) -> Response | Stream:
        methods = self.routes.get(request.path)
        if methods is None:
            under = [p for p in self.prefixes if request.path.startswith(p)]
            if not under:
                return Response.text(f"404: no route {request.path}", 404)
            methods = self.prefixes[max(under, key=len)]
        handler = methods.get(request.method)
        if handler is None:
            return Response(f"405: {request.method} is not allowed on {request.path}\n".encode(), 405,
                            ((b"Allow", ", ".join(sorted(methods)).encode()),), b"text/plain; charset=utf-8")
        return await handler(request)

    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, backlog: int = 1024,
                    reuse_port: bool = False, sock: socket.socket | None = None) -> tuple[str, int]:
        """Listen on ``host:port`` (an empty host: every address of every family) or on ``sock``, already bound;
        the bound address (port 0 → the one the kernel picked). Raises :class:`OSError`."""
        loop = asyncio.get_running_loop()
        if sock is None and not host:
            sock = netaddr.wildcard_socket(port, reuse_port, backlog)
        if sock is not None:
            self._server = await loop.create_server(lambda: _Connection(self), sock=sock, ssl=ssl_context,
                                                    backlog=backlog)
        else:
            self._server = await loop.create_server(lambda: _Connection(self), host, port, ssl=ssl_context,
                                                    backlog=backlog, reuse_port=reuse_port or None)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def stop(self, timeout: float) -> None:
        """Stop accepting, close idle connections, let running handlers finish for up to ``timeout``, then cut the
        rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.task is None:
                conn.transport.close()
        if self.active:
            self.idle = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self.idle.wait()
            except TimeoutError:
                log.warning("%d requests still running after %.1f s; closing their connections", self.active, timeout)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.transport.abort()  # a handler still running (a stream to a client that stopped reading)
            else:
                conn.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
        for call in self.on_stop:
            call()
