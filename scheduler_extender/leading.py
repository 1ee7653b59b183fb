"""The bind verb with several replicas: one binder, elected.

Two binders choosing devices from their own caches could hand out the same NPU twice (each remembers only the
devices it has just assigned, until the watch shows them). So the replicas elect one binder with a Lease
(:mod:`fuyao.leader`); every replica filters and scores (those read the cache and decide nothing for good), and a
bind that reaches a follower through the Service is forwarded to the leader, whose URL the Lease carries. A forwarded
bind is never forwarded again: a replica that lost the lease meanwhile answers an error, and the scheduler retries the
pod. While no replica leads (the leader died without releasing: at most the lease duration), binds answer an error
naming the lease, and the scheduler retries them.
"""

from __future__ import annotations

import logging
import ssl

import aiohttp
import orjson

from fuyao.kube_client import LazySession
from fuyao.leader import LeaderElector

from .binder import Binder
from .kube_protocol import BindingArgs
from .metrics import ExtenderMetrics

log = logging.getLogger(__name__)

FORWARDED_PATH = "/bind/forwarded"
"""Where a follower sends a bind to the leader (the leader binds it, never forwards it)."""


FORWARD_CONNECT_TIMEOUT_S = 1.0
"""How long a follower waits to connect to the leader: a leader whose pod is gone (force-deleted, its node down)
holds the Lease until it expires, and a connection to its address hangs instead of being refused. Failing fast
lets the scheduler's retries come round sooner; the lease's expiry, not this, decides when the binds resume."""


class LeaderBinder:
    def __init__(self, binder: Binder, elector: LeaderElector, metrics: ExtenderMetrics,
                 ssl_context: ssl.SSLContext | None = None, timeout_s: float = 4.0):
        """``timeout_s``: a forwarded bind's whole time, under kube-scheduler's extender ``httpTimeout`` (5 s in
        the chart), so that the scheduler reads the follower's error rather than its own timeout."""
        self.binder, self.elector, self.metrics = binder, elector, metrics
        self._client = LazySession(ssl_context, 64, timeout_s, connect_timeout_s=FORWARD_CONNECT_TIMEOUT_S)

    async def close(self) -> None:
        await self._client.close()

    def _lease(self) -> str:
        return f"{self.elector.namespace}/{self.elector.name}"

    async def __call__(self, args: BindingArgs, forwarded: bool = False) -> str:
        """"" or the error the scheduler should see."""
        if self.elector.is_leader:
            return await self.binder(args)
        if forwarded:
            return (f"this replica ({self.elector.identity}) was forwarded a bind but does not hold the lease "
                    f"{self._lease()} any more; the scheduler retries")
        url = self.elector.leader_url
        if not url:
            self.metrics.forwarded.labels("no-leader").inc()
            why = self.elector.last_error or f"no live holder (last: {self.elector.leader or 'none'})"
            return f"no replica holds the binder lease {self._lease()} yet ({why}); the scheduler retries"
        body = {"PodName": args.pod_name, "PodNamespace": args.pod_namespace, "PodUID": args.pod_uid,
                "Node": args.node}
        try:
            async with self._client().post(url.rstrip("/") + FORWARDED_PATH, data=orjson.dumps(body),
                                           headers={"Content-Type": "application/json"}) as response:
                data = await response.read()
            answer = orjson.loads(data) if response.status == 200 else None
            error = answer.get("Error", "") if isinstance(answer, dict) else \
                f"the leader {self.elector.leader} at {url} answered {response.status}: {data[:200]!r}"
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            self.metrics.forwarded.labels("unreachable").inc()
            return (f"cannot forward the bind to the leader {self.elector.leader} at {url}: {type(exc).__name__}: "
                    f"{exc}; the scheduler retries")
        self.metrics.forwarded.labels("error" if error else "ok").inc()
        return str(error)
