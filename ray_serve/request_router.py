"""``KvIndexRequestRouter``: a Ray Serve request router (``ray.serve.request_router.RequestRouter``, alpha in Ray
2.60) that asks fuyao's KV-cache index which replica's engine already holds the prompt's leading KV blocks.

For each request it sends the prompt (or chat messages, or token ids) to the index's ``POST /v1/lookup``; the index
tokenizes it with the served model's tokenizer, hashes its blocks as the engines do, and answers, per engine, how
many leading blocks that engine has cached (from the engines' KV events). Replicas are matched to engines by the
``engine`` their ``record_replica_metadata`` reports. :func:`fuyao.ray_serve.ranking.rank` turns that into Serve's
ranks: the replicas holding the most, then the rest; Serve picks the least-loaded replica with room in the first rank
that has one. When the index is slow (``lookup_timeout``), down, or knows nothing, all replicas form one rank:
plain load balancing, never a failed request. After ``index_failure_threshold`` failed lookups in a row the router
stops asking the index for ``index_cool_down`` seconds, then probes it with one request (:mod:`.kv_lookup`), so a
hung index does not slow every routing decision by ``lookup_timeout``.

Counters (Ray metrics, exported by Ray's metrics agent as ``ray_fuyao_serve_route_total``):
``fuyao_serve_route_total{outcome}``, once per request, with outcome ``hit`` (the index's answer ordered the
replicas: some engine held at least ``min_hit`` of the prompt), ``miss`` (it did not), ``no_prompt``,
``index_error`` (the lookup failed), ``index_skipped`` (the index's circuit was open: not asked).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .kv_lookup import IndexLookup
from .ranking import rank, request_of

log = logging.getLogger("fuyao.ray_serve.request_router")
ANSWERS_KEPT = 4096
"""Index answers kept by request id, for Serve's later passes over a request that found every replica full."""


def _counter() -> Any:
    try:
        from ray.util.metrics import Counter

        return Counter("fuyao_serve_route_total", description="Serve routing decisions of fuyao's KV-index router",
                       tag_keys=("outcome",))
    except Exception:
        return None


class KvIndexRequestRouter(RequestRouter):
    def initialize_state(self, kv_index_url: str = "", lookup_timeout: float = 0.2, min_hit: float = 0.0,
                         tolerance_blocks: int = 0, index_failure_threshold: int = 3, index_cool_down: float = 10.0,
                         **_: Any) -> None:
        if not kv_index_url:
            raise ValueError("KvIndexRequestRouter needs request_router_kwargs.kv_index_url (fuyao-kvcache's URL)")
        self._lookup = IndexLookup(kv_index_url, lookup_timeout, int(index_failure_threshold),
                                   float(index_cool_down))
        self._min_hit = float(min_hit)
        self._tolerance = int(tolerance_blocks)
        self._routed = _counter()
        self.outcomes: dict[str, int] = {"hit": 0, "miss": 0, "no_prompt": 0, "index_error": 0, "index_skipped": 0}
        self._answers: OrderedDict[str, dict[str, Any] | None] = OrderedDict()  # by request id, newest last

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self._routed is not None:
            self._routed.inc(tags={"outcome": outcome})

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Serve calls again while every replica is full: with this it waits (backing off) between passes;
            # without it, it called back at once, asking the index each time, just when the fleet is overloaded
            pending_request.routing_context.should_backoff = True
        try:
            return await self._choose(candidate_replicas, pending_request)
        except Exception:  # Serve drops a request whose routing raised, unanswered: route it on load instead
            log.exception("KV-index routing failed: routing on load alone")
            return [candidate_replicas]

    async def _choose(self, candidate_replicas: list[RunningReplica],
                      pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        request = request_of(pending_request.args, pending_request.kwargs) if pending_request else None
        query = request.lookup_query() if request else None
        if query is None:
            self._count("no_prompt")
            return [candidate_replicas]
        # one lookup per request: the passes Serve makes while the replicas are full reuse its answer
        # (by Serve's internal id: the request id may be the client's, and clients reuse them)
        key: str | None = pending_request.metadata.internal_request_id if pending_request is not None else None
        first = key is None or key not in self._answers
        if key is not None and not first:
            answer = self._answers[key]
        else:
            lookup = await self._lookup(query)
            answer = lookup.answer
            if key is not None:
                self._answers[key] = answer
                while len(self._answers) > ANSWERS_KEPT:
                    self._answers.popitem(last=False)
            if answer is None:
                self._count("index_skipped" if lookup.outcome == "skipped" else "index_error")
        if answer is None:
            return [candidate_replicas]
        engines = [(r.replica_metadata or {}).get("engine") for r in candidate_replicas]
        cached = answer.get("endpoints") or {}
        if not isinstance(cached, dict):
            raise ValueError(f"the KV index answered endpoints {type(cached).__name__}, not an object")
        ranks = rank(engines, cached, int(answer.get("blocks") or 0), min_hit=self._min_hit,
                     tolerance_blocks=self._tolerance)
        if first:
            self._count("hit" if len(ranks) > 1 else "miss")  # a hit: the index's answer ordered the replicas
        return [[candidate_replicas[i] for i in group] for group in ranks]
