"""The KV-index lookup of :mod:`fuyao.ray_serve.request_router`: ``POST /v1/lookup`` with a short deadline, behind a
circuit breaker (fuyao-router's :class:`~fuyao.inference_router.balancing.CircuitBreaker`).

Serve runs at most ``2 * replicas`` routing tasks at a time (``RequestRouter.max_num_routing_tasks``), and each one
waits for its lookup: an index that hangs would make every request wait the whole ``lookup_timeout`` and cap the
deployment at ``2 * replicas / lookup_timeout`` routing decisions a second. So after ``failure_threshold``
lookups in a row fail (a timeout, a refused connection, a 5xx, an answer that is no JSON object) the circuit opens:
for ``cool_down`` seconds no request asks the index (it is routed on load at once); then one request probes it
(half-open) while the others still skip it, and its answer closes the circuit or opens it again.

No Ray here: it runs in fuyao's own environment as well as in Serve's routers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from fuyao.inference_router.balancing import CircuitBreaker

log = logging.getLogger("fuyao.ray_serve.request_router")

Outcome = Literal["answered", "failed", "skipped"]


@dataclass(frozen=True)
class Lookup:
    """The index's answer (None when there is none to use) and how it came: ``answered`` (the index answered, maybe
    with a 4xx about this request), ``failed`` (it did not, or not usably), ``skipped`` (the circuit is open)."""

    answer: dict[str, Any] | None
    outcome: Outcome


class IndexLookup:
    def __init__(self, index_url: str, timeout: float, failure_threshold: int = 3, cool_down: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.url = index_url.rstrip("/") + "/v1/lookup"
        self.timeout = float(timeout)
        self.breaker = CircuitBreaker(failure_threshold, cool_down)
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, query: dict[str, Any]) -> Lookup:
        if not self.breaker.allows(self.clock()):
            return Lookup(None, "skipped")
        self.breaker.dispatched()
        verdict = False
        try:
            answer, ok = await self._ask(query)
            verdict = True
            if ok:
                self.breaker.success()
                return Lookup(answer, "answered")
            was = self.breaker.state
            self.breaker.failure(self.clock())
            if self.breaker.state == "open" and was != "open":
                log.warning("KV index failed %d lookups in a row: routing on load alone for %.0f s",
                            self.breaker.failures, self.breaker.timeout_s)
            return Lookup(None, "failed")
        finally:
            if not verdict:  # cancelled (Serve gave up on the request): no verdict on the index, free the probe
                self.breaker.release()

    async def _ask(self, query: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """The answer, and whether the index works: a 400 or 422 about this request says it does; a 404 or 405
        (a wrong ``kvIndexUrl`` or path: every lookup would fail the same way) and a 5xx say it does not."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(self.url, json=query) as response:
                if response.status != 200:
                    log.warning("KV index lookup answered %s: %s", response.status, (await response.text())[:300])
                    return None, response.status in (400, 422)
                answer = await response.json()
                if not isinstance(answer, dict):
                    log.warning("KV index lookup answered a %s, not an object", type(answer).__name__)
                    return None, False
                return answer, True
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.warning("KV index lookup failed (%s): routing on load alone", exc.__class__.__name__)
            return None, False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
