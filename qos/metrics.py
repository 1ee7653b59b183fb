"""Prometheus metrics of the QoS agent: batch resources, suppression, evictions, usage per class."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from fuyao.contracts import RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY
from fuyao.metrics_http import MetricsEndpoint


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.batch = Gauge("fuyao_qos_batch_resource", "Batch resources computed for BE pods "
                           f"({RESOURCE_BATCH_CPU} in milli, {RESOURCE_BATCH_MEMORY} in bytes)", ("resource",),
                           registry=r)
        self.usage_cpu = Gauge("fuyao_qos_cpu_usage_milli", "CPU used, by class (LS, BE, system)", ("class",),
                               registry=r)
        self.usage_memory = Gauge("fuyao_qos_memory_usage_bytes", "Memory working set, by class (LS, BE, system)",
                                  ("class",), registry=r)
        self.io = Gauge("fuyao_qos_node_io_bytes_per_second", "IO rate: disk_read, disk_write of the node; net_rx, "
                        "net_tx of the agent pod's network namespace (not the node's: no hostNetwork)", ("kind",),
                        registry=r)
        self.suppressed = Gauge("fuyao_qos_cpu_suppressed", "1 while BE pods are CPU-suppressed", registry=r)
        self.be_allowed = Gauge("fuyao_qos_be_cpu_allowed_milli", "CPU BE pods may use together while suppressed",
                                registry=r)
        self.evictions = Counter("fuyao_qos_evictions_total", "BE pods evicted for memory pressure, by result",
                                 ("result",), registry=r)
        self.cgroup_writes = Counter("fuyao_qos_cgroup_writes_total", "cgroup file writes by result", ("result",),
                                     registry=r)
        for result in ("ok", "error"):  # at 0 from the start: increase() counts the first ones too
            self.evictions.labels(result)
            self.cgroup_writes.labels(result)
        self.cgroup_errors = Counter("fuyao_qos_cgroup_read_errors_total", "Pod cgroup files that could not be read",
                                     registry=r)
        self.publishes = Counter("fuyao_qos_publishes_total", "Writes to the Node object by what and result",
                                 ("what", "result"), registry=r)
        self.cycle_seconds = Histogram("fuyao_qos_cycle_duration_seconds", "Time of one collection cycle",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
                                       registry=r)  # a cycle may wait on Node writes and evictions (10 s bound)
        self.endpoint = MetricsEndpoint(self.registry)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
