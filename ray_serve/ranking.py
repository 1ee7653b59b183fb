"""Which Serve replicas a request should go to, from what fuyao's KV-cache index says each replica's engine holds.

Pure: the request router (:mod:`fuyao.ray_serve.request_router`) does the I/O (the index lookup) and hands the answer
here. The result is Serve's shape for ``choose_replicas``: ranks of replicas, most preferred first. Serve then picks
the least-loaded replica of the first rank that has room (below ``max_ongoing_requests``) and falls through to the
next rank when the whole rank is full, so a hot prefix never pins more load on a replica than it accepts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OPENAI_FIELDS = ("prompt", "messages")


@dataclass(frozen=True)
class OpenAiRequest:
    """What the ingress hands the engine deployment: the API path and the JSON body. ``prompt`` and ``messages`` are
    attributes, so Serve's own prefix router (``PrefixCacheAffinityRouter``, which reads ``arg.prompt`` /
    ``arg.messages``) routes it as well as fuyao's."""

    path: str
    body: Mapping[str, Any]

    # only the one the request carries exists: Serve's prefix router takes ``messages`` whenever hasattr says it
    # is there, and a completion's None made it raise (the request then hung, never routed)
    @property
    def prompt(self) -> Any:
        if "prompt" not in self.body:
            raise AttributeError("prompt")
        return self.body["prompt"]

    @property
    def messages(self) -> Any:
        if "messages" not in self.body:
            raise AttributeError("messages")
        return self.body["messages"]

    def lookup_query(self, model: str | None = None) -> dict[str, Any] | None:
        """The index's ``POST /v1/lookup`` body for this request, or None when it carries no prompt or messages."""
        query: dict[str, Any] = {}
        if isinstance(self.body.get("messages"), list):
            query["messages"] = self.body["messages"]
        elif isinstance(self.body.get("prompt"), str):
            query["prompt"] = self.body["prompt"]
        elif isinstance(self.body.get("prompt"), list) and all(isinstance(t, int) for t in self.body["prompt"]):
            query["token_ids"] = self.body["prompt"]
        else:
            return None
        name = model or self.body.get("model")
        if isinstance(name, str) and name:
            query["model"] = name
        return query


@dataclass(frozen=True)
class StreamHead:
    """The first item of a streamed answer from the engine deployment: the engine's HTTP status and, when it
    refused the request, its JSON error answer (the stream then ends)."""

    status: int
    error: Mapping[str, Any] | None = None


def request_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> OpenAiRequest | None:
    """The OpenAI request among a pending request's arguments (the first :class:`OpenAiRequest`), or None."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, OpenAiRequest):
            return value
    return None


def hit_scores(engines: Sequence[str | None], cached: Mapping[str, int], blocks: int) -> list[float]:
    """Per replica (by its engine's name; None: unknown), the share of the prompt's blocks its engine holds, in
    [0, 1]."""
    if blocks <= 0:
        return [0.0] * len(engines)
    return [min(1.0, max(0, cached.get(e, 0)) / blocks) if e else 0.0 for e in engines]


def rank(engines: Sequence[str | None], cached: Mapping[str, int], blocks: int, *, min_hit: float = 0.0,
         tolerance_blocks: int = 0) -> list[list[int]]:
    """Positions of the replicas in ranks: first those whose engine holds the most leading blocks of the prompt
    (within ``tolerance_blocks`` of the best, and at least ``min_hit`` of the prompt), then every other replica.
    When no engine holds enough, one rank of all: Serve then balances on load alone."""
    held = [min(blocks, max(0, cached.get(e, 0))) if e and blocks > 0 else 0 for e in engines]
    best = max(held, default=0)
    if best <= 0 or best < min_hit * blocks:
        return [list(range(len(engines)))] if engines else []
    first = [i for i, h in enumerate(held) if h > 0 and h >= best - tolerance_blocks and h >= min_hit * blocks]
    chosen = set(first)
    rest = [i for i in range(len(engines)) if i not in chosen]
    return [first, rest] if rest else [first]
