"""Prometheus metrics of the extender: latency per verb, decisions, rejections by plugin."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest


class ExtenderMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.latency = Histogram("fuyao_extender_request_duration_seconds", "Time to answer a request, per verb",
                                 ("verb",), registry=r,
                                 buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                          2.5, 5.0, 10.0))  # 0.5: the slow alert's default threshold
        self.decisions = Counter("fuyao_extender_decisions_total", "Answered requests by verb and result",
                                 ("verb", "result"), registry=r)
        self.rejections = Counter("fuyao_extender_rejections_total", "Node rejections by plugin and reason",
                                  ("plugin", "reason"), registry=r)
        self.bad_requests = Counter("fuyao_extender_bad_requests_total", "Requests refused as the client's error: "
                                    "malformed or too deep (400), too big (413), too slow to arrive (408)",
                                    ("verb",), registry=r)
        self.api_calls = Counter("fuyao_extender_api_calls_total", "The binder's API server calls: read (a pod the "
                                 "watch cache did not have yet, or a stale copy) and bind, by HTTP status",
                                 ("call", "code"), registry=r)
        self.api_latency = Histogram("fuyao_extender_api_call_duration_seconds", "The binder's API server calls, "
                                     "from sending the request to reading the whole answer", ("call",), registry=r,
                                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.nodes = Gauge("fuyao_extender_cached_nodes", "Nodes in the watch cache", registry=r)
        self.leader = Gauge("fuyao_extender_leader", "1 while this replica holds the binder lease (leaderElection; "
                            "always 1 for a single binder, 0 when not binding)", registry=r)
        self.forwarded = Counter("fuyao_extender_forwarded_binds_total", "Binds a follower replica forwarded to the "
                                 "leader, by result (ok, error: the leader answered an error, unreachable, "
                                 "no-leader)", ("result",), registry=r)
        for result in ("ok", "error", "unreachable", "no-leader"):
            self.forwarded.labels(result)

    def render(self) -> bytes:
        return generate_latest(self.registry)
