"""The policy's status as a pure function of what the operator observes: per component a state (running, pending,
degraded, failed, disabled) with a reason and a message that names the nodes concerned, node counts, and the
Ready / Progressing / Degraded conditions. The controller gathers the observations; nothing here does I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from fuyao.contracts import ACCELERATOR_ASCEND_NPU, LABEL_ACCELERATOR, RESOURCE_NPU

from .api import (
    Component,
    ComponentState,
    ComponentStatus,
    Condition,
    NodeCounts,
    PolicySpec,
    PolicyStatus,
    StateType,
)
from .render import vnpu_config_problem

S = StateType
MAX_NAMED = 5  # nodes named in a message before "and N more"


@dataclass(frozen=True)
class Workload:
    """A DaemonSet or Deployment the operator applied, as its status and pods report it."""

    exists: bool = True
    desired: int = 0
    ready: int = 0
    updated: int = 0  # pods running the current spec
    generation_seen: bool = True  # status.observedGeneration ≥ metadata.generation
    not_ready_nodes: tuple[str, ...] = ()  # nodes whose pod is not ready (for DaemonSets)
    version: str | None = None


@dataclass(frozen=True)
class Observed:
    """Everything the status is computed from."""

    npu_nodes: tuple[str, ...] = ()  # nodes labelled as NPU nodes
    workloads: Mapping[Component, Workload] = field(default_factory=dict)
    allocatable: Mapping[str, int] = field(default_factory=dict)  # NPU node → allocatable NPUs
    driver_versions: Mapping[str, str | None] = field(default_factory=dict)  # NPU node → version (None: unknown)
    firmware_versions: Mapping[str, str | None] = field(default_factory=dict)  # NPU node → firmware version
    validation: Mapping[str, tuple[bool | None, str]] = field(default_factory=dict)  # node → (passed?, message)
    extender_answers: bool | None = None  # the extender's /readyz (None: not probed)
    errors: Mapping[Component, str] = field(default_factory=dict)  # a component that could not be applied: why
    was_up: frozenset[Component] = frozenset()  # components running or degraded in the previous status
    foreign_accelerators: Mapping[str, str] = field(default_factory=dict)
    """Node → the ``accelerator`` value someone else set where discovery found NPUs (discovery leaves it)."""
    held: Mapping[Component, str] = field(default_factory=dict)
    """Components the operator did not roll out this pass (:func:`held_back`): why."""


def _named(nodes: Sequence[str]) -> str:
    shown = ", ".join(sorted(nodes)[:MAX_NAMED])
    return shown + (f" and {len(nodes) - MAX_NAMED} more" if len(nodes) > MAX_NAMED else "")


def _workload_state(name: str, w: Workload | None, was_up: bool = False
                    ) -> tuple[ComponentState, NodeCounts, str | None]:
    """``was_up``: the component was running (or degraded) before. Pods that stop being ready then make it
    degraded; before it ever ran, they only make it pending (still coming up)."""
    if w is None or not w.exists:
        return ComponentState(type=S.PENDING, reason="NotCreated", message=f"{name} is not created yet"), \
            NodeCounts(), None
    ready = min(w.ready, w.desired - len(w.not_ready_nodes)) if w.not_ready_nodes else w.ready
    counts = NodeCounts(desired=w.desired, ready=max(ready, 0))
    if not w.generation_seen or w.updated < w.desired:
        return ComponentState(type=S.PENDING, reason="RollingOut",
                              message=f"{w.updated}/{w.desired} pods run the current spec"), counts, w.version
    if w.desired and ready < w.desired:
        where = f" on {_named(w.not_ready_nodes)}" if w.not_ready_nodes else ""
        kind = S.DEGRADED if (ready > 0 or was_up) else S.PENDING
        return ComponentState(type=kind, reason="PodsNotReady",
                              message=f"{w.desired - max(ready, 0)} of {w.desired} pods not ready{where}"), \
            counts, w.version
    return ComponentState(type=S.RUNNING, reason="Ready", message=f"{ready}/{w.desired} ready"), counts, w.version


def _mismatches(nodes: Sequence[str], found: Mapping[str, str | None], expected: str | None) -> list[str]:
    """``<version> on <node>`` for each node whose known version is not ``expected``."""
    wrong = sorted({f"{found[n]} on {n}" for n in nodes if expected and found.get(n) not in (None, expected)})
    return wrong[:MAX_NAMED] + ([f"{len(wrong) - MAX_NAMED} more"] if len(wrong) > MAX_NAMED else [])


def driver_status(spec: PolicySpec, seen: Observed) -> ComponentStatus:
    """The driver check: every NPU node's driver (and firmware) version known and the expected one."""
    nodes = seen.npu_nodes
    counts = NodeCounts(desired=len(nodes), ready=sum(1 for n in nodes if seen.driver_versions.get(n)))
    unknown = [n for n in nodes if not seen.driver_versions.get(n)]
    expected = spec.driver.version
    problems = []
    if wrong := _mismatches(nodes, seen.driver_versions, expected):
        problems.append(f"expected driver {expected}, found {'; '.join(wrong)}")
    if wrong := _mismatches(nodes, seen.firmware_versions, spec.driver.firmware_version):
        problems.append(f"expected firmware {spec.driver.firmware_version}, found {'; '.join(wrong)}")
    if problems:
        return ComponentStatus(name=Component.DRIVER, nodes=counts, version=expected, state=ComponentState(
            type=S.DEGRADED, reason="VersionMismatch", message="; ".join(problems)))
    if unknown:
        return ComponentStatus(name=Component.DRIVER, nodes=counts, version=expected, state=ComponentState(
            type=S.PENDING, reason="VersionUnknown", message=f"no driver version read yet on {_named(unknown)}"))
    versions = sorted({v for v in seen.driver_versions.values() if v})
    firmware = sorted({v for n, v in seen.firmware_versions.items() if v and n in nodes})
    return ComponentStatus(name=Component.DRIVER, nodes=counts, version=expected or ", ".join(versions) or None,
                           state=ComponentState(type=S.RUNNING, reason="Ready",
                                                message=f"driver {', '.join(versions) or 'n/a'}"
                                                        + (f" (firmware {', '.join(firmware)})" if firmware else "")
                                                        + f" on {len(nodes)} node(s)"))


