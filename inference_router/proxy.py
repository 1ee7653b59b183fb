"""The router's request path: admission, backend choice, forwarding with streaming passthrough, retries,
prefill/decode disaggregation, and what it reports (metrics with the design doc's names, one ``routing_decision``
log line per request).

- Admission: beyond ``max_concurrent_requests`` in flight, 429 at once (a router that queues unboundedly hides
  overload until everything times out).
- Forwarding: one keep-alive connection pool to all backends; bodies pass through untouched; a streamed answer is
  relayed chunk by chunk as it arrives (never buffered), so the client sees the backend's bytes exactly.
- Retries: a request that fails before the first byte reaches the client (connection refused or reset, timeout
  to the first byte, a 5xx, vLLM's 404 for a model that engine does not serve) is retried on another backend, at
  most ``retries`` times; once bytes have gone out it never is (a streamed answer is never duplicated). What an
  answer means is :func:`retry.verdict`'s decision; only failures feed the backend's circuit breaker.
- Prefill/decode: the prefill engine computes the prompt (``max_tokens: 1``, ``kv_transfer_params.do_remote_decode``),
  its ``kv_transfer_params`` go with the original request to the decode engine, whose answer is streamed back. A
  failed prefill falls back to decode-only or answers 502, per ``pd_separation.fallback``; a failed decode is
  retried on another decode engine as the plain request (the KV the params name may be gone).
- Request ids: the client's ``X-Request-Id`` (or one the router makes) goes to the engine (vLLM names the request
  after it), comes back in the answer's ``X-Request-Id`` and is in the router's log lines. Both legs of a
  prefill/decode pair get one fresh id, as vLLM's P/D proxies send (its connectors match the legs by it, so it
  must be unique: never the client's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import aiohttp
import orjson

from fuyao.http_body import BodyError, decode_json
from fuyao.http_client import ConnectError, DeadlineError, UpstreamError, UpstreamPool
from fuyao.http_client import Response as UpstreamResponse
from fuyao.http_server import HttpServer, Request, Response, Stream

from . import admission, retry
from .balancing import Decision, RoundRobin
from .config import RouterConfig, policy_args
from .fleet import Backend, Dispatch, Fleet, Matches, PrefixSource, Role
from .metrics import BackendView, RouterMetrics
from .policies import POLICIES, Policy, PrefixAwareArgs, RoutingRequest, decide, make_policy, prefill_tokens
from .prompts import Prompts, prompt_keys

log = logging.getLogger(__name__)
decisions_log = logging.getLogger("inference_router.decisions")

_HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host", b"upgrade",
                          b"proxy-connection", b"te", b"trailer", b"expect"})
"""Headers that belong to one connection (RFC 9110 §7.6.1), never passed on; ``expect`` is answered by the router."""
_REQUEST_ID = b"x-request-id"
_ANSWER_DROP = _HOP_HEADERS | {b"date", _REQUEST_ID}
"""An engine's answer headers not passed on: the router's server writes its own ``Date`` (one, not two), and its
own ``X-Request-Id`` (the client's; an engine with ``--enable-request-id-headers`` echoes the one it was sent)."""
_JSON = ((b"Content-Type", b"application/json"),)
_GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
Answer = Response | Stream
_WHOLE_BODY_BYTES = 1 << 20
"""Answers of known length up to this size are read whole and sent in one write; longer ones are relayed in chunks."""
TOKENIZE_RETRY_S = 60.0
"""A backend without ``/tokenize`` is not asked again for this long."""
_STREAM_ERROR = b'data: {"error"'
"""How vLLM's streams begin an error event (a failure during generation, after its 200)."""
_PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                   "remote_block_ids": None, "remote_host": None, "remote_port": None}


class _BackendFailed(Exception):
    """An engine did not answer the request, or answered what :func:`retry.verdict` says another engine is asked
    after (``verdict``)."""

    def __init__(self, reason: str, status: int = 502, body: bytes = b"",
                 verdict: retry.Verdict = retry.Verdict.FAILED, answered: bool = False, unsent: bool = False):
        super().__init__(reason)
        self.reason, self.status, self.body, self.verdict = reason, status, body, verdict
        self.answered = answered  # the engine answered (an HTTP status), not a connection that failed
        self.unsent = unsent  # no connection was made: the request was never sent

    @property
    def untouched(self) -> bool:
        """Whether the engine certainly did nothing with the request: never sent (no connection), or refused at
        the door (busy, a model it does not serve). Only then may a decode's retry carry the prefill's KV: an
        engine that took it may have loaded the blocks already, and the prefill engine frees them once they are
        read (NIXL's pull), so another decode engine would read freed blocks without an error. Any other failure
        (a 5xx, a reset or timeout after sending) retries the plain request."""
        return self.unsent or (self.answered and self.verdict in (retry.Verdict.BUSY, retry.Verdict.NOT_SERVED))


