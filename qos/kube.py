"""The QoS agent's side of the API server: what it follows (its Node, the pods bound to it: two watches with field
selectors, not a list per cycle) and what it writes (batch resources in the Node status, measured usage as a
Node annotation, evictions of BE pods through the Eviction API).

RBAC (what it calls; charts/qos-agent/templates/rbac.yaml grants exactly this): nodes list/watch/patch,
nodes/status patch, pods list/watch, pods/eviction create. Nothing is read with a get: the watches' lists hold the
Node and the pods.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from fuyao.contracts import (
    ANNOTATION_NODE_USAGE,
    RESOURCE_BATCH_CPU,
    RESOURCE_BATCH_MEMORY,
    NodeUsage,
    QoSClass,
    dump_annotation,
    resolve_qos,
)
from fuyao.kube_watch import ListWatch

from .collect import PodFacts
from .policy import ContainerResources

log = logging.getLogger(__name__)


def _quantity(raw: Any) -> Decimal | None:
    try:
        value: Decimal = parse_quantity(raw)
        return value
    except (ValueError, TypeError):
        return None


def _milli(raw: Any, batch: bool) -> int | None:
    """CPU as milli-CPU: ``cpu`` is in cores (``1500m``, ``2``), ``kubernetes.io/batch-cpu`` already in milli."""
    value = _quantity(raw) if raw is not None else None
    if value is None:
        return None
    return int(value) if batch else int(value * 1000)


def _bytes(raw: Any) -> int | None:
    value = _quantity(raw) if raw is not None else None
    return None if value is None else int(value)


def container_resources(container: Mapping[str, Any], container_id: str = "", batch: bool = False
                        ) -> ContainerResources:
    """A container's cgroup needs from its spec: cpu/memory where set, else (``batch``: a BE pod, which asks for
    nothing else) the batch resources. Extended resources default their request to the limit, as the API server
    does."""
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}

    def cpu(values: Mapping[str, Any]) -> int | None:
        own = _milli(values.get("cpu"), batch=False)
        return own if own is not None or not batch else _milli(values.get(RESOURCE_BATCH_CPU), batch=True)

    def memory(values: Mapping[str, Any]) -> int | None:
        own = _bytes(values.get("memory"))
        return own if own is not None or not batch else _bytes(values.get(RESOURCE_BATCH_MEMORY))

    cpu_limit, memory_limit = cpu(limits), memory(limits)
    cpu_request, memory_request = cpu(requests), memory(requests)
    if cpu_request is None and batch and "cpu" not in limits:  # an extended resource's request defaults to its limit
        cpu_request = _milli(limits.get(RESOURCE_BATCH_CPU), batch=True)
    if memory_request is None and batch and "memory" not in limits:
        memory_request = _bytes(limits.get(RESOURCE_BATCH_MEMORY))
    return ContainerResources(name=str(container.get("name") or ""), container_id=container_id,
                              cpu_request_milli=max(0, cpu_request or 0),
                              cpu_limit_milli=cpu_limit if cpu_limit and cpu_limit > 0 else None,
                              memory_limit_bytes=memory_limit if memory_limit and memory_limit > 0 else None,
                              memory_request_bytes=max(0, memory_request or 0))


def _effective(app: list[int | None], init: list[tuple[bool, int | None]], unset_is_unlimited: bool) -> int | None:
    """The pod's value as the kubelet sizes its cgroup: the larger of its app containers plus its sidecars (init
    containers with ``restartPolicy: Always``) and, for each regular init container, itself plus the sidecars
    started before it. ``unset_is_unlimited`` (limits): a container without one leaves the pod unlimited (None);
    else (requests) it counts 0."""
    values = app + [v for _, v in init]
    if unset_is_unlimited and (not app or any(v is None for v in values)):
        return None
    running = sum(v or 0 for v in app)
    sidecars, peak = 0, 0
    for sidecar, value in init:
        if sidecar:
            sidecars += value or 0
        else:
            peak = max(peak, (value or 0) + sidecars)
    return max(running + sidecars, peak)


def pod_facts(obj: Mapping[str, Any]) -> tuple[str, PodFacts] | None:
    """(uid, facts) of a pod object; None without a uid. Its containers are the app containers and the sidecars
    (which run beside them, in cgroups of their own); its totals follow the kubelet's pod rule (``_effective``)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    uid = meta.get("uid")
    if not uid:
        return None
    status = obj.get("status") or {}
    ids = {s.get("name"): s.get("containerID") or ""
           for key in ("containerStatuses", "initContainerStatuses") for s in status.get(key) or []
           if isinstance(s, Mapping)}
    qos = resolve_qos(meta.get("labels") or {}, meta.get("annotations") or {}).qos
    batch = qos == QoSClass.BE
    app = [container_resources(c, ids.get(c.get("name"), ""), batch=batch)
           for c in spec.get("containers") or [] if isinstance(c, Mapping)]
    init = [(c.get("restartPolicy") == "Always", container_resources(c, ids.get(c.get("name"), ""), batch=batch))
            for c in spec.get("initContainers") or [] if isinstance(c, Mapping)]
    containers = tuple(app + [c for sidecar, c in init if sidecar])

    raw_overhead = spec.get("overhead")
    overhead: Mapping[str, Any] = raw_overhead if isinstance(raw_overhead, Mapping) else {}
    extra = {"cpu_limit_milli": _milli(overhead.get("cpu"), batch=False) or 0,
             "cpu_request_milli": _milli(overhead.get("cpu"), batch=False) or 0,
             "memory_limit_bytes": _bytes(overhead.get("memory")) or 0,
             "memory_request_bytes": _bytes(overhead.get("memory")) or 0}  # a RuntimeClass's, on top (as the kubelet)

    def total(field: str, unset_is_unlimited: bool) -> int | None:
        value = _effective([getattr(c, field) for c in app], [(s, getattr(c, field)) for s, c in init],
                           unset_is_unlimited)
        return None if value is None else value + extra[field]

    return uid, PodFacts(
        namespace=meta.get("namespace") or "default", name=meta.get("name") or "", qos=qos,
        priority=int(spec.get("priority") or 0), terminating=bool(meta.get("deletionTimestamp")),
        cpu_limit_milli=total("cpu_limit_milli", True),
        cpu_request_milli=total("cpu_request_milli", False) or 0,
        memory_limit_bytes=total("memory_limit_bytes", True),
        memory_request_bytes=total("memory_request_bytes", False) or 0,
        finished=status.get("phase") in ("Succeeded", "Failed"), containers=containers)


