"""The NPUClusterPolicy controller: one level-triggered reconcile of the whole stack, run whenever something it
watches changes (the policy, nodes, its workloads and pods) and every ``resync`` seconds regardless.

Each reconcile:

1. reads the policy ``cluster`` (none: nothing to do; being deleted: :func:`cleanup`, then the finalizer goes);
2. renders every enabled component (:mod:`fuyao.npu_operator.render`) and server-side applies it, owned by the policy;
   applying everything each time is what corrects drift (an edited or deleted child comes back). The components
   that use the NPUs through the driver (:data:`status.AFTER_DRIVER`) are held back while the driver check does not
   pass: neither applied nor pruned, so what runs stays as it is (the GPU Operator's state order);
3. prunes what the operator applied before but no longer wants (a component disabled, a chart object dropped);
4. keeps one validation pod per NPU node, re-run when what it validates changes or after a failure;
5. observes (workload status, allocatable NPUs, driver versions, validation results, the extender's ``/readyz``,
   every device plugin's ``/metrics``) and writes the status that :mod:`fuyao.npu_operator.status` computes from it.

Why the official client and not kopf: the reconcile is level-triggered, so a watch only has to say "something
changed"; ``fuyao.kube_watch.ListWatch`` (list + watch with resume and backoff, already used by three daemons)
does that, and server-side apply is one PATCH. kopf would bring its own event loop, handler registry and state
annotations for a controller with a single object.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from fuyao.contracts import (
    ACCELERATOR_ASCEND_NPU,
    ANNOTATION_NFD_LABELS,
    ANNOTATION_NODE_FAULTS,
    ANNOTATION_NODE_TOPOLOGY,
    ANNOTATION_NODE_USAGE,
    LABEL_ACCELERATE_TYPE,
    LABEL_ACCELERATOR,
    LABEL_APP_INSTANCE,
    LABEL_APP_NAME,
    LABEL_DEVICE_COUNT,
    LABEL_MANAGED_BY,
    LABEL_NPU_DRIVER,
    LABEL_NPU_FIRMWARE,
    LABEL_OPERATOR_COMPONENT,
    LABEL_OPERATOR_REVISION,
    NPU_RESOURCES,
    RESOURCE_BATCH_CPU,
    RESOURCE_BATCH_MEMORY,
    RESOURCE_NPU,
    RESOURCE_NPU_CORE,
    RESOURCE_VNPU,
)

from . import render
from .api import (
    GROUP,
    KIND,
    PLURAL,
    POLICY_NAME,
    VERSION,
    Component,
    ComponentStatus,
    PolicySpec,
    PolicyStatus,
    StateType,
)
from .kube import KINDS, KubeError, Rest, collection
from .render import MANAGER, RenderError, Settings
from .status import (
    Observed,
    Workload,
    driver_status,
    held_back,
    invalid_spec_status,
    policy_status,
    transitions,
    was_up,
)

log = logging.getLogger(__name__)

FINALIZER = f"{GROUP}/cleanup"
QOS_CLEANUP = f"{GROUP}/qos-cleanup-since"
"""The policy's annotation that says the operator removed the QoS agent it ran and has yet to remove what the agent
wrote on nodes, since when (RFC 3339). On the policy, not in memory, so an operator restarted meanwhile finishes it."""
POLICY_PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}/{POLICY_NAME}"
MANAGED = f"{LABEL_MANAGED_BY}={MANAGER}"
CLEANUP_TIMEOUT_S = 150.0
"""How long the uninstall hook waits for the operator's cleanup by default (the chart's ``operator.cleanupTimeout``,
which it passes to the operator too)."""
CLEANUP_MARGIN_S = 30.0
"""What the operator needs within the hook's timeout after its wait for the component pods: a pass to notice they
are gone, the node cleanup, the finalizer."""
MIN_STOP_WAIT_S = 30.0
"""The least wait for the component pods (their termination grace periods are 5 to 10 s)."""


def stop_wait(cleanup_timeout_s: float) -> float:
    """How long a deleted policy waits for its component pods to go before cleaning the nodes anyway, given the
    uninstall hook's timeout: what is left of it after :data:`CLEANUP_MARGIN_S`, so the operator has cleaned up
    before the hook gives up and does it itself (with pods that may still write their labels back). ValueError for
    a timeout that leaves less than :data:`MIN_STOP_WAIT_S`."""
    wait = cleanup_timeout_s - CLEANUP_MARGIN_S
    if wait < MIN_STOP_WAIT_S:
        raise ValueError(f"{cleanup_timeout_s:g}s is too short: a deleted policy waits for its components' pods "
                         f"{CLEANUP_MARGIN_S:g}s less than the cleanup timeout, and at least {MIN_STOP_WAIT_S:g}s "
                         f"(give {CLEANUP_MARGIN_S + MIN_STOP_WAIT_S:g}s or more)")
    return wait


STOP_WAIT_S = stop_wait(CLEANUP_TIMEOUT_S)
"""How long a deleted policy waits for its component pods by default."""
MONITORING = "monitoring.coreos.com/v1"


@dataclass
class Controller:
    rest: Rest
    settings: Settings
    resync_s: float = 30.0
    validator_retry_s: float = 60.0
    probe_timeout_s: float = 2.0
    probe: Callable[[str, float], bool] | None = None
    """GET a URL, True when it answers 200 (tests replace it; default: urllib)."""
    _renders: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    min_interval_s: float = 5.0
    """The least time between passes woken by node, pod or workload events (the policy's wake at once)."""
    reconciles: int = 0
    last_error: str = ""
    _urgent: bool = False
    _stopping_since: float | None = None  # when the deletion of the policy began waiting for component pods
    _kick: threading.Event = field(default_factory=threading.Event)  # ends a min_interval_s wait: urgent, stop
    stop_wait_s: float = STOP_WAIT_S
    """How long a deleted policy waits for its component pods (:func:`stop_wait` of the hook's timeout)."""
    _qos_leftovers_since: float | None = None
    """When the operator removed its QoS agent (wall clock), until its node keys go: :data:`QOS_CLEANUP`, as this
    pass read it and wrote it."""

    # The loop ----------------------------------------------------------------------------------------------------
    def wake(self, urgent: bool = False) -> None:
        """Reconcile soon: at once when ``urgent`` (the policy changed), else no sooner than ``min_interval_s``
        after the last pass (node and pod events of a large cluster arrive all the time)."""
        if urgent:
            self._urgent = True
            self._kick.set()
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        self._wake.set()

    def run(self) -> None:
        """Reconcile until stopped: on every wake-up (debounced by 0.3 s; other than the policy's, at most once
        per ``min_interval_s``) and every ``resync_s``."""
        last = -float("inf")
        while not self._stop.is_set():
            self._wake.wait(self.resync_s)
            if self._stop.is_set():
                return
            time.sleep(0.3)  # a burst of watch events makes one reconcile
            wait = self.min_interval_s - (time.monotonic() - last)
            self._kick.clear()
            if not self._urgent and wait > 0:
                self._kick.wait(wait)  # events meanwhile fold into this pass; the policy's or stop() end it
                if self._stop.is_set():
                    return
            self._wake.clear()
            self._urgent = False
            last = time.monotonic()
            try:
                self.reconcile()
                self.last_error = ""
            except Exception as exc:
                self.last_error = str(exc)
                log.exception("reconcile failed (retrying in 5s)")
                self._stop.wait(5.0)
                self._wake.set()

    # One pass ----------------------------------------------------------------------------------------------------
    def reconcile(self) -> PolicyStatus | None:
        self.reconciles += 1
        policy = self.rest.get(POLICY_PATH)
        if policy is None:
            return None
        meta = policy["metadata"]
        if meta.get("deletionTimestamp"):
            running = self._stop_components()
            if running:  # their pods would write the node labels back after the cleanup: wait until they are gone
                log.info("policy %s is being deleted: waiting for %d component pods to go (%s)", POLICY_NAME,
                         len(running), ", ".join(running[:10]))
                self._wake_in(2.0)
                return None
            cleanup(self.rest, self.settings.namespace)
            self._stopping_since = None
            if FINALIZER in (meta.get("finalizers") or []):
                self._drop_finalizer(policy)
            return None
        self._stopping_since = None  # a policy that is not being deleted (again): a later deletion waits afresh
        self._qos_leftovers_since = qos_cleanup_since(meta)
        if FINALIZER not in (meta.get("finalizers") or []):
            self.rest.merge_patch(POLICY_PATH, {"metadata": {
                "finalizers": [*(meta.get("finalizers") or []), FINALIZER],
                "resourceVersion": meta["resourceVersion"]}})
        try:
            spec = PolicySpec.model_validate(policy.get("spec") or {})
        except ValidationError as exc:  # the CRD's schema prevents this; an older CRD might not
            first = exc.errors()[0]
            where = ".".join(str(p) for p in ("spec", *first["loc"]))
            problem = f"{where}: {first['msg']}"
            log.error("policy spec is invalid: %s", problem)
            previous = _status_model(policy.get("status"))
            status = invalid_spec_status(problem, int(meta.get("generation") or 0), previous)
            body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
            if status_differs(body, policy.get("status")):
                self.rest.merge_patch(POLICY_PATH + "/status", {"status": body})
            return status
        nodes = self.rest.list("/api/v1/nodes")
        npu_nodes = sorted(n["metadata"]["name"] for n in nodes
                           if (n["metadata"].get("labels") or {}).get(LABEL_ACCELERATOR) == ACCELERATOR_ASCEND_NPU)
        drivers, firmware = node_versions(nodes, npu_nodes)
        held = held_back(spec, driver_status(spec, Observed(npu_nodes=tuple(npu_nodes), driver_versions=drivers,
                                                            firmware_versions=firmware)))
        if held:
            log.info("not rolling out %s: %s", ", ".join(c.value for c in held), next(iter(held.values())))
        errors: dict[Component, str] = {}
        desired = self._desired(spec, policy, errors, held)
        applied = self._apply(desired, errors)
        self._prune({render.key(o) for o in desired}, errors, held)
        pods = self.rest.list(collection("v1", "pods", self.settings.namespace))
        allocatable = {n["metadata"]["name"]: (n.get("status") or {}).get("allocatable") or {} for n in nodes}
        validation = self._validate(spec, policy, npu_nodes, pods, applied, allocatable)
        previous = _status_model(policy.get("status"))
        self._remove_qos_leftovers(spec, previous, nodes, pods)
        seen = self._observe(spec, nodes, npu_nodes, pods, applied, validation, errors, was_up(previous), held)
        status = policy_status(spec, seen, int(meta.get("generation") or 0), previous)
        body = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        if status_differs(body, policy.get("status")):
            self.rest.merge_patch(POLICY_PATH + "/status", {"status": body})
            for changed in transitions(previous, status):
                self._event(policy, changed)
        return status

    def _stop_components(self) -> list[str]:
        """Delete the component DaemonSets and Deployments; the names of their pods still running (a discovery or
        QoS pod would write its node labels back after the cleanup), found by their charts' labels (so an operator
        restarted mid-deletion still waits for them). After :data:`STOP_WAIT_S` of waiting (pods stuck terminating
        on a dead node) none are waited for any more."""
        ns = self.settings.namespace
        for kind in ("DaemonSet", "Deployment"):
            api_version, plural, namespaced = KINDS[kind]
            for obj in self.rest.list(collection(api_version, plural, ns if namespaced else None), MANAGED):
                self.rest.delete(obj)
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
        if time.monotonic() - self._stopping_since > self.stop_wait_s:
            return []
        return component_pods(self.rest.list(collection("v1", "pods", ns)), set(render.CHARTS.values()),
                              nfd=True)

    def _remove_qos_leftovers(self, spec: PolicySpec, previous: PolicyStatus | None,
                              nodes: list[dict[str, Any]], pods: list[dict[str, Any]]) -> None:
        """Once the QoS agent the operator ran is disabled and its pods are gone, remove what it wrote on nodes: its
        extended resources (no kubelet owns them, so they would stay in every node's status) and its usage
        annotation. Only after the operator removed its own agent (it pruned it, or the last status showed it
        enabled), never for one installed otherwise while the policy's is off. That it is pending is kept on the
        policy (:data:`QOS_CLEANUP`), so an operator restarted during the wait still does it. Pods stuck terminating
        are waited for no longer than a deleted policy waits for its components."""
        if spec.enabled(Component.QOS_AGENT):
            if self._qos_leftovers_since is not None:  # enabled again before the cleanup: its resources are its own
                self._set_qos_cleanup(None)
            return
        was_enabled = any(s.name == Component.QOS_AGENT and s.state.type != StateType.DISABLED
                          for s in (previous.component_statuses if previous else ()))
        if was_enabled:
            self._begin_qos_cleanup()
        if self._qos_leftovers_since is None:
            return
        waiting = component_pods(pods, {render.CHARTS[Component.QOS_AGENT]})
        if waiting and time.time() - self._qos_leftovers_since <= self.stop_wait_s:
            log.info("qosAgent disabled: waiting for %d of its pods to go before removing its node resources",
                     len(waiting))
            return
        for node in nodes:
            patches = qos_node_patches(node)
            for path, patch in patches:
                try:
                    self.rest.merge_patch(path, patch)
                except KubeError as exc:
                    if exc.status != 404:  # a node deleted meanwhile has nothing left to remove
                        raise
            if patches:
                log.info("node %s: removed what the disabled QoS agent wrote", node["metadata"]["name"])
        self._set_qos_cleanup(None)

    def _begin_qos_cleanup(self) -> None:
        """Record on the policy that the QoS agent's node keys are to be removed (once; the first time stays)."""
        if self._qos_leftovers_since is None:
            self._set_qos_cleanup(time.time())

    def _set_qos_cleanup(self, since: float | None) -> None:
        at = None if since is None else datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.rest.merge_patch(POLICY_PATH, {"metadata": {"annotations": {QOS_CLEANUP: at}}})
        self._qos_leftovers_since = since

    def _wake_in(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self._wake.set)
        timer.daemon = True
        timer.start()

    def _event(self, policy: Mapping[str, Any], changed: ComponentStatus) -> None:
        """A Kubernetes Event on the policy for a component's state change (``kubectl describe`` shows them)."""
        state = changed.state
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta = policy["metadata"]
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": "default"},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                               "uid": meta["uid"]},
            "reason": f"Component{state.type.value.capitalize()}",
            "message": f"{changed.name.value}: {state.type.value} ({state.reason}) {state.message}"[:1024],
            "type": "Warning" if state.type in (StateType.DEGRADED, StateType.FAILED) else "Normal",
            "source": {"component": MANAGER}, "reportingComponent": MANAGER, "reportingInstance": MANAGER,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        try:
            self.rest.request("POST", "/api/v1/namespaces/default/events", body=event)
        except KubeError as exc:  # an event is a courtesy; the status already says it
            log.warning("cannot record an event: %s", exc)

    def _drop_finalizer(self, policy: Mapping[str, Any]) -> None:
        meta = policy["metadata"]
        keep = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        self.rest.merge_patch(POLICY_PATH, {"metadata": {"finalizers": keep or None,
                                                         "resourceVersion": meta["resourceVersion"]}})
        log.info("policy %s deleted: its components are removed", POLICY_NAME)

    def _api_versions(self) -> tuple[str, ...]:
        try:
            kinds = self.rest.served(MONITORING)
        except KubeError:
            kinds = set()
        return tuple(f"{MONITORING}/{k}" for k in sorted(kinds & {"ServiceMonitor", "PrometheusRule"}))

    def _desired(self, spec: PolicySpec, policy: Mapping[str, Any], errors: dict[Component, str],
                 held: Mapping[Component, str] | None = None) -> list[dict[str, Any]]:
        """The objects of every enabled component but those ``held`` back (:func:`status.held_back`)."""
        out: list[dict[str, Any]] = []
        ns = self.settings.namespace
        api_versions = self._api_versions()
        for component, chart in render.CHARTS.items():
            if not spec.enabled(component) or component in (held or {}):
                continue
            try:
                values = render.chart_values(spec, component, self.settings)
                cache_key = json.dumps([chart, ns, api_versions, values], sort_keys=True, default=str)
                if cache_key not in self._renders:
                    if len(self._renders) >= 64:  # spec edits over months: keep the cache bounded
                        self._renders.clear()
                    self._renders[cache_key] = render.helm_template(
                        self.settings.charts_dir / chart, chart, ns, values, helm=self.settings.helm,
                        api_versions=api_versions)
            except RenderError as exc:
                errors[component] = str(exc)
                continue
            except (TypeError, AttributeError, ValueError) as exc:  # values of a shape the chart cannot take
                errors[component] = f"spec.{component.value} cannot be rendered: {type(exc).__name__}: {exc}"
                continue
            out += render.owned(self._renders[cache_key], policy, component, ns)
        if spec.enabled(Component.NODE_FEATURE_DISCOVERY):
            out += render.owned(render.nfd_objects(self.settings), policy, Component.NODE_FEATURE_DISCOVERY, ns)
        return out

    def _apply(self, desired: list[dict[str, Any]], errors: dict[Component, str]) -> list[dict[str, Any]]:
        applied = []
        for obj in desired:
            component = Component(obj["metadata"]["labels"][LABEL_OPERATOR_COMPONENT])
            try:
                applied.append(self.rest.apply(obj))
            except KubeError as exc:
                errors.setdefault(component, f"applying {obj['kind']} {obj['metadata']['name']}: {exc}")
        return applied

    def _prune(self, wanted: set[tuple[str, str, str, str]], errors: dict[Component, str],
               held: Mapping[Component, str] | None = None) -> None:
        ns = self.settings.namespace
        failed = {c.value for c in (*errors, *(held or {}))}
        for kind, (api_version, plural, namespaced) in KINDS.items():
            if kind == "Pod":
                continue
            try:
                found = self.rest.list(collection(api_version, plural, ns if namespaced else None), MANAGED)
            except KubeError as exc:
                if exc.status in (403, 404):  # a kind the cluster does not serve (ServiceMonitor)
                    continue
                raise
            for obj in found:
                label = (obj["metadata"].get("labels") or {}).get(LABEL_OPERATOR_COMPONENT, "")
                if label in failed:  # a component that could not be rendered, or is held back, keeps what it runs
                    continue
                if render.key(obj) not in wanted:
                    log.info("removing %s %s (no longer wanted by the policy)", kind, obj["metadata"]["name"])
                    if label == Component.QOS_AGENT.value:  # recorded before the delete: its node resources go
                        self._begin_qos_cleanup()  # once its pods have, even if this process does not live that long
                    try:
                        self.rest.delete(obj)
                    except KubeError as exc:
                        if exc.status == 403 and not namespaced:
                            # a cluster-scoped object named otherwise than the charts (an earlier fullnameOverride):
                            # the operator's RBAC may touch only its components' own names; a person removes it
                            log.warning("cannot remove %s %s (not one of the names the operator may write): delete "
                                        "it by hand", kind, obj["metadata"]["name"])
                            continue
                        label = (obj["metadata"].get("labels") or {}).get(LABEL_OPERATOR_COMPONENT, "")
                        if label in {c.value for c in Component}:
                            errors.setdefault(Component(label), f"removing {kind} {obj['metadata']['name']}: {exc}")

    # Validation pods ---------------------------------------------------------------------------------------------
    def _validate(self, spec: PolicySpec, policy: Mapping[str, Any], npu_nodes: list[str],
                  pods: list[dict[str, Any]], applied: list[dict[str, Any]],
                  allocatable: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, tuple[bool | None, str]]:
        mine = {p["metadata"]["name"]: p for p in pods
                if (p["metadata"].get("labels") or {}).get(LABEL_OPERATOR_COMPONENT) == Component.VALIDATOR.value}
        if not spec.enabled(Component.VALIDATOR):
            for pod in mine.values():
                self.rest.delete(pod)
            return {}
        plugin = [o.get("spec") for o in applied
                  if o.get("kind") == "DaemonSet"
                  and o["metadata"]["labels"].get(LABEL_OPERATOR_COMPONENT) == Component.DEVICE_PLUGIN.value]
        rev = render.revision(plugin, spec.validator.image or self.settings.image)
        # the device plugin not applied this pass (an error, a render problem): its revision is unknown, and the
        # validation pods of the last known one stay (not all re-run for an error, and again when it clears)
        rev_known = bool(plugin) or not spec.enabled(Component.DEVICE_PLUGIN)
        wanted = {render.validator_name(n): n for n in npu_nodes}
        resource = {n: validator_resource(spec, (allocatable or {}).get(n) or {}) for n in npu_nodes}
        results: dict[str, tuple[bool | None, str]] = {}
        now = time.time()
        for name, pod in mine.items():
            labels = pod["metadata"].get("labels") or {}
            stale = name not in wanted or (rev_known and labels.get(LABEL_OPERATOR_REVISION) != rev) or (
                (pod.get("status") or {}).get("phase") == "Pending"
                and _requested(pod) != resource.get(wanted[name]))  # waits for a resource the node does not offer
            failed_at = _finished_at(pod) if (pod.get("status") or {}).get("phase") == "Failed" else None
            if stale or (failed_at is not None and now - failed_at > self.validator_retry_s):
                self.rest.delete(pod)
                mine[name] = {}
        for name, node in wanted.items():
            found = mine.get(name)
            if not found and not rev_known:
                results[node] = (None, "waiting for the device plugin to be applied")
                continue
            if not found:
                manifest = render.owned([render.validator_pod(node, self.settings, rev, spec.validator.image,
                                                              resource[node])],
                                        policy, Component.VALIDATOR, self.settings.namespace)[0]
                try:
                    self.rest.create(manifest)
                except KubeError as exc:
                    if exc.status != 409:  # 409: the old pod is still terminating; next pass
                        results[node] = (False, f"cannot create the validation pod: {exc}")
                        continue
                results[node] = (None, "")
                continue
            results[node] = _validation_result(found)
        return results

    # Observation -------------------------------------------------------------------------------------------------
    def _observe(self, spec: PolicySpec, nodes: list[dict[str, Any]], npu_nodes: list[str],
                 pods: list[dict[str, Any]], applied: list[dict[str, Any]],
                 validation: Mapping[str, tuple[bool | None, str]], errors: Mapping[Component, str],
                 up: frozenset[Component] = frozenset(),
                 held: Mapping[Component, str] | None = None) -> Observed:
        by_name = {n["metadata"]["name"]: n for n in nodes}
        allocatable = {}
        for name in npu_nodes:
            alloc = (by_name[name].get("status") or {}).get("allocatable") or {}
            allocatable[name] = sum(_int(alloc.get(r)) for r in NPU_RESOURCES)
        drivers, firmware = node_versions(nodes, npu_nodes)
        workloads: dict[Component, Workload] = {}
        extender_url = ""
        metrics_urls: dict[str, str] = {}
        for obj in applied:
            labels = obj["metadata"].get("labels") or {}
            component = Component(labels[LABEL_OPERATOR_COMPONENT])
            if obj.get("kind") in ("DaemonSet", "Deployment"):
                workloads[component] = _workload(obj, pods, nodes)
                if component == Component.DEVICE_PLUGIN:
                    metrics_urls = _metrics_urls(obj, pods)
            if obj.get("kind") == "Service" and component == Component.SCHEDULER_EXTENDER:
                extender_url = _service_url(obj)
        if Component.DEVICE_PLUGIN in workloads:
            workloads[Component.VNPU] = workloads[Component.DEVICE_PLUGIN]
            if spec.exporter.enabled:
                workloads[Component.EXPORTER] = self._probe_metrics(workloads[Component.DEVICE_PLUGIN], metrics_urls)
        answers = None
        if extender_url and spec.enabled(Component.SCHEDULER_EXTENDER):
            answers = self._get(extender_url + "/readyz")
        return Observed(npu_nodes=tuple(npu_nodes), workloads=workloads, allocatable=allocatable,
                        driver_versions=drivers, firmware_versions=firmware, validation=validation,
                        extender_answers=answers, errors=dict(errors), was_up=up,
                        foreign_accelerators=foreign_accelerators(nodes), held=dict(held or {}))

    def _get(self, url: str) -> bool:
        if self.probe is not None:
            return self.probe(url, self.probe_timeout_s)
        try:
            with urllib.request.urlopen(url, timeout=self.probe_timeout_s) as response:
                return bool(response.status == 200)
        except Exception:
            return False

    def _probe_metrics(self, plugin: Workload, urls: Mapping[str, str]) -> Workload:
        """Every node's exporter asked at once (at most 32 in flight): a pass over a hundred unreachable ones
        takes a timeout or a few, not a hundred."""
        if urls:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(urls))) as pool:
                answered = dict(zip(urls, pool.map(self._get, urls.values()), strict=True))
        else:
            answered = {}
        silent = tuple(sorted(node for node, ok in answered.items() if not ok))
        return Workload(desired=plugin.desired, ready=len(urls) - len(silent), updated=plugin.updated,
                        generation_seen=plugin.generation_seen, not_ready_nodes=silent + tuple(
                            n for n in plugin.not_ready_nodes if n not in urls), version=plugin.version)


