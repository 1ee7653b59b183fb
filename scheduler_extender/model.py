"""What the extender knows about a pod and a node, parsed once from raw Kubernetes JSON (dicts, as the scheduler
sends them and the watch delivers them) into plain values the plugins read. Pure: no I/O here.

Parsing is lenient where Kubernetes is (missing fields are empty) and strict where our contracts are: an invalid
annotation value is recorded in ``problems`` (so the pod gets an event naming it) and treated as absent. The fields
that say which object it is (name, namespace, uid, node name...) must be strings when present: anything else is a
:class:`ProtocolError` naming the field (they become dict keys, log lines and f-strings everywhere after this).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property, lru_cache
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from fuyao.contracts import (
    ACCELERATOR_RESOURCES,
    ANNOTATION_BUSINESS_TYPE,
    ANNOTATION_NODE_TOPOLOGY,
    ANNOTATION_NODE_USAGE,
    ANNOTATION_NUMA_POLICY,
    ANNOTATION_POD_ASSIGNED,
    ANNOTATION_VNPU_MODE,
    LABEL_VOLCANO_COLOCATION,
    POD_INSTANCE_LABELS,
    RESOURCE_BATCH_CPU,
    RESOURCE_BATCH_MEMORY,
    RESOURCE_NPU,
    USAGE_STALE_S,
    BusinessType,
    ContractError,
    NodeTopology,
    NodeUsage,
    NumaPolicy,
    Phase,
    PodAssignment,
    QoSClass,
    VnpuMode,
    parse_annotation,
    parse_business_type,
    parse_numa_policy,
    parse_phase,
    parse_vnpu_mode,
    pd_group,
    resolve_qos,
)

from .partial import ProtocolError

log = logging.getLogger(__name__)

CPU = "cpu"
MEMORY = "memory"
GiB = 1024**3
QUANTITY_LIMIT = Decimal(2**53)
"""Requests beyond this (9 PB, 9e15 cores) are clamped: they fit nowhere anyway, and stay exact in int64/float."""


@lru_cache(maxsize=4096)
def quantity(raw: str | int | float) -> Decimal:
    """A Kubernetes quantity (``500m``, ``2Gi``, ``1e3``); garbage raises ValueError."""
    value: Decimal = parse_quantity(raw)
    return value


def _resources(spec: Mapping[str, Any] | None) -> dict[str, Decimal]:
    """A container's requests, with limits standing in for missing requests (Kubernetes' defaulting)."""
    if not spec:
        return {}
    requests = dict(spec.get("limits") or {})
    requests.update(spec.get("requests") or {})
    out: dict[str, Decimal] = {}
    for name, raw in requests.items():
        try:
            out[name] = max(-QUANTITY_LIMIT, min(QUANTITY_LIMIT, quantity(raw)))
        except ValueError:
            log.debug("ignoring unparseable quantity %r for %s", raw, name)
    return out


Requests = dict[str, Decimal]


def effective_requests(pod_spec: Mapping[str, Any]) -> tuple[
        Requests, list[tuple[str, Requests]], list[tuple[str, Requests, int]]]:
    """(pod total, running containers, plain init containers) as kube-scheduler computes them (component-helpers
    ``PodRequests``): a native sidecar (an init container with ``restartPolicy: Always``) runs beside the
    containers, so it adds to their sum and holds its devices like one of them (listed first: the kubelet starts it
    first); a plain init container runs alone beside the sidecars started before it (listed with how many of the
    running containers those are) and gives its devices back before the containers start. The pod total is
    max(containers + sidecars, the largest of those init steps), plus the pod's overhead."""
    containers = [(c.get("name", ""), _resources(c.get("resources"))) for c in pod_spec.get("containers") or []]
    sidecars: list[tuple[str, Requests]] = []
    plain: list[tuple[str, Requests, int]] = []
    sidecar_sum: Requests = {}
    init_peak: Requests = {}
    for init in pod_spec.get("initContainers") or []:
        requests = _resources(init.get("resources"))
        if init.get("restartPolicy") == "Always":
            sidecars.append((init.get("name", ""), requests))
            _add(sidecar_sum, requests)
            step = sidecar_sum
        else:
            plain.append((init.get("name", ""), requests, len(sidecars)))
            step = _add(dict(sidecar_sum), requests)
        for name, value in step.items():
            init_peak[name] = max(init_peak.get(name, Decimal(0)), value)
    running = sidecars + containers
    total: Requests = {}
    for _, req in running:
        _add(total, req)
    for name, value in init_peak.items():
        total[name] = max(total.get(name, Decimal(0)), value)
    _add(total, _resources(pod_spec.get("overhead") and {"requests": pod_spec["overhead"]}))
    return total, running, plain


