"""The device plugin's vNPU side: which resources to serve in each mode, and the reconcile loop.

- off: whole dies only (``npu.huawei.com/NPU``).
- static: the ConfigMap file is planned and applied at start and whenever it changes; carved dies move from
  ``npu.huawei.com/NPU`` to one ``npu.huawei.com/vNPU`` device per slice.
- dynamic: every die is offered as ``npu.huawei.com/npu-core`` devices; Allocate creates the vNPU, the reconcile
  loop destroys it once no container holds its cores (per the kubelet's pod-resources API) — never on a guess.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU, parse_vnpu_device_id
from fuyao.inventory import NodeInventory
from fuyao.npusmi import NpuSmi, NpuSmiError
from fuyao.vnpu.ledger import Ledger
from fuyao.vnpu.manager import VnpuManager
from fuyao.vnpu.plan import Plan, PlanError, load_vnpu_config, make_plan
from fuyao.vnpu.templates import Template, load_templates
from fuyao.vnpu.usage import PodResourcesUnavailable, holdings

from .config import PluginConfig
from .devices import ChipHealth, ResourceDevices, Slot, whole_device_slots
from .metrics import PluginMetrics
from .resource import (
    CoreResource,
    NpuResource,
    ResourcePlugin,
    SchedulerChoices,
    VnpuResource,
    core_slots,
    vnpu_slots,
)

log = logging.getLogger(__name__)


class VnpuControl:
    def __init__(self, inventory: NodeInventory, config: PluginConfig, npu_smi: NpuSmi, chips: ChipHealth,
                 metrics: PluginMetrics, scheduler_choices: SchedulerChoices | None = None):
        self.inventory = inventory
        self.config = config
        self.settings = config.vnpu
        self.mode = config.vnpu.mode
        self.metrics = metrics
        self.devices = {d.id: d for d in inventory.devices}
        self.templates: tuple[Template, ...] = ()
        if self.mode != "off":
            self.templates, source = load_templates(npu_smi, inventory.chip_model, inventory.devices[0].npu_id)
            log.info("vNPU mode %s: %d templates from %s", self.mode, len(self.templates), source,
                     extra={"templates": [t.name for t in self.templates]})
        self.manager = VnpuManager(npu_smi, Ledger(self.settings.ledger), inventory.devices,
                                   on_event=lambda action, result: metrics.vnpu_operations.labels(action,
                                                                                                  result).inc(),
                                   templates=self.templates)
        self._retiring: dict[tuple[str, int], float] = {}
        self.held_at = time.time()
        self.held_groups: list[frozenset[str]] | None = None  # the cores each container holds (last answer)
        self.held_whole: set[str] | None = None  # dies containers hold as whole NPUs (last answer; None: unknown)
        # Whether the kubelet may have been offered dies whole: not before start()'s first round (nothing is advertised
        # yet, so the plan carves at once), always after it (a die the plan newly carves waits to be withdrawn)
        self._advertising = False
        # Until the first reconcile knows better, a die with any record in the ledger is not offered whole; with
        # vNPUs off nothing reconciles, so a die with vNPUs on it (left by another mode) is never offered whole
        carved = {r.device_id for r in self.manager.ledger.records()}
        if self.mode == "off":
            carved |= self._dies_with_vnpus()
            if carved:
                log.warning("vNPU mode off, but %s have vNPUs (or the ledger's records of them): not offered as "
                            "whole NPUs until those are destroyed (fuyao-vnpu) and the plugin restarts",
                            ", ".join(sorted(carved)))
        numa = inventory.numa_source == "sysfs"  # the kubelet gets real NUMA nodes or none
        self.npu = NpuResource(inventory, config, ResourceDevices(chips, whole_device_slots(
            d for d in inventory.devices if d.id not in carved), numa=numa), scheduler_choices)
        self.vnpu = VnpuResource(inventory, config, ResourceDevices(chips, numa=numa), scheduler_choices)
        self.cores: CoreResource | None = None
        if self.mode == "dynamic":
            aicore = {d.id: c.aicore for d in inventory.devices if (c := self.manager.capacity(d.id)) is not None}
            self.cores = CoreResource(inventory, config, ResourceDevices(chips, core_slots(inventory.devices,
                                                                                            aicore), numa=numa),
                                      self.manager, self.templates, scheduler_choices)
        self.plan: Plan | None = None
        self._config_stamp: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_reconciled: Callable[[], None] | None = None  # e.g. republish the topology annotation

    def resources(self) -> list[ResourcePlugin]:
        if self.mode == "dynamic":
            assert self.cores is not None
            return [self.cores]
        if self.mode == "static":
            return [self.npu, self.vnpu]
        return [self.npu]

    def slices(self) -> list[Slot]:
        """The static vNPU slices advertised now (for the node's topology annotation)."""
        return list(self.vnpu.advertised.slots().values())

    # Loop ---------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Reconcile once (static: the plan is applied before anything is advertised, so no die is offered twice),
        then start the loop — also when that first round failed: the loop retries it."""
        if self.mode == "off":
            return
        try:
            self.reconcile()
        except Exception:
            log.exception("vNPU reconcile at start failed (retried every %gs)", self.settings.reconcile_interval)
        self._advertising = True
        self._thread = threading.Thread(target=self._run, name="vnpu-reconcile", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval):
            try:
                self.reconcile()
            except Exception:  # one bad round must not end reconciliation
                log.exception("vNPU reconcile failed")

    def held(self) -> tuple[set[tuple[str, int]], set[str]] | None:
        """(vNPU slices held, npu-core devices held) from the kubelet, or None when it does not answer. The time
        of the question is kept in ``held_at``: only vNPUs older than that (minus the grace) can be judged by it;
        the cores each container holds are kept in ``held_groups``."""
        self.held_at = time.time()
        self.held_groups = self.held_whole = None
        try:
            found = holdings(self.settings.pod_resources_socket, (RESOURCE_VNPU, RESOURCE_NPU_CORE, RESOURCE_NPU))
        except PodResourcesUnavailable as exc:
            log.warning("%s; vNPUs are not destroyed (nor dies carved) until it answers", exc)
            return None
        held = found.devices
        self.held_groups = found.groups.get(RESOURCE_NPU_CORE, [])
        self.held_whole = held[RESOURCE_NPU]
        slices = {p for d in held[RESOURCE_VNPU] if (p := parse_vnpu_device_id(d)) is not None}
        return slices, held[RESOURCE_NPU_CORE]

    def reconcile(self) -> None:
        held = self.held()
        try:
            if self.mode == "static":
                self._reconcile_static(None if held is None else held[0])
                self._collect_dynamic()  # leftovers of dynamic mode
            elif self.mode == "dynamic":
                self._collect_dynamic()
                if self.manager.static_records():  # leftovers of static mode: an empty plan retires them
                    self._retire_static_leftovers(None if held is None else held[0])
        finally:
            if self.mode == "dynamic":
                assert self.cores is not None
                # Allocations younger than the grace period may not be in the kubelet's answer yet: count their
                # cores as held, or the snapshot (taken before them) would reserve their capacity a second time.
                young = {c for r in self.manager.ledger.records() if r.dynamic
                         and r.at > self.held_at - self.settings.collect_grace for c in r.cores}
                self.cores.refresh_reserved(None if held is None else held[1] | young)
            self.metrics.vnpus.set(len([r for r in self.manager.ledger.records() if r.state == "created"]))
            if self.on_reconciled is not None:
                self.on_reconciled()

    def _retire_static_leftovers(self, held_slices: set[tuple[str, int]] | None) -> None:
        try:
            report = self.manager.apply(Plan(devices=()), held_slices)
        except NpuSmiError as exc:
            log.error("retiring the static vNPUs left from static mode failed (retried every %gs): %s",
                      self.settings.reconcile_interval, exc)
            return
        if report.destroyed or report.errors or report.forgotten:
            log.info("static vNPUs left from static mode retired", extra={"report": report.summary()})

    def _reconcile_static(self, held_slices: set[tuple[str, int]] | None) -> None:
        """Apply the plan. A slice the plan drops is first withdrawn from ListAndWatch and destroyed only a grace
        period later, judged by a fresh pod-resources answer (one allocated in between is then seen as held). A die
        the plan newly carves, once offered whole, is likewise withdrawn first and carved a grace period later if a
        fresh answer shows it still free (the kubelet records an allocation only after Allocate returns)."""
        plan = self._current_plan()
        now = self.manager.clock()  # monotonic: the manager's withdrawal times are on the same clock
        grace = self.settings.collect_grace
        # withdrawn at least a grace period before this round's question to the kubelet
        asked = now - (time.time() - self.held_at)
        destroyable = {k for k, since in self._retiring.items() if asked - since >= grace}
        retiring: set[tuple[str, int]] = set()
        try:
            if plan is not None:
                report = self.manager.apply(plan, held_slices, destroyable, held_whole=self.held_whole,
                                            withdraw_grace=grace if self._advertising else 0.0, asked_at=asked)
                retiring = {(r.device_id, r.vnpu_id) for r in report.retiring + report.in_use}
                if report.created or report.destroyed or report.errors or report.adopted or report.forgotten:
                    log.info("static vNPUs applied", extra={"report": report.summary()})
        except NpuSmiError as exc:
            log.error("applying the vNPU plan failed (retried every %gs): %s", self.settings.reconcile_interval, exc)
        finally:
            records = self.manager.static_records()
            offered = [r for r in records if (r.device_id, r.vnpu_id) not in retiring
                       or (held_slices is not None and (r.device_id, r.vnpu_id) in held_slices)]
            carved = {r.device_id for r in self.manager.ledger.records()} | (plan.carved if plan else set()) | \
                self._dies_with_vnpus()
            self.vnpu.advertised.set_slots(vnpu_slots(self.devices, offered))
            self.npu.advertised.set_slots(whole_device_slots(d for d in self.inventory.devices if d.id not in carved))
            # withdrawn now, not when this round began: the apply above may have taken seconds (npu-smi creates)
            withdrawn = self.manager.clock()
            self._retiring = {k: self._retiring.get(k, withdrawn) for k in retiring}
            self.manager.withdrawn_at(withdrawn)

    def _dies_with_vnpus(self) -> set[str]:
        """Dies npu-smi shows any vNPU on (ours, another tool's, a leftover): never offered whole."""
        out = set()
        for device in self.inventory.devices:
            try:
                if self.manager.observe(device.id).vnpus:
                    out.add(device.id)
            except NpuSmiError:
                continue
        return out

    def _current_plan(self) -> Plan | None:
        """The plan of the ConfigMap file, re-made when the file changes; the last good plan while it is bad."""
        path = self.settings.config
        if not path:
            return self.plan or Plan(devices=())
        try:
            st = os.stat(path)
            stamp = (st.st_mtime, st.st_size)
        except OSError as exc:
            log.warning("vNPU config %s unreadable (%s); keeping the current vNPUs", path, exc)
            return self.plan
        if stamp == self._config_stamp and self.plan is not None:
            return self.plan
        self._config_stamp = stamp
        try:
            config = load_vnpu_config(path)
            capacity = {d: c for d in self.devices if (c := self.manager.capacity(d, for_plan=True)) is not None}
            self.plan = make_plan(config, self.inventory.devices, self.templates, capacity)
            log.info("vNPU plan from %s", path, extra={"plan": [
                f"{d.device_id}: {d.describe()}" for d in self.plan.devices]})
        except (PlanError, NpuSmiError) as exc:
            log.error("vNPU config %s rejected, nothing changed: %s", path, exc)
        return self.plan

    def _collect_dynamic(self) -> None:
        """Judged by the last answer of the kubelet (``held``): the cores each container holds, None if unknown."""
        self.manager.recover()
        destroyed, errors = self.manager.collect_dynamic(self.held_groups, self.settings.collect_grace,
                                                         self.templates, observed_at=self.held_at)
        for error in errors:
            log.warning("vNPU collection: %s", error)
        if destroyed:
            log.info("destroyed %d dynamic vNPUs no container holds", len(destroyed),
                     extra={"vnpus": [f"{r.device_id}/{r.vnpu_id}" for r in destroyed]})
