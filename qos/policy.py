"""The QoS agent's decisions, as pure functions of one measurement: batch resources for BE pods, CPU suppression
of BE pods, and which BE pods to evict under memory pressure. No I/O here (see ``agent``).

Classes: LS (latency-sensitive: online inference, and every pod the agent cannot classify) and BE (best-effort,
by the contract keys). Only BE pods are ever throttled or evicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fuyao.contracts import QoSClass

from .config import AgentConfig

MIN_QUOTA_US = 1000  # the kernel refuses CFS quotas below 1 ms
MIN_SHARES, MAX_SHARES = 2, 262144


@dataclass(frozen=True)
class ContainerResources:
    """What one container's spec asks of its cgroup. For a BE pod, the batch resources stand in for cpu and memory
    (``kubernetes.io/batch-cpu`` in milli-CPU, ``kubernetes.io/batch-memory`` in bytes), as koordlet applies them."""

    name: str
    container_id: str = ""  # runtime://id from the pod status ("" before it runs)
    cpu_request_milli: int = 0
    cpu_limit_milli: int | None = None  # None: unlimited
    memory_limit_bytes: int | None = None
    memory_request_bytes: int = 0


@dataclass(frozen=True)
class PodSample:
    """One pod's usage, with what the API says about it (``known`` False: only its cgroup was seen)."""

    uid: str
    namespace: str = ""
    name: str = ""
    qos: QoSClass = QoSClass.LS
    known: bool = False
    priority: int = 0
    terminating: bool = False
    cpu_limit_milli: int | None = None  # from the pod spec (what the kubelet set); None: unlimited
    cpu_request_milli: int = 0
    memory_limit_bytes: int | None = None
    memory_request_bytes: int = 0
    finished: bool = False  # phase Succeeded or Failed: its containers are gone for good
    containers: tuple[ContainerResources, ...] = ()
    cpu_milli: int = 0  # latest rate
    cpu_peak_milli: int = 0  # peak over the window
    memory_bytes: int = 0  # latest working set
    memory_peak_bytes: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}" if self.known else f"<unknown pod {self.uid}>"

    @property
    def be(self) -> bool:
        return self.known and self.qos == QoSClass.BE


@dataclass(frozen=True)
class NodeSample:
    cpu_capacity_milli: int
    memory_capacity_bytes: int
    cpu_reserved_milli: int = 0  # capacity - allocatable (kube-reserved + system-reserved)
    memory_reserved_bytes: int = 0
    cpu_used_milli: int = 0  # latest
    memory_used_bytes: int = 0
    system_cpu_peak_milli: int = 0  # node used - Σ pods, peak over the window
    system_memory_peak_bytes: int = 0


@dataclass(frozen=True)
class BatchResources:
    cpu_milli: int
    memory_bytes: int
    ls_cpu_milli: int
    ls_memory_bytes: int
    system_cpu_milli: int
    system_memory_bytes: int


def batch_resources(node: NodeSample, pods: Sequence[PodSample], config: AgentConfig,
                    unsampled: Sequence[PodSample] = ()) -> BatchResources:
    """Koordinator's usage policy: capacity x reclaim% - max(system used, reserved) - Σ LS used (window peaks),
    never negative. BE pods' own usage is not subtracted: it is what the batch resources hand out. ``unsampled``:
    pods the API binds to the node whose cgroups gave no sample (not created yet: the image is still pulling, or
    unreadable this cycle); an LS one among them uses its requests (Koordinator's calculateOnNode), unless it has
    finished."""
    waiting = [p for p in unsampled if not p.be and not p.finished]
    ls_cpu = sum(p.cpu_peak_milli for p in pods if not p.be) + sum(p.cpu_request_milli for p in waiting)
    ls_memory = sum(p.memory_peak_bytes for p in pods if not p.be) + sum(p.memory_request_bytes for p in waiting)
    cpu = node.cpu_capacity_milli * config.batch.cpu_reclaim_percent / 100 \
        - max(node.system_cpu_peak_milli, node.cpu_reserved_milli) - ls_cpu
    memory = node.memory_capacity_bytes * config.batch.memory_reclaim_percent / 100 \
        - max(node.system_memory_peak_bytes, node.memory_reserved_bytes) - ls_memory
    return BatchResources(cpu_milli=max(0, int(cpu)), memory_bytes=max(0, int(memory)), ls_cpu_milli=ls_cpu,
                          ls_memory_bytes=ls_memory, system_cpu_milli=node.system_cpu_peak_milli,
                          system_memory_bytes=node.system_memory_peak_bytes)


