"""The router's metrics (the design doc's names), counted on the request path without locks and rendered by
``prometheus_client`` at scrape time.

The router is one event loop: every count happens on it, so the per-value locks of ``prometheus_client``'s own
metric classes (and their per-call checks) buy nothing there and cost about a tenth of the router's CPU per proxied
request. Here a count is a dict or list update; a collector turns them into the same families (names, help, labels,
buckets) when ``/metrics`` is read, and ``prometheus_client`` writes the exposition format.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ERROR_REASONS = ("no-backend", "backend-failed", "broken-stream", "prefill-failed", "deadline")
"""The router's own failure reasons (a backend's error answer counts as ``http-<status>`` or its error type)."""
MAX_SERIES = 4096
"""Label combinations kept per counter; beyond that (backends churning for days) the counter starts over."""


class Counter:
    """A counter with optional labels; :meth:`inc` takes the label values in order."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...] = ()):
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, *label_values: str, amount: float = 1.0) -> None:
        values = self.values
        if label_values in values:
            values[label_values] += amount
            return
        if len(label_values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {label_values}")
        if len(values) >= MAX_SERIES:
            values.clear()
        values[label_values] = amount

    def value(self, *label_values: str) -> float:
        return self.values.get(label_values, 0.0)

    def forget(self, position: int, value: str) -> None:
        """Drop every series whose label at ``position`` is ``value`` (a backend that left the fleet)."""
        for key in [k for k in self.values if len(k) > position and k[position] == value]:
            del self.values[key]

    def zero(self, *label_values: str) -> None:
        """Export these label values at 0 before the first increment: ``rate()`` over them is 0, not "no data"."""
        self.values.setdefault(label_values, 0.0)

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(list(key), value)
        return family


class Histogram:
    """A histogram without labels: one count per bucket (found by bisection) and the sum."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]):
        self.name, self.documentation = name, documentation
        self.bounds = sorted(buckets)
        if self.bounds[-1] != math.inf:
            self.bounds.append(math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self) -> Metric:
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        return HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)


class BackendView(NamedTuple):
    """What the router's per-backend gauges show of one backend when scraped."""

    url: str
    circuit: str
    healthy: bool
    tier_load_cost: float | None = None


class RouterMetrics:
    """Every metric the router serves. ``queue_depth`` is read from ``in_flight`` when scraped."""

    def __init__(self, in_flight: Callable[[], int] = lambda: 0,
                 backends: Callable[[], Iterable[BackendView]] = tuple) -> None:
        """``backends``: each backend's view when scraped (see :meth:`watch`)."""
        self.watch(in_flight, backends)
        self.latency = Histogram("inference_latency", "End-to-end request latency through the router, seconds",
                                 _LATENCY)
        self.requests = Counter("inference_requests", "Requests answered, by HTTP status", ("code",))
        self.errors = Counter("inference_errors", "Requests that failed, by reason", ("reason",))
        for reason in ERROR_REASONS:
            self.errors.zero(reason)
        self.queue_time = Histogram("queue_time", "Time from arrival to the backend's first byte is asked "
                                    "(admission, tokenising, choosing, prefill in P/D), seconds",
                                    (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5,
                                     10, 30))  # a P/D request's queue time holds its prefill
        self.ttft = Histogram("inference_ttft_seconds", "Time to the first byte of the answer, seconds", _LATENCY)
        self.retries = Counter("inference_retries", "Requests retried on another backend")
        self.client_disconnects = Counter("inference_client_disconnects", "Clients that went away before their "
                                          "answer was complete (not held against the backend)")
        self.backend_requests = Counter("inference_backend_requests", "Requests sent, by backend and role",
                                        ("backend", "role"))
        self.prompts = Counter("inference_prompt_tokenizations", "Requests' prompts by how their tokens were "
                               "found: ids (sent as token ids), cache (seen before), local (the router's tokenizer), "
                               "engine (an engine's /tokenize), failed (routed on load alone)", ("source",))
        self.prefix_blocks = Histogram("inference_prefix_match_ratio", "Share of the prompt's blocks cached on the "
                                       "chosen backend", (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0))
        self._status = {}  # type: dict[int, tuple[str]]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)  # a collector: anything with collect()

    def watch(self, in_flight: Callable[[], int], backends: Callable[[], Iterable[BackendView]]) -> None:
        """What the gauges read when scraped: the requests in flight, each backend's view."""
        self.in_flight = in_flight
        self.backends = backends

    def answered(self, status: int) -> None:
        key = self._status.get(status)
        if key is None:
            key = self._status[status] = (str(status),)
        self.requests.inc(*key)

    def collect(self) -> Iterator[Metric]:
        for metric in (self.latency, self.requests, self.errors, self.queue_time, self.ttft, self.retries,
                       self.client_disconnects, self.backend_requests, self.prompts, self.prefix_blocks):
            yield metric.family()
        yield GaugeMetricFamily("queue_depth", "Requests in the router now (admitted, not finished)",
                                value=self.in_flight())
        circuit = GaugeMetricFamily("inference_backend_circuit_open", "1 while the backend's circuit breaker is open "
                                    "or half-open (it gets no requests, or one probe)", labels=("backend",))
        healthy = GaugeMetricFamily("inference_backend_healthy", "1 while the backend passes its health check",
                                    labels=("backend",))
        load_cost = GaugeMetricFamily("fuyao_router_tier_load_cost", "The backend's measured cost of loading a token's "
                                      "KV from the shared tier, as a share of computing it (prefix-aware's "
                                      "learnTierLoadCost); absent until measured", labels=("backend",))
        for view in self.backends():
            circuit.add_metric((view.url,), 0.0 if view.circuit == "closed" else 1.0)
            healthy.add_metric((view.url,), 1.0 if view.healthy else 0.0)
            if view.tier_load_cost is not None:
                load_cost.add_metric((view.url,), view.tier_load_cost)
        yield circuit
        yield healthy
        yield load_cost

    def render(self) -> bytes:
        return generate_latest(self.registry)
