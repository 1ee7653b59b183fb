"""A lean asyncio HTTP/1.1 client: keep-alive connections, one request in one write, and only what its callers need
from the answer (status, headers, length, body chunks as they arrive). The router relays requests to its engines
with it, and the scheduler extender's binder posts its Bindings to the API server (TLS, the cluster's CA and
client certificate through ``ssl_context``).

Why not aiohttp's client: a profile of the router put about 40 % of its CPU per proxied request in
``ClientRequest``/``ClientResponse`` (header multidicts, cookie and redirect machinery, stream readers), for
features a reverse proxy to its own engines never uses; the extender's binds spent as much per Binding. Here the
response is parsed by ``httptools`` (llhttp, the parser uvicorn uses) and everything else is a few attribute
updates per callback.

- Connections are pooled per ``(scheme, host, port)`` and reused newest first. An idle connection is dropped when
  the server closes it (the pool hears the close) or after :data:`IDLE_S`, below uvicorn's default keep-alive of 5 s
  (vLLM's ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), so the client does not write into a connection the server is closing.
  A POST is never sent twice: one that meets a closed connection fails, and the caller decides (the router
  retries on another backend only before the first byte reaches its client). A GET or HEAD sent on a reused
  connection that the server closed before answering is sent once more on a new one (an idempotent request, as
  RFC 9112 §9.3.1 allows): a keep-alive connection can be closed by the server, or a load balancer in between,
  just as it is taken from the pool.
- A connection goes back to the pool only after its answer was read to the end; an answer abandoned half way
  (the client went away) closes it, which is how the engine learns to abort the generation.
- Back-pressure: a streamed answer buffers at most :data:`HIGH_WATER` bytes before the socket stops being read.
  :meth:`Response.read` wants the whole answer, so it is never paused; its ``limit`` bounds what it holds.
- Idle connections of every origin are swept once per idle time (on any request or release), so an engine that
  left, or a node that died without closing its sockets, does not keep connections open.
- Timeouts: ``first`` bounds the time to the first byte of the answer's body (a stream's first token: an engine
  that streams sends its headers at once), ``total`` the whole exchange (both include connecting; ``total`` raises
  :class:`DeadlineError`), ``idle`` each wait for the next bytes of the body once it has started. Each aborts the
  connection and raises :class:`UpstreamError`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools

IDLE_S = 4.0
"""An idle keep-alive connection is closed after this long (servers close theirs after 5 s by default)."""
HIGH_WATER = 256 * 1024
"""Bytes of an answer buffered before reading from the engine pauses (resumed once the relay catches up)."""
MAX_IDLE_PER_ORIGIN = 256
"""Idle connections kept per engine; more are closed when they come back."""
_IDEMPOTENT = frozenset({b"GET", b"HEAD"})
"""Methods sent again, once, when a reused connection turns out closed before any answer."""


class UpstreamError(Exception):
    """The server could not be reached or broke off: refused, reset, closed early, a malformed answer, a timeout."""


class DeadlineError(UpstreamError):
    """The whole exchange took longer than its ``total``: the engine works (it answered until then); the request's
    time budget ran out."""


class ConnectError(UpstreamError):
    """No connection could be made (refused, unreachable, a TLS handshake refused, timed out): nothing was sent, so
    the request certainly did not happen. Any other :class:`UpstreamError` may come after the server acted."""


class Origin:
    """Where to connect for one backend base URL (parsed once)."""

    __slots__ = ("host", "host_header", "port", "prefix", "ssl")

    def __init__(self, base: str, ssl_context: ssl.SSLContext | None = None):
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        self.host = parts.hostname
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        self.port = parts.port or (443 if self.ssl else 80)
        self.host_header = parts.netloc.rpartition("@")[2].encode("idna")
        self.prefix = parts.path.rstrip("/").encode()


class Response:
    """An engine's answer: :attr:`status`, :attr:`headers` (raw pairs, as sent), :attr:`content_length`, then the
    body through :meth:`read` (whole) or :meth:`next_chunk` (as it arrives). :meth:`close` abandons it."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_idle",
        "_waiter",
        "_whole",
        "chunked",
        "content_length",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, idle: float | None):
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self._conn: _Connection | None = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._idle = idle
        self._whole = False  # read() wants all of it: no back-pressure pause

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def next_chunk(self) -> bytes | None:
        """The next bytes of the body as they arrived, or None at its end. Raises :class:`UpstreamError`."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        conn = self._conn
        if conn is not None and conn.paused and self._buffered < HIGH_WATER // 2:
            conn.resume()
        return chunk

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body. ``limit``: an answer of more bytes is abandoned (its connection closed) and raises.
        Raises :class:`UpstreamError`."""
        self._whole = True
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()  # paused while nobody read (a body bigger than HIGH_WATER): read() takes it all
        if limit is not None and self.content_length is not None and self.content_length > limit:
            self.close()
            raise UpstreamError(f"the answer is {self.content_length} bytes, over the {limit} expected")
        while not self._done:
            if self._error is not None:
                raise self._error
            if limit is not None and self._buffered > limit:
                self.close()
                raise UpstreamError(f"the answer is over the {limit} bytes expected")
            await self._wait()
        if self._error is not None:
            raise self._error
        if limit is not None and self._buffered > limit:
            raise UpstreamError(f"the answer is over the {limit} bytes expected")
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    def close(self) -> None:
        """Abandon the answer: unless it was read to the end, its connection is closed (the engine sees it)."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.abort()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        conn = self._conn
        # before the first body byte, ``first`` (when given) bounds the wait, not ``idle``: a long prefill is not a
        # silent engine
        waiting_first = conn is not None and conn.headers_deadline is not None
        timer = loop.call_later(self._idle, self._idle_expired, waiter) if self._idle and not waiting_first else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _idle_expired(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done() and self._conn is not None:
            self._conn.fail(UpstreamError(f"no bytes from the engine for {self._idle:g} s"))

    # Called by the connection -------------------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._whole and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._conn = None
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if not self._done:
            self._error = error
            self._conn = None
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]):
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.headers_ready: asyncio.Future[None] | None = None
        self.keep_alive = False
        self.paused = False
        self.closed = False
        self.peer_closed = False  # the server (or something between) closed or reset it, not us
        self.idle_since = 0.0
        self.deadline: asyncio.TimerHandle | None = None
        self.headers_deadline: asyncio.TimerHandle | None = None

    # asyncio.Protocol ---------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a TCP connection's (uvloop's TCPTransport is one in all but name: not an asyncio.Transport subclass)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            self.abort()  # bytes nobody asked for: the connection is not in a known state
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"malformed HTTP answer from the engine: {exc}"))

    def eof_received(self) -> bool:
        # the server is closing: never handed out again from now on (connection_lost comes after this)
        self.peer_closed = self.peer_closed or not self.closed
        self.closed = True
        self.pool.forget(self)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer_closed = self.peer_closed or not self.closed
        self.closed = True
        self.pool.forget(self)
        response = self.response
        if response is not None:
            if (response.status and response.content_length is None and not response.chunked
                    and not response._done):
                self._complete()  # a body delimited by the end of the connection ends here
            else:
                self.fail(UpstreamError(f"the engine closed the connection{f': {exc}' if exc else ''}"))

    # httptools callbacks ------------------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.response.headers.append((name, value))  # type: ignore[union-attr]  # httptools calls it only while a response is read

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status = self.parser.get_status_code()
        if 100 <= response.status < 200:  # an interim answer (we never send Expect): wait for the real one
            response.status = 0
            response.headers.clear()
            return
        for name, value in response.headers:
            lower = name.lower()
            if lower == b"content-length":
                response.content_length = int(value)  # llhttp has refused a malformed length already
            elif lower == b"transfer-encoding" and b"chunked" in value.lower():
                response.chunked = True
        self.keep_alive = self.parser.should_keep_alive()
        # ``first`` bounds the first byte of the body, not the headers: an engine that streams sends its headers at
        # once and its first token after the prefill (on_body / _complete cancel it)
        ready = self.headers_ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.headers_deadline is not None:
            self.headers_deadline.cancel()
            self.headers_deadline = None
        self.response._feed(body)  # type: ignore[union-attr]  # as on_header (the hot path: no assert per chunk)

    def on_message_complete(self) -> None:
        if self.response is not None and self.response.status:
            self._complete()

    # The pool's side ----------------------------------------------------------------------------------------------
    def send(self, data: bytes, response: Response, deadline: float | None,
             headers_deadline: float | None) -> asyncio.Future[None]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.response = response
        self.keep_alive = False
        self.headers_ready = loop.create_future()
        if deadline is not None:
            self.deadline = loop.call_at(deadline, self._timed_out, "finish its answer", DeadlineError)
        if headers_deadline is not None:
            self.headers_deadline = loop.call_at(headers_deadline, self._timed_out, "start its answer")
        self.transport.write(data)
        return self.headers_ready

    def _timed_out(self, what: str, kind: type[UpstreamError] = UpstreamError) -> None:
        self.fail(kind(f"the engine did not {what} in time"))

    def _cancel_timers(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.headers_deadline is not None:
            self.headers_deadline.cancel()
            self.headers_deadline = None

    def _complete(self) -> None:
        response, self.response = self.response, None
        self._cancel_timers()
        if self.paused:
            self.resume()
        if response is not None:
            response._finish()
        if self.keep_alive and not self.closed:
            self.pool.release(self)
        else:
            self.abort()

    def fail(self, error: UpstreamError) -> None:
        response, self.response = self.response, None
        self._cancel_timers()
        ready = self.headers_ready
        if ready is not None and not ready.done():
            ready.set_exception(error)
        if response is not None:
            response._fail(error)
        self.abort()

    def abort(self) -> None:
        self.response = None
        self._cancel_timers()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        self.pool.forget(self)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()


class UpstreamPool:
    """Keep-alive connections to every backend; see the module docstring."""

    def __init__(self, connect_timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None,
                 idle_s: float | None = None, server_hostname: str | None = None):
        """``ssl_context``: for https origins (default: the system's trust store). ``idle_s``: how long an idle
        connection is kept (default :data:`IDLE_S`; keep it below the server's own idle timeout).
        ``server_hostname``: the name https certificates are checked against (and sent as SNI) instead of each
        URL's host (a kubeconfig's ``tls-server-name``)."""
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.idle_s = idle_s
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._swept = time.monotonic()
        self._origins: dict[str, Origin] = {}
        self._closed = False

    def origin(self, base: str) -> Origin:
        """The parsed origin of a backend base URL, cached (backends come and go with discovery: bounded)."""
        origin = self._origins.get(base)
        if origin is None:
            if len(self._origins) > 4096:
                self._origins.clear()
            origin = self._origins[base] = Origin(base, self.ssl_context)
        return origin

    async def request(self, base: str, method: bytes, path: str, body: bytes,
                      headers: Iterable[tuple[bytes, bytes]] = (), *, total: float | None = None,
                      first: float | None = None, idle: float | None = None) -> Response:
        """Send one request to the backend at ``base`` and return once the answer's headers have arrived.
        ``headers`` must not hold hop-by-hop headers (the caller filters them); Host and Content-Length are set
        here. ``first`` bounds the time to the answer's first body byte (a stream's first token), ``total`` the whole
        exchange (:class:`DeadlineError` when it runs out), ``idle`` each wait for
        body bytes (seconds; None: unbounded). Raises :class:`UpstreamError` (and ``ValueError`` for a base that is
        not an http(s) URL)."""
        if self._closed:
            raise UpstreamError("the client is closed (shutting down)")
        origin = self.origin(base)
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + total if total is not None else None
        headers_deadline = now + first if first is not None else None
        limit = min(t for t in (self.connect_timeout, total, first) if t is not None)
        head = [b"%s %s%s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n"
                % (method, origin.prefix, path.encode(), origin.host_header, len(body))]
        for name, value in headers:
            if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
                continue  # never let a header value start another header
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        head.append(body)
        data = b"".join(head)
        fresh = False
        while True:
            conn, reused = await self._acquire(origin, limit, fresh=fresh)
            response = Response(conn, idle)
            try:
                await conn.send(data, response, deadline, headers_deadline)
                return response
            except UpstreamError:
                conn.abort()
                if not (reused and conn.peer_closed and method in _IDEMPOTENT and not response.status):
                    raise
                fresh = True  # closed by the server as it was taken from the pool, before any answer: once more
            except BaseException:
                conn.abort()  # cancelled or failed: this connection's state is unknown
                raise

    async def _acquire(self, origin: Origin, limit: float, fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection to ``origin`` and whether it was reused from the pool (``fresh``: always a new one)."""
        key = (origin.host, origin.port, origin.ssl is not None)
        self._sweep_if_due(time.monotonic())
        idle = None if fresh else self._idle.get(key)
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < (self.idle_s or IDLE_S):
                    return conn, True
                conn.abort()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, key), origin.host, origin.port, ssl=origin.ssl,
                    server_hostname=(self.server_hostname or origin.host) if origin.ssl else None)
        except TimeoutError:
            raise ConnectError(f"connecting to {origin.host}:{origin.port} timed out") from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}") from None
        return conn, False

    def release(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        now = time.monotonic()
        self._sweep_if_due(now)
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            conn.abort()
            return
        conn.idle_since = now
        conn.headers_ready = None
        idle.append(conn)

    def _sweep_if_due(self, now: float) -> None:
        if now - self._swept >= (self.idle_s or IDLE_S):
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close the idle connections past their idle time, for every origin (one is otherwise looked at only when
        its origin is asked again: an engine that left, or a node that died without closing its sockets, kept up
        to :data:`MAX_IDLE_PER_ORIGIN` of them open for good)."""
        self._swept = now
        limit = self.idle_s or IDLE_S
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and now - c.idle_since < limit]
            for conn in [c for c in idle if c not in keep]:
                conn.abort()  # (takes itself out of the pool's list)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        self._closed = True
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.abort()
        self._idle.clear()
