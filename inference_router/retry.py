"""What the router does with an engine's answer that is not a success, before any byte of it reaches the client:
the retry policy, as one pure function of the answer (status and body) shared by every path (plain, prefill,
decode). The request path only acts on the verdict: relay it, or try another engine, and whether the engine's
circuit breaker hears of it.

vLLM's answers it tells apart (0.32, ``vllm/entrypoints/serve``): its 404 ``NotFoundError`` "The model `m` does not
exist." (``_check_model``: that engine does not serve the model — another may, the router's model map is stale),
its 503 ``Service Unavailable`` when its queue is full (``GracefulHTTPError``: retry on another instance), its 501
(not implemented for this model) and 400/413/422 (about the request: every engine would say the same), and any
other 5xx (the engine failed: ``GenerationError`` is a 500 "Internal server error", e.g. a KV load that failed under
``kv_load_failure_policy: fail``).
"""

from __future__ import annotations

import enum

import orjson


class Verdict(enum.Enum):
    REFUSED = "refused"
    """About the request itself (400, 413, 422, vLLM's 501): every engine would say it; relayed, never retried."""
    FAILED = "failed"
    """The engine failed (a 5xx, no answer): retried on another engine, held against its circuit."""
    BUSY = "busy"
    """vLLM's queue is full (its 503 "Service Unavailable"): retried elsewhere; the engine works, its circuit stays
    closed (a burst would open every circuit)."""
    NOT_SERVED = "not-served"
    """vLLM's 404 for a model that engine does not serve: retried on another engine serving it, not held against the
    engine, and the router reads the engines' models again."""
    OTHER = "other"
    """Any other answer (401, 403, a proxy's 408 or 429, a 404 of no model): relayed on a plain request; a prefill
    tries another prefill engine (its own answer never reaches the client)."""

    @property
    def retried(self) -> bool:
        """Whether a plain request is tried on another engine after this answer."""
        return self in _RETRIED

    @property
    def blames(self) -> bool:
        """Whether it counts against the engine's circuit breaker."""
        return self is Verdict.FAILED


_RETRIED = frozenset({Verdict.FAILED, Verdict.BUSY, Verdict.NOT_SERVED})
_REFUSED = frozenset({400, 413, 422, 501})
INSPECTED = frozenset({404, *range(500, 600)} - {501})
"""The statuses whose body a plain request's relay reads to decide (any other answer is relayed as it comes)."""


def _error_field(body: bytes) -> object:
    """The ``error`` field of a JSON object body (None: none, or not JSON)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("error") if isinstance(parsed, dict) else None


def _error(body: bytes) -> dict[str, object] | None:
    """The ``error`` object of an OpenAI-style error body, if it is one."""
    error = _error_field(body)
    return error if isinstance(error, dict) else None


def is_error_body(body: bytes) -> bool:
    """Whether ``body`` is an OpenAI-style error (an engine's answer, not a proxy's HTML page)."""
    return isinstance(_error_field(body), dict | str)


def model_not_served(body: bytes) -> bool:
    """Whether ``body`` is vLLM's answer for a model the engine does not serve ("The model `m` does not exist.",
    type ``NotFoundError``; the router's own 404 reads the same)."""
    error = _error(body)
    if error is None or error.get("type") != "NotFoundError":
        return False
    message = error.get("message")
    return isinstance(message, str) and message.startswith("The model `") and "does not exist" in message


def verdict(status: int, body: bytes) -> Verdict:
    """What an engine's unsuccessful answer (``status`` >= 400) means for the request and for the engine."""
    if status in _REFUSED:
        return Verdict.REFUSED
    if status == 404:
        return Verdict.NOT_SERVED if model_not_served(body) else Verdict.OTHER
    if status == 503:
        error = _error(body)
        return Verdict.BUSY if error is not None and error.get("type") == "Service Unavailable" else Verdict.FAILED
    return Verdict.FAILED if status >= 500 else Verdict.OTHER