def _nfd(seen: Observed) -> ComponentStatus:
    if seen.foreign_accelerators:
        values = sorted(set(seen.foreign_accelerators.values()))
        return ComponentStatus(name=Component.NODE_FEATURE_DISCOVERY, nodes=NodeCounts(
            desired=len(seen.npu_nodes) + len(seen.foreign_accelerators), ready=len(seen.npu_nodes)),
            state=ComponentState(type=S.DEGRADED, reason="AcceleratorLabelInUse", message=(
                f"{_named(list(seen.foreign_accelerators))} already carry {LABEL_ACCELERATOR}="
                f"{'|'.join(values)}, set by someone else: discovery leaves it, and the components, which select "
                f"{LABEL_ACCELERATOR}={ACCELERATOR_ASCEND_NPU}, do not run there")))
    if not seen.npu_nodes:
        return ComponentStatus(name=Component.NODE_FEATURE_DISCOVERY, state=ComponentState(
            type=S.PENDING, reason="NoNpuNodes", message="no node with a Huawei PCI device (vendor 0x19e5) found"))
    return ComponentStatus(name=Component.NODE_FEATURE_DISCOVERY, nodes=NodeCounts(
        desired=len(seen.npu_nodes), ready=len(seen.npu_nodes)), state=ComponentState(
        type=S.RUNNING, reason="Labelled", message=f"{len(seen.npu_nodes)} NPU node(s) labelled"))


def _device_plugin(seen: Observed) -> ComponentStatus:
    state, counts, version = _workload_state("the device plugin DaemonSet", seen.workloads.get(
        Component.DEVICE_PLUGIN), Component.DEVICE_PLUGIN in seen.was_up)
    if state.type == S.RUNNING:
        empty = [n for n in seen.npu_nodes if seen.allocatable.get(n, 0) <= 0]
        if empty:
            state = ComponentState(type=S.DEGRADED, reason="NoAllocatableNpus",
                                   message=f"no allocatable {RESOURCE_NPU} on {_named(empty)} (the plugin is "
                                           "not registered with the kubelet, or every NPU is unhealthy)")
    return ComponentStatus(name=Component.DEVICE_PLUGIN, state=state, nodes=counts, version=version)