class _ClientGone(Exception):
    """The client left before any engine was asked."""


class _Refused(Exception):
    """The request is answered at the door with ``status`` (bad body, bad fields; ``param``: the field)."""

    def __init__(self, status: int, message: str, reason: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.reason, self.param = status, message, reason, param


class _Answered(Exception):
    """The router answers the request itself with ``response``, counted once as ``reason`` (no backend could)."""

    def __init__(self, response: Response, reason: str):
        super().__init__(reason)
        self.response, self.reason = response, reason


def _end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers a proxy passes on: without the hop-by-hop ones and without those the ``Connection`` header names
    (RFC 9110 §7.6.1); an empty ``X-Request-Id`` goes too (the router sends its own: :func:`_request_ids`)."""
    named = {n.strip().lower() for k, v in headers if k.lower() == b"connection" for n in v.split(b",")}
    return [(k, v) for k, v in headers if k.lower() not in _HOP_HEADERS and k.lower() not in named
            and (v or k.lower() != _REQUEST_ID)]


def _failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _deadline(timeout_s: float) -> Response:
    """The answer to a request whose whole time (``decode_timeout``) ran out."""
    return _error(504, f"the answer took longer than {timeout_s:g} s (inference timeouts)", "TimeoutError")


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and v.lower().startswith(b"text/event-stream") for k, v in headers)


def _request_ids(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes | None]:
    """The request's id (the client's ``X-Request-Id``, else a new one) and the client's (None when it sent none or
    an empty one: vLLM would name that request ``cmpl-`` while the router's logs named it otherwise)."""
    given = next((v for k, v in headers if k.lower() == _REQUEST_ID), None) or None
    return (given if given is not None else uuid.uuid4().hex.encode()), given


def _with_id(response: Response, request_id: bytes) -> Response:
    """A response the router makes itself, with the request's ``X-Request-Id``."""
    response.headers = (*response.headers, (b"X-Request-Id", request_id))
    return response


def _sse_comments_only(chunk: bytes) -> bool:
    """Whether a chunk of an event stream holds only comment lines (``: keep-alive``), no event."""
    lines = [line for line in chunk.split(b"\n") if line.strip()]
    return bool(lines) and all(line.startswith(b":") for line in lines)


def _error(status: int, message: str, kind: str = "ServiceUnavailableError", param: str | None = None) -> Response:
    return Response.json(orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}),
                         status)


