"""HTTP front of the extender (:class:`fuyao.http_server.HttpServer`: the lean HTTP/1.1 server the router uses; the
scheduler's three calls per pod, or Volcano's per-node predicates, each pay its cost): routes, JSON in and out
(orjson), 400 for malformed bodies, 413 for oversized ones, latency metrics.

Bodies are read by :meth:`fuyao.http_server.Request.read` and decoded by :func:`fuyao.http_body.decode_json`: over
``MAX_BODY`` → 413 before any work, nested deeper than
``MAX_DEPTH`` → 400 before parsing (so nothing later can recurse out of stack on a hostile document), and bodies over
``OFFLOAD_ABOVE`` are parsed in a worker thread. Decisions are CPU-bound and short for the requests schedulers send:
they run inline on the event loop, which keeps a request's latency at the cost of its own work (no thread hops).
A big body (over ``OFFLOAD_ABOVE``: thousands of full Node objects) is decided — and its answer encoded — in a worker
thread instead: its work grows with its size (10 MB of Nodes is ~1-2 s), and on the loop it would hold up every
request behind it. The loop keeps serving meanwhile (the worker and the loop share the GIL: a small request waits
for at most a few switch intervals, plus any single C call such as orjson parsing the big body).
Volcano's predicate carries one NodeInfo (200-300 kB with its 20-60 pods): it is decided inline up to
``PREDICATE_OFFLOAD_ABOVE``, since a NodeInfo seen before is a lookup by digest (a thread hop would cost more than
the decision) and one never seen is a few milliseconds of parsing."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

import orjson

from fuyao.http_body import MAX_DEPTH, OFFLOAD_ABOVE, BodyError, decode_json
from fuyao.http_server import HttpServer, Request, Response

from .leading import FORWARDED_PATH
from .partial import ProtocolError
from .service import ExtenderService
from .volcano_verbs import VolcanoVerbs

log = logging.getLogger(__name__)

EXPLAIN = "/explain/"

MAX_BODY = 64 * 1024 * 1024  # a NodeList of 5,000 full nodes is tens of MB
VOLCANO_PRIORITIZE_MAX_BODY = 256 * 1024 * 1024
"""Volcano's prioritize carries every candidate's full NodeInfo, every pod of every node with its managedFields: about
100 MB for 500 nodes. Only that verb may send this much."""
BIG_DECISION_WORKERS = 2
"""Threads deciding big bodies: they share the GIL, so more would not decide faster; two keep one slow big request
from queueing another behind it."""
SESSION_BODY_READ = 1024 * 1024
"""Volcano's session verbs: bodies up to this are read so that the connection stays open; bigger ones close it."""
PREDICATE_OFFLOAD_ABOVE = 4 * 1024 * 1024
"""Volcano's predicate is decided inline up to this size (one NodeInfo is 200-300 kB: see the module's doc)."""


def _json(data: Any, status: int = 200) -> Response:
    return Response.json(orjson.dumps(data), status)


def _ack(service: ExtenderService, name: str) -> Callable[[Request], Any]:
    async def handler(request: Request) -> Response:
        # a small body is read (and dropped) so that the connection stays open for the scheduler's next call (an
        # answer before the body closes it); a big one (Volcano's onSessionOpen carries the whole session, ~100 MB
        # at 500 nodes, every second) is not held in memory for nothing: the connection closes after the answer
        with contextlib.suppress(BodyError):
            await request.read(SESSION_BODY_READ)
        service.metrics.decisions.labels(name, "ok").inc()
        return _json({})

    return handler


def _decide(call: Callable[[Any], Any], body: Any) -> bytes:
    """``call(body)`` encoded (unless it answers bytes: encoded already); the errors of a well-formed JSON document
    whose objects have the wrong types deep inside (spec: "x") are the client's: :class:`ProtocolError`."""
    try:
        answer = call(body)
        return answer if isinstance(answer, bytes) else orjson.dumps(answer)
    except ProtocolError:
        raise
    except (AttributeError, TypeError, ValueError, ArithmeticError, KeyError) as exc:
        if _raised_deciding(exc):
            raise  # a bug in the decision on parsed objects: a 500 counted as result=error, not a bad request
        raise ProtocolError(f"malformed object in the request: {type(exc).__name__}: {exc}") from None


_DECIDING = ("features", "framework", "row_cache", "devices", "object_memo")
"""The extender's modules that decide on objects already parsed (with ``plugins.*``): an exception raised in one is
the extender's bug, whatever its type."""


def _raised_deciding(exc: BaseException) -> bool:
    """Whether the innermost frame of this package that ``exc`` passed through decides on parsed objects."""
    innermost = ""
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if "scheduler_extender." in module:
            innermost = module.rsplit("scheduler_extender.", 1)[1]
        tb = tb.tb_next
    return innermost.startswith("plugins.") or innermost in _DECIDING