def changed_enough(old: int | None, new: int, capacity: int, threshold_percent: float) -> bool:
    """Publish a batch value when it is new or moved by more than the threshold (share of capacity)."""
    return old is None or abs(new - old) > capacity * threshold_percent / 100


@dataclass(frozen=True)
class SuppressPlan:
    active: bool
    ls_and_system_milli: int
    be_allowed_milli: int | None  # None: not suppressed
    limits: dict[str, int | None]  # BE pod uid → CPU limit in milli (None: unlimited)
    cpus: frozenset[int] | None = None  # the cpuset policy: the CPUs BE pods share (None: not managed)


def be_cpus(allowed: frozenset[int], budget_milli: int) -> frozenset[int]:
    """The CPUs BE pods share under the cpuset policy: the budget rounded up to whole CPUs (at least one), the
    highest-numbered of ``allowed`` (the kubelet's BestEffort cpuset), so LS threads keep the others to themselves."""
    count = min(len(allowed), max(1, -(-budget_milli // 1000)))
    return frozenset(sorted(allowed)[len(allowed) - count:])


def cpu_suppress(node: NodeSample, pods: Sequence[PodSample], config: AgentConfig, was_active: bool,
                 node_cpus: frozenset[int] = frozenset(), was_cpus: int | None = None) -> SuppressPlan:
    """BE pods' CPU below what LS and the system leave under the threshold (the budget: capacity x threshold - LS -
    system, at least ``minBeMilli``).

    - ``cfsQuota``: when LS + system CPU passes the threshold, BE pods share the budget equally as CFS quotas; below
      threshold - hysteresis the quotas go back to what the pods' specs say.
    - ``cpuset``: always, BE pods share the budget's CPUs (:func:`be_cpus` of ``node_cpus``); their quotas are what
      their specs say. A BE thread then never runs on the CPUs LS keeps: quotas bound how much BE runs, not when, so
      an LS thread waking beside a running BE thread still waits (measured: docs/qos.md). ``was_cpus``: how many
      CPUs BE had last cycle; BE gets more only once the budget passes the whole-CPU boundary below it by
      ``hysteresisPercent`` of capacity (at most 1000m), else one CPU fewer than the budget rounds up to (it loses
      CPUs at once: LS first), so a load near a whole CPU does not move BE pods back and forth every cycle."""
    settings = config.cpu_suppress
    be = [p for p in pods if p.be]
    ls_and_system = sum(p.cpu_milli for p in pods if not p.be) + max(
        0, node.cpu_used_milli - sum(p.cpu_milli for p in pods))
    ratio = ls_and_system / max(1, node.cpu_capacity_milli) * 100
    threshold = settings.threshold_percent
    if settings.policy == "cpuset" and node_cpus:
        specs = {p.uid: p.cpu_limit_milli for p in be}
        if not settings.enabled:
            return SuppressPlan(False, ls_and_system, None, specs)
        budget = max(settings.min_be_milli, int(node.cpu_capacity_milli * threshold / 100) - ls_and_system)
        cpus = be_cpus(node_cpus, budget)
        margin = node.cpu_capacity_milli * settings.hysteresis_percent / 100
        lower = (len(cpus) - 1) * 1000  # the whole-CPU boundary just below the budget
        if was_cpus is not None and len(cpus) > was_cpus and budget <= lower + min(margin, 1000):
            cpus = be_cpus(node_cpus, max(was_cpus * 1000, lower))  # not past it by the margin: one CPU fewer
        return SuppressPlan(True, ls_and_system, budget, specs, cpus)
    active = settings.enabled and (
        ratio > threshold or (was_active and ratio > threshold - settings.hysteresis_percent))
    if not active:
        return SuppressPlan(False, ls_and_system, None, {p.uid: p.cpu_limit_milli for p in be})
    allowed = max(settings.min_be_milli, int(node.cpu_capacity_milli * threshold / 100) - ls_and_system)
    share = allowed // max(1, len(be))
    limits: dict[str, int | None] = {}
    for pod in be:
        own = pod.cpu_limit_milli
        limits[pod.uid] = max(1, share if own is None else min(own, share))
    return SuppressPlan(True, ls_and_system, allowed, limits)


def quota_us(limit_milli: int | None, period_us: int) -> int | None:
    if limit_milli is None:
        return None
    return max(MIN_QUOTA_US, limit_milli * period_us // 1000)


def milli_to_shares(milli: int) -> int:
    """The kubelet's MilliCPUToShares: cpu.shares for a CPU request (2 for none)."""
    return max(MIN_SHARES, min(MAX_SHARES, milli * 1024 // 1000))


@dataclass(frozen=True)
class CgroupTarget:
    """What one cgroup (a pod's or a container's) should hold."""

    cpu_limit_milli: int | None  # CFS quota in milli-CPU; None: unlimited
    cpu_shares: int  # v1 shares (v2 weight converted from it)
    memory_limit_bytes: int | None  # None: unlimited


@dataclass(frozen=True)
class PodTargets:
    pod: CgroupTarget
    containers: dict[str, CgroupTarget]  # container name → target (containers with a runtime id only)


def _min_limit(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def be_targets(pod: PodSample, cpu_limit_milli: int | None, be_cpu_shares: int,
               in_besteffort_tier: bool = True) -> PodTargets:
    """A BE pod's cgroups from its batch requests and limits (``cpu_limit_milli``: the pod's CPU allowance now,
    its own limit or less while suppressed). CPU weight from the request (``be_cpu_shares`` without one); a
    container's quota never above the pod's, which the kernel (cgroup v1) refuses.

    ``in_besteffort_tier`` False: the kubelet put the pod in the burstable (or guaranteed) tier because it also
    requests cpu or memory; there its weight competes with LS pods' own, not within the besteffort tier's 2 shares,
    so it is at most ``be_cpu_shares`` (a BE pod asking 4000m batch-cpu must not weigh as much as 4 LS CPUs)."""
    shares = milli_to_shares(pod.cpu_request_milli) if pod.cpu_request_milli > 0 else be_cpu_shares
    if not in_besteffort_tier:
        shares = min(shares, be_cpu_shares)
    containers = {}
    for c in pod.containers:
        if not c.container_id:
            continue
        containers[c.name] = CgroupTarget(
            cpu_limit_milli=_min_limit(c.cpu_limit_milli, cpu_limit_milli),
            cpu_shares=milli_to_shares(c.cpu_request_milli) if c.cpu_request_milli > 0 else MIN_SHARES,
            memory_limit_bytes=c.memory_limit_bytes)
    return PodTargets(CgroupTarget(cpu_limit_milli, shares, pod.memory_limit_bytes), containers)


def spec_targets(pod: PodSample) -> PodTargets:
    """What the kubelet would set from the pod's own cpu/memory (for a pod that stopped being BE)."""
    def own(c: PodSample | ContainerResources) -> CgroupTarget:
        return CgroupTarget(c.cpu_limit_milli, milli_to_shares(c.cpu_request_milli), c.memory_limit_bytes)

    return PodTargets(own(pod), {c.name: own(c) for c in pod.containers if c.container_id})


@dataclass(frozen=True)
class Eviction:
    pod: PodSample
    reason: str


def memory_evictions(node: NodeSample, pods: Sequence[PodSample], config: AgentConfig) -> list[Eviction]:
    """Above the high watermark, BE pods — lowest priority first, then largest memory — until the node's memory
    minus theirs is below the low watermark. Terminating pods are already going and count as freed."""
    settings = config.memory_eviction
    capacity = node.memory_capacity_bytes
    used = node.memory_used_bytes
    if not settings.enabled or capacity <= 0 or used <= capacity * settings.high_percent / 100:
        return []
    low = capacity * settings.low_percent / 100
    used -= sum(p.memory_bytes for p in pods if p.be and p.terminating)
    out: list[Eviction] = []
    for pod in sorted((p for p in pods if p.be and not p.terminating), key=lambda p: (p.priority, -p.memory_bytes)):
        if used <= low:
            break
        out.append(Eviction(pod, f"node memory {node.memory_used_bytes / capacity:.0%} is above the "
                                 f"{settings.high_percent:g}% watermark; BE pod using {pod.memory_bytes} bytes "
                                 f"(priority {pod.priority}) evicted to get below {settings.low_percent:g}%"))
        used -= pod.memory_bytes
    return out
