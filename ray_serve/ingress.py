"""The application's HTTP ingress: the OpenAI API (``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health``) in front of the engine deployment. It parses the JSON body once and hands
the engine deployment an :class:`~fuyao.ray_serve.ranking.OpenAiRequest`, so the engine deployment's request router sees
the prompt when it chooses a replica. Streamed requests (``"stream": true``) come back as server-sent events as
the engine sends them.

Errors are the OpenAI API's: a body that is not a JSON object → 400 naming the problem; an unknown path → 404; a
streamed request the engine refuses → the engine's status and error answer (not a 200 stream holding an error).
"""

from __future__ import annotations

import json
from typing import Any

from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .ranking import OpenAiRequest, StreamHead

ROUTES = ("/v1/completions", "/v1/chat/completions")


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class OpenAiIngress:
    """The body of the ingress deployment (``fuyao.ray_serve.app`` wraps it with ``serve.deployment``)."""

    def __init__(self, engine: DeploymentHandle):
        self.engine = engine

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path in ("/health", "/healthz"):
            return Response(status_code=200)
        if request.method == "GET" and path == "/v1/models":
            return JSONResponse(await self.engine.models.remote())
        if path not in ROUTES:
            return _error(404, f"no route {request.method} {path}; this app serves {', '.join(ROUTES)}",
                          "not_found_error")
        if request.method != "POST":
            return _error(405, f"{path} takes POST")
        try:
            body: Any = json.loads(await request.body())
        except ValueError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        call = OpenAiRequest(path, body)
        if body.get("stream"):
            chunks = self.engine.options(stream=True).stream.remote(call)
            head = await chunks.__anext__()
            if not isinstance(head, StreamHead):
                return _error(502, "the engine deployment's stream did not start with its status", "engine_error")
            if head.status != 200:  # the engine refused it before streaming: its status and answer, as vLLM's
                return JSONResponse(dict(head.error or {}), status_code=head.status)
            return StreamingResponse(chunks, media_type="text/event-stream")
        status, payload = await self.engine.complete.remote(call)
        return JSONResponse(payload, status_code=status)
