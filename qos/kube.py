"""The QoS agent's side of the API server: what it follows (its Node, the pods bound to it: two watches with field
selectors, not a list per cycle) and what it writes (batch resources in the Node status, measured usage as a
Node annotation, evictions of BE pods through the Eviction API).

RBAC (the chart grants exactly this): nodes get/list/watch/patch, nodes/status patch, pods get/list/watch,
pods/eviction create.
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
    dump_annotation,
    resolve_qos,
)
from fuyao.kube_watch import ListWatch

from .collect import PodFacts

log = logging.getLogger(__name__)


def _quantity(raw: Any) -> Decimal | None:
    try:
        return parse_quantity(raw)
    except (ValueError, TypeError):
        return None


def pod_facts(obj: Mapping[str, Any]) -> tuple[str, PodFacts] | None:
    """(uid, facts) of a pod object; None without a uid."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    uid = meta.get("uid")
    if not uid:
        return None
    limit: Decimal | None = Decimal(0)
    for container in spec.get("containers") or []:
        value = _quantity(((container.get("resources") or {}).get("limits") or {}).get("cpu"))
        if value is None:
            limit = None  # a container without a CPU limit: the pod is not capped
            break
        limit += value  # type: ignore[operator]
    return uid, PodFacts(
        namespace=meta.get("namespace") or "default", name=meta.get("name") or "",
        qos=resolve_qos(meta.get("labels") or {}, meta.get("annotations") or {}).qos,
        priority=int(spec.get("priority") or 0), terminating=bool(meta.get("deletionTimestamp")),
        cpu_limit_milli=None if limit is None or limit <= 0 else int(limit * 1000))


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

    def capacity(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """((CPU milli, memory bytes) capacity, capacity - allocatable) from the Node status."""
        with self._lock:
            node = self.node
        if node is None:
            return None
        status = node.get("status") or {}
        capacity, allocatable = status.get("capacity") or {}, status.get("allocatable") or {}
        values = [_quantity(x.get(k)) for x in (capacity, allocatable) for k in ("cpu", "memory")]
        if any(v is None for v in values):
            return None
        cap_cpu, cap_mem, alloc_cpu, alloc_mem = values
        return ((int(cap_cpu * 1000), int(cap_mem)),  # type: ignore[operator]
                (max(0, int((cap_cpu - alloc_cpu) * 1000)), max(0, int(cap_mem - alloc_mem))))  # type: ignore[operator]


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

    def evict(self, namespace: str, name: str) -> str:
        """Create an Eviction (honours PodDisruptionBudgets); returns "" or why it did not happen."""
        from kubernetes.client import V1DeleteOptions, V1Eviction, V1ObjectMeta
        from kubernetes.client.exceptions import ApiException

        body = V1Eviction(metadata=V1ObjectMeta(name=name, namespace=namespace),
                          delete_options=V1DeleteOptions(grace_period_seconds=30))
        try:
            self.api.create_namespaced_pod_eviction(name, namespace, body, _request_timeout=10)
        except ApiException as exc:
            if exc.status == 404:
                return ""  # already gone
            if exc.status == 429:
                return "refused by a PodDisruptionBudget (429); retried next cycle"
            return f"{exc.status} {exc.reason}"
        return ""