def _extender(seen: Observed) -> ComponentStatus:
    state, counts, version = _workload_state("the scheduler extender Deployment", seen.workloads.get(
        Component.SCHEDULER_EXTENDER), Component.SCHEDULER_EXTENDER in seen.was_up)
    if state.type == S.RUNNING and seen.extender_answers is False:
        state = ComponentState(type=S.DEGRADED, reason="NotAnswering",
                               message="the extender's pods are ready but its Service does not answer /readyz")
    return ComponentStatus(name=Component.SCHEDULER_EXTENDER, state=state, nodes=counts, version=version)


def _validator(seen: Observed) -> ComponentStatus:
    nodes = seen.npu_nodes
    results = {n: seen.validation.get(n, (None, "")) for n in nodes}
    failed = [n for n, (ok, _) in results.items() if ok is False]
    waiting = [n for n, (ok, _) in results.items() if ok is None]
    counts = NodeCounts(desired=len(nodes), ready=sum(1 for ok, _ in results.values() if ok))
    if failed:
        first = failed[0]
        return ComponentStatus(name=Component.VALIDATOR, nodes=counts, state=ComponentState(
            type=S.FAILED, reason="ValidationFailed",
            message=f"validation failed on {_named(failed)}: {results[first][1][:300]}"))
    if waiting or not nodes:
        why = next((results[n][1] for n in sorted(waiting) if results[n][1]), "")
        return ComponentStatus(name=Component.VALIDATOR, nodes=counts, state=ComponentState(
            type=S.PENDING, reason="Validating",
            message=(f"waiting for the validation pod on {_named(waiting)}" + (f" ({why[:200]})" if why else ""))
            if waiting else "no NPU node to validate"))
    return ComponentStatus(name=Component.VALIDATOR, nodes=counts, state=ComponentState(
        type=S.RUNNING, reason="Validated", message=f"a one-NPU pod ran npu-smi info on {len(nodes)} node(s)"))


NEEDS: dict[Component, Component] = {
    Component.VNPU: Component.DEVICE_PLUGIN,
    Component.EXPORTER: Component.DEVICE_PLUGIN,
    Component.VALIDATOR: Component.DEVICE_PLUGIN,
}
"""What each component cannot work without."""


AFTER_DRIVER = (Component.DEVICE_PLUGIN, Component.VNPU, Component.EXPORTER, Component.VALIDATOR)
"""The components that use the NPUs through the host's driver, and so come after the driver check: the GPU Operator's
state order (driver, then the device plugin and what uses it). vNPUs and the exporter are settings of the device
plugin's chart; the validator runs on the device plugin's NPUs."""


def held_back(spec: PolicySpec, driver: ComponentStatus) -> dict[Component, str]:
    """The enabled components of :data:`AFTER_DRIVER` not to roll out while the driver check finds a version that
    is not the expected one, each with why; empty when it passes, is disabled, or has not read a version yet (the
    device plugin labels the version too, and is the only one to when discovery is off or finds no npu-smi: holding
    it back until then would wait forever). What already runs is left as it is: held back means not created, not
    changed, not pruned."""
    if not spec.enabled(Component.DRIVER) or driver.state.reason != "VersionMismatch":
        return {}
    why = (f"held back until the driver check passes (driver {driver.state.type.value}, {driver.state.reason}: "
           f"{driver.state.message}); what already runs is left as it is")
    return {c: why for c in AFTER_DRIVER if spec.enabled(c)}


def component_statuses(spec: PolicySpec, seen: Observed) -> tuple[ComponentStatus, ...]:
    out = []
    for component in Component:
        needed = NEEDS.get(component)
        if not spec.enabled(component):
            out.append(ComponentStatus(name=component, state=ComponentState(
                type=S.DISABLED, reason="Disabled", message=f"spec.{component.value}.enabled is false")))
        elif needed is not None and not spec.enabled(needed):
            out.append(ComponentStatus(name=component, state=ComponentState(
                type=S.FAILED, reason="MissingDependency",
                message=f"spec.{component.value} needs spec.{needed.value}.enabled: true (or disable "
                        f"spec.{component.value})")))
        elif component in seen.errors:
            out.append(ComponentStatus(name=component, state=ComponentState(
                type=S.FAILED, reason="ApplyFailed", message=seen.errors[component][:500])))
        elif component in seen.held:
            out.append(ComponentStatus(name=component, state=ComponentState(
                type=S.PENDING, reason="WaitingForDriver", message=seen.held[component][:500])))
        elif component == Component.DRIVER:
            out.append(driver_status(spec, seen))
        elif component == Component.NODE_FEATURE_DISCOVERY:
            out.append(_nfd(seen))
        elif component == Component.DEVICE_PLUGIN:
            out.append(_device_plugin(seen))
        elif component == Component.SCHEDULER_EXTENDER:
            out.append(_extender(seen))
        elif component == Component.VALIDATOR:
            out.append(_validator(seen))
        elif component == Component.VNPU and (problem := vnpu_config_problem(spec)):
            out.append(ComponentStatus(name=component, state=ComponentState(
                type=S.FAILED, reason="InvalidConfig", message=problem[:500])))
        else:
            state, counts, version = _workload_state(f"the {component.value} workload", seen.workloads.get(component),
                                                     component in seen.was_up)
            out.append(ComponentStatus(name=component, state=state, nodes=counts, version=version))
    return tuple(out)


