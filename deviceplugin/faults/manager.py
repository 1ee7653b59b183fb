"""Carries out the fault decisions for every NPU of the node, once per health poll: reads the error codes of chips
npu-smi does not call OK, grades them with the fault table, asks :func:`~.recovery.assess` what to do, resets and
isolates, polls link state with ``hccn_tool``, and reports statuses, the node annotation, Events and metrics.

Runs on the health monitor's thread; a failing npu-smi or hccn_tool call is logged and retried next poll, never
fatal.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from fuyao.config_files import ConfigError
from fuyao.contracts import DeviceFault, DeviceHealth, FaultAction, NodeFaults
from fuyao.inventory import NpuDevice
from fuyao.npusmi import NpuHealthState, NpuSmi, NpuSmiError
from fuyao.npusmi.models import NpuSmiInfo
from fuyao.npusmi.parse import parse_link_status

from ..devices import DeviceStatus, match_chips
from ..metrics import PluginMetrics
from .isolation import IsolatedNpu, IsolationRecord
from .recovery import FaultState, Observation, ResetPolicy, Step, assess
from .table import FaultLevel, FaultTable, load_table

log = logging.getLogger(__name__)

Holders = Callable[[], Mapping[str, str] | None]
"""Die → the pod holding it (or a vNPU / AICore of it); None when the kubelet cannot say."""
EventSink = Callable[[str, str, str], None]
"""(type Normal|Warning, reason, message) → a Kubernetes Event on the node."""


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)  # follows the ConfigMap's ..data symlink: a new projection is a new inode
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino, st.st_size


def rfc3339(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LinkSettings:
    tool: NpuSmi | None  # hccn_tool (same runner as npu-smi: timeout, process-group kill)
    interval_s: float = 30.0


class FaultManager:
    def __init__(self, npu_smi: NpuSmi, devices: Iterable[NpuDevice], table: FaultTable, policy: ResetPolicy,
                 record: IsolationRecord, metrics: PluginMetrics, *, holders: Holders,
                 events: EventSink | None = None, link: LinkSettings | None = None, reset_timeout_s: float = 60.0,
                 table_path: str | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.npu_smi = npu_smi
        self.devices = {d.id: d for d in devices}
        self.table = table
        self.table_path = table_path
        self._table_stamp = _stamp(table_path)
        self.policy = policy
        self.record = record
        self._unrecorded: dict[str, IsolatedNpu] = {}  # isolated in memory: the record could not be written
        self.metrics = metrics
        self.holders_fn = holders
        self.events = events or (lambda _type, _reason, _message: None)
        self.link = link
        self.reset_timeout_s = reset_timeout_s
        self.clock = clock
        self.wall = wall
        self.states: dict[str, FaultState] = {}
        self.due_resets: dict[str, FaultState] = {}  # decided by update(), run by run_resets() after it
        self.links: dict[str, bool | None] = {}
        self.holders: dict[str, str] = {}
        self.published = NodeFaults()  # the report as of the statuses last applied (commit)
        self.published_links: dict[str, bool | None] = {}
        self.published_changed = False
        self._next_link_poll = 0.0
        self._record_stamp: tuple[int, int] | None = None
        self._load_isolations(self.record.read())
        self._record_stamp = self.record.stamp()

    # -- isolation record ------------------------------------------------------------------------------------
    def _load_isolations(self, isolated: Mapping[str, IsolatedNpu]) -> None:
        for device, entry in isolated.items():
            if device not in self.devices:
                log.warning("isolation record names %s, which this node does not have; ignored", device)
                continue
            if not self.states.get(device, FaultState()).isolated:
                self.states[device] = FaultState(isolated=True, codes=entry.codes, since=self.wall(),
                                                 note=f"isolated: {entry.reason}")
                log.warning("NPU %s stays isolated (%s, since %s)", device, entry.reason, entry.since,
                            extra={"device": device})
            self.metrics.set_isolated(self.devices[device], True)

    def _check_releases(self) -> None:
        for device_id, entry in list(self._unrecorded.items()):  # isolations the record could not take before
            try:
                self.record.add(device_id, entry)
            except OSError:
                break
            del self._unrecorded[device_id]
            self._record_stamp = self.record.stamp()
        stamp = self.record.stamp()
        if stamp == self._record_stamp:
            return
        self._record_stamp = stamp
        isolated = self.record.read()
        for device, state in list(self.states.items()):
            if state.isolated and device not in isolated and device not in self._unrecorded:
                self.states[device] = FaultState()
                self.metrics.set_isolated(self.devices[device], False)
                log.warning("NPU %s released from isolation by an operator", device, extra={"device": device})
                self.events("Normal", "NpuReleased", f"NPU {device} released from isolation by an operator")
        self._load_isolations(isolated)

    def _check_table(self) -> None:
        """Re-read the fault table when its file changes (a ConfigMap update); a bad one keeps the old table."""
        stamp = _stamp(self.table_path)
        if self.table_path is None or stamp == self._table_stamp:
            return
        self._table_stamp = stamp
        try:
            table = load_table(self.table_path)
        except ConfigError as exc:
            log.error("fault table %s changed but is invalid; keeping the one loaded before: %s", self.table_path,
                      exc)
            return
        self.table = table
        log.info("fault table %s reloaded (%d codes)", self.table_path, len(table.codes))

    # -- one poll ----------------------------------------------------------------------------------------------
    def update(self, info: NpuSmiInfo, base: Mapping[str, DeviceStatus]) -> dict[str, DeviceStatus]:
        """The devices' statuses after grading their faults (``base``: from the Health column; a chip missing from
        the table stays as ``base`` says). Resets and isolations happen here."""
        self._check_releases()
        self._check_table()
        now, wall = self.clock(), self.wall()
        processes: dict[tuple[int, int], int] = {}
        for p in info.processes:
            processes[(p.npu_id, p.chip_id)] = processes.get((p.npu_id, p.chip_id), 0) + 1
        graded: dict[str, tuple[tuple[str, ...], FaultLevel | None]] = {}
        for device, chip in match_chips(self.devices.values(), info):
            if chip is None:
                continue
            codes: tuple[str, ...] = ()
            health = chip.health
            if health != NpuHealthState.OK:  # npu-smi prints codes only for a chip it does not call OK
                codes, health = self._codes(device, health)
            graded[device.id] = (codes, self.table.level(codes, health))
        needs_holders = any(level is not None for _codes, level in graded.values()) or any(
            s.level is not None or s.isolated for s in self.states.values())
        holders = self._holders() if needs_holders else {}
        out = dict(base)
        for device_id, (codes, level) in graded.items():
            device = self.devices[device_id]
            prev = self.states.get(device_id)
            seen = Observation(level=level, codes=codes, holder=(holders or {}).get(device_id),
                               processes=processes.get((device.npu_id, device.chip_id), 0),
                               holders_known=holders is not None, now=now, wall=wall)
            state, step = assess(prev, seen, self.policy)
            if step == Step.ISOLATE:
                self._isolate(device, state)
            elif step == Step.RESET:
                # not now: this poll's Unhealthy must reach the kubelet first (a reset takes up to its timeout,
                # during which the die would still be advertised Healthy and could be allocated): run_resets
                self.due_resets[device_id] = state
            self._announce(device, prev or FaultState(), state)
            self.states[device_id] = state
            self.metrics.set_fault(device, state.level.value if state.level else None,
                                   state.action.value if state.action else None)
            if state.healthy:
                out[device_id] = base[device_id] if state.level is None else DeviceStatus(
                    health=DeviceHealth.HEALTHY, reason=f"fault {state.level.value} ({', '.join(codes)}): kept")
            else:
                what = state.level.value if state.level else "isolated"
                out[device_id] = DeviceStatus(
                    health=DeviceHealth.UNHEALTHY,
                    reason=f"{base[device_id].reason}; {what} {' '.join(state.codes)}: {state.note}".strip())
        return out

    def run_resets(self) -> None:
        """The resets ``update`` decided, run after its statuses were applied (the dies are Unhealthy, so the
        kubelet allocates them to no one). A die a container took meanwhile (its Unhealthy came too late) is not
        reset now: the next polls decide again."""
        due, self.due_resets = self.due_resets, {}
        if not due:
            return
        holders = self._holders()
        for device_id, state in due.items():
            device = self.devices[device_id]
            if holders is None or holders.get(device_id):
                log.warning("hot reset of NPU %s put off: %s", device_id, "the kubelet's view of its holders is "
                            "unknown" if holders is None else f"{holders[device_id]} holds it now",
                            extra={"device": device_id})
                continue
            after = self._reset(device, state)
            if self.states.get(device_id) is state:  # no poll has moved its state on meanwhile
                self.states[device_id] = after

    def _codes(self, device: NpuDevice, health: NpuHealthState) -> tuple[tuple[str, ...], NpuHealthState]:
        try:
            report = self.npu_smi.health(device.npu_id, device.chip_id)
        except NpuSmiError as exc:
            log.warning("cannot read the error codes of %s (graded by its Health %s): %s", device.id, health.value,
                        exc, extra={"device": device.id})
            return (), health
        return report.error_codes, report.health

    def _holders(self) -> dict[str, str] | None:
        try:
            held = self.holders_fn()
        except Exception as exc:  # never let a kubelet hiccup stop health checking
            log.warning("cannot tell which pods hold NPUs: %s", exc)
            held = None
        if held is not None:
            self.holders = dict(held)
        return None if held is None else dict(held)

    def _isolate(self, device: NpuDevice, state: FaultState) -> None:
        reason = state.note.removeprefix("isolated: ")
        entry = IsolatedNpu(codes=state.codes, level=state.level.value if state.level else None, reason=reason,
                            since=rfc3339(self.wall()))
        try:
            self.record.add(device.id, entry)
        except OSError as exc:  # isolated all the same (in memory): a full or read-only disk must not put it back
            self._unrecorded[device.id] = entry  # written when the record can take it (_check_releases)
            log.error("NPU %s is isolated but the isolation record %s cannot be written (%s): it stays isolated, "
                      "and the record is written again each poll", device.id, self.record.path, exc.strerror or exc,
                      extra={"device": device.id})
        self._record_stamp = self.record.stamp()
        self.metrics.set_isolated(device, True)
        log.error("NPU %s isolated: %s (codes %s); release it with fuyao-device-plugin --release-npu %s once it is "
                  "repaired", device.id, reason, " ".join(state.codes) or "none", device.id,
                  extra={"device": device.id, "codes": list(state.codes)})
        self.events("Warning", "NpuIsolated", f"NPU {device.id} isolated: {reason} (codes {' '.join(state.codes)})")

    def _reset(self, device: NpuDevice, state: FaultState) -> FaultState:
        attempt = len(state.resets)
        log.warning("hot reset of NPU %s (npu %d chip %d), attempt %d of %d: %s %s", device.id, device.npu_id,
                    device.chip_id, attempt, self.policy.max_attempts, state.level.value if state.level else "",
                    " ".join(state.codes), extra={"device": device.id, "attempt": attempt})
        try:
            result = self.npu_smi.reset_chip(device.npu_id, device.chip_id, timeout_s=self.reset_timeout_s)
        except NpuSmiError as exc:
            self.metrics.resets.labels(self.metrics.node, "failed").inc()
            log.error("hot reset of NPU %s failed: %s", device.id, exc, extra={"device": device.id})
            self.events("Warning", "NpuResetFailed", f"hot reset of NPU {device.id} (attempt {attempt}) failed: "
                                                     f"{str(exc)[:200]}")
            return replace(state, note=f"reset {attempt} failed; retrying after {self.policy.settle_s:g}s")
        self.metrics.resets.labels(self.metrics.node, "ok").inc()
        self.events("Normal", "NpuReset", f"NPU {device.id} hot reset (attempt {attempt}) for "
                                          f"{' '.join(state.codes) or 'its health'}: {result.message}")
        return replace(state, note=f"reset {attempt} done; waiting for the NPU to come back")

    def _announce(self, device: NpuDevice, prev: FaultState, new: FaultState) -> None:
        if new.level is not None and (prev.level != new.level or prev.codes != new.codes):
            self.metrics.faults.labels(self.metrics.node, new.level.value).inc()
            kind = "Normal" if new.action == FaultAction.KEEP else "Warning"
            log.log(logging.INFO if kind == "Normal" else logging.WARNING, "NPU %s fault %s (%s): %s", device.id,
                    " ".join(new.codes) or "(no code)", new.level.value, new.note,
                    extra={"device": device.id, "codes": list(new.codes), "fault_level": new.level.value})
            self.events(kind, "NpuFault", f"NPU {device.id} fault {' '.join(new.codes) or '(no code)'}, level "
                                          f"{new.level.value}: {new.note}")
        elif new.level is None and prev.level is not None and not new.isolated:
            log.info("NPU %s recovered from %s", device.id, " ".join(prev.codes) or prev.level.value,
                     extra={"device": device.id})
            what = " ".join(prev.codes) or "its fault"
            self.events("Normal", "NpuRecovered", f"NPU {device.id} recovered from {what} ({prev.level.value})")

    # -- network -------------------------------------------------------------------------------------------------
    def poll_links(self, now: float | None = None) -> None:
        """Read every NPU's RoCE link when ``link.interval`` has passed. Called after a poll's statuses are applied
        (a hung ``hccn_tool`` takes its timeout per NPU: a failure that poll found must not wait behind it)."""
        now = self.clock() if now is None else now
        if self.link is None or self.link.tool is None or now < self._next_link_poll:
            return
        self._next_link_poll = now + self.link.interval_s
        for device in self.devices.values():
            try:
                up: bool | None = parse_link_status(self.link.tool.run(["-i", str(device.physical_id), "-link",
                                                                         "-g"]))
            except NpuSmiError as exc:
                if self.links.get(device.id, False) is not None:
                    log.warning("cannot read the link of %s: %s", device.id, exc, extra={"device": device.id})
                up = None
            before = self.links.get(device.id)
            self.links[device.id] = up
            self.metrics.set_link(device, up)
            if (before is not None and up is not None and before != up) or (before is None and up is False):
                log.log(logging.INFO if up else logging.WARNING, "NPU %s link %s", device.id,
                        "up" if up else "down", extra={"device": device.id})
                self.events("Normal" if up else "Warning", "NpuLinkUp" if up else "NpuLinkDown",
                            f"NPU {device.id} RoCE link {'up' if up else 'down'}"
                            + ("" if up else ": left out of multi-NPU placements"))

    def commit(self) -> None:
        """Make the current report the published one (called with the statuses it goes with applied)."""
        report = self.report()
        self.published_changed = report != self.published or self.links != self.published_links
        self.published, self.published_links = report, dict(self.links)

    # -- reporting -------------------------------------------------------------------------------------------------
    def report(self) -> NodeFaults:
        """The node annotation: every NPU with a fault, an isolation or a link down."""
        out: dict[str, DeviceFault] = {}
        for device_id in self.devices:
            state = self.states.get(device_id, FaultState())
            link = self.links.get(device_id)
            if state.level is None and not state.isolated and link is not False:
                continue
            out[device_id] = DeviceFault(
                codes=state.codes, level=state.level.value if state.level else None, action=state.action,
                state=state.note, since=rfc3339(state.since) if state.since is not None else None,
                resets=len(state.resets), holder=self.holders.get(device_id), isolated=state.isolated,
                link_up=link)
        return NodeFaults(devices=out)