def _add(into: dict[str, Decimal], requests: Mapping[str, Decimal]) -> dict[str, Decimal]:
    for name, value in requests.items():
        into[name] = into.get(name, Decimal(0)) + value
    return into


def exclusive_cpus(pod_spec: Mapping[str, Any]) -> int:
    """CPUs the kubelet's static CPU manager pins for this pod: the integer CPU requests of its containers when the
    pod is Guaranteed (every container limits CPU and memory, requests equal to limits); else 0."""
    total = 0
    for kind in ("initContainers", "containers"):
        for container in pod_spec.get(kind) or []:
            spec = container.get("resources") or {}
            limits, requests = spec.get("limits") or {}, spec.get("requests") or {}
            try:
                for name in (CPU, MEMORY):
                    if name not in limits or quantity(requests.get(name, limits[name])) != quantity(limits[name]):
                        return 0
                cpu = quantity(limits[CPU])
            except (ValueError, TypeError):
                return 0
            if kind == "containers" and cpu == cpu.to_integral_value():
                total += int(cpu)
    return min(total, 2**31)


@dataclass(frozen=True)
class NpuSteps:
    """A pod's whole-NPU requests in the order the kubelet's device manager hands them out, one container at a time
    (GetPreferredAllocation, then Allocate), each from what the ones before left.

    ``running``: the NPUs of each of ``PodInfo.containers`` (native sidecars in spec order, then the containers;
    0 for those asking for none): they hold their dies together while the pod runs. ``init``: per plain init
    container asking for NPUs, (its NPUs, how many of ``running`` start before it: the sidecars beside it). The
    kubelet allocates a plain init container's dies after those sidecars' and keeps them the pod's: the containers
    after it take them first (``devicesToReuse``), and those none takes stay held, idle, while the pod lives
    (``devices.plan_npus`` follows this)."""

    running: tuple[int, ...]
    init: tuple[tuple[int, int], ...] = ()

    @property
    def counts(self) -> tuple[int, ...]:
        """Every set asked for: the running containers' (those asking for some), then the plain init
        containers'."""
        return tuple(n for n in self.running if n > 0) + tuple(n for n, _ in self.init)

    @property
    def joint(self) -> bool:
        """More than one container asks for NPUs: where one's set goes decides what the others can get."""
        return len(self.counts) > 1

    @property
    def linked(self) -> int:
        """NPUs that must have their RoCE link up at once: those of containers asking for more than one, running
        together (the running containers; each plain init container with the sidecars beside it)."""
        def multi(counts: Iterable[int]) -> int:
            return sum(n for n in counts if n > 1)

        return max([multi(self.running)] + [multi((n, *self.running[:before])) for n, before in self.init])


