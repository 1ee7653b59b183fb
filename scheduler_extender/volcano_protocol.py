"""Volcano's extender protocol (``pkg/scheduler/plugins/extender`` and the types it sends, ``pkg/scheduler/api``), as
pure functions from decoded JSON to the extender's model and back. Checked against Volcano v1.15.1 and master
(``ed72c7c8``); what differs is noted. The request and response wrappers have JSON tags (``task``, ``node``,
``nodes``, ``evictor``, ``evictees``, ``job``, ``queue``); the api types inside them (``TaskInfo``, ``NodeInfo``,
``JobInfo``, ``QueueInfo``) have none, so their keys are Go field names (``Pod``, ``Tasks``, ``Status``...), and the
Kubernetes objects inside those (``Pod``, ``Node``, ``PodGroup``) use their own tags (``metadata``, ``spec``).

Every verb is a POST to ``extender.urlPrefix + "/" + <verb value>``; a non-200 answer is an error for Volcano
(ignored when ``extender.ignorable`` is true, else the node fails, the job is not enqueued, and so on):

==================  ======================================  ==============================================
verb (config key)   request                                 response
==================  ======================================  ==============================================
predicate           ``{task: TaskInfo, node: NodeInfo}``    ``{status: "<reason or empty>", code: int}``
prioritize          ``{task, nodes: [NodeInfo]}``           ``{nodeScore: {node: float}, errorMessage}``
preemptable         ``{evictor: TaskInfo, evictees: [...]}``  ``{status: int, victims: [TaskInfo]}``
reclaimable         same as preemptable                     same as preemptable
jobEnqueueable      ``{job: JobInfo}``                      ``{status: int}`` (permit 1, abstain 0, reject -1)
jobEnqueued         ``{job: JobInfo}`` (master only)        ``{}`` (read, never used)
jobReady            ``{job: JobInfo}``                      ``{status: bool}``
queueOverused       ``{queue: QueueInfo}``                  ``{overused: bool}``
allocateFunc        ``{task: TaskInfo}``                    ``{errorMessage: ""}`` (non-empty: Volcano's
deallocateFunc      ``{task: TaskInfo}``                    event carries it as an error)
onSessionOpen       the session's jobs, nodes, queues...    status only
onSessionClose      ``{}``                                  status only
==================  ======================================  ==============================================
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypedDict

import msgspec

from . import partial
from .model import NodeInfo, PodInfo, parse_node, quantity
from .partial import ProtocolError


class TaskStatus(enum.IntEnum):
    """``api.TaskStatus`` (pkg/scheduler/api/types.go: ``Pending TaskStatus = 1 << iota`` ...), sent as its number
    under ``TaskInfo.Status`` (flattened from the embedded ``TransactionContext``)."""

    PENDING = 1
    ALLOCATED = 2
    PIPELINED = 4
    BINDING = 8
    BOUND = 16
    RUNNING = 32
    RELEASING = 64
    SUCCEEDED = 128
    FAILED = 256
    UNKNOWN = 512


FREEING = frozenset({TaskStatus.RELEASING, TaskStatus.SUCCEEDED, TaskStatus.FAILED})
"""Tasks whose devices count as free: a Releasing task is being evicted (by preempt or reclaim, in this session or
an earlier one) or deleted, and Volcano counts its resources in ``NodeInfo.FutureIdle()`` — the idle resources
preempt, reclaim and allocate's pipelining check against. Volcano master re-runs the predicate after each eviction
(``preemptorFitsOnNode``), so an extender that still counted a victim's NPUs would throw the preemption away.
Pipelined tasks (placed, waiting for those resources) count as taken."""

# Codes of a predicate answer (pkg/scheduler/api/types.go: Success = iota, Error, Unschedulable, ...)
SUCCESS, ERROR, UNSCHEDULABLE, UNSCHEDULABLE_AND_UNRESOLVABLE = 0, 1, 2, 3
# Votes (pkg/scheduler/plugins/util/util.go)
PERMIT, ABSTAIN, REJECT = 1, 0, -1


# What the extender reads of the big requests (predicate, prioritize): partial types (fuyao.scheduler_extender.partial),
# every other field skipped without being built.
class _Task(TypedDict, total=False):
    Status: Any
    Pod: partial.Pod | None


class _NodeInfo(TypedDict, total=False):
    Node: partial.Node | None
    Tasks: dict[str, _Task | None] | None


class _PredicateRequest(TypedDict, total=False):
    task: _Task | None
    node: msgspec.Raw  # its bytes: a node already seen is looked up by them instead of decoded


class _PrioritizeRequest(TypedDict, total=False):
    task: _Task | None
    nodes: list[msgspec.Raw] | None  # null when preempt asks about no node


_NODE_INFO = msgspec.json.Decoder(_NodeInfo)
_PREDICATE = msgspec.json.Decoder(_PredicateRequest)
_PRIORITIZE = msgspec.json.Decoder(_PrioritizeRequest)


_TASK = msgspec.json.Decoder(_Task | None)
_NODE_KEY = b',"node":{'


def _task_at(raw: bytes, key: bytes, end: bytes) -> int | None:
    """When ``raw`` is ``{"task":<task><key>…<end>``: where the first ``key`` starts (the task's bytes are
    ``raw[8:at]``, if they decode as a whole task: :func:`try_task`). Else None."""
    at = raw.find(key)
    if at <= 8 or not raw.startswith(b'{"task":') or not raw.endswith(end):
        return None
    return at


_NOT_A_TASK = object()


def try_task(raw: bytes | memoryview) -> Any:
    """``raw`` decoded as a whole TaskInfo (the fields the model reads; None for JSON null), or :data:`_NOT_A_TASK`
    when it is not one (a cut in the wrong place)."""
    try:
        return _TASK.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return _NOT_A_TASK


def is_task(decoded: Any) -> bool:
    return decoded is not _NOT_A_TASK


def _task_before(raw: bytes, key: bytes, end: bytes) -> tuple[Any, int] | None:
    """When ``raw`` is ``{"task":<task><key>…<end>`` and the part before the first ``key`` decodes as a whole task:
    the task and where ``key`` starts. Else None (the caller decodes the whole body)."""
    at = _task_at(raw, key, end)
    if at is None:
        return None
    task = try_task(memoryview(raw)[8:at])
    return None if task is _NOT_A_TASK else (task, at)


def split_predicate(raw: bytes) -> tuple[memoryview, memoryview] | None:
    """A Go-shaped predicate body's task bytes and node bytes, by byte search alone. None for any other shape.

    Go's encoder writes ``{"task":<TaskInfo>,"node":<NodeInfo>}``. No key ``node`` with an object value exists in a
    TaskInfo or a Pod, and a ``,"node":{`` nested inside the task would leave its braces unbalanced: so when the
    part before the first ``,"node":{`` decodes as a whole task (:func:`try_task`), it is the task, and the rest is
    the node. A caller that has decoded these exact task bytes before knows that already. Finding the cut costs a
    byte search instead of a pass of the decoder over the node's ~200 kB; the node's bytes are then decoded only if
    they were not seen before (``VolcanoVerbs._node_info_bytes``), which also checks that they are JSON. Any other
    shape is decoded whole (:func:`decode_whole_predicate`)."""
    at = _task_at(raw, _NODE_KEY, b"}")
    if at is None:
        return None
    view = memoryview(raw)
    return view[8:at], view[at + len(_NODE_KEY) - 1:-1]


def decode_whole_predicate(raw: bytes) -> tuple[Any, msgspec.Raw | None]:
    """A predicate request decoded by msgspec as a whole (the task's fields the model reads; the node as raw
    bytes)."""
    body = partial.decode(_PREDICATE, raw, "PredicateRequest")
    return body.get("task"), body.get("node")


_NODES_KEY = b',"nodes":['
_NEXT_NODE = b'},{"Name":"'  # between two NodeInfos: Name is NodeInfo's first field, so Go writes it first


def decode_prioritize(raw: bytes, cut: bool = True) -> tuple[Any, list[bytes | memoryview | msgspec.Raw]]:
    """A prioritize request's task (decoded) and its nodes, each undecoded (its bytes). As for the predicate (see
    :func:`split_predicate`), the Go-shaped body ``{"task":…,"nodes":[{"Name":…},{"Name":…}]}`` is cut by byte
    search; a cut in the wrong place leaves a piece that is not a whole JSON object, which fails to decode (it
    was never seen, so it is decoded), and then the whole body is decoded instead."""
    found = _task_before(raw, _NODES_KEY, b"]}") if cut else None
    if found is not None:
        task, at = found
        view, start, end = memoryview(raw), at + len(_NODES_KEY), len(raw) - 2
        nodes: list[bytes | memoryview | msgspec.Raw] = []
        while start < end:
            next_at = raw.find(_NEXT_NODE, start, end)
            stop = end if next_at < 0 else next_at + 1
            nodes.append(view[start:stop])
            start = stop + 1
        return task, nodes
    body = partial.decode(_PRIORITIZE, raw, "PrioritizeRequest")
    return body.get("task"), body.get("nodes") or []


def decode_node_info(raw: bytes | msgspec.Raw) -> Any:
    return partial.decode(_NODE_INFO, raw, "NodeInfo")


def as_object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(body).__name__}")
    return body


def task_pod(raw: Any, what: str = "task") -> dict[str, Any]:
    """The full v1.Pod of a ``TaskInfo``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("Pod"), dict):
        raise ProtocolError(f"Volcano {what}: expected a TaskInfo with the full v1.Pod under 'Pod'")
    pod: dict[str, Any] = raw["Pod"]
    return pod


def task_status(raw: Mapping[str, Any], where: str) -> int | None:
    """``TaskInfo.Status`` as a number (None when absent); anything else is a :class:`ProtocolError`. A number that is
    not a known status is returned as it is, and counts as holding its devices."""
    status = raw.get("Status")
    if status is None:
        return None
    if isinstance(status, bool) or not isinstance(status, int):
        raise ProtocolError(f"{where}.Status: expected Volcano's numeric TaskStatus (1 Pending ... 64 Releasing "
                            f"... 512 Unknown), got {status!r}")
    return status


def node_info(raw: Any, parse_pod: Callable[[Mapping[str, Any]], PodInfo],
              parse_node: Callable[[Mapping[str, Any], list[PodInfo]], NodeInfo] = parse_node) -> NodeInfo:
    """A Volcano ``NodeInfo`` as the extender's :class:`NodeInfo`: the full v1.Node under ``Node``, and its tasks'
    pods under ``Tasks`` (a map keyed ``namespace/name``). Tasks in a :data:`FREEING` status are left out, and the
    devices the node's topology says they hold count as free."""
    raw = as_object(raw, "Volcano NodeInfo")
    if not isinstance(raw.get("Node"), dict):
        raise ProtocolError("Volcano NodeInfo: expected an object with the full v1.Node under 'Node'")
    tasks = raw.get("Tasks") or {}
    if not isinstance(tasks, dict):
        raise ProtocolError("Volcano NodeInfo.Tasks: expected an object")
    pods: list[PodInfo] = []
    freed: set[str] = set()
    for key, task in tasks.items():
        if not isinstance(task, dict) or not isinstance(task.get("Pod"), dict):
            continue
        pod = parse_pod(task["Pod"])
        if task_status(task, f"NodeInfo.Tasks[{key}]") in FREEING:
            freed.add(pod.key)
        else:
            pods.append(pod)
    node = parse_node(raw["Node"], pods)
    return node.without(freed) if freed else node


@dataclass(frozen=True)
class Job:
    """What the extender reads of a ``JobInfo``: its tasks' pods (none yet for a vcjob whose PodGroup is not
    Inqueue: the job controller creates pods after enqueueing), the gang size, and the PodGroup's
    ``minResources`` (what proportion and overcommit check at enqueue)."""

    key: str
    min_available: int
    pods: list[dict[str, Any]]
    min_resources: dict[str, Decimal]


def parse_job(raw: Any) -> Job:
    raw = as_object(raw, "Volcano JobInfo")
    name, namespace = raw.get("Name") or "", raw.get("Namespace") or ""
    if not isinstance(name, str) or not isinstance(namespace, str):
        raise ProtocolError("Volcano JobInfo.Name/Namespace: expected strings")
    min_available = raw.get("MinAvailable") or 0
    if isinstance(min_available, bool) or not isinstance(min_available, int) or min_available < 0:
        raise ProtocolError(f"Volcano JobInfo.MinAvailable: expected a non-negative integer, got {min_available!r}")
    tasks = raw.get("Tasks") or {}
    if not isinstance(tasks, dict):
        raise ProtocolError("Volcano JobInfo.Tasks: expected an object (TaskID → TaskInfo)")
    pods = [task_pod(t, f"JobInfo.Tasks[{k}]") for k, t in tasks.items()]
    min_resources: dict[str, Decimal] = {}
    group = raw.get("PodGroup")
    if isinstance(group, dict):
        spec = group.get("spec") or {}
        resources = spec.get("minResources") if isinstance(spec, dict) else None
        if isinstance(resources, dict):
            for resource, value in resources.items():
                try:
                    min_resources[resource] = quantity(value)
                except ValueError:
                    raise ProtocolError(f"Volcano JobInfo.PodGroup.spec.minResources[{resource}]: not a "
                                        f"quantity: {value!r}") from None
    return Job(key=f"{namespace}/{name}", min_available=min_available, pods=pods, min_resources=min_resources)


def predicate_result(reason: str = "", code: int = SUCCESS) -> dict[str, Any]:
    """``PredicateResponse``: the reason goes under ``status`` (its JSON tag), empty when the node fits."""
    return {"status": reason, "code": code}


def prioritize_result(scores: Mapping[str, float]) -> dict[str, Any]:
    return {"nodeScore": dict(scores), "errorMessage": ""}


def victims_result(victims: list[Any], status: int = PERMIT) -> dict[str, Any]:
    return {"status": status, "victims": victims}
