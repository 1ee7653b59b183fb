"""What to do about one NPU's faults, as a pure function of what npu-smi and the kubelet report and of the NPU's
history (:func:`assess`). The health monitor calls it every poll and carries out the step it returns.

- keep: the NPU stays Healthy; the fault is only published.
- unhealthy: Unhealthy while the fault lasts.
- reset: Unhealthy; a hot reset once no pod holds the NPU and no process runs on it. Resets are spaced by
  ``settle`` (the chip needs time to come back) and counted over ``window``: the ``max_attempts``-th reset that
  does not cure the NPU isolates it (a chip that keeps failing is not reset forever).
- isolate: Unhealthy until an operator releases it (the isolation is recorded on disk before it is published, so a
  restart of the plugin keeps it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from fuyao.contracts import FaultAction

from .table import FaultLevel


@dataclass(frozen=True)
class ResetPolicy:
    enabled: bool = True
    max_attempts: int = 3
    window_s: float = 24 * 3600.0
    settle_s: float = 30.0


class Step(StrEnum):
    NONE = "none"
    RESET = "reset"  # run npu-smi set -t reset now
    ISOLATE = "isolate"  # record the isolation now


@dataclass(frozen=True)
class FaultState:
    """One NPU's fault history. ``level`` None: no fault now (the state lives on while resets are remembered)."""

    level: FaultLevel | None = None
    codes: tuple[str, ...] = ()
    since: float | None = None  # wall-clock seconds the current fault was first seen
    resets: tuple[float, ...] = ()  # monotonic times of resets inside the window
    isolated: bool = False
    note: str = ""

    @property
    def action(self) -> FaultAction | None:
        if self.isolated:
            return FaultAction.ISOLATE
        return None if self.level is None else self.level.action

    @property
    def healthy(self) -> bool:
        """Advertised Healthy to the kubelet."""
        return self.action in (None, FaultAction.KEEP)


@dataclass(frozen=True)
class Observation:
    level: FaultLevel | None
    codes: tuple[str, ...]
    holder: str | None  # the pod holding the NPU (kubelet pod-resources)
    processes: int  # processes npu-smi shows on the NPU
    holders_known: bool = True  # False when the kubelet's pod-resources API did not answer
    now: float = 0.0  # monotonic
    wall: float = 0.0  # wall clock


def assess(prev: FaultState | None, seen: Observation, policy: ResetPolicy) -> tuple[FaultState, Step]:
    """The NPU's new state and the step to take now."""
    prev = prev or FaultState()
    resets = tuple(t for t in prev.resets if seen.now - t < policy.window_s)
    since = prev.since if prev.level is not None and prev.since is not None else seen.wall
    state = replace(prev, level=seen.level, codes=seen.codes, resets=resets,
                    since=since if seen.level is not None or prev.isolated else None)
    if prev.isolated:
        return replace(state, note="isolated: released only by an operator"), Step.NONE
    if seen.level is None:
        return replace(state, note=""), Step.NONE
    action = seen.level.action
    if action == FaultAction.KEEP:
        return replace(state, note="kept in service"), Step.NONE
    if action == FaultAction.UNHEALTHY:
        return replace(state, note="unhealthy while the fault lasts"), Step.NONE
    if action == FaultAction.ISOLATE:
        return replace(state, isolated=True, note=f"isolated: {seen.level.value}"), Step.ISOLATE
    # reset
    if not policy.enabled:
        return replace(state, note="unhealthy while the fault lasts (hot reset is turned off)"), Step.NONE
    if resets and seen.now - resets[-1] < policy.settle_s:
        return replace(state, note=f"reset {len(resets)} done; waiting for the NPU to come back"), Step.NONE
    if len(resets) >= policy.max_attempts:
        return replace(state, isolated=True,
                       note=f"isolated: still faulty after {len(resets)} resets"), Step.ISOLATE
    if not seen.holders_known:
        return replace(state, note="reset pending: the kubelet's pod-resources API does not answer"), Step.NONE
    if seen.holder is not None:
        return replace(state, note=f"reset pending: held by pod {seen.holder}"), Step.NONE
    if seen.processes:
        return replace(state, note=f"reset pending: {seen.processes} process(es) run on it"), Step.NONE
    return replace(state, resets=(*resets, seen.now), note=f"resetting (attempt {len(resets) + 1})"), Step.RESET