def _verb(service: ExtenderService, name: str, call: Callable[[Any], Any],
          big: ThreadPoolExecutor, raw_body: bool = False,
          max_body: int = MAX_BODY, offload_above: int = OFFLOAD_ABOVE) -> Callable[[Request], Any]:
    """``call`` decides inline on the event loop — in ``big``'s threads for bodies over ``OFFLOAD_ABOVE`` — or is a
    coroutine function when it waits on the API server (bind). With ``raw_body`` it gets the request's bytes (after
    the size check) and decodes only what it reads, with msgspec, which refuses nesting deeper than the recursion
    limit itself (a ``ProtocolError``): no depth scan, which would cost more than the whole decision on a 200 kB
    Volcano NodeInfo."""
    is_async = inspect.iscoroutinefunction(call)

    async def handler(request: Request) -> Response:
        started = time.perf_counter()
        status = 400
        try:
            raw = await request.read(max_body)
            if raw_body:
                if len(raw) > offload_above:
                    answer = await asyncio.get_running_loop().run_in_executor(big, _decide, call, raw)
                else:
                    answer = _decide(call, raw)
                return Response.json(answer)
            body = await decode_json(raw, MAX_DEPTH, OFFLOAD_ABOVE)
            if is_async:  # waits on the API server: its failures are answers or 500s, never "malformed request"
                return _json(await call(body))
            if len(raw) > offload_above:
                answer = await asyncio.get_running_loop().run_in_executor(big, _decide, call, body)
            else:
                answer = _decide(call, body)
            return Response.json(answer)
        except BodyError as exc:  # refused before any work: too big (413), too deep or not JSON (400)
            status, error = exc.status, exc.message
        except ProtocolError as exc:
            error = str(exc)
        except Exception as exc:  # a bug must not take the server down; the scheduler sees a clear 500
            log.exception("%s failed", name)
            service.metrics.decisions.labels(name, "error").inc()  # what SchedulerExtenderErrors alerts on
            return _json({"error": f"internal error: {type(exc).__name__}: {exc}"}, status=500)
        finally:
            service.metrics.latency.labels(name).observe(time.perf_counter() - started)
        service.metrics.bad_requests.labels(name).inc()
        log.warning("bad %s request (%d): %s", name, status, error,
                    extra={"verb": name, "remote": request.remote, "status": status})
        return _json({"error": error}, status=status)

    return handler


def build_app(service: ExtenderService) -> HttpServer:
    app = HttpServer()  # each verb checks its own body cap
    big = ThreadPoolExecutor(BIG_DECISION_WORKERS, thread_name_prefix="extender-big-decision")
    app.on_stop.append(lambda: big.shutdown(wait=False, cancel_futures=True))
    s = service
    routes = {
        "/filter": ("filter", s.filter),
        "/prioritize": ("prioritize", s.prioritize),
        "/bind": ("bind", s.bind),
        FORWARDED_PATH: ("bind-forwarded", s.bind_forwarded),
        "/preempt": ("preempt", s.preempt),
        **VolcanoVerbs(service).routes(),
    }
    raw_verbs = {"filter", "prioritize"} | {f"volcano-{verb}" for verb in VolcanoVerbs.RAW}
    for path, (name, call) in routes.items():
        app.route("POST", path, _verb(service, name, call, big, raw_body=name in raw_verbs,
                                      max_body=VOLCANO_PRIORITIZE_MAX_BODY if name == "volcano-prioritize"
                                      else MAX_BODY,
                                      offload_above=PREDICATE_OFFLOAD_ABOVE if name == "volcano-predicate"
                                      else OFFLOAD_ABOVE))
    for verb in ("onSessionOpen", "onSessionClose"):  # Volcano reads only the status
        app.route("POST", f"/volcano/{verb}", _ack(service, f"volcano-{verb}"))

    async def healthz(_request: Request) -> Response:
        return Response.text("ok")

    async def readyz(_request: Request) -> Response:
        ready, why = service.readiness()
        return Response.text(why, 200 if ready else 503)

    async def metrics(_request: Request) -> Response:
        service.metrics.nodes.set(len(service.cache.node_names()))
        return Response(service.metrics.render(), content_type=b"text/plain; version=0.0.4; charset=utf-8")

    async def explain(request: Request) -> Response:
        namespace, sep, pod = unquote(request.path.removeprefix(EXPLAIN)).partition("/")
        if not (namespace and sep and pod) or "/" in pod:
            return _json({"error": f"expected {EXPLAIN}<namespace>/<pod>, got {request.path}"}, status=404)
        key = f"{namespace}/{pod}"
        found = service.explanations.get(key)
        if found is None:
            return _json({"error": f"no decision recorded for {key}"}, status=404)
        return _json(found)

    app.route("GET", "/healthz", healthz)
    app.route("GET", "/readyz", readyz)
    app.route("GET", "/metrics", metrics)
    app.route_prefix("GET", EXPLAIN, explain)
    return app


def ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
