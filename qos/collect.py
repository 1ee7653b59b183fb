"""Usage collection: the node (psutil: CPU, memory, disk and network IO) and each pod (its cgroup), turned into rates
and kept in a sliding window.

CPU is cumulative in both sources; a rate needs two samples, so the first cycle reports 0 CPU. A pod cgroup that
vanishes or has a file the agent cannot read is logged and skipped for that cycle, never fatal.

CPU, memory and disk IO are the host's (``/proc/stat``, ``/proc/meminfo``, ``/proc/diskstats`` are not namespaced);
network IO is the agent pod's own network namespace (``/proc/net/dev``: the DaemonSet has no ``hostNetwork`` and
does not mount the host's ``/proc``), not the node's.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import psutil

from fuyao.contracts import QoSClass

from . import cgroups
from .policy import ContainerResources, NodeSample, PodSample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostReading:
    """Cumulative busy CPU seconds (all CPUs), memory used and total, at ``at`` (monotonic seconds)."""

    at: float
    cpu_busy_s: float
    memory_used_bytes: int
    memory_total_bytes: int
    cpus: int
    io_bytes: tuple[int, int, int, int] = (0, 0, 0, 0)  # disk read, disk write, network rx, network tx
    """Disk: the host's; network: the agent pod's network namespace (module docstring)."""


def read_host() -> HostReading:
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    busy = sum(times) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    memory = psutil.virtual_memory()
    disk, net = psutil.disk_io_counters(), psutil.net_io_counters()
    io = (disk.read_bytes if disk else 0, disk.write_bytes if disk else 0, net.bytes_recv if net else 0,
          net.bytes_sent if net else 0)
    return HostReading(at=time.monotonic(), cpu_busy_s=busy, memory_used_bytes=memory.total - memory.available,
                       memory_total_bytes=memory.total, cpus=psutil.cpu_count() or 1, io_bytes=io)


@dataclass(frozen=True)
class PodFacts:
    """What the API says about a pod (the collector measures, it does not classify)."""

    namespace: str
    name: str
    qos: QoSClass
    priority: int = 0
    terminating: bool = False
    cpu_limit_milli: int | None = None
    cpu_request_milli: int = 0
    memory_limit_bytes: int | None = None
    memory_request_bytes: int = 0
    finished: bool = False  # phase Succeeded or Failed
    containers: tuple[ContainerResources, ...] = ()


def _pod_sample(uid: str, fact: PodFacts | None, cpu_milli: int = 0, cpu_peak_milli: int = 0, memory_bytes: int = 0,
                memory_peak_bytes: int = 0) -> PodSample:
    """A pod's sample: what the API says about it (``fact``; None: only its cgroup was seen) and its usage."""
    if fact is None:
        return PodSample(uid=uid, cpu_milli=cpu_milli, cpu_peak_milli=cpu_peak_milli, memory_bytes=memory_bytes,
                         memory_peak_bytes=memory_peak_bytes)
    return PodSample(uid=uid, namespace=fact.namespace, name=fact.name, qos=fact.qos, known=True,
                     priority=fact.priority, terminating=fact.terminating, cpu_limit_milli=fact.cpu_limit_milli,
                     cpu_request_milli=fact.cpu_request_milli, memory_limit_bytes=fact.memory_limit_bytes,
                     memory_request_bytes=fact.memory_request_bytes, finished=fact.finished,
                     containers=fact.containers, cpu_milli=cpu_milli, cpu_peak_milli=cpu_peak_milli,
                     memory_bytes=memory_bytes, memory_peak_bytes=memory_peak_bytes)


@dataclass
class _Series:
    cpu_ns: int | None = None
    at: float = 0.0
    cpu: deque[int] = field(default_factory=deque)
    memory: deque[int] = field(default_factory=deque)