@dataclass(frozen=True)
class PodInfo:
    namespace: str
    name: str
    uid: str
    node_name: str | None
    phase_status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    requests: Mapping[str, Decimal]
    containers: tuple[tuple[str, Mapping[str, Decimal]], ...]
    business: BusinessType | None
    business_explicit: bool
    qos: QoSClass
    phase: Phase | None
    pd_group: str | None
    numa_policy: NumaPolicy
    vnpu_mode: VnpuMode | None
    assignment: PodAssignment | None
    problems: tuple[str, ...] = ()
    creation: str = ""
    qos_explicit: bool = False
    """The QoS class came from a key (not the LS default)."""
    exclusive_cpus: int = 0
    """CPUs the static CPU manager would pin (Guaranteed pod, integer CPUs)."""
    resource_version: str = ""
    """The version the binder's Binding requires (a precondition of the API server)."""
    acknowledged: bool = False
    """The kubelet has taken the pod in (``status.startTime`` set): devices held under its name are its own, not a
    deleted namesake's."""
    soft_preferences: bool = False
    """The pod asks kube-scheduler to weigh something (preferred node or pod (anti-)affinity, a ScheduleAnyway
    topology spread): the extender must leave it a choice (see ``shortlist``)."""
    init_containers: tuple[tuple[str, Mapping[str, Decimal], int], ...] = ()
    """Plain (not sidecar) init containers, in spec order: (name, requests, how many of ``containers`` run beside
    it: the sidecars started before it). Each runs alone before the containers; its resources count for the
    scheduler only while it runs, but its devices stay the pod's (the kubelet hands them to the containers after it
    first)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def request(self, resource: str) -> int:
        """Integer request of an extended resource (0 when absent)."""
        return int(self.requests.get(resource, 0))

    @property
    def cpu_milli(self) -> int:
        return int(self.requests.get(CPU, Decimal(0)) * 1000)

    @property
    def memory_bytes(self) -> int:
        return int(self.requests.get(MEMORY, Decimal(0)))

    @cached_property
    def shape(self) -> PodShape:
        """What the plugins can read from this pod (everything but who it is), as a key: two pods with the same
        shape get the same per-node verdicts and scores (``row_cache``)."""
        return PodShape(tuple(_hashable({k: v for k, v in self.labels.items() if k not in POD_INSTANCE_LABELS}
                                        if name == "labels" else getattr(self, name)) for name in _SHAPE_FIELDS))

    @cached_property
    def accelerators(self) -> dict[str, int]:
        return {r: self.request(r) for r in ACCELERATOR_RESOURCES if self.request(r) > 0}

    @cached_property
    def npu_steps(self) -> NpuSteps:
        """The whole NPUs of each container, in the order the kubelet hands them out (see :class:`NpuSteps`)."""
        return NpuSteps(running=tuple(int(requests.get(RESOURCE_NPU, 0)) for _, requests in self.containers),
                        init=tuple((n, before) for _, n, before in self.npu_inits))

    @cached_property
    def npu_inits(self) -> tuple[tuple[str, int, int], ...]:
        """The plain init containers asking for whole NPUs, in spec order: (name, NPUs, how many of ``containers``
        run beside it). ``NpuSteps.init`` and ``NpuPlan.init_sets`` follow this order."""
        return tuple((name, n, before) for name, requests, before in self.init_containers
                     if (n := int(requests.get(RESOURCE_NPU, 0))) > 0)

    def npu_step(self, step: int) -> tuple[str, int, int | None]:
        """Step ``step`` of :attr:`npu_steps` (running containers first, then the plain init containers asking for
        NPUs): (the container's name, its NPUs, None for a running container, else how many running containers
        run beside it)."""
        running = len(self.containers)
        if step < running:
            return self.containers[step][0], self.npu_steps.running[step], None
        name, count, beside = self.npu_inits[step - running]
        return name, count, beside

    @cached_property
    def npu_counts(self) -> tuple[int, ...]:
        """The whole NPUs of each container asking for some, plain init containers included: the device plugin
        gives each its own set, so a product's count and shape rules apply to each of them, not to the pod's
        total (one such container, or none named: the pod's total)."""
        counts = self.npu_steps.counts
        return counts if len(counts) > 1 else ((self.request(RESOURCE_NPU),) if self.request(RESOURCE_NPU) else ())

    @property
    def terminal(self) -> bool:
        return self.phase_status in ("Succeeded", "Failed")


_IDENTITY = frozenset({"namespace", "name", "uid", "resource_version", "creation", "problems", "acknowledged"})
"""PodInfo fields that say which pod it is, not what it asks for: every other field is part of the shape (a field
added later is part of it unless listed here). Controller-set instance labels (``POD_INSTANCE_LABELS``: a
StatefulSet's pod name, an indexed Job's index) are left out of it too, so that replicas share one shape."""
_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(PodInfo) if f.name not in _IDENTITY)


def _hashable(value: Any) -> Hashable:
    try:
        hash(value)
        hashable: Hashable = value
        return hashable
    except TypeError:
        pass
    if isinstance(value, (tuple, list)):
        return tuple(_hashable(v) for v in value)
    items = getattr(value, "items", None)
    if items is not None:
        return frozenset((k, _hashable(v)) for k, v in items())
    return repr(value)


