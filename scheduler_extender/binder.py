"""What the extender writes to the API server: the bind (device choice → ``npu.openfuyao.com/assigned`` → the
Binding) and Warning events for pods whose annotations are invalid.

Two binds must never hand out the same devices. Within one extender, binds run on the event loop and choose +
assume with no await between, and a bound pod is *assumed* on its node until the watch reports it. The binding
carries the assignment annotation and the pod's uid and resourceVersion: the API server applies node and
annotation in one step, only if the pod is unchanged (409 otherwise; the scheduler retries). Across several
binding replicas devices of one node could still be chosen twice: run one active binder.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

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
from fuyao.http_client import ConnectError, UpstreamError, UpstreamPool
from fuyao.kube_client import HEADERS_KEPT_S, RestEndpoint

from . import devices
from .cluster import ClusterCache
from .kube_protocol import BindingArgs
from .metrics import ExtenderMetrics
from .model import NodeInfo, PodInfo, parse_pod, written

log = logging.getLogger(__name__)

API_IDLE_S = 60.0
"""Idle connections to the API server are kept this long (below its 90 s)."""
API_IN_FLIGHT = 64
"""API calls in flight at once (each holds a connection: a burst of binds against a slow API server opens at most
this many TLS connections; the others wait their turn)."""
MAX_API_ANSWER_BYTES = 16 * 1024 * 1024
"""Bigger answers are refused (a Pod's JSON stays under a few MB: etcd stores at most ~1.5 MB per object)."""

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
    steps = pod.npu_steps
    plan = devices.plan_npus(devices.node_dies(node), steps) if steps.counts else None
    if plan is not None and plan.problem is not None:  # the device plugin would refuse a set: back to the queue
        name, want, beside = pod.npu_step(plan.failed)
        raise AssignmentFailed(f"node {node.name} has no allowed set of {want} free NPUs for "
                               f"{'container' if beside is None else 'init container'} {name}"
                               f"{' after the containers before it' if any(plan.sets) else ''}: {plan.problem}")
    working = dataclasses.replace(node, assigned={r: set(d) for r, d in node.assigned.items()}, memo={})
    containers = []
    for index, (name, requests) in enumerate(pod.containers):
        for resource, choose in _CHOOSERS.items():
            want = int(requests.get(resource, 0))
            if want <= 0:
                continue
            # whole NPUs: the plan's (each container in turn, as the kubelet asks the device plugin)
            chosen = list(plan.sets[index]) if plan is not None and resource == RESOURCE_NPU else choose(working, want)
            if len(chosen) < want:
                raise AssignmentFailed(f"node {node.name} has no {want} free {resource} for container {name} "
                                       f"(found {len(chosen)})")
            working.assigned.setdefault(resource, set()).update(chosen)
            working.memo = {}
            containers.append(ContainerAssignment(container=name or "main", resource=resource,
                                                  devices=tuple(chosen)))
    if plan is not None:  # plain init containers' dies: the kubelet keeps them the pod's (reused or idle)
        containers += [ContainerAssignment(container=name or "init", resource=RESOURCE_NPU, devices=chosen)
                       for (name, _, _), chosen in zip(pod.npu_inits, plan.init_sets, strict=True) if chosen]
    return PodAssignment(node=node.name, containers=tuple(containers)) if containers else None


class Binder:
    """The bind verb, on the event loop: choose devices from the cache, count them as taken (assume), POST the
    Binding. Choice and assumption happen with no await between them, so concurrent binds — on one node or many —
    never see the same devices free; a failed POST gives them back. The pod comes from the watch cache when it
    has it (no GET per bind); a stale copy costs one 409 and one GET, then a second try."""

    def __init__(self, endpoint: RestEndpoint, cache: ClusterCache, metrics: ExtenderMetrics | None = None,
                 timeout_s: float = 5.0):
        self.metrics = metrics
        self.endpoint = endpoint
        self.cache = cache
        self.timeout_s = timeout_s
        # the API server closes idle connections after 90 s (its http.Server IdleTimeout); binds come in bursts of
        # 5-10 in flight, and a connection opened again costs both sides a TLS handshake
        self._client = UpstreamPool(connect_timeout=timeout_s, ssl_context=endpoint.ssl_context, idle_s=API_IDLE_S,
                                    server_hostname=endpoint.server_hostname)
        self._headers: tuple[dict[str, str] | None, list[tuple[bytes, bytes]]] = (None, [])
        self._in_flight = asyncio.Semaphore(API_IN_FLIGHT)

    async def close(self) -> None:
        await self._client.close()

    def _request_headers(self) -> list[tuple[bytes, bytes]]:
        """The endpoint's auth headers (re-read every ``HEADERS_KEPT_S``), encoded once per reading."""
        auth = self.endpoint.headers(HEADERS_KEPT_S)
        kept, headers = self._headers
        if auth != kept:
            headers = [(k.encode(), v.encode()) for k, v in auth.items()]
            headers += [(b"Content-Type", b"application/json"), (b"Accept", b"application/json")]
            self._headers = (auth, headers)
        return headers

    async def _call(self, method: bytes, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One API call: (status, body); raises :class:`UpstreamError`."""
        async with self._in_flight, await self._client.request(
                self.endpoint.base_url, method, path, body, self._request_headers(), total=self.timeout_s) as response:
            return response.status, await response.read(MAX_API_ANSWER_BYTES)

    def _count(self, call: str, code: int | str, started: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.api_calls.labels(call, str(code)).inc()
            if started is not None:
                self.metrics.api_latency.labels(call).observe(time.monotonic() - started)

    @staticmethod
    def _pod_path(namespace: str, name: str) -> str:
        return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"

    async def _read_pod(self, args: BindingArgs) -> tuple[PodInfo | None, str]:
        started = time.monotonic()
        try:
            status, body = await self._call(b"GET", self._pod_path(args.pod_namespace, args.pod_name))
            self._count("read", status, started)
            if status != 200:
                return None, (f"cannot read pod {args.pod_namespace}/{args.pod_name}: {status} "
                              f"{_status_message(body)}")
        except UpstreamError as exc:
            self._count("read", "error")
            return None, f"cannot read pod {args.pod_namespace}/{args.pod_name}: {type(exc).__name__}: {exc}"
        try:
            return parse_pod(orjson.loads(body)), ""
        except (orjson.JSONDecodeError, AttributeError, TypeError) as exc:
            return None, f"cannot read pod {args.pod_namespace}/{args.pod_name}: the API server sent {exc}"

    async def __call__(self, args: BindingArgs, forwarded: bool = False) -> str:
        """Bind; returns "" or the error the scheduler should see (``forwarded``: sent by another replica; the
        single binder binds it all the same)."""
        pod = self.cache.pod_by_uid(args.pod_uid) if args.pod_uid else None
        if pod is None or pod.name != args.pod_name or pod.namespace != args.pod_namespace:
            pod, error = await self._read_pod(args)
            if pod is None:
                return error
        try:
            error = await self._bind(args, pod)
        except _Conflict:  # our copy was stale (or someone else changed the pod): read it once more
            pod, error = await self._read_pod(args)
            if pod is None:
                return error
            try:
                error = await self._bind(args, pod)
            except _Conflict as conflict:
                error = (f"bind of {pod.key} to {args.node} failed: the pod changed meanwhile ({conflict}); "
                         "the scheduler retries")
        if error:
            log.warning("%s", error, extra={"pod": f"{args.pod_namespace}/{args.pod_name}", "node": args.node})
        return error

    async def _bind(self, args: BindingArgs, pod: PodInfo) -> str:
        """One attempt: "" or the error; raises :class:`_Conflict` on 409."""
        if args.pod_uid and pod.uid != args.pod_uid:
            return f"pod {pod.key} is now uid {pod.uid}, not {args.pod_uid}: it was re-created"
        if pod.node_name:
            # a retried bind whose first attempt succeeded: never re-choose devices of a bound pod. Read from the
            # API server, it may be news to the watch (an earlier attempt whose answer was lost, to this node or
            # another, then replaced by this attempt's assumption): its devices count from now on
            if not pod.terminal:
                self.cache.assume(pod)
            return "" if pod.node_name == args.node else f"pod {pod.key} is already bound to {pod.node_name}"
        if not self.cache.ready:  # a node without its pods looks free: its devices would be handed out again
            return "the extender is still listing nodes and pods; the scheduler retries"
        node = self.cache.node_info(args.node)
        if node is None:
            return f"node {args.node} is unknown to the extender"
        try:
            assignment = assignment_for(pod, node)
        except AssignmentFailed as exc:
            return str(exc)
        annotations = dict(pod.annotations)
        if assignment:
            annotations[ANNOTATION_POD_ASSIGNED] = dump_annotation(assignment)
            written(annotations[ANNOTATION_POD_ASSIGNED], assignment)
        # assumed as the watch will report it (node, assignment annotation): then its event costs no recomputation
        assumed = dataclasses.replace(pod, node_name=args.node, assignment=assignment, annotations=annotations,
                                      phase_status="Pending")
        self.cache.assume(assumed)
        # One request, atomic in the API server: the binding sets the node and the annotations together, on the
        # condition that the pod still has this uid and resourceVersion (409 otherwise).
        metadata: dict[str, Any] = {"name": pod.name, "namespace": pod.namespace}
        if pod.uid:
            metadata["uid"] = pod.uid
        if pod.resource_version:
            metadata["resourceVersion"] = pod.resource_version
        if assignment:
            metadata["annotations"] = {ANNOTATION_POD_ASSIGNED: annotations[ANNOTATION_POD_ASSIGNED]}
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": metadata,
                   "target": {"apiVersion": "v1", "kind": "Node", "name": args.node}}
        status: int | str
        started = time.monotonic()
        try:
            # POST pods/<name>/binding, the subresource kube-scheduler uses (RBAC: pods/binding create)
            code, body = await self._call(b"POST", self._pod_path(pod.namespace, pod.name) + "/binding",
                                          orjson.dumps(binding))
            status = code
            failure = f"{code} {_status_message(body)}" if code >= 300 else ""
        except UpstreamError as exc:
            status, failure = "error", f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ConnectError):  # sent, then the answer was lost: the Binding may have happened
                self._count("bind", status, started)
                return (f"bind of {pod.key} to {args.node}: no answer ({failure}); its devices stay counted until "
                        "the watch shows whether it was bound")
        self._count("bind", status, started)
        if failure:
            # refused, or never sent: the devices are free again, unless another attempt has assumed the pod since
            self.cache.forget_assumed(pod.uid, only=assumed)
            if status == 409:
                raise _Conflict(failure)  # the API server's reason: a stale copy, or a pod being deleted...
            return f"bind of {pod.key} to {args.node} failed: {failure}"
        log.info("bound %s to %s", pod.key, args.node,
                 extra={"pod": pod.key, "node": args.node,
                        "devices": {c.container: list(c.devices) for c in assignment.containers}
                        if assignment else {}})
        return ""


class _Conflict(Exception):
    """The API server refused the binding's preconditions (409): the pod is not the version we read."""


def _status_message(body: bytes) -> str:
    """The message of a Kubernetes Status body (or its start, if it is not one)."""
    try:
        status = orjson.loads(body)
        return str(status.get("message") or status.get("reason") or "")
    except (orjson.JSONDecodeError, AttributeError):
        return body[:200].decode(errors="replace")


class PodWarnings:
    """Warning events on pods (``kubectl describe pod`` shows why an annotation was ignored)."""

    QUEUED = 256
    """Events waiting for the one sender thread; beyond that they are dropped (counted in ``dropped``): a
    Deployment of thousands of replicas with one bad annotation must not start a thread per pod."""

    def __init__(self, api: Any, component: str = "fuyao-scheduler-extender"):
        self.api = api
        self.component = component
        self.dropped = 0
        self._queue: queue.Queue[tuple[PodInfo, str]] = queue.Queue(self.QUEUED)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __call__(self, pod: PodInfo, message: str) -> None:
        try:
            self._queue.put_nowait((pod, message))
        except queue.Full:
            self.dropped += 1
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pod-warnings", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            pod, message = self._queue.get()
            try:
                self._send(pod, message)
            except Exception:  # one bad event must not end the only sender
                log.exception("cannot record an event on %s", pod.key)

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
