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

import logging
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from fuyao.contracts import ACCELERATOR_RESOURCES, QoSClass

from .features import RESOURCE_COLUMN
from .framework import Cycle, Explanation, Framework
from .kube_protocol import ProtocolError
from .model import PodInfo, parse_pod
from .plugins import DeviceFitPlugin
from .volcano_protocol import (
    ABSTAIN,
    PERMIT,
    REJECT,
    SUCCESS,
    UNSCHEDULABLE,
    UNSCHEDULABLE_AND_UNRESOLVABLE,
    as_object,
    node_info,
    parse_job,
    predicate_result,
    prioritize_result,
    task_pod,
    victims_result,
)

if TYPE_CHECKING:
    from .service import ExtenderService

log = logging.getLogger(__name__)


class VolcanoVerbs:
    def __init__(self, service: ExtenderService):
        self.service = service
        self.config = service.config
        self.metrics = service.metrics
        # jobEnqueueable asks only whether devices could ever fit: device-fit alone, whatever else is enabled
        self.capacity = Framework([(DeviceFitPlugin(service.config.plugins.device_fit.strategy), 1.0)])

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

    def _count(self, verb: str, outcome: str) -> None:
        self.metrics.decisions.labels(f"volcano-{verb}", outcome).inc()

    # Placement ---------------------------------------------------------------------------------------------------
    def predicate(self, body: Any) -> dict[str, Any]:
        body = as_object(body, "PredicateRequest")
        pod = self.service.pod(task_pod(body.get("task")))
        node = node_info(body.get("node"), parse_pod)
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

    def prioritize(self, body: Any) -> dict[str, Any]:
        body = as_object(body, "PrioritizeRequest")
        pod = self.service.pod(task_pod(body.get("task")))
        raw_nodes = body.get("nodes") or []
        if not isinstance(raw_nodes, list):
            raise ProtocolError("PrioritizeRequest.nodes: expected an array of NodeInfo")
        with self.service.request_view([node_info(n, parse_pod) for n in raw_nodes]) as (view, cycle):
            explanation = self.service.framework.score(pod, view, cycle)
        explanation.verb = "volcano-prioritize"
        self.service.explanations.record(explanation)
        self._count("prioritize", "ok")
        scale = self.config.volcano_score_scale
        totals = explanation.totals.tolist() if explanation.totals is not None else []
        return prioritize_result({n: round(t * scale, 3) for n, t in zip(view.names, totals, strict=True)})

    def victims(self, body: Any, verb: str) -> dict[str, Any]:
        """preemptable / reclaimable: an LS evictor may evict BE evictees (returned verbatim); a BE evictor none."""
        body = as_object(body, f"{verb} request")
        evictor = self.service.pod(task_pod(body.get("evictor"), "evictor"))
        evictees = body.get("evictees") or []
        if not isinstance(evictees, list):
            raise ProtocolError(f"{verb} request.evictees: expected an array of TaskInfo")
        victims = [t for t in evictees if isinstance(t, dict) and isinstance(t.get("Pod"), dict)
                   and evictor.qos == QoSClass.LS and parse_pod(t["Pod"]).qos == QoSClass.BE]
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
            fits: dict[tuple[tuple[str, int], ...], bool] = {}
            placeable = len(pods) - len(wanted)  # tasks without devices are not ours to judge
            for pod in wanted:
                shape = tuple(sorted(pod.accelerators.items()))
                if shape not in fits:
                    outcome = self.capacity.filter(pod, view, Cycle(pd=cache.pd, domains=cache.table))
                    fits[shape] = len(outcome.unresolvable) < len(view)
                placeable += fits[shape]
        if wanted and placeable < needed:
            impossible = [dict(s) for s, ok in fits.items() if not ok]
            return REJECT, (f"{len(pods) - placeable} of its tasks can never fit on any node (devices {impossible}), "
                            f"and it needs {needed} of {len(pods)}")
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