@dataclass(frozen=True)
class Measurement:
    node: NodeSample
    pods: list[PodSample]
    errors: list[str]
    warm: bool  # CPU rates are measured (not the first sample)
    io: dict[str, int]  # IO, bytes per second: disk_read, disk_write (the host's), net_rx, net_tx (the agent pod's)
    groups: dict[str, cgroups.PodCgroup]  # uid → cgroup, for the writes
    unsampled: list[PodSample] = field(default_factory=list)
    """Pods the API binds to this node that gave no cgroup sample this cycle (no cgroup yet: pulling its image;
    or unreadable), with what their specs ask (no usage)."""

class Collector:
    def __init__(self, layout: cgroups.Layout, window: int, read: Callable[[], HostReading] = read_host):
        self.layout = layout
        self.window = window
        self.read = read
        self._host: HostReading | None = None
        self._pods: dict[str, _Series] = {}
        self._system_cpu: deque[int] = deque(maxlen=window)
        self._system_memory: deque[int] = deque(maxlen=window)
        self.errors_total = 0

    def _push(self, values: deque[int], value: int) -> None:
        values.append(value)
        while len(values) > self.window:
            values.popleft()

    def sample(self, facts: Mapping[str, PodFacts], capacity: tuple[int, int] | None = None,
               reserved: tuple[int, int] = (0, 0)) -> Measurement:
        """One cycle. ``capacity``: (CPU milli, memory bytes) of the node as Kubernetes sees it (default: the
        host's); ``reserved``: capacity - allocatable."""
        host = self.read()
        previous, self._host = self._host, host
        node_cpu = 0
        io = dict.fromkeys(("disk_read", "disk_write", "net_rx", "net_tx"), 0)
        if previous is not None and host.at > previous.at:
            elapsed = host.at - previous.at
            node_cpu = max(0, int((host.cpu_busy_s - previous.cpu_busy_s) / elapsed * 1000))
            io = {name: max(0, int((now - before) / elapsed))
                  for name, now, before in zip(io, host.io_bytes, previous.io_bytes, strict=True)}
        errors: list[str] = []
        pods: list[PodSample] = []
        seen = set()
        groups = cgroups.pod_cgroups(self.layout, errors)
        for uid, group in groups.items():
            try:
                cpu_ns = cgroups.cpu_usage_ns(self.layout, group)
                memory = cgroups.memory_working_set(self.layout, group)
            except cgroups.CgroupError as exc:
                errors.append(str(exc))
                continue
            seen.add(uid)
            series = self._pods.setdefault(uid, _Series())
            rate = 0
            if series.cpu_ns is not None and host.at > series.at and cpu_ns >= series.cpu_ns:
                rate = int((cpu_ns - series.cpu_ns) / 1e6 / (host.at - series.at))
            first = series.cpu_ns is None
            series.cpu_ns, series.at = cpu_ns, host.at
            if not first:
                self._push(series.cpu, rate)
            self._push(series.memory, memory)
            pods.append(_pod_sample(uid, facts.get(uid), cpu_milli=rate, cpu_peak_milli=max(series.cpu, default=0),
                                    memory_bytes=memory, memory_peak_bytes=max(series.memory, default=memory)))
        for gone in set(self._pods) - seen:
            del self._pods[gone]
        if errors:
            self.errors_total += len(errors)
            for error in errors:
                log.warning("cgroup skipped this cycle: %s", error)
        if previous is not None:
            self._push(self._system_cpu, max(0, node_cpu - sum(p.cpu_milli for p in pods)))
        self._push(self._system_memory, max(0, host.memory_used_bytes - sum(p.memory_bytes for p in pods)))
        cpu_capacity, memory_capacity = capacity or (host.cpus * 1000, host.memory_total_bytes)
        node = NodeSample(
            cpu_capacity_milli=cpu_capacity, memory_capacity_bytes=memory_capacity,
            cpu_reserved_milli=reserved[0], memory_reserved_bytes=reserved[1], cpu_used_milli=node_cpu,
            memory_used_bytes=host.memory_used_bytes, system_cpu_peak_milli=max(self._system_cpu, default=0),
            system_memory_peak_bytes=max(self._system_memory, default=0))
        unsampled = [_pod_sample(uid, fact) for uid, fact in facts.items() if uid not in seen]
        return Measurement(node, pods, errors, warm=previous is not None, io=io, groups=groups, unsampled=unsampled)