class NodeState:
    """This node and its pods as the watches report them (a :class:`fuyao.kube_watch.Sink` per kind)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.node: dict[str, Any] | None = None
        self.pods: dict[str, PodFacts] = {}
        self.synced = {"node": False, "pods": False}
        self.failing: dict[str, str] = {}

    class _Pods:
        def __init__(self, state: NodeState):
            self.state = state

        def replace(self, items: list[dict[str, Any]]) -> None:
            facts = dict(f for item in items if (f := pod_facts(item)))
            with self.state._lock:
                self.state.pods = facts
                self.state.synced["pods"] = True

        def upsert(self, obj: dict[str, Any]) -> None:
            found = pod_facts(obj)
            if found:
                with self.state._lock:
                    self.state.pods[found[0]] = found[1]

        def delete(self, obj: dict[str, Any]) -> None:
            with self.state._lock:
                self.state.pods.pop((obj.get("metadata") or {}).get("uid", ""), None)

    class _Node:
        def __init__(self, state: NodeState):
            self.state = state

        def replace(self, items: list[dict[str, Any]]) -> None:
            with self.state._lock:
                self.state.node = items[0] if items else None
                self.state.synced["node"] = True

        def upsert(self, obj: dict[str, Any]) -> None:
            with self.state._lock:
                self.state.node = obj

        def delete(self, obj: dict[str, Any]) -> None:
            with self.state._lock:
                self.state.node = None

    def follow(self, api: Any, node_name: str) -> list[ListWatch]:
        watches = [
            ListWatch("node", api.list_node, NodeState._Node(self), failing=self.failing,
                      kwargs={"field_selector": f"metadata.name={node_name}"}),
            ListWatch("pods", api.list_pod_for_all_namespaces, NodeState._Pods(self), failing=self.failing,
                      kwargs={"field_selector": f"spec.nodeName={node_name}"}),
        ]
        for watch in watches:
            watch.start()
        return watches

    @property
    def ready(self) -> bool:
        return all(self.synced.values())

    def facts(self) -> dict[str, PodFacts]:
        with self._lock:
            return dict(self.pods)

    def published_batch(self) -> tuple[int | None, int | None]:
        """The batch resources the Node's allocatable holds now (None where absent or unreadable)."""
        with self._lock:
            node = self.node
        allocatable = ((node or {}).get("status") or {}).get("allocatable") or {}
        values = [_quantity(allocatable.get(k)) for k in (RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY)]
        return (None if values[0] is None else int(values[0]), None if values[1] is None else int(values[1]))

    def capacity(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """((CPU milli, memory bytes) capacity, capacity - allocatable) from the Node status."""
        with self._lock:
            node = self.node
        if node is None:
            return None
        status = node.get("status") or {}
        capacity, allocatable = status.get("capacity") or {}, status.get("allocatable") or {}
        values = [_quantity(x.get(k)) for x in (capacity, allocatable) for k in ("cpu", "memory")]
        cap_cpu, cap_mem, alloc_cpu, alloc_mem = values
        if cap_cpu is None or cap_mem is None or alloc_cpu is None or alloc_mem is None:
            return None
        return ((int(cap_cpu * 1000), int(cap_mem)),
                (max(0, int((cap_cpu - alloc_cpu) * 1000)), max(0, int(cap_mem - alloc_mem))))


class Publisher:
    """Writes to this node's object. Failures are logged and retried next cycle (the values are recomputed)."""

    def __init__(self, api: Any, node_name: str):
        self.api = api
        self.node_name = node_name

    def batch_resources(self, cpu_milli: int, memory_bytes: int) -> None:
        """Extended resources in the Node status (capacity and allocatable), as integers."""
        values = {RESOURCE_BATCH_CPU: str(cpu_milli), RESOURCE_BATCH_MEMORY: str(memory_bytes)}
        self.api.patch_node_status(self.node_name, {"status": {"capacity": values, "allocatable": values}},
                                   _request_timeout=10)

    def usage(self, usage: NodeUsage) -> None:
        self.api.patch_node(self.node_name, {"metadata": {"annotations": {
            ANNOTATION_NODE_USAGE: dump_annotation(usage)}}}, _request_timeout=10)


class Evictor:
    def __init__(self, api: Any):
        self.api = api

    def evict(self, namespace: str, name: str, uid: str = "") -> str:
        """Create an Eviction (honours PodDisruptionBudgets) of that pod only (``uid``: a pod recreated under the
        same name is not it); returns "" or why it did not happen."""
        from kubernetes.client import V1DeleteOptions, V1Eviction, V1ObjectMeta, V1Preconditions
        from kubernetes.client.exceptions import ApiException

        body = V1Eviction(metadata=V1ObjectMeta(name=name, namespace=namespace),
                          delete_options=V1DeleteOptions(grace_period_seconds=30,
                                                         preconditions=V1Preconditions(uid=uid) if uid else None))
        try:
            self.api.create_namespaced_pod_eviction(name, namespace, body, _request_timeout=10)
        except ApiException as exc:
            if exc.status == 404:
                return ""  # already gone
            if exc.status == 429:
                return "refused by a PodDisruptionBudget (429); retried next cycle"
            if exc.status == 409:
                return "the pod of that name is another one now (its uid differs): not evicted"
            return f"{exc.status} {exc.reason}"
        except Exception as exc:  # a timeout, a reset: retried next cycle, the cycle goes on
            return f"eviction request failed: {exc}"
        return ""