# ---------------------------------------------------------------------------------------------------------------
# Cleanup (the policy's finalizer, and `fuyao-npu-operator cleanup` for helm's pre-delete hook)
# ---------------------------------------------------------------------------------------------------------------
COMPONENT_NODE_LABELS = frozenset({LABEL_ACCELERATE_TYPE, LABEL_DEVICE_COUNT, LABEL_NPU_DRIVER})
"""Node labels the device plugin writes (besides ``accelerator``, which an administrator may have set)."""
COMPONENT_NODE_ANNOTATIONS = frozenset({ANNOTATION_NODE_TOPOLOGY, ANNOTATION_NODE_FAULTS, ANNOTATION_NODE_USAGE})
"""Node annotations the device plugin and the QoS agent write."""
QOS_NODE_RESOURCES = (RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY)
"""Extended resources the QoS agent writes into nodes' status (capacity and allocatable). No device plugin
registers them, so the kubelet keeps them after the agent is gone: only removing them takes them away."""
QOS_NODE_ANNOTATIONS = frozenset({ANNOTATION_NODE_USAGE})
"""Node annotations the QoS agent writes."""


def _node_path(node: Mapping[str, Any]) -> str:
    return f"/api/v1/nodes/{quote(node['metadata']['name'])}"


def _status_resources_patch(node: Mapping[str, Any], resources: Sequence[str]) -> dict[str, Any] | None:
    """The ``nodes/status`` merge patch that deletes ``resources`` from the node's capacity and allocatable (a null
    value deletes the key), naming only the keys the node has; None when it has none of them."""
    status = node.get("status") or {}
    fields = {name: dict.fromkeys(r for r in resources if r in (status.get(name) or {}))
              for name in ("capacity", "allocatable")}
    fields = {name: keys for name, keys in fields.items() if keys}
    return {"status": fields} if fields else None