class PodShape:
    """:attr:`PodInfo.shape`: a tuple key whose hash is computed once (a tuple recomputes its hash at every lookup)."""

    __slots__ = ("_hash", "key")

    def __init__(self, key: tuple[Hashable, ...]):
        self.key = key
        self._hash = hash(key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, PodShape) and self._hash == other._hash and self.key == other.key)

    def __repr__(self) -> str:
        return f"PodShape({self.key!r})"


def infer_business(requests: Mapping[str, Decimal]) -> BusinessType:
    """No ``business.workload/type``: accelerators → compute-intensive; ≥ 8 GiB per requested CPU core →
    memory-sensitive; otherwise io-intensive (services that mostly move data)."""
    if any(requests.get(r, 0) > 0 for r in ACCELERATOR_RESOURCES):
        return BusinessType.COMPUTE_INTENSIVE
    cpu = float(requests.get(CPU, 0))
    memory = float(requests.get(MEMORY, 0))
    if memory > 0 and (cpu == 0 or memory / cpu >= 8 * GiB):
        return BusinessType.MEMORY_SENSITIVE
    return BusinessType.IO_INTENSIVE


def has_soft_preferences(spec: Mapping[str, Any]) -> bool:
    """Preferences only kube-scheduler's score plugins honour: preferred node affinity, preferred pod affinity or
    anti-affinity, a topology spread constraint with ``whenUnsatisfiable: ScheduleAnyway``."""
    affinity = spec.get("affinity") or {}
    for kind in ("nodeAffinity", "podAffinity", "podAntiAffinity"):
        if (affinity.get(kind) or {}).get("preferredDuringSchedulingIgnoredDuringExecution"):
            return True
    return any((c or {}).get("whenUnsatisfiable") == "ScheduleAnyway"
               for c in spec.get("topologySpreadConstraints") or [])


def _strings(obj: Mapping[str, Any], fields: tuple[str, ...], what: str) -> dict[str, str]:
    """``obj``'s ``fields`` that are present and not null; :class:`ProtocolError` naming the first that is not a
    string."""
    out = {}
    for name in fields:
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ProtocolError(f"{what}.{name}: expected a string, got {type(value).__name__}")
        out[name] = value
    return out


_POD_META = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")


