"""What the extender writes to the API server: the bind (device choice → ``npu.openfuyao.com/assigned`` → the
Binding) and Warning events for pods whose annotations are invalid.

Two binds must never hand out the same devices. Within one extender, a lock per node serialises choice and
bookkeeping, and a bound pod is *assumed* on its node until the watch reports it. The binding carries the
assignment annotation and the pod's uid and resourceVersion: the API server applies node and annotation in one
step, only if the pod is unchanged (409 otherwise; the scheduler retries). Across several binding replicas devices
of one node could still be chosen twice: run one active binder.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import threading
from collections.abc import Callable
from typing import Any

import orjson

from fuyao.contracts import (
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_NPU,
    RESOURCE_NPU_CORE,
    RESOURCE_VNPU,
    ContainerAssignment,
    PodAssignment,
    dump_annotation,
)

from . import devices
from .cluster import ClusterCache
from .kube_protocol import BindingArgs
from .model import NodeInfo, PodInfo, parse_pod

log = logging.getLogger(__name__)

_CHOOSERS: dict[str, Callable[[NodeInfo, int], list[str]]] = {
    RESOURCE_NPU: devices.choose_npus,
    RESOURCE_VNPU: devices.choose_vnpus,
    RESOURCE_NPU_CORE: devices.choose_cores,
}


class AssignmentFailed(Exception):
    pass


def assignment_for(pod: PodInfo, node: NodeInfo) -> PodAssignment | None:
    """Concrete devices for each container's NPU / vNPU / npu-core request (None when it asks for none), chosen
    with the device plugin's placement function on the node's free devices. Pure."""
    if node.topology is None:
        if any(pod.request(r) for r in _CHOOSERS):
            raise AssignmentFailed(f"node {node.name} publishes no NPU topology (is the device plugin running?)")
        return None
    working = dataclasses.replace(node, assigned={r: set(d) for r, d in node.assigned.items()}, memo={})
    containers = []
    for name, requests in pod.containers:
        for resource, choose in _CHOOSERS.items():
            want = int(requests.get(resource, 0))
            if want <= 0:
                continue
            chosen = choose(working, want)
            if len(chosen) < want:
                raise AssignmentFailed(f"node {node.name} has no {want} free {resource} for container {name} "
                                       f"(found {len(chosen)})")
            working.assigned.setdefault(resource, set()).update(chosen)
            working.memo = {}
            containers.append(ContainerAssignment(container=name or "main", resource=resource,
                                                  devices=tuple(chosen)))
    return PodAssignment(node=node.name, containers=tuple(containers)) if containers else None


class Binder:
    def __init__(self, api: Any, cache: ClusterCache):
        self.api = api
        self.cache = cache
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, node: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(node, threading.Lock())

    def __call__(self, args: BindingArgs) -> str:
        """Bind; returns "" or the error the scheduler should see."""
        from kubernetes.client import V1Binding, V1ObjectMeta, V1ObjectReference
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.api.read_namespaced_pod(args.pod_name, args.pod_namespace, _preload_content=False,
                                                    _request_timeout=5)
            raw = orjson.loads(response.data)
        except ApiException as exc:
            return f"cannot read pod {args.pod_namespace}/{args.pod_name}: {exc.status} {exc.reason}"
        pod = parse_pod(raw)
        if args.pod_uid and pod.uid != args.pod_uid:
            return f"pod {pod.key} is now uid {pod.uid}, not {args.pod_uid}: it was re-created"
        if pod.node_name:
            # a retried bind whose first attempt succeeded: never re-choose devices of a bound pod
            if pod.node_name == args.node:
                return ""
            return f"pod {pod.key} is already bound to {pod.node_name}"
        with self._lock(args.node):
            node = self.cache.node_info(args.node)
            if node is None:
                return f"node {args.node} is unknown to the extender"
            try:
                assignment = assignment_for(pod, node)
            except AssignmentFailed as exc:
                return str(exc)
            try:
                # One request, atomic in the API server: the binding sets the node and the annotations together,
                # on the condition that the pod still has this uid and resourceVersion (a pod changed by anyone
                # since we read it — another extender replica binding it — fails with 409).
                annotations = {ANNOTATION_POD_ASSIGNED: dump_annotation(assignment)} if assignment else None
                body = V1Binding(metadata=V1ObjectMeta(name=args.pod_name, namespace=args.pod_namespace,
                                                       uid=pod.uid or None,
                                                       resource_version=raw["metadata"].get("resourceVersion"),
                                                       annotations=annotations),
                                 target=V1ObjectReference(api_version="v1", kind="Node", name=args.node))
                # POST pods/<name>/binding, the subresource kube-scheduler uses (RBAC: pods/binding create)
                response = self.api.create_namespaced_pod_binding(args.pod_name, args.pod_namespace, body,
                                                                  _preload_content=False, _request_timeout=5)
                response.release_conn()  # an unread response keeps its connection out of the pool
            except ApiException as exc:
                what = "the pod changed meanwhile (409)" if exc.status == 409 else f"{exc.status} {exc.reason}"
                log.warning("bind of %s to %s failed: %s", pod.key, args.node, what)
                return f"bind of {pod.key} to {args.node} failed: {what}"
            self.cache.assume(dataclasses.replace(pod, node_name=args.node, assignment=assignment,
                                                  phase_status="Pending"))
        log.info("bound %s to %s", pod.key, args.node,
                 extra={"pod": pod.key, "node": args.node,
                        "devices": {c.container: list(c.devices) for c in assignment.containers}
                        if assignment else {}})
        return ""


class PodWarnings:
    """Warning events on pods (``kubectl describe pod`` shows why an annotation was ignored)."""

    def __init__(self, api: Any, component: str = "fuyao-scheduler-extender"):
        self.api = api
        self.component = component

    def __call__(self, pod: PodInfo, message: str) -> None:
        threading.Thread(target=self._send, args=(pod, message), daemon=True).start()

    def _send(self, pod: PodInfo, message: str) -> None:
        from kubernetes.client import CoreV1Event, V1EventSource, V1ObjectMeta, V1ObjectReference

        now = datetime.datetime.now(datetime.UTC)
        event = CoreV1Event(
            metadata=V1ObjectMeta(generate_name=f"{pod.name}.", namespace=pod.namespace),
            involved_object=V1ObjectReference(kind="Pod", name=pod.name, namespace=pod.namespace, uid=pod.uid,
                                              api_version="v1"),
            reason="InvalidAnnotation", message=message, type="Warning", first_timestamp=now, last_timestamp=now,
            count=1, source=V1EventSource(component=self.component))
        try:
            self.api.create_namespaced_event(pod.namespace, event, _request_timeout=5)
        except Exception as exc:
            log.warning("cannot record an event on %s: %s", pod.key, exc)