def qos_node_patches(node: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(path, merge patch) for each request that removes what the QoS agent wrote on ``node``: its extended
    resources from the node's status, its usage annotation. Empty when the node has neither."""
    out: list[tuple[str, dict[str, Any]]] = []
    resources = _status_resources_patch(node, QOS_NODE_RESOURCES)
    if resources is not None:
        out.append((_node_path(node) + "/status", resources))
    notes = sorted(QOS_NODE_ANNOTATIONS & set(node["metadata"].get("annotations") or {}))
    if notes:
        out.append((_node_path(node), {"metadata": {"annotations": dict.fromkeys(notes)}}))
    return out


def node_cleanup(node: Mapping[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """(path, merge patch) for each request that removes what the stack wrote on ``node``, and what they remove
    (empty when there is nothing): the labels discovery recorded (an ``accelerator`` label whose value is no longer
    the one discovery writes was changed by someone else, and stays), the labels and annotations the components
    write, the QoS agent's extended resources."""
    meta = node["metadata"]
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    recorded = {k for k in (annotations.get(ANNOTATION_NFD_LABELS) or "").split(",") if k}
    if labels.get(LABEL_ACCELERATOR) != ACCELERATOR_ASCEND_NPU:
        recorded.discard(LABEL_ACCELERATOR)
    keys = sorted((recorded & set(labels)) | (COMPONENT_NODE_LABELS & set(labels)))
    notes = sorted(({ANNOTATION_NFD_LABELS} | COMPONENT_NODE_ANNOTATIONS) & set(annotations))
    resources = _status_resources_patch(node, QOS_NODE_RESOURCES)
    patches: list[tuple[str, dict[str, Any]]] = []
    if keys or notes:
        patches.append((_node_path(node), {"metadata": {"labels": dict.fromkeys(keys),
                                                        "annotations": dict.fromkeys(notes)}}))
    if resources is not None:
        patches.append((_node_path(node) + "/status", resources))
    if not patches:
        return [], ""
    removed = sorted({r for fields in (resources or {}).get("status", {}).values() for r in fields})
    return patches, (f"node {meta['name']}: removed labels {', '.join(keys) or '-'}, annotations "
                     f"{', '.join(notes) or '-'}, resources {', '.join(removed) or '-'}")


def cleanup(rest: Rest, namespace: str) -> list[str]:
    """Undo what ownership does not (:func:`node_cleanup` on every node: the labels discovery set, exactly the keys
    it recorded, so a label an administrator set stays; the labels, annotations and extended resources the
    components write on nodes) and delete the validation pods. Every other object is owned by the policy and goes
    with it. Returns what it did."""
    done = []
    for node in rest.list("/api/v1/nodes"):
        patches, what = node_cleanup(node)
        for path, patch in patches:
            rest.merge_patch(path, patch)
        if what:
            done.append(what)
    for pod in rest.list(collection("v1", "pods", namespace),
                         f"{LABEL_OPERATOR_COMPONENT}={Component.VALIDATOR.value}"):
        if rest.delete(pod):
            done.append(f"pod {pod['metadata']['name']} deleted")
    return done


# ---------------------------------------------------------------------------------------------------------------
# Reading workload and pod status (pure)
# ---------------------------------------------------------------------------------------------------------------
def qos_cleanup_since(meta: Mapping[str, Any]) -> float | None:
    """When the policy's :data:`QOS_CLEANUP` says the pending QoS cleanup began (epoch seconds); None when there is
    none. A value that does not parse (edited by hand) counts as pending since 0: its wait is over."""
    raw = (meta.get("annotations") or {}).get(QOS_CLEANUP)
    if raw is None:
        return None
    try:
        return datetime.strptime(str(raw), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


def node_versions(nodes: Sequence[Mapping[str, Any]], npu_nodes: Sequence[str]
                  ) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """(driver, firmware) versions of each NPU node, as discovery labelled them (None: not labelled)."""
    labels = {n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in nodes}
    return ({n: labels.get(n, {}).get(LABEL_NPU_DRIVER) for n in npu_nodes},
            {n: labels.get(n, {}).get(LABEL_NPU_FIRMWARE) for n in npu_nodes})


def _int(value: Any) -> int:
    try:
        return int(str(value or 0))
    except ValueError:
        return 0


def _selected(obj: Mapping[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    match = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return [p for p in pods if match and all((p["metadata"].get("labels") or {}).get(k) == v
                                             for k, v in match.items())
            and not p["metadata"].get("deletionTimestamp")]


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _pod_node(pod: Mapping[str, Any]) -> str:
    """The node a pod runs on, or is meant for: a DaemonSet's pod names its node in a required node affinity before
    the scheduler binds it. Its own name when neither says."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    terms = (((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    for term in terms:
        for match in term.get("matchFields") or []:
            if match.get("key") == "metadata.name" and match.get("operator") == "In" and match.get("values"):
                return str(match["values"][0])
    return f"pod {pod['metadata']['name']} (not scheduled)"


def _image_tag(obj: Mapping[str, Any]) -> str | None:
    containers = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    image = containers[0].get("image", "") if containers else ""
    return image.rpartition(":")[2] or None


def _workload(obj: Mapping[str, Any], pods: list[dict[str, Any]],
              nodes: Sequence[Mapping[str, Any]] = ()) -> Workload:
    """A DaemonSet's or Deployment's state. ``nodes`` (a DaemonSet's candidates): between a pod's deletion and its
    replacement's creation, the node its DaemonSet selects but that has no pod is named as not ready."""
    status = obj.get("status") or {}
    generation_seen = _int(status.get("observedGeneration")) >= _int(obj["metadata"].get("generation"))
    mine = _selected(obj, pods)
    not_ready = {_pod_node(p) for p in mine if not _ready(p)}
    if obj["kind"] == "DaemonSet":
        desired, ready = _int(status.get("desiredNumberScheduled")), _int(status.get("numberReady"))
        updated = _int(status.get("updatedNumberScheduled"))
        if desired - ready > len(not_ready):
            selector = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get("nodeSelector") or {}
            with_pod = {_pod_node(p) for p in mine}
            not_ready |= {str(n["metadata"]["name"]) for n in nodes
                          if n["metadata"]["name"] not in with_pod
                          and all((n["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())}
    else:
        desired = _int((obj.get("spec") or {}).get("replicas", 1))
        ready, updated = _int(status.get("readyReplicas")), _int(status.get("updatedReplicas"))
    return Workload(desired=desired, ready=ready, updated=updated, generation_seen=generation_seen,
                    not_ready_nodes=tuple(sorted(not_ready)), version=_image_tag(obj))


def _metrics_urls(plugin: Mapping[str, Any], pods: list[dict[str, Any]]) -> dict[str, str]:
    containers = plugin["spec"]["template"]["spec"]["containers"]
    port = next((p["containerPort"] for c in containers for p in c.get("ports") or [] if p.get("name") == "metrics"),
                None)
    if port is None:
        return {}
    return {_pod_node(p): f"http://{p['status']['podIP']}:{port}/metrics"
            for p in _selected(plugin, pods) if (p.get("status") or {}).get("podIP") and _ready(p)}


def _service_url(service: Mapping[str, Any]) -> str:
    spec = service.get("spec") or {}
    ip, ports = spec.get("clusterIP"), spec.get("ports") or []
    if not ip or ip == "None" or not ports:
        return ""
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{ports[0]['port']}"


def _finished_at(pod: Mapping[str, Any]) -> float | None:
    """When a failed pod finished: its container's end, else (a pod the kubelet refused at admission has no
    container) when it started, or was created."""
    status = pod.get("status") or {}
    candidates = [((c.get("state") or {}).get("terminated") or {}).get("finishedAt")
                  for c in status.get("containerStatuses") or []]
    candidates += [status.get("startTime"), (pod.get("metadata") or {}).get("creationTimestamp")]
    for at in candidates:
        if at:
            try:
                return datetime.strptime(str(at), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
            except ValueError:
                continue
    return None


def validator_resource(spec: PolicySpec, allocatable: Mapping[str, Any]) -> str:
    """What a node's validation pod asks for: one whole NPU, or where vNPUs take the dies (dynamic mode offers
    cores only; a static plan may carve every die) one vNPU or one core, whichever the node offers."""
    order = list(NPU_RESOURCES)
    if spec.vnpu.enabled and spec.vnpu.mode == "dynamic":
        order = [RESOURCE_NPU_CORE, RESOURCE_NPU, RESOURCE_VNPU]
    for resource in order:
        if _int(allocatable.get(resource)) > 0:
            return resource
    return order[0]


def _requested(pod: Mapping[str, Any]) -> str | None:
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    return next((r for r in NPU_RESOURCES if r in limits), None)


def _validation_result(pod: Mapping[str, Any]) -> tuple[bool | None, str]:
    """(passed?, message) from a validation pod: its container's termination message, or why it has none yet."""
    status = pod.get("status") or {}
    phase = status.get("phase")
    message = ""
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated") or {}
        message = (terminated.get("message") or terminated.get("reason") or "").strip()
    if phase == "Succeeded":
        return True, message
    if phase == "Failed":
        return False, message or status.get("message") or "the validation pod failed"
    waiting = [c.get("message") or c.get("reason") for c in status.get("conditions") or []
               if c.get("type") == "PodScheduled" and c.get("status") == "False"]
    return None, f"pending: {waiting[0]}" if waiting and waiting[0] else ""


def component_pods(pods: Sequence[Mapping[str, Any]], releases: set[str], nfd: bool = False) -> list[str]:
    """The names of the pods still running (or starting) of the charts released as ``releases``, found by their
    charts' labels (so an operator restarted meanwhile still finds them); ``nfd``: discovery's too."""
    def ours(pod: Mapping[str, Any]) -> bool:
        labels = pod["metadata"].get("labels") or {}
        return labels.get(LABEL_APP_INSTANCE) in releases or (nfd and labels.get(LABEL_APP_NAME) == render.NFD_NAME)

    return [p["metadata"]["name"] for p in pods
            if ours(p) and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]


def foreign_accelerators(nodes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Node → value, for the nodes where discovery found NPUs (it recorded the labels it set) but ``accelerator``
    holds a value someone else set (MindCluster's and Volcano's ``huawei-Ascend910``...): discovery leaves it, so the
    components, which select discovery's value, do not run there."""
    out = {}
    for node in nodes:
        meta = node["metadata"]
        value = (meta.get("labels") or {}).get(LABEL_ACCELERATOR)
        if (meta.get("annotations") or {}).get(ANNOTATION_NFD_LABELS) and value not in (None, ACCELERATOR_ASCEND_NPU):
            out[str(meta["name"])] = str(value)
    return out


def status_differs(body: Mapping[str, Any], stored: Any) -> bool:
    """Whether writing ``body`` (a merge patch of ``status``) changes the stored status. Keys of the stored status
    the operator does not write (a newer operator's, left after a rollback) are left alone by the patch, so they do
    not count: otherwise every pass would write the status again."""
    before = stored if isinstance(stored, Mapping) else {}
    return any(before.get(key) != value for key, value in body.items())


_SALVAGE_ROUNDS = 8


def _status_model(raw: Any) -> PolicyStatus | None:
    """The stored status as far as this operator reads it: keys it does not know (a newer operator's, left after a
    rollback) and list entries it cannot read are left out, so what it does read keeps its ``lastTransitionTime``
    and its components' states. A status it could not read at all would be written anew on every pass, with new
    transition times and an Event per component."""
    if not isinstance(raw, Mapping) or not raw:
        return None
    data: dict[str, Any] = copy.deepcopy(dict(raw))
    for _ in range(_SALVAGE_ROUNDS):
        try:
            return PolicyStatus.model_validate(data)
        except ValidationError as exc:
            if not _drop_unreadable(data, exc):
                return None
    return None


def _drop_unreadable(data: dict[str, Any], exc: ValidationError) -> bool:
    """Remove from ``data`` what each error of ``exc`` is about: an unknown key itself; otherwise the innermost list
    entry holding the bad value, or else the top-level key (its field then takes its default). True when anything
    was removed."""
    targets: set[tuple[str | int, ...]] = set()
    for error in exc.errors():
        loc = tuple(error["loc"])
        if not loc:
            continue
        if error["type"] == "extra_forbidden":
            targets.add(loc)
            continue
        entries = [i for i, part in enumerate(loc) if isinstance(part, int)]
        targets.add(loc[: entries[-1] + 1] if entries else loc[:1])
    removed = False
    # deepest first, and a list's later entries before its earlier ones, so every path still points where it did
    for path in sorted(targets, key=lambda p: (len(p), [(0, x) if isinstance(x, int) else (1, x) for x in p]),
                       reverse=True):
        parent: Any = data
        for part in path[:-1]:
            parent = parent[part] if _holds(parent, part) else None
        if _holds(parent, path[-1]):
            del parent[path[-1]]
            removed = True
    return removed


def _holds(container: Any, key: str | int) -> bool:
    if isinstance(container, dict):
        return key in container
    return isinstance(container, list) and isinstance(key, int) and 0 <= key < len(container)


class PolicyEvents:
    """The policy watch's sink (:class:`fuyao.kube_watch.ListWatch`): ``wake`` (a pass at once) when a policy
    appears or goes, its spec changes (``metadata.generation``) or its deletion begins, and for nothing else: the
    operator's own writes (its status above all, its finalizer) would otherwise each start the next pass at once,
    which writes the status again (the GPU Operator's GenerationChangedPredicate). The resync covers the rest."""

    def __init__(self, wake: Callable[[], None]):
        self._wake = wake
        self._seen: dict[str, tuple[int, bool]] = {}

    @staticmethod
    def _mark(obj: Mapping[str, Any]) -> tuple[str, tuple[int, bool]]:
        meta = obj.get("metadata") or {}
        return str(meta.get("name", "")), (_int(meta.get("generation")), bool(meta.get("deletionTimestamp")))

    def replace(self, items: list[dict[str, Any]]) -> None:
        seen = dict(self._mark(obj) for obj in items)
        changed, self._seen = seen != self._seen, seen
        if changed:
            self._wake()

    def upsert(self, obj: dict[str, Any]) -> None:
        name, mark = self._mark(obj)
        if self._seen.get(name) != mark:
            self._seen[name] = mark
            self._wake()

    def delete(self, obj: dict[str, Any]) -> None:
        self._seen.pop(self._mark(obj)[0], None)
        self._wake()
