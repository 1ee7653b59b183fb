"""What the router accepts at its door, checked before any work (tokenizing, hashing, choosing, forwarding):

- the body: at most ``inference.max_body_bytes`` (413), all of it within ``inference.request_body_timeout`` (408),
  at most ``fuyao.http_body.MAX_DEPTH`` levels deep (400), a JSON object;
- ``model`` a string when given, ``stream`` a boolean when given;
- completions: ``prompt`` a string, an array of strings, an array of token ids or an array of token-id arrays, each
  id an unsigned 32-bit integer (the engine then checks its own vocabulary), unless the request gives
  ``prompt_embeds`` instead (vLLM: "either prompt or prompt_embeds"; the engine checks them);
- chat: ``messages`` a non-empty array of messages whose role is a string and whose content is a string, null or
  an array of parts with string ``text`` (what the chat template can render);
- embeddings: ``input`` as ``prompt`` above (a string, strings, token ids or token-id arrays).

A refused request gets a 400 in the OpenAI error shape naming the field, is counted (``inference_requests_total``
by code, ``inference_errors_total{reason="bad-request"}``), and never reaches an engine: a malformed body must
not be retried on every engine and open their circuits.

Fields only the router may set (:data:`ROUTER_FIELDS`, vLLM's disaggregation parameters) are dropped from a
client's body: a client's ``kv_transfer_params`` would pin its blocks on an engine for the lease time, or point an
engine at an address of its choosing to read KV from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fuyao import tokenizer

ROUTER_FIELDS = ("kv_transfer_params", "ec_transfer_params")
"""vLLM's KV and encoder-cache transfer parameters: set by the router on the prefill / decode legs, never by
clients."""


def without_router_fields(body: dict[str, Any]) -> bool:
    """Drop :data:`ROUTER_FIELDS` from a client's ``body``; whether any was there (the body must be re-encoded)."""
    found = False
    for name in ROUTER_FIELDS:
        if name in body:
            del body[name]
            found = True
    return found


def one_sequence(body: Mapping[str, Any]) -> bool:
    """Whether a generation request makes one sequence from one prompt: what prefill/decode disaggregation carries
    (vLLM answers a prefill's ``kv_transfer_params`` for the first prompt only; a batch of prompts, ``n`` > 1 or
    beam search would decode with another sequence's KV)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str | list):
        return False  # several prompts (strings or token-id arrays); a flat array of ids is one prompt
    embeds = body.get("prompt_embeds")
    if isinstance(embeds, list) and len(embeds) > 1:
        return False  # several prompts' embeddings
    if embeds and prompt is not None:
        return False  # vLLM runs the embeddings and the prompt (even an empty one) as two sequences
    return body.get("n") in (None, 1) and body.get("best_of") in (None, 1) and not body.get("use_beam_search")


class BadRequest(ValueError):
    """The request is not one the router forwards; the message names the field (``param``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check(path: str, body: Mapping[str, Any]) -> None:
    """:class:`BadRequest` unless ``body`` is a request for ``path`` the engines can be asked."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    if path.endswith("chat/completions"):
        try:
            tokenizer.check_chat(body.get("messages"))
        except tokenizer.ChatFormatError as exc:
            raise BadRequest(str(exc), "messages") from None
        return
    if path.endswith("/embeddings"):
        _check_prompt(body.get("input"), "input")
    elif not (body.get("prompt") in (None, "") and body.get("prompt_embeds")):
        _check_prompt(body.get("prompt"))


def _check_prompt(prompt: Any, field: str = "prompt") -> None:
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest(f"{field} must be a string, an array of strings, an array of token ids or an array of "
                         "token-id arrays", field)
    if all(isinstance(p, str) for p in prompt):
        return
    if all(isinstance(p, list) and p for p in prompt):
        arrays = prompt
    elif not any(isinstance(p, list | str) for p in prompt):
        arrays = [prompt]
    else:
        raise BadRequest(f"{field} must not mix strings, token ids and token-id arrays", field)
    for ids in arrays:
        try:
            tokenizer.check_token_ids(ids)
        except tokenizer.TokenIdError as exc:
            raise BadRequest(str(exc), field) from None