def parse_pod(obj: Mapping[str, Any]) -> PodInfo:
    """:class:`ProtocolError` when an identifying field is not a string (see the module doc)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    ids = _strings(meta, _POD_META, "Pod metadata")
    node_name = _strings(spec, ("nodeName",), "Pod spec").get("nodeName")
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    problems: list[str] = []
    total, containers, init_containers = effective_requests(spec)
    business, explicit = None, False
    if ANNOTATION_BUSINESS_TYPE in annotations:
        try:
            business, explicit = parse_business_type(annotations[ANNOTATION_BUSINESS_TYPE]), True
        except ContractError as exc:
            problems.append(str(exc))
    if business is None and not problems:
        business = infer_business(total)
    qos = resolve_qos(labels, annotations)
    problems.extend(qos.problems)
    try:
        phase = parse_phase(labels)
    except ContractError as exc:
        phase = None
        problems.append(str(exc))
    numa = NumaPolicy.NONE
    if ANNOTATION_NUMA_POLICY in annotations:
        try:
            numa = parse_numa_policy(annotations[ANNOTATION_NUMA_POLICY])
        except ContractError as exc:
            problems.append(str(exc))
    vnpu_mode = None
    if ANNOTATION_VNPU_MODE in annotations:
        try:
            vnpu_mode = parse_vnpu_mode(annotations[ANNOTATION_VNPU_MODE])
        except ContractError as exc:
            problems.append(str(exc))
    assignment = None
    if ANNOTATION_POD_ASSIGNED in annotations:
        try:
            raw = annotations[ANNOTATION_POD_ASSIGNED]
            assignment = _WRITTEN.get(raw) if isinstance(raw, str) else None
            if assignment is None:
                assignment = parse_annotation(ANNOTATION_POD_ASSIGNED, raw, PodAssignment)
        except ContractError as exc:
            problems.append(str(exc))
    return PodInfo(
        namespace=ids.get("namespace") or "default", name=ids.get("name", ""), uid=ids.get("uid", ""),
        node_name=node_name or None, phase_status=(obj.get("status") or {}).get("phase") or "",
        labels=labels, annotations=annotations, requests=total, containers=tuple(containers),
        init_containers=tuple(init_containers),
        business=business, business_explicit=explicit, qos=qos.qos, phase=phase, pd_group=pd_group(labels),
        numa_policy=numa, vnpu_mode=vnpu_mode, assignment=assignment, problems=tuple(problems),
        creation=ids.get("creationTimestamp", ""), qos_explicit=qos.source is not None,
        exclusive_cpus=exclusive_cpus(spec) if isinstance(spec, dict) else 0,
        resource_version=ids.get("resourceVersion", ""),
        acknowledged=bool((obj.get("status") or {}).get("startTime")),
        soft_preferences=has_soft_preferences(spec) if isinstance(spec, dict) else False)


@dataclass
class NodeInfo:
    """A node with the pods on it: what is allocatable, what is taken, which devices are free."""

    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    allocatable: Mapping[str, Decimal]
    topology: NodeTopology | None
    usage: NodeUsage | None
    pods: list[PodInfo] = field(default_factory=list)
    problems: tuple[str, ...] = ()
    resource_version: str = ""

    # derived, filled by refresh()
    used: dict[str, Decimal] = field(default_factory=dict)
    assigned: dict[str, set[str]] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)
    """Derived values plugins share (free devices...); cleared by refresh(). Copies must get a fresh one."""

    def refresh(self) -> NodeInfo:
        """``used`` from every live pod's requests; ``assigned`` from the planned devices of the pods the kubelet
        has not admitted yet. A pod that holds devices per the topology annotation (``holder``: the kubelet's
        pod-resources) is accounted there, by what it really got: the kubelet may have given it other devices
        than planned (its GetPreferredAllocation does not say which pod it is for), and counting both would hide
        free NPUs."""
        self.used = {}
        self.assigned = {}
        self.memo = {}
        held: dict[str, set[str]] = {}
        for index, device in (self.topology.devices.items() if self.topology else ()):
            if device.holder:
                held.setdefault(device.holder, set()).add(index)
        for pod in self.pods:
            if pod.terminal:
                continue
            for name, value in pod.requests.items():
                self.used[name] = self.used.get(name, Decimal(0)) + value
            if pod.assignment is None or pod.assignment.node != self.name:
                continue
            planned = {d for c in pod.assignment.containers for d in c.devices}
            mine = held.get(pod.key)
            if mine is not None and (pod.acknowledged or mine & planned):
                # accounted by what the kubelet gave it (a deleted namesake's entry is neither); but the kubelet
                # keeps a plain init container's dies the pod's too, and its pod-resources answer leaves plain init
                # containers out: the planned ones no running container holds are taken all the same
                inits = {name or "init" for name, _, _ in pod.npu_inits}  # as the binder names them
                idle = {d for c in pod.assignment.containers if c.resource == RESOURCE_NPU and c.container in inits
                        for d in c.devices} - mine
                if idle:
                    self.assigned.setdefault(RESOURCE_NPU, set()).update(idle)
                continue
            for c in pod.assignment.containers:
                self.assigned.setdefault(c.resource, set()).update(c.devices)
        return self

    def without(self, keys: set[str]) -> NodeInfo:
        """A copy without the pods ``keys`` (``namespace/name``) and with the devices the topology says they hold
        free: the node once they are gone (preemption victims, Volcano's Releasing tasks)."""
        topology = self.topology
        if topology is not None and any(d.holder in keys for d in topology.devices.values()):
            topology = topology.model_copy(update={"devices": {
                i: d.model_copy(update={"holder": None, "allocated": False}) if d.holder in keys else d
                for i, d in topology.devices.items()}})
        return dataclasses.replace(self, pods=[p for p in self.pods if p.key not in keys], topology=topology,
                                   memo={}).refresh()

    def allocatable_int(self, resource: str) -> int:
        return int(self.allocatable.get(resource, 0))

    def free(self, resource: str) -> int:
        return int(self.allocatable.get(resource, 0)) - int(self.used.get(resource, 0))

    @property
    def cpu_allocatable_milli(self) -> int:
        return int(self.allocatable.get(CPU, Decimal(0)) * 1000)

    @property
    def cpu_requested_milli(self) -> int:
        return int(self.used.get(CPU, Decimal(0)) * 1000)

    @property
    def memory_allocatable(self) -> int:
        return int(self.allocatable.get(MEMORY, Decimal(0)))

    @property
    def memory_requested(self) -> int:
        return int(self.used.get(MEMORY, Decimal(0)))

    @property
    def colocation(self) -> bool:
        return self.labels.get(LABEL_VOLCANO_COLOCATION, "").lower() == "true"

    def batch_free(self) -> tuple[int, int]:
        """Free ``kubernetes.io/batch-cpu`` (milli) and ``batch-memory`` (bytes)."""
        return self.free(RESOURCE_BATCH_CPU), self.free(RESOURCE_BATCH_MEMORY)

    def fresh_usage(self, now: float | None = None) -> NodeUsage | None:
        if self.usage is None:
            return None
        if (now or time.time()) - self.usage.updated_at > USAGE_STALE_S:
            return None
        return self.usage


_WRITTEN: dict[str, PodAssignment] = {}
WRITTEN_KEPT = 4096


def written(raw: str, assignment: PodAssignment) -> None:
    """The binder wrote ``assignment`` as ``raw``: the pod watch then reports that value, and it is not parsed again
    (kept for the last ``WRITTEN_KEPT`` binds)."""
    if len(_WRITTEN) >= WRITTEN_KEPT:
        _WRITTEN.clear()
    _WRITTEN[raw] = assignment


@lru_cache(maxsize=1024)
def _node_topology(raw: str) -> NodeTopology:
    """The topology annotation, parsed once per distinct value: like nodes publish the same one and share the
    (frozen) result, so what is derived from a topology is kept once for all of them (``devices``)."""
    return parse_annotation(ANNOTATION_NODE_TOPOLOGY, raw, NodeTopology)


def parse_node(obj: Mapping[str, Any], pods: Iterable[PodInfo] = ()) -> NodeInfo:
    """:class:`ProtocolError` when the name or resourceVersion is not a string."""
    meta = obj.get("metadata") or {}
    ids = _strings(meta, ("name", "resourceVersion"), "Node metadata")
    status = obj.get("status") or {}
    annotations = meta.get("annotations") or {}
    allocatable: dict[str, Decimal] = {}
    for name, raw in (status.get("allocatable") or status.get("capacity") or {}).items():
        try:
            allocatable[name] = max(Decimal(0), min(QUANTITY_LIMIT, quantity(raw)))  # int64 columns hold it
        except ValueError:
            log.debug("node %s: unparseable allocatable %s=%r", ids.get("name"), name, raw)
    problems: list[str] = []
    topology = usage = None
    if ANNOTATION_NODE_TOPOLOGY in annotations:
        try:
            raw = annotations[ANNOTATION_NODE_TOPOLOGY]
            topology = _node_topology(raw) if isinstance(raw, str) else parse_annotation(
                ANNOTATION_NODE_TOPOLOGY, raw, NodeTopology)
        except ContractError as exc:
            problems.append(str(exc))
    if ANNOTATION_NODE_USAGE in annotations:
        try:
            usage = parse_annotation(ANNOTATION_NODE_USAGE, annotations[ANNOTATION_NODE_USAGE], NodeUsage)
        except ContractError as exc:
            problems.append(str(exc))
    labels = meta.get("labels") or {}
    if not all(isinstance(v, str) for v in labels.values()):  # a label value is a string: the request is malformed
        raise TypeError(f"node {ids.get('name')!r}: label values must be strings")
    return NodeInfo(name=ids.get("name", ""), labels=labels, annotations=annotations,
                    allocatable=allocatable, topology=topology, usage=usage, pods=list(pods),
                    problems=tuple(problems), resource_version=ids.get("resourceVersion", "")).refresh()
