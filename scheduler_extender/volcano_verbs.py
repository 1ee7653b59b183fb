"""The extender's answers to Volcano (its ``extender`` plugin), one method per verb, from decoded JSON to decoded JSON.
Shapes and codes: :mod:`.volcano_protocol`. What each verb decides:

- ``predicate``: the same plugins as kube-scheduler's filter, on the one node Volcano sends (with its tasks; tasks
  Releasing, Succeeded or Failed do not hold their devices). The reason names the plugin; ``code`` is
  UnschedulableAndUnresolvable when evicting pods would not help (Volcano's preempt then skips the node).
- ``prioritize``: the weighted plugin scores in [0, 1] times ``volcano_score_scale`` (Volcano adds extender scores raw).
- ``preemptable`` / ``reclaimable``: an LS evictor may evict BE evictees, returned as Volcano sent them.
- ``jobEnqueueable``: rejects a gang that cannot fit in the cluster even when it is empty (too few nodes whose
  devices could ever take one of its tasks, or more devices than the cluster has); otherwise abstains, so the
  queue plugins (proportion, overcommit, capacity) decide. Never permits: a permit in one tier skips the next
  tier's checks (``Session.JobEnqueueable``).
- ``jobEnqueued``, ``jobReady`` (true), ``queueOverused`` (false), ``allocateFunc`` / ``deallocateFunc`` (no error):
  neutral answers, counted, so enabling one of them never changes what Volcano decides nor turns into an error.
- ``onSessionOpen`` / ``onSessionClose``: acknowledged without reading the body (``server.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
import xxhash

from fuyao.contracts import ACCELERATOR_RESOURCES, QoSClass

from .features import RESOURCE_COLUMN
from .framework import Cycle, Explanation, Framework
from .model import NodeInfo, PodInfo, parse_node, parse_pod
from .partial import Kept, ProtocolError, identity
from .plugins import DeviceFitArgs, DeviceFitPlugin, registry
from .plugins.colocation import be_victims
from .volcano_protocol import (
    ABSTAIN,
    PERMIT,
    REJECT,
    SUCCESS,
    UNSCHEDULABLE,
    UNSCHEDULABLE_AND_UNRESOLVABLE,
    as_object,
    decode_node_info,
    decode_prioritize,
    decode_whole_predicate,
    is_task,
    node_info,
    parse_job,
    predicate_result,
    prioritize_result,
    split_predicate,
    task_pod,
    try_task,
    victims_result,
)

if TYPE_CHECKING:
    from .service import ExtenderService

log = logging.getLogger(__name__)

PODS_KEPT = 200_000
"""Parsed pods kept by (uid, resourceVersion): every pod on every node a predicate or prioritize carries."""
NODES_KEPT = 8_192
"""Parsed NodeInfos kept by the digest of their bytes, and parsed Nodes by (name, resourceVersion)."""

TASKS_KEPT = 1_024
"""Parsed task pods kept by the digest of the task's bytes (one task's predicates all carry the same bytes)."""


class VolcanoVerbs:
    def __init__(self, service: ExtenderService):
        self.service = service
        self.config = service.config
        self.metrics = service.metrics
        # jobEnqueueable asks only whether devices could ever fit: device-fit alone, whatever else is enabled
        fit = registry.args_of(service.config.plugins, "device-fit")
        assert isinstance(fit, DeviceFitArgs)
        # (a node without its topology yet may publish it: not "never")
        self.capacity = Framework([(DeviceFitPlugin(fit.model_copy(update={"require_topology": False})), 1.0)])
        # Volcano sends every node with all its pods in every call: 420 calls of ~200 kB for one task over 1,000
        # nodes, and the same nodes again for the next task and the next session. What was parsed is kept, by
        # what identifies it exactly: a pod by (uid, resourceVersion), a Node by (name, resourceVersion), a whole
        # NodeInfo by a 128-bit digest of its bytes. Plain dicts, emptied when full (the GIL makes each get and
        # set atomic between the event loop and the big-request worker).
        self._pods: Kept[tuple[str, str], PodInfo] = Kept(PODS_KEPT)
        self._nodes: Kept[tuple[str, str], NodeInfo] = Kept(NODES_KEPT)
        self._node_infos: Kept[bytes, NodeInfo] = Kept(NODES_KEPT)
        self._task_pods: Kept[bytes, PodInfo] = Kept(TASKS_KEPT)

    def routes(self) -> dict[str, tuple[str, Callable[[Any], Any]]]:
        """URL path → (metric name, handler) for every verb Volcano's extender plugin can call."""
        verbs: dict[str, Callable[[Any], Any]] = {
            "predicate": self.predicate, "prioritize": self.prioritize,
            "preemptable": lambda b: self.victims(b, "preemptable"),
            "reclaimable": lambda b: self.victims(b, "reclaimable"),
            "jobEnqueueable": self.job_enqueueable, "jobEnqueued": self.job_enqueued, "jobReady": self.job_ready,
            "queueOverused": self.queue_overused,
            "allocateFunc": lambda b: self.event(b, "allocateFunc"),
            "deallocateFunc": lambda b: self.event(b, "deallocateFunc"),
        }
        return {f"/volcano/{verb}": (f"volcano-{verb}", call) for verb, call in verbs.items()}

    RAW = frozenset({"predicate", "prioritize"})
    """Verbs that take the request's bytes (they decode only what they read)."""

    def _count(self, verb: str, outcome: str) -> None:
        self.metrics.decisions.labels(f"volcano-{verb}", outcome).inc()

    # Parsing, with what was parsed before ----------------------------------------------------------------------
    def _pod_of(self, raw: Mapping[str, Any]) -> PodInfo:
        key = identity(raw, "uid")
        return parse_pod(raw) if key is None else self._pods.get_or(key, lambda: parse_pod(raw))

    def _node_of(self, raw: Mapping[str, Any], pods: list[PodInfo]) -> NodeInfo:
        key = identity(raw, "name")
        if key is None:
            return parse_node(raw, pods)
        base = self._nodes.get_or(key, lambda: parse_node(raw))
        return dataclasses.replace(base, pods=pods, memo={}).refresh()

    def _node_info(self, raw: Any) -> NodeInfo:
        return node_info(raw, self._pod_of, self._node_of)

    def _node_info_bytes(self, raw: Any) -> NodeInfo:
        """A NodeInfo from its JSON bytes (a ``msgspec.Raw``), reused when the same bytes came before."""
        if raw is None:
            raise ProtocolError("Volcano NodeInfo: missing")
        return self._node_infos.get_or(xxhash.xxh3_128_digest(raw),
                                       lambda: self._node_info(decode_node_info(raw)))

    def _predicate_parts(self, raw: bytes) -> tuple[PodInfo, Any]:
        """The task's pod and the node's bytes of a predicate body. Every predicate of one task carries the same
        task bytes (420 calls for 1,000 nodes): the pod is kept by their digest, and bytes that decoded as a whole
        task once are known to be one (the cut of :func:`split_predicate` is right) without decoding them again."""
        cut = split_predicate(raw)
        if cut is not None:
            task_bytes, node_bytes = cut
            digest = xxhash.xxh3_128_digest(task_bytes)
            pod = self._task_pods.get(digest)
            if pod is not None:
                return pod, node_bytes
            task = try_task(task_bytes)
            if is_task(task):
                pod = self.service.pod(task_pod(task))
                self._task_pods.get_or(digest, lambda: pod)
                return pod, node_bytes
        task, node = decode_whole_predicate(raw)
        return self.service.pod(task_pod(task)), node

    # Placement ---------------------------------------------------------------------------------------------------
    def predicate(self, body: bytes | Any) -> dict[str, Any]:
        """``body``: the request's bytes (the server's path) or decoded JSON."""
        if isinstance(body, bytes):
            pod, node_bytes = self._predicate_parts(body)
            node = self._node_info_bytes(node_bytes)
        else:
            body = as_object(body, "PredicateRequest")
            pod = self.service.pod(task_pod(body.get("task")))
            node = self._node_info(body.get("node"))
        result = self.service.framework.check(pod, node)
        explanation = Explanation(pod=pod.key, verb="volcano-predicate")
        if result is None:
            self._count("predicate", "ok")
            self.service.explanations.record(explanation)
            return predicate_result("", SUCCESS)
        plugin, rejection = result
        text = f"{plugin}: {rejection.reason}"
        explanation.rejected[node.name] = text
        self.service.explanations.record(explanation)
        self.service.observe({(plugin, rejection.code): 1})
        self._count("predicate", "rejected")
        return predicate_result(text, UNSCHEDULABLE_AND_UNRESOLVABLE if rejection.unresolvable else UNSCHEDULABLE)

    def prioritize(self, body: bytes | Any) -> dict[str, Any]:
        """``body``: the request's bytes (the server's path) or decoded JSON."""
        if isinstance(body, bytes):
            task, raw_nodes = decode_prioritize(body)
            try:
                nodes = [self._node_info_bytes(n) for n in raw_nodes]
            except ProtocolError:
                if isinstance(raw_nodes[0], msgspec.Raw):
                    raise  # decoded by msgspec already: the node itself is malformed
                task, raw_nodes = decode_prioritize(body, cut=False)  # cut in the wrong place: decode whole
                nodes = [self._node_info_bytes(n) for n in raw_nodes]
        else:
            body = as_object(body, "PrioritizeRequest")
            task, raw_nodes = body.get("task"), body.get("nodes") or []
            if not isinstance(raw_nodes, list):
                raise ProtocolError("PrioritizeRequest.nodes: expected an array of NodeInfo")
            nodes = [self._node_info(n) for n in raw_nodes]
        pod = self.service.pod(task_pod(task))
        with self.service.request_view(nodes) as (view, cycle):
            explanation = self.service.framework.score(pod, view, cycle)
        explanation.verb = "volcano-prioritize"
        self.service.explanations.record(explanation)
        self._count("prioritize", "ok")
        scale = self.config.volcano_score_scale
        totals = explanation.totals.tolist() if explanation.totals is not None else []
        return prioritize_result({n: round(t * scale, 3) for n, t in zip(view.names, totals, strict=True)})

    def victims(self, body: Any, verb: str) -> dict[str, Any]:
        """preemptable / reclaimable: an LS evictor may evict BE evictees and those without a QoS key (ordinary
        priority preemption; returned verbatim), never one marked LS; a BE evictor none (as ``be_victims``)."""
        body = as_object(body, f"{verb} request")
        evictor = self.service.pod(task_pod(body.get("evictor"), "evictor"))
        evictees = body.get("evictees") or []
        if not isinstance(evictees, list):
            raise ProtocolError(f"{verb} request.evictees: expected an array of TaskInfo")
        victims = [t for t in evictees if isinstance(t, dict) and isinstance(t.get("Pod"), dict)
                   and evictor.qos == QoSClass.LS and be_victims(evictor, [parse_pod(t["Pod"])]) is not None]
        self._count(verb, "ok" if victims else "none")
        return victims_result(victims, PERMIT)

    # Jobs and queues ---------------------------------------------------------------------------------------------
    def job_enqueueable(self, body: Any) -> dict[str, Any]:
        job = parse_job(as_object(body, "JobEnqueueableRequest").get("job"))
        vote, why = self._enqueue_vote([self.service.pod(p) for p in job.pods], job.min_available,
                                       job.min_resources)
        self._count("jobEnqueueable", {PERMIT: "permit", ABSTAIN: "abstain", REJECT: "reject"}[vote])
        if vote == REJECT:
            log.info("job %s cannot fit in the cluster: %s", job.key, why, extra={"job": job.key, "reason": why})
        return {"status": vote}

    def _enqueue_vote(self, pods: list[PodInfo], min_available: int,
                      min_resources: dict[str, Decimal]) -> tuple[int, str]:
        """REJECT with the reason when the gang could not fit even in an empty cluster; else ABSTAIN. Both tests are
        necessary conditions (never a false reject): each of ``min_available`` tasks needs a node whose devices
        could ever take it, and the cluster must have at least the devices of its ``min_available`` smallest
        tasks (or the PodGroup's ``minResources`` when there are no tasks yet)."""
        cache = self.service.cache
        if not cache.ready:
            return ABSTAIN, "no cluster state"
        wanted = [p for p in pods if p.accelerators]
        demand = {r: int(v) for r, v in min_resources.items() if r in RESOURCE_COLUMN and v > 0}
        if not wanted and not demand:
            return ABSTAIN, "no devices requested"
        needed = min_available or len(pods)
        with cache.lock:
            view, _ = cache.table.view(cache.node_names())
            capacity = {r: int(view.alloc[:, column].sum()) for r, column in RESOURCE_COLUMN.items()}
            # per shape of its requests (the pod's totals, and each container's NPUs: product rules apply to each)
            fits: dict[tuple[tuple[tuple[str, int], ...], tuple[int, ...]], bool] = {}
            never = 0  # tasks without devices, and tasks not created yet, are not ours to judge: they may fit
            for pod in wanted:
                shape = (tuple(sorted(pod.accelerators.items())), pod.npu_counts)
                if shape not in fits:
                    outcome = self.capacity.filter(pod, view, Cycle(pd=cache.pd, domains=cache.table))
                    fits[shape] = len(outcome.unresolvable) < len(view)
                never += not fits[shape]
        tasks = max(len(pods), needed)
        if wanted and tasks - never < needed:
            impossible = [dict(s) | ({"containers' NPUs": list(c)} if len(c) > 1 else {})
                          for (s, c), ok in fits.items() if not ok]
            return REJECT, (f"{never} of its tasks can never fit on any node (devices {impossible}), "
                            f"and it needs {needed} of {tasks}")
        if wanted:
            for resource in ACCELERATOR_RESOURCES:
                sizes = sorted(p.accelerators.get(resource, 0) for p in pods)
                demand[resource] = max(demand.get(resource, 0), sum(sizes[:needed]))
        for resource, amount in demand.items():
            if amount > capacity.get(resource, 0):
                return REJECT, f"it needs at least {amount} {resource}; the cluster has {capacity.get(resource, 0)}"
        return ABSTAIN, "could fit"

    def job_enqueued(self, body: Any) -> dict[str, Any]:
        parse_job(as_object(body, "JobEnqueuedRequest").get("job"))
        self._count("jobEnqueued", "ok")
        return {}

    def job_ready(self, body: Any) -> dict[str, Any]:
        """Neutral: readiness is the gang plugin's (minAvailable), and devices do not change it."""
        parse_job(as_object(body, "JobReadyRequest").get("job"))
        self._count("jobReady", "ok")
        return {"status": True}

    def queue_overused(self, body: Any) -> dict[str, Any]:
        """Neutral: queue shares are proportion's or capacity's."""
        as_object(body, "QueueOverusedRequest")
        self._count("queueOverused", "ok")
        return {"overused": False}

    def event(self, body: Any, verb: str) -> dict[str, Any]:
        """allocateFunc / deallocateFunc: neutral. Volcano sends the task after its own session accounting; the
        tasks it allocated appear in the NodeInfos of the next predicate and prioritize calls, so there is nothing
        to keep here. The ``errorMessage`` is always empty: Volcano would carry a non-empty one as the event's error."""
        task_pod(as_object(body, "EventHandlerRequest").get("task"))
        self._count(verb, "ok")
        return {"errorMessage": ""}