def conditions(statuses: Sequence[ComponentStatus], previous: Sequence[Condition] = (),
               now: datetime | None = None) -> tuple[Condition, ...]:
    """Ready (every enabled component running), Progressing (some pending), Degraded (some degraded or failed).
    ``lastTransitionTime`` moves only when a condition's status changes."""
    at = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    active = [s for s in statuses if s.state.type != S.DISABLED]
    bad = [s for s in active if s.state.type in (S.DEGRADED, S.FAILED)]
    pending = [s for s in active if s.state.type == S.PENDING]
    ready = not bad and not pending

    def names(group: list[ComponentStatus]) -> str:
        return ", ".join(f"{s.name.value} ({s.state.reason})" for s in group)

    wanted = (
        ("Ready", ready, "AllComponentsRunning" if ready else "ComponentsNotRunning",
         "" if ready else names(bad + pending)),
        ("Progressing", bool(pending), "ComponentsPending" if pending else "Settled", names(pending)),
        ("Degraded", bool(bad), "ComponentsDegraded" if bad else "NoProblems", names(bad)),
    )
    before: dict[str, Condition] = {c.type: c for c in previous}
    out = []
    for kind, value, reason, message in wanted:
        status = "True" if value else "False"
        old = before.get(kind)
        since = old.last_transition_time if old is not None and old.status == status else at
        out.append(Condition(type=kind, status=status, reason=reason, message=message,
                             last_transition_time=since))
    return tuple(out)


def was_up(previous: PolicyStatus | None) -> frozenset[Component]:
    """The components the previous status showed running or degraded."""
    return frozenset(s.name for s in (previous.component_statuses if previous else ())
                     if s.state.type in (S.RUNNING, S.DEGRADED))


def transitions(previous: PolicyStatus | None, current: PolicyStatus) -> list[ComponentStatus]:
    """The components whose state type changed (each becomes an Event)."""
    before = {s.name: s.state.type for s in (previous.component_statuses if previous else ())}
    return [s for s in current.component_statuses if before.get(s.name) != s.state.type]


def policy_status(spec: PolicySpec, seen: Observed, generation: int, previous: PolicyStatus | None = None,
                  now: datetime | None = None) -> PolicyStatus:
    statuses = component_statuses(spec, seen)
    return PolicyStatus(observed_generation=generation, component_statuses=statuses,
                        conditions=conditions(statuses, previous.conditions if previous else (), now))


def invalid_spec_status(problem: str, generation: int, previous: PolicyStatus | None = None,
                        now: datetime | None = None) -> PolicyStatus:
    """The status of a policy whose spec does not validate (an older CRD without the schema let it in): not Ready,
    with the field and why, for this generation; the components are left as the last valid spec made them."""
    at = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    before: dict[str, Condition] = {c.type: c for c in (previous.conditions if previous else ())}

    def condition(kind: Literal["Ready", "Progressing", "Degraded"], status: Literal["True", "False"],
                  reason: str, message: str) -> Condition:
        old = before.get(kind)
        since = old.last_transition_time if old is not None and old.status == status else at
        return Condition(type=kind, status=status, reason=reason, message=message, last_transition_time=since)

    return PolicyStatus(
        observed_generation=generation, component_statuses=previous.component_statuses if previous else (),
        conditions=(condition("Ready", "False", "InvalidSpec", problem),
                    condition("Progressing", "False", "InvalidSpec", ""),
                    condition("Degraded", "True", "InvalidSpec", problem)))