class Router:
    def __init__(self, config: RouterConfig, fleet: Fleet, prefix: PrefixSource,
                 metrics: RouterMetrics | None = None):
        """``metrics``: where the router counts (a fresh :class:`RouterMetrics` by default); it reads the router's
        in-flight count and the fleet's circuits from here when scraped."""
        self.config = config
        self.fleet = fleet
        self.prefix = prefix
        self.prompts = Prompts(config.kv_cache.tokenizer, prefix.keys, prefix.block_size)
        self.metrics = metrics or RouterMetrics()
        self.metrics.watch(lambda: self.in_flight, lambda: (
            BackendView(b.url, b.breaker.state, b.healthy, b.tier_load_cost)
            for b in list(self.fleet.backends.values())))
        self.rr = RoundRobin()
        self.in_flight = 0
        self.session: aiohttp.ClientSession | None = None  # the fleet's health checks, scrapes and index lookups
        self.server: HttpServer | None = None
        self.upstream = UpstreamPool()  # the request path: proxied requests, prefills, /tokenize
        self.draining = False
        self._said: set[tuple[str, str]] = set()  # (backend, message) logged once
        self._background: set[asyncio.Future[None]] = set()  # refreshes a request started and does not wait for

    @property
    def config(self) -> RouterConfig:
        return self._config

    @config.setter
    def config(self, config: RouterConfig) -> None:
        """A new config (a reloaded file) brings its policies' args with it."""
        self._config = config
        self.policies: dict[str, Policy] = {name: make_policy(name, policy_args(config.router, name))
                                            for name in POLICIES}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        # no cookie jar: a cookie one engine sets must never ride along with another client's request (and the
        # jar's bookkeeping costs on every request)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        for task in list(self._background):  # model refreshes still running would meet a closed session
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.fleet.stop_refreshing()  # the read those tasks waited on, shielded: not cancelled with them
        await self.upstream.close()
        if self.session is not None:
            await self.session.close()

    # Choosing ----------------------------------------------------------------------------------------------------
    async def _decide(self, role: Role, hashes: list[int], exclude: list[str], strategy: str | None = None,
                      prompt_tokens: int = 0, near: str | None = None,
                      model: str | None = None) -> tuple[Backend, Decision] | None:
        pool = self.fleet.pool(role, exclude, model=model)
        if not pool:
            return None
        if near is not None:
            # decode next to its prefill (same node: the KV moves over the local interconnect) unless those
            # engines are clearly busier than the rest
            local = [b for b in pool if b.node == near]
            least = min(b.candidate().load for b in pool)
            if local and min(b.candidate().load for b in local) <= least + 2:
                pool = local
        policy = self.policies[strategy or self.config.router.strategy]
        found = await self.prefix.lookup(hashes, self.session) if hashes and policy.uses_prefix else Matches({})
        candidates = [b.candidate(found.endpoints.get(b.url, 0), self.prefix.cached_blocks(b.url)) for b in pool]
        decision = decide(policy, candidates, RoutingRequest(prompt_tokens, len(hashes), self.prefix.block_size,
                                                             found.tier_blocks), self.rr)
        backend = next(b for b in pool if b.url == decision.url)
        return backend, decision

    # The request path --------------------------------------------------------------------------------------------
    async def handle(self, request: Request) -> Answer:
        started = time.perf_counter()
        request_id, given = _request_ids(request.headers)
        if self.draining:
            return self._finish(_with_id(_error(503, "the router is shutting down"), request_id), started, "draining")
        if self.in_flight >= self.config.router.max_concurrent_requests:
            return self._finish(_with_id(_error(429, "too many requests in flight; retry later", "RateLimitError"),
                                         request_id), started, "overloaded")
        self.in_flight += 1
        request.cancel_when_gone()  # a client that leaves while an engine works drops the engine's request at once
        try:
            return self._finish(await self._serve(request, started, request_id, given), started)
        except asyncio.CancelledError:
            if request.gone:  # the client left while the router waited (an engine, a lookup, a tokenization)
                self._client_left(started)
            raise
        except _Answered as exc:
            return self._finish(_with_id(exc.response, request_id), started, exc.reason)
        except _ClientGone:
            return self._client_left(started)
        except _Refused as exc:
            kind = {413: "RequestEntityTooLargeError", 408: "RequestTimeoutError", 404: "NotFoundError"}.get(
                exc.status, "BadRequestError")
            return self._finish(_with_id(_error(exc.status, exc.message, kind, exc.param), request_id), started,
                                exc.reason)
        except Exception as exc:  # a bug answers a clear 500, counted and logged; the router goes on
            log.exception("request %s %s failed in the router", request.method, request.path,
                          extra={"request_id": request_id.decode("latin-1")})
            return self._finish(_with_id(_error(500, f"internal error: {type(exc).__name__}: {exc}",
                                                "InternalServerError"), request_id), started, "internal")
        finally:
            self.in_flight -= 1

    async def _serve(self, request: Request, started: float, request_id: bytes, given: bytes | None) -> Answer:
        """``request_id``: the request's ``X-Request-Id`` (``given``: the client's, None when it sent none)."""
        path = request.path
        try:
            inference = self.config.inference
            raw = await request.read(inference.max_body_bytes, inference.request_body_timeout)
            body = await decode_json(raw)
        except BodyError as exc:
            raise _Refused(exc.status, exc.message, "bad-request") from None
        if not isinstance(body, dict):
            raise _Refused(400, "the body must be a JSON object", "bad-request")
        try:
            admission.check(path, body)
        except admission.BadRequest as exc:
            raise _Refused(400, f"{exc}", "bad-request", exc.param) from None
        if admission.without_router_fields(body):
            raw = orjson.dumps(body)
        model = body.get("model") or None  # vLLM serves its base model for an absent or empty model
        if model is not None and not self.fleet.serves(model) and self.session is not None:
            await self.fleet.refresh_models(self.session)  # served since the last read (a LoRA adapter loaded)?
        if model is not None and not self.fleet.serves(model):
            raise _Refused(404, f"The model `{model}` does not exist.", "unknown-model", "model")
        hashes: list[int] = []
        tokens = 0
        if self._wants_prefix() and "prompt_embeds" not in body:  # embeddings: routed on load (prompt_keys)
            prompt = await self.prompts.resolve(path, body, self._engine_tokenize)
            if prompt is not None:
                # kept apart per LoRA adapter and cache_salt, as vLLM's own block hashes are
                hashes, tokens = prompt_keys(prompt.hashes, body, self.fleet.adapters), prompt.tokens
                self.metrics.prompts.inc(prompt.source)
        # the client's own headers (its Authorization: engines started with --api-key check it on every /v1 call)
        headers = _end_to_end(request.headers)
        # vLLM sends a non-streamed answer's headers only once generation ends: only a stream's first byte is bounded
        # by prefill_timeout (else every generation over it would fail, be retried and count against the engines)
        first = self.config.inference.prefill_timeout if body.get("stream") is True else None
        # generation only: an embedding has no decode (through P/D it failed the prefill and was computed twice)
        pd = self.config.pd_separation.enabled and path in _GENERATION_PATHS and self.fleet.pool("decode", model=model)
        if pd and admission.one_sequence(body):
            # the two legs' id: fresh, as vLLM's P/D proxies make it (a connector pairs the legs by it)
            leg_id = request_id if given is None else uuid.uuid4().hex.encode()
            if given is not None:
                headers = [(k, v) for k, v in headers if k.lower() != _REQUEST_ID]
            headers.append((b"X-Request-Id", leg_id))
            return await self._pd(request, path, body, raw, hashes, started, headers, request_id, tokens, model,
                                  first)
        if given is None:
            headers.append((b"X-Request-Id", request_id))
        # a generation P/D does not carry (several sequences) is computed whole where decodes run
        return await self._forward(request, path, raw, hashes, started, headers, request_id,
                                   "decode" if pd else "both", self.config.inference.decode_timeout,
                                   prompt_tokens=tokens, model=model, first_byte_s=first)

    async def _engine_tokenize(self, kind: str, payload: dict[str, Any], model: str | None) -> list[int] | None:
        """The prompt's token ids from an engine's own ``/tokenize`` (the least busy healthy engine serving
        ``model`` that has one), or None when none answers within ``tokenize_timeout``."""
        now = time.monotonic()
        pool = [b for b in self.fleet.pool("prefill", model=model) + self.fleet.pool("both", model=model)
                if b.tokenize_after <= now]
        if not pool:
            return None
        backend = min(pool, key=lambda b: b.in_flight)
        body = {**payload, "model": model} if model is not None else payload
        try:
            async with await self.upstream.request(backend.url, b"POST", "/tokenize", orjson.dumps(body), _JSON,
                                                   total=self.config.kv_cache.tokenize_timeout) as response:
                data = await response.read()
            if response.status == 405 or (response.status == 404 and b'"error"' not in data):
                # no such route (an OpenAI-style error body is the engine's answer about this request instead,
                # e.g. a model it does not serve)
                backend.tokenize_after = now + TOKENIZE_RETRY_S
                log.warning("backend %s has no /tokenize (HTTP %d): prompts are not tokenized there for "
                            "%.0f s", backend.url, response.status, TOKENIZE_RETRY_S,
                            extra={"backend": backend.url})
                return None
            if response.status != 200:
                return None  # the engine refuses this prompt; it will say why when the request reaches it
            tokens = orjson.loads(data).get("tokens")
        except (UpstreamError, OSError, ValueError, AttributeError) as exc:
            log.info("tokenizing on %s failed: %s", backend.url, exc or type(exc).__name__,
                     extra={"backend": backend.url})
            return None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return None
        return tokens

    def _wants_prefix(self) -> bool:
        return self.config.kv_cache.enabled and (self.config.router.strategy == "prefix-aware"
                                                 or self.config.pd_separation.enabled)

    def _client_left(self, started: float) -> Answer:
        self.metrics.client_disconnects.inc()
        return self._finish(Response(status=499), started, "client-gone")  # nginx's "client closed request"

    def _finish(self, response: Answer, started: float, error: str | None = None) -> Answer:
        self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.answered(response.status)
        if error or response.status >= 400:
            self.metrics.errors.inc(error or f"http-{response.status}")
        return response

    async def _forward(self, request: Request, path: str, raw: bytes, hashes: list[int], started: float,
                       headers: list[tuple[bytes, bytes]], request_id: bytes,
                       role: Role, timeout_s: float, strategy: str | None = None,
                       prompt_tokens: int = 0, near: str | None = None,
                       model: str | None = None, first_byte_s: float | None = None,
                       retry_raw: bytes | None = None) -> Answer:
        """Send ``raw`` with ``headers`` to the best engine of ``role``, and to others after an answer
        :func:`retry.verdict` retries; ``retry_raw``: what goes to them instead (a decode's plain request)."""
        tried: list[str] = []
        last: _BackendFailed | None = None
        for attempt in range(self.config.router.retries + 1):
            chosen = await self._decide(role, hashes, tried, strategy, prompt_tokens, near, model)
            if chosen is None:
                break
            backend, decision = chosen
            tried.append(backend.url)
            if attempt:
                self.metrics.retries.inc()
            self._log_decision(path, decision, len(hashes), role, attempt, request_id, headers)
            uncached = self._pending_tokens(backend, decision, prompt_tokens)
            if hashes:
                self.metrics.prefix_blocks.observe(decision.prefix_blocks / len(hashes))
            try:
                return await self._relay(request, backend, path, raw, headers, request_id, timeout_s, started,
                                         hashes, uncached, first_byte_s)
            except _BackendFailed as exc:
                last = exc
                self._learn(exc)
                log.warning("backend %s failed before answering (%s)%s", backend.url, exc.reason,
                            "; retrying on another" if attempt < self.config.router.retries else "",
                            extra={"backend": backend.url, "reason": exc.reason,
                                   "request_id": request_id.decode("latin-1")})
                if retry_raw is not None and not exc.untouched:
                    raw = retry_raw  # the engine may have read the prefill's KV: the retry goes without it
        if last is not None and last.body and (last.status < 500 or retry.is_error_body(last.body)):
            # the last engine's own answer (vLLM's 503 "ServiceUnavailableError", its 500 "EngineDeadError"...): its
            # message says more than a generic 502
            return _with_id(Response.json(last.body, last.status), request_id)
        reason = last.reason if last else "no healthy backend"
        raise _Answered(_error(502 if last else 503, f"no backend could answer: {reason}"),
                        "no-backend" if last is None else "backend-failed")

    def _learn(self, failed: _BackendFailed) -> None:
        """What an engine's answer tells the router beyond this request: one that does not serve a model it was
        thought to serve makes the router read the engines' models again (in the background, rate-limited)."""
        if failed.verdict is retry.Verdict.NOT_SERVED and self.session is not None:
            task = asyncio.ensure_future(self.fleet.refresh_models(self.session))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _pending_tokens(self, backend: Backend, decision: Decision, prompt_tokens: int) -> int:
        """The prefill work this request queues on ``backend`` until its first byte, in prefill tokens: what it
        computes there, and what it loads from the shared tier at that engine's load cost."""
        bs = self.prefix.block_size
        args = policy_args(self.config.router, "prefix-aware")
        cost = args.load_cost(backend.tier_load_cost) if isinstance(args, PrefixAwareArgs) else 0.0
        return round(prefill_tokens(prompt_tokens, decision.prefix_blocks * bs, decision.tier_blocks * bs, cost))

    def _dispatch(self, backend: Backend, role: str, uncached: int = 0) -> Dispatch:
        self.metrics.backend_requests.inc(backend.url, role)
        return backend.dispatch(uncached)

    async def _relay(self, request: Request, backend: Backend, path: str, raw: bytes,
                     headers: list[tuple[bytes, bytes]], request_id: bytes, timeout_s: float,
                     started: float, hashes: list[int], uncached: int = 0,
                     first_byte_s: float | None = None) -> Answer:
        """Send to ``backend`` and relay its answer (with ``request_id`` as its ``X-Request-Id``); raises
        :class:`_BackendFailed` only before the first byte. Until that first byte the request counts as ``uncached``
        prompt tokens of prefill work queued there. What goes wrong on the backend's side (connection, timeout, 5xx,
        a stream cut short) counts against it; a client that goes away does not
        (``inference_client_disconnects_total``): the backend's answer is then abandoned, which makes the engine
        abort the generation."""
        if request.gone:
            raise _ClientGone  # it left while the request waited (admission, prefill, a retry): ask no engine
        inference = self.config.inference
        with self._dispatch(backend, backend.role, uncached) as dispatch:
            self.metrics.queue_time.observe(time.perf_counter() - started)
            try:
                upstream = await self.upstream.request(backend.url, b"POST", path, raw, headers, total=timeout_s,
                                                       first=first_byte_s, idle=inference.stream_idle_timeout)
            except DeadlineError:
                # nothing at all came back in the request's whole time: a hung engine (its /health may still pass)
                # counts it, so its circuit opens; never retried (a long generation would take as long elsewhere)
                dispatch.failed()
                raise _Answered(_deadline(timeout_s), "deadline") from None
            except (UpstreamError, OSError) as exc:
                dispatch.failed()
                raise _BackendFailed(_failure(exc), unsent=isinstance(exc, ConnectError)) from None
            async with upstream:
                answer_headers = [(k, v) for k, v in upstream.headers if k.lower() not in _ANSWER_DROP]
                answer_headers.append((b"X-Request-Id", request_id))
                if upstream.status in retry.INSPECTED:  # tried elsewhere (raises), or relayed whole
                    body = await self._judge(upstream, dispatch)
                    dispatch.first_byte()
                    return Response(body, upstream.status, answer_headers)
                if upstream.status < 400:  # a request the engine refused leaves nothing cached there
                    self.prefix.routed(backend.url, hashes)
                length = upstream.content_length
                if length is not None and length <= _WHOLE_BODY_BYTES:
                    # a complete answer of known, small size (not streamed): read it and answer in one write
                    try:
                        body = await upstream.read()
                    except UpstreamError as exc:
                        dispatch.failed()
                        raise _BackendFailed(_failure(exc)) from None
                    dispatch.first_byte()
                    self.metrics.ttft.observe(time.perf_counter() - started)
                    dispatch.succeeded()
                    return Response(body, upstream.status, answer_headers)
                response = request.stream(upstream.status, answer_headers)
                first = True
                ended = True  # the bytes relayed so far end an event (an error event written now stands alone)
                errored = False  # the engine sent an error event
                while True:
                    try:
                        chunk = await upstream.next_chunk()
                    except UpstreamError as exc:
                        deadline = isinstance(exc, DeadlineError)  # a generation longer than its budget: cut,
                        if not deadline:                           # but the engine did nothing wrong
                            dispatch.failed()
                        if not request.streamed:  # nothing went out yet (vLLM's ": keep-alive" comments do go
                            # out, head first: after one of them a retry would write a second answer into this one)
                            if deadline:
                                raise _Answered(_deadline(timeout_s), "deadline") from None
                            raise _BackendFailed(_failure(exc)) from None
                        log.warning("backend %s broke off a response: %s", backend.url, exc,
                                    extra={"backend": backend.url})
                        self.metrics.errors.inc("deadline" if deadline else "broken-stream")
                        if _is_event_stream(answer_headers):  # said, as vLLM says an error mid-stream (a client
                            # reading to the connection's end, HTTP/1.0, would otherwise take the cut for the end)
                            with contextlib.suppress(OSError):
                                await response.write((b"" if ended else b"\n\n") + b"data: " + orjson.dumps(
                                    {"error": {"message": f"the engine broke off the answer: {exc}", "type":
                                               "TimeoutError" if deadline else "InternalServerError", "param": None,
                                               "code": 504 if deadline else 502}}) + b"\n\n")
                        request.abort()  # cut the client's answer too: never retried or duplicated
                        return response
                    if chunk is None:
                        break
                    try:
                        if first and not _sse_comments_only(chunk):  # vLLM's ": keep-alive" is no token
                            dispatch.first_byte()
                            self.metrics.ttft.observe(time.perf_counter() - started)
                            first = False
                        await response.write(chunk)
                        ended = chunk.endswith(b"\n\n")
                        # vLLM reports a failure during generation as an error event in a 200 stream
                        errored = errored or _STREAM_ERROR in chunk
                    except OSError as exc:  # ConnectionResetError: the client is gone
                        return self._client_gone(request, backend, upstream, response, exc)
                try:
                    await response.end()
                except OSError as exc:
                    return self._client_gone(request, backend, upstream, response, exc)
                if errored:
                    self.metrics.errors.inc("engine-stream-error")
                    dispatch.failed()
                else:
                    dispatch.succeeded()
                return response

    @staticmethod
    async def _judge(upstream: UpstreamResponse, dispatch: Dispatch) -> bytes:
        """An answer :data:`retry.INSPECTED` looks at: its body, when it is relayed; :class:`_BackendFailed` when
        another engine is to be asked. The engine's circuit hears :func:`retry.verdict`'s verdict."""
        try:
            body = await upstream.read()
        except UpstreamError:
            body = b""
        verdict = retry.verdict(upstream.status, body)
        if verdict.blames:
            dispatch.failed()
        else:
            dispatch.succeeded()
        if verdict.retried:
            raise _BackendFailed(f"HTTP {upstream.status}", upstream.status, body, verdict, answered=True)
        return body

    def _client_gone(self, request: Request, backend: Backend, upstream: UpstreamResponse,
                     response: Stream, exc: BaseException) -> Stream:
        self.metrics.client_disconnects.inc()
        log.info("client went away during the answer from %s: %s", backend.url, exc,
                 extra={"backend": backend.url, "remote": request.remote})
        upstream.close()  # drop the backend connection: the engine sees the disconnect and aborts the request
        return response

    async def _pd(self, request: Request, path: str, body: dict[str, Any], raw: bytes, hashes: list[int],
                  started: float, headers: list[tuple[bytes, bytes]], request_id: bytes, prompt_tokens: int = 0,
                  model: str | None = None, first_byte_s: float | None = None) -> Answer:
        """Prefill on a prefill engine, then decode (streamed) on a decode engine with its ``kv_transfer_params``;
        ``headers`` go to both (with the legs' one ``X-Request-Id``), the client's answer carries ``request_id``."""
        assert self.session is not None
        prefill_body = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": _PREFILL_PARAMS}
        prefill_body.pop("stream_options", None)
        prefill_body.pop("min_tokens", None)  # vLLM refuses min_tokens > max_tokens; the decode keeps the client's
        if "max_completion_tokens" in prefill_body:
            prefill_body["max_completion_tokens"] = 1
        params = None
        failure = "no prefill engine"
        refused: _BackendFailed | None = None  # a 4xx about the request itself: every prefill engine would say it
        tried: list[str] = []
        near: str | None = None
        prefill_headers = [(k, v) for k, v in headers if k.lower() != b"content-type"] + list(_JSON)
        for _ in range(self.config.router.retries + 1):
            chosen = await self._decide("prefill", hashes, tried, "prefix-aware", prompt_tokens, model=model)
            if chosen is None:
                break
            backend, decision = chosen
            tried.append(backend.url)
            self._log_decision(path, decision, len(hashes), "prefill", len(tried) - 1, request_id, headers)
            uncached = self._pending_tokens(backend, decision, prompt_tokens)
            with self._dispatch(backend, "prefill", uncached) as dispatch:
                try:
                    async with await self.upstream.request(backend.url, b"POST", path, orjson.dumps(prefill_body),
                                                           prefill_headers,
                                                           total=self.config.inference.prefill_timeout) as response:
                        data = await response.read()
                    dispatch.first_byte()
                    if response.status != 200:
                        raise _BackendFailed(f"HTTP {response.status}", response.status, data,
                                             retry.verdict(response.status, data), answered=True)
                    answer = orjson.loads(data)
                    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
                    if params is not None and not isinstance(params, dict):
                        raise _BackendFailed(f"the prefill answer's kv_transfer_params is a {type(params).__name__}")
                    if params is None:
                        # a connector that moves KV through storage (fuyao's shared tier, vLLM's ExampleConnector)
                        # answers none: the prefill stored it, and the decode engine loads it from there
                        params = {}
                        self._say_once(backend, "prefill engine %s answers no kv_transfer_params: its KV goes "
                                                "through its connector's storage; decodes get the plain request")
                    dispatch.succeeded()
                    self.prefix.routed(backend.url, hashes)
                    near = backend.node
                    break
                except (_BackendFailed, UpstreamError, OSError, ValueError) as exc:
                    failure = _failure(exc)
                    failed = exc if isinstance(exc, _BackendFailed) else _BackendFailed(failure)
                    if failed.verdict.blames:
                        dispatch.failed()
                    else:
                        dispatch.succeeded()  # it answered (about the request, busy, another model): it works
                    self._learn(failed)
                    log.warning("prefill on %s failed: %s", backend.url, failure,
                                extra={"backend": backend.url, "request_id": request_id.decode("latin-1")})
                    if failed.verdict is retry.Verdict.REFUSED:
                        refused = failed
                        break  # not retried: another prefill engine would refuse the same request
        if params is None:
            if self.config.pd_separation.fallback == "error":
                if refused is not None and refused.body:  # the engine's own answer, as a colocated fleet gives it
                    raise _Answered(Response.json(refused.body, refused.status), "prefill-failed")
                raise _Answered(_error(502, f"prefill failed: {failure}"), "prefill-failed")
            self.metrics.errors.inc("prefill-failed")
            decode_raw = raw  # decode-only: the decode engine computes the prompt itself
        else:
            decode_raw = orjson.dumps({**body, "kv_transfer_params": params}) if params else raw
        # a decode that fails is retried on another decode engine as the plain request: the KV its params name may
        # be gone (vLLM's kv_load_failure_policy "fail" answers a failed load with a 500; the prefill's blocks are
        # freed once a reader is done or their lease ends), and the plain request needs nothing from the prefill
        return await self._forward(request, path, decode_raw, [], started, headers, request_id, "decode",
                                   self.config.inference.decode_timeout, strategy="least-connections", near=near,
                                   model=model, first_byte_s=first_byte_s, retry_raw=raw)

    def _say_once(self, backend: Backend, message: str) -> None:
        """Log ``message`` (``%s``: the backend) once per backend."""
        if (backend.url, message) not in self._said:
            self._said.add((backend.url, message))
            log.info(message, backend.url, extra={"backend": backend.url})

    def _log_decision(self, path: str, decision: Decision, blocks: int, role: str, attempt: int, request_id: bytes,
                      headers: list[tuple[bytes, bytes]]) -> None:
        """One ``routing_decision`` line: ``request_id`` is the client's ``X-Request-Id``, ``engine_request_id``
        the one in ``headers`` (the engine's), when they differ (a prefill/decode pair's own)."""
        if decisions_log.isEnabledFor(logging.INFO):
            engine_id = next((v for k, v in headers if k.lower() == _REQUEST_ID), request_id)
            extra = {"event": "routing_decision", "request_id": request_id.decode("latin-1"), "path": path,
                     "endpoint": decision.url, "strategy": decision.strategy, "role": role, "attempt": attempt,
                     "prefix_blocks_matched": decision.prefix_blocks, "prompt_blocks": blocks,
                     "scores": {u: round(s, 4) for u, s in decision.scores.items()}}
            if engine_id != request_id:
                extra["engine_request_id"] = engine_id.decode("latin-1")
            decisions_log.info("routing_decision", extra=extra)

    # Other endpoints ---------------------------------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        """Every model the healthy backends serve (vLLM's list shape, one entry per model id, from the first backend
        that lists it), asked concurrently with the client's own Authorization: never the engines' key
        (``FUYAO_ENGINE_API_KEY`` is for the router's own reads), so a client the engines refuse is refused here
        too, with their status and answer."""
        assert self.session is not None
        session = self.session
        auth = next((v.decode("latin-1") for k, v in request.headers if k.lower() == b"authorization"), None)
        headers = {"Authorization": auth} if auth else {}
        healthy = {b.url: b for b in self.fleet.pool("both") + self.fleet.pool("decode")}  # each asked once

        async def ask(backend: Backend) -> tuple[int, bytes]:
            try:
                async with session.get(backend.url + "/v1/models", headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=5)) as response:
                    return response.status, await response.read()
            except (aiohttp.ClientError, TimeoutError, OSError):
                return 0, b""

        answers = await asyncio.gather(*(ask(b) for b in healthy.values()))
        merged: dict[str, Any] = {}
        for status, raw in answers:
            if status != 200:
                continue
            try:
                data = orjson.loads(raw).get("data")
            except (ValueError, AttributeError):
                continue
            for entry in data if isinstance(data, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                    merged.setdefault(entry["id"], entry)
        if merged:
            return Response.json(orjson.dumps({"object": "list", "data": list(merged.values())}))
        refused = [(status, raw) for status, raw in answers if status in (401, 403)]
        if refused and len(refused) == len([a for a in answers if a[0]]):  # every engine that answered refused
            status, raw = refused[0]
            return Response.json(raw, status) if retry.is_error_body(raw) else _error(status, "the engines refuse this "
                                                                                "client's credentials",
                                                                                "AuthenticationError")
        model = self.config.inference.model
        if model:
            return Response.json(orjson.dumps({"object": "list", "data": [{"id": model, "object": "model",
                                                                           "owned_by": "fuyao"}]}))
        return _error(503, "no healthy backend")

    async def no_route(self, request: Request) -> Response:
        return _error(404, f"no route {request.method} {request.path} on this router", "NotFoundError")

    async def health(self, _request: Request) -> Response:
        if self.draining:
            return Response.text("draining", 503)
        up = [b.url for b in self.fleet.backends.values() if b.healthy]
        return Response.text(f"{len(up)} healthy backends", 200 if up else 503)

    async def livez(self, _request: Request) -> Response:
        """Liveness: the event loop answers. Unlike /health it does not depend on engines being up (a router with
        no engine yet must not be restarted)."""
        return Response.text("ok")

    async def readyz(self, _request: Request) -> Response:
        """Readiness: accepting requests (not draining); with no healthy engine it still answers, with a clear 503
        per request, so installs do not wait for the engines."""
        return Response.text("draining", 503) if self.draining else Response.text("ok")

    async def metrics_page(self, _request: Request) -> Response:
        return Response(self.metrics.render(), content_type=b"text/plain; version=0.0.4; charset=utf-8")

    async def backends_page(self, _request: Request) -> Response:
        return Response.json(orjson.dumps({
            b.url: {"role": b.role, "healthy": b.healthy, "circuit": b.breaker.state, "in_flight": b.in_flight,
                    "waiting": b.waiting, "running": b.running, "kv_usage": b.kv_usage, "models": sorted(b.models)}
            for b in self.fleet.backends.values()}))

    def app(self) -> HttpServer:
        # a client that stops reading a stream is cut after as long as an engine may stay silent in one
        server = self.server = HttpServer(write_timeout=self.config.inference.stream_idle_timeout)
        server.route("POST", "/v1/completions", self.handle)
        server.route("POST", "/v1/chat/completions", self.handle)
        server.route("POST", "/v1/embeddings", self.handle)  # routed on load (no prompt prefix to keep)
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            server.route_prefix(method, "/", self.no_route)  # OpenAI clients read an error object, not text
        for path, handler in (("/v1/models", self.models), ("/health", self.health), ("/livez", self.livez),
                              ("/readyz", self.readyz), ("/metrics", self.metrics_page),
                              ("/debug/backends", self.backends_page)):
            server.route("GET", path, handler)
        return server
