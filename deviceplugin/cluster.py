"""What the device plugin reads from and writes to the API server: the node's labels and topology annotation,
and the devices the scheduler assigned to pending pods on this node.

Optional by design: with no cluster (no kubeconfig, not in a pod) the plugin serves the kubelet all the same.
The ``kubernetes`` client is imported only when a cluster is configured (it is slow to import).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

from fuyao.backoff import Backoff
from fuyao.contracts import (
    ANNOTATION_POD_ASSIGNED,
    ContainerAssignment,
    ContractError,
    PodAssignment,
    parse_annotation,
)

log = logging.getLogger(__name__)

API_TIMEOUT_S = 5.0
RESYNC_S = 60.0


def node_patch(current_labels: Mapping[str, str], current_annotations: Mapping[str, str],
               labels: Mapping[str, str], annotations: Mapping[str, str]) -> dict[str, Any] | None:
    """The merge patch that brings the node to the wanted labels/annotations, or None when nothing differs."""
    label_diff = {k: v for k, v in labels.items() if current_labels.get(k) != v}
    annotation_diff = {k: v for k, v in annotations.items() if current_annotations.get(k) != v}
    if not label_diff and not annotation_diff:
        return None
    metadata: dict[str, Any] = {}
    if label_diff:
        metadata["labels"] = label_diff
    if annotation_diff:
        metadata["annotations"] = annotation_diff
    return {"metadata": metadata}


class NodePublisher:
    """Keeps the node's labels and annotations at the wanted values, in the background, patching only changes.

    ``want`` never blocks (the API server may be slow or down); the latest wanted state wins. The node is re-read
    every ``RESYNC_S`` so labels removed by someone else come back.
    """

    def __init__(self, api: Any, node_name: str):
        self.api = api
        self.node_name = node_name
        self.patches = 0
        self._wanted: tuple[dict[str, str], dict[str, str]] | None = None
        self._cond = threading.Condition()
        self._stopped = False
        self._done: tuple[dict[str, str], dict[str, str]] | None = None
        self._thread = threading.Thread(target=self._run, name="node-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def want(self, labels: Mapping[str, str], annotations: Mapping[str, str]) -> None:
        with self._cond:
            self._wanted = (dict(labels), dict(annotations))
            self._cond.notify_all()

    def _has_work(self) -> bool:
        return self._stopped or (self._wanted is not None and self._wanted != self._done)

    def _run(self) -> None:
        backoff = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.1)
        while True:
            with self._cond:
                self._cond.wait_for(self._has_work, timeout=RESYNC_S)
                if self._stopped:
                    return
                wanted = self._wanted
            if wanted is None:
                continue
            try:
                self.sync(*wanted)
                self._done = wanted
                backoff.reset()
            except Exception as exc:
                delay = backoff.next()
                log.warning("cannot update node %s (retrying in %.0fs): %s", self.node_name, delay, exc,
                            extra={"node": self.node_name})
                with self._cond:
                    self._cond.wait_for(lambda: self._stopped, timeout=delay)

    def sync(self, labels: Mapping[str, str], annotations: Mapping[str, str]) -> bool:
        """Read the node and patch what differs; True when a patch was sent."""
        node = self.api.read_node(self.node_name, _request_timeout=API_TIMEOUT_S)
        patch = node_patch(node.metadata.labels or {}, node.metadata.annotations or {}, labels, annotations)
        if patch is None:
            return False
        self.api.patch_node(self.node_name, patch, _request_timeout=API_TIMEOUT_S)
        self.patches += 1
        log.info("updated node %s", self.node_name,
                 extra={"node": self.node_name, "labels": sorted(patch["metadata"].get("labels", {})),
                        "annotations": sorted(patch["metadata"].get("annotations", {}))})
        return True


class NodeEvents:
    """Kubernetes Events on this node (``kubectl describe node`` shows them: NPU faults, resets, isolations).

    ``__call__`` never blocks: events go through a bounded queue to one sender thread, in order; when the API
    server is slow and the queue is full, new events are dropped with a log line (the log has them all anyway)."""

    NAMESPACE = "default"  # where node events live (the kubelet's convention)

    def __init__(self, api: Any, node_name: str, component: str = "fuyao-device-plugin", capacity: int = 256):
        self.api = api
        self.node_name = node_name
        self.component = component
        self.sent = 0
        self._queue: queue.Queue[tuple[str, str, str] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="node-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def __call__(self, type_: str, reason: str, message: str) -> None:
        try:
            self._queue.put_nowait((type_, reason, message))
        except queue.Full:
            log.warning("event queue full; dropped %s event %s: %s", type_, reason, message)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._send(*item)

    def _send(self, type_: str, reason: str, message: str) -> None:
        from kubernetes.client import CoreV1Event, V1EventSource, V1ObjectMeta, V1ObjectReference

        now = datetime.datetime.now(datetime.UTC)
        event = CoreV1Event(
            metadata=V1ObjectMeta(generate_name=f"{self.node_name}.", namespace=self.NAMESPACE),
            involved_object=V1ObjectReference(kind="Node", name=self.node_name, uid=self.node_name,
                                              api_version="v1"),
            reason=reason, message=message[:1024], type=type_, first_timestamp=now, last_timestamp=now, count=1,
            source=V1EventSource(component=self.component, host=self.node_name))
        try:
            self.api.create_namespaced_event(self.NAMESPACE, event, _request_timeout=API_TIMEOUT_S)
            self.sent += 1
        except Exception as exc:
            log.warning("cannot record event %s on node %s: %s", reason, self.node_name, exc)


def assignments_for(resource: str, node_name: str,
                    pods: list[tuple[str, Mapping[str, str]]]) -> list[ContainerAssignment]:
    """The container assignments of ``resource`` (device set, and for dynamic vNPUs the template) that the
    scheduler wrote into ``npu.openfuyao.com/assigned`` of these pods (``(pod name, annotations)``) for this node;
    invalid annotations are logged and skipped."""
    out: list[ContainerAssignment] = []
    for pod, pod_annotations in pods:
        raw = pod_annotations.get(ANNOTATION_POD_ASSIGNED)
        if raw is None:
            continue
        try:
            assignment = parse_annotation(ANNOTATION_POD_ASSIGNED, raw, PodAssignment)
        except ContractError as exc:
            log.warning("ignoring pod %s: %s", pod, exc, extra={"pod": pod})
            continue
        if assignment.node != node_name:
            continue
        out.extend(c for c in assignment.containers if c.resource == resource)
    return out


class PendingPodAssignments:
    """Reads pending pods bound to this node (one list call, filtered by the API server)."""

    def __init__(self, api: Any, node_name: str, timeout_s: float = 1.0):
        self.api = api
        self.node_name = node_name
        self.timeout_s = timeout_s

    def __call__(self, resource: str) -> list[ContainerAssignment]:
        pods = self.api.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node_name},status.phase=Pending", _request_timeout=self.timeout_s)
        # The kubelet admits pending pods oldest first: offer the oldest pod's choice first.
        ordered = sorted(pods.items, key=lambda p: (p.metadata.creation_timestamp is None,
                                                    p.metadata.creation_timestamp or 0, p.metadata.name))
        return assignments_for(resource, self.node_name, [
            (f"{p.metadata.namespace}/{p.metadata.name}", p.metadata.annotations or {}) for p in ordered])
