"""Creates and destroys vNPUs with npu-smi, keeping the ledger true to the hardware.

Decisions are pure (:func:`static_changes`, :func:`choose_vnpu_id`, :func:`entry_in_use`); :class:`VnpuManager`
is the I/O edge. Rules that keep vNPUs from leaking or vanishing under a workload:

- a vNPU is recorded ``pending`` before it is created, ``created`` after (see :mod:`vnpu.ledger`);
- only vNPUs in the ledger are destroyed, and never one in use (npu-smi shows a container bound to it, or the
  caller's ``in_use`` set — from the kubelet's pod-resources API — names it);
- a vNPU that disappeared behind our back (a reboot) is forgotten, not recreated twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fuyao.inventory import NpuDevice
from fuyao.npusmi import NpuSmi, NpuSmiError, NpuSmiUnsupported
from fuyao.npusmi.models import VnpuEntry, VnpuInfo

from .ledger import OWNER_STATIC, Ledger, VnpuRecord, dynamic_owner
from .plan import MAX_VNPUS_PER_CHIP, ChipCapacity, Plan
from .templates import Template, smallest_covering

log = logging.getLogger(__name__)

_UNBOUND_CONTAINERS = {"", "0", "-", "NA", "000000000000"}


class VnpuError(Exception):
    """A vNPU could not be created or destroyed; the message says which and why."""


def entry_in_use(entry: VnpuEntry) -> bool:
    """npu-smi shows a container bound to the vNPU (a non-zero status or container id)."""
    container = (entry.container_id or "").strip()
    status = (entry.status or "0").strip()
    return container not in _UNBOUND_CONTAINERS or status not in ("0", "")


def vnpu_id_range(physical_id: int) -> range:
    """The vNPU ids a chip may use: ``phy*16+100`` … ``+115``."""
    start = physical_id * MAX_VNPUS_PER_CHIP + 100
    return range(start, start + MAX_VNPUS_PER_CHIP)


def choose_vnpu_id(physical_id: int, taken: Iterable[int]) -> int | None:
    used = set(taken)
    return next((i for i in vnpu_id_range(physical_id) if i not in used), None)


@dataclass
class Changes:
    keep: list[VnpuRecord] = field(default_factory=list)
    create: list[tuple[str, Template, int]] = field(default_factory=list)  # (device, template, how many)
    destroy: list[VnpuRecord] = field(default_factory=list)
    forget: list[VnpuRecord] = field(default_factory=list)  # ledger entries whose vNPU no longer exists


def static_changes(plan: Plan, records: Sequence[VnpuRecord], existing: Mapping[str, set[int]]) -> Changes:
    """What to do to make the static vNPUs match ``plan``. ``existing``: device → vNPU ids npu-smi reports."""
    changes = Changes()
    static = [r for r in records if r.owner == OWNER_STATIC and r.state == "created"]
    devices = {r.device_id for r in static} | {d.device_id for d in plan.devices}
    for device in sorted(devices):
        target = plan.for_device(device)
        ours = [r for r in static if r.device_id == device]
        alive = [r for r in ours if r.vnpu_id in existing.get(device, set())]
        changes.forget.extend(r for r in ours if r not in alive)
        want = target.count if target is not None and target.template is not None else 0
        name = target.template.name if target is not None and target.template is not None else None
        matching = sorted((r for r in alive if r.template == name), key=lambda r: r.vnpu_id)
        changes.keep.extend(matching[:want])
        changes.destroy.extend(matching[want:] + [r for r in alive if r.template != name])
        if want > len(matching) and target is not None and target.template is not None:
            changes.create.append((device, target.template, want - len(matching)))
    return changes


@dataclass
class ApplyReport:
    created: list[VnpuRecord] = field(default_factory=list)
    destroyed: list[VnpuRecord] = field(default_factory=list)
    kept: list[VnpuRecord] = field(default_factory=list)
    in_use: list[VnpuRecord] = field(default_factory=list)  # should go, but a container uses it
    forgotten: list[VnpuRecord] = field(default_factory=list)
    adopted: list[VnpuRecord] = field(default_factory=list)  # pending records whose vNPU turned out to exist
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        return {
            "created": [f"{r.device_id}/{r.vnpu_id}:{r.template}" for r in self.created],
            "destroyed": [f"{r.device_id}/{r.vnpu_id}:{r.template}" for r in self.destroyed],
            "kept": len(self.kept), "in_use_not_destroyed": [f"{r.device_id}/{r.vnpu_id}" for r in self.in_use],
            "forgotten": [f"{r.device_id}/{r.vnpu_id}" for r in self.forgotten],
            "adopted": [f"{r.device_id}/{r.vnpu_id}" for r in self.adopted], "errors": self.errors,
        }


class VnpuManager:
    def __init__(self, npu_smi: NpuSmi, ledger: Ledger, devices: Sequence[NpuDevice],
                 on_event: Callable[[str, str], None] | None = None):
        self.npu_smi = npu_smi
        self.ledger = ledger
        self.devices = {d.id: d for d in devices}
        self.on_event = on_event  # (action, result) → metrics

    # Observation -----------------------------------------------------------------------------------------------
    def observe(self, device_id: str) -> VnpuInfo:
        d = self.devices[device_id]
        return self.npu_smi.vnpu_info(d.npu_id, d.chip_id)

    def capacity(self, device_id: str, info: VnpuInfo | None = None) -> ChipCapacity | None:
        """The chip's totals from ``info-vnpu``, else from the inventory (AICPU then unknown)."""
        try:
            info = info or self.observe(device_id)
        except NpuSmiUnsupported:
            info = None
        except NpuSmiError as exc:
            log.warning("cannot read vNPU capacity of %s: %s", device_id, exc)
            info = None
        if info is not None:
            r = info.resources
            core, mem, cpu = r.get("AICORE"), r.get("Memory"), r.get("AICPU")
            if core and core.total is not None and mem and mem.total is not None:
                return ChipCapacity(aicore=int(core.total), memory_gb=mem.total,
                                    aicpu=int(cpu.total) if cpu and cpu.total is not None else None)
        d = self.devices[device_id]
        if d.aicore is None or d.memory_mb is None:
            return None
        return ChipCapacity(aicore=d.aicore, memory_gb=d.memory_mb / 1024)

    def existing(self, device_ids: Iterable[str]) -> dict[str, dict[int, VnpuEntry]]:
        out: dict[str, dict[int, VnpuEntry]] = {}
        for device_id in device_ids:
            out[device_id] = {e.vnpu_id: e for e in self.observe(device_id).vnpus}
        return out

    # Recovery ----------------------------------------------------------------------------------------------------
    def recover(self) -> list[VnpuRecord]:
        """Resolve creations that were in flight when a previous process died: adopt or drop. Returns adopted."""
        pending = [r for r in self.ledger.records() if r.state == "pending"]
        adopted = []
        for record in pending:
            try:
                entries = {e.vnpu_id: e for e in self.observe(record.device_id).vnpus}
            except NpuSmiError as exc:
                log.warning("cannot resolve pending vNPU %s/%d yet: %s", record.device_id, record.vnpu_id, exc)
                continue
            found = entries.get(record.vnpu_id)
            if found is not None and found.template == record.template:
                done = record.model_copy(update={"state": "created"})
                self.ledger.put(done)
                adopted.append(done)
                log.info("adopted vNPU %d on %s (created before a restart)", record.vnpu_id, record.device_id,
                         extra={"device": record.device_id, "vnpu": record.vnpu_id, "template": record.template})
            else:
                self.ledger.remove(record)
                log.info("dropped pending vNPU %d on %s: it was never created", record.vnpu_id, record.device_id,
                         extra={"device": record.device_id, "vnpu": record.vnpu_id})
        return adopted

    # Changes ----------------------------------------------------------------------------------------------------
    def create(self, device_id: str, template: Template, owner: str) -> VnpuRecord:
        d = self.devices[device_id]
        entries = {e.vnpu_id for e in self.observe(device_id).vnpus}
        taken = entries | {r.vnpu_id for r in self.ledger.records() if r.device_id == device_id}
        vnpu_id = choose_vnpu_id(d.physical_id, taken)
        if vnpu_id is None:
            raise VnpuError(f"{device_id} has no free vNPU id (16 per chip)")
        record = VnpuRecord(vnpu_id=vnpu_id, device_id=device_id, npu_id=d.npu_id, chip_id=d.chip_id,
                            template=template.name, owner=owner, state="pending", at=time.time())
        self.ledger.put(record)
        try:
            self.npu_smi.create_vnpu(d.npu_id, d.chip_id, template.name, vnpu_id=vnpu_id)
        except NpuSmiError as exc:
            # The call may have failed after the driver created it (a timeout): look before giving up.
            if self._exists(device_id, vnpu_id, template.name):
                log.warning("npu-smi reported an error but vNPU %d on %s exists; keeping it: %s", vnpu_id,
                            device_id, exc)
            else:
                self.ledger.remove(record)
                self._event("create", "error")
                raise VnpuError(f"cannot create {template.name} vNPU {vnpu_id} on {device_id}: {exc}") from None
        done = record.model_copy(update={"state": "created"})
        self.ledger.put(done)
        self._event("create", "ok")
        log.info("created vNPU %d (%s) on %s for %s", vnpu_id, template.name, device_id, owner,
                 extra={"device": device_id, "vnpu": vnpu_id, "template": template.name, "owner": owner})
        return done

    def destroy(self, record: VnpuRecord) -> None:
        try:
            self.npu_smi.destroy_vnpu(record.npu_id, record.chip_id, record.vnpu_id)
        except NpuSmiError as exc:
            if not self._exists(record.device_id, record.vnpu_id, None, default=True):
                log.info("vNPU %d on %s was already gone", record.vnpu_id, record.device_id)
            else:
                self._event("destroy", "error")
                raise VnpuError(f"cannot destroy vNPU {record.vnpu_id} on {record.device_id}: {exc}") from None
        self.ledger.remove(record)
        self._event("destroy", "ok")
        log.info("destroyed vNPU %d (%s) on %s", record.vnpu_id, record.template, record.device_id,
                 extra={"device": record.device_id, "vnpu": record.vnpu_id, "template": record.template,
                        "owner": record.owner})

    def _exists(self, device_id: str, vnpu_id: int, template: str | None, default: bool = False) -> bool:
        try:
            entries = {e.vnpu_id: e for e in self.observe(device_id).vnpus}
        except NpuSmiError:
            return default
        return vnpu_id in entries and (template is None or entries[vnpu_id].template == template)

    def _event(self, action: str, result: str) -> None:
        if self.on_event is not None:
            self.on_event(action, result)

    def apply(self, plan: Plan, in_use: set[tuple[str, int]] | None) -> ApplyReport:
        """Make the static vNPUs match ``plan``. ``in_use``: (device, vNPU id) pairs containers hold, from the
        kubelet; None when that is unknown — then nothing is destroyed (creations still happen)."""
        report = ApplyReport(adopted=self.recover())
        records = self.ledger.records()
        devices = sorted({d.device_id for d in plan.devices} | {r.device_id for r in records
                                                                if r.owner == OWNER_STATIC})
        observed = self.existing(devices)
        changes = static_changes(plan, records, {d: set(e) for d, e in observed.items()})
        report.kept = changes.keep
        for record in changes.forget:
            self.ledger.remove(record)
            report.forgotten.append(record)
            log.warning("vNPU %d on %s vanished (reboot or someone else destroyed it); forgetting it",
                        record.vnpu_id, record.device_id)
        busy = set(in_use or ())
        for record in changes.destroy:
            entry = observed.get(record.device_id, {}).get(record.vnpu_id)
            if in_use is None:
                report.in_use.append(record)
                log.warning("vNPU %d on %s is no longer in the plan; not destroying it while the kubelet's view of "
                            "which containers use it is unknown", record.vnpu_id, record.device_id)
                continue
            if (record.device_id, record.vnpu_id) in busy or (entry is not None and entry_in_use(entry)):
                report.in_use.append(record)
                log.warning("vNPU %d on %s is no longer in the plan but a container uses it; keeping it until "
                            "it is free", record.vnpu_id, record.device_id)
                continue
            try:
                self.destroy(record)
                report.destroyed.append(record)
            except VnpuError as exc:
                report.errors.append(str(exc))
        for device_id, template, count in changes.create:
            for _ in range(count):
                try:
                    report.created.append(self.create(device_id, template, OWNER_STATIC))
                except (VnpuError, NpuSmiError) as exc:
                    report.errors.append(str(exc))
                    break
        return report

    def create_dynamic(self, device_id: str, cores: Sequence[str], templates: Sequence[Template],
                       template_name: str | None = None) -> VnpuRecord:
        """The vNPU for a container given ``cores`` (npu-core devices of one chip): ``template_name`` when the
        scheduler chose one, else the smallest template with at least that many AICores that still fits the chip.
        The same core set again re-uses its vNPU (the kubelet only hands out devices whose holder is gone)."""
        owner = dynamic_owner(cores)
        existing = next((r for r in self.ledger.records() if r.owner == owner and r.state == "created"), None)
        if existing is not None and self._exists(existing.device_id, existing.vnpu_id, existing.template):
            return existing
        if existing is not None:
            self.ledger.remove(existing)
        info = self.observe(device_id)
        free = {k: v.free for k, v in info.resources.items()}
        candidates = smallest_covering(templates, aicore=len(cores))
        if template_name is not None:
            candidates = [t for t in candidates if t.name == template_name]
            if not candidates:
                raise VnpuError(f"the scheduler's template {template_name!r} is unknown here or has fewer than "
                                f"{len(cores)} AICores (templates: {[t.name for t in templates]})")
        for template in candidates:
            if (free.get("AICORE") is None or template.aicore <= (free["AICORE"] or 0)) and \
                    (free.get("Memory") is None or template.memory_gb <= (free["Memory"] or 0) + 1e-9) and \
                    (free.get("AICPU") is None or template.aicpu <= (free["AICPU"] or 0)):
                return self.create(device_id, template, owner)
        if not candidates:
            raise VnpuError(f"no template has {len(cores)} AICores (templates: {[t.name for t in templates]})")
        raise VnpuError(f"{device_id} has no room for a {len(cores)}-core vNPU (free: "
                        f"{free.get('AICORE')} AICore, {free.get('Memory')} GB, {free.get('AICPU')} AICPU)")

    def collect_dynamic(self, held_cores: set[str] | None) -> tuple[list[VnpuRecord], list[str]]:
        """Destroy our dynamic vNPUs whose cores no container holds. ``held_cores`` None (the kubelet's view is
        unknown) destroys nothing: a vNPU is never destroyed on a guess."""
        if held_cores is None:
            return [], []
        destroyed, errors = [], []
        for record in self.ledger.records():
            if not record.dynamic or record.state != "created" or record.cores & held_cores:
                continue
            try:
                entry = {e.vnpu_id: e for e in self.observe(record.device_id).vnpus}.get(record.vnpu_id)
            except NpuSmiError as exc:
                errors.append(f"{record.device_id}: {exc}")
                continue
            if entry is not None and entry_in_use(entry):
                continue
            try:
                self.destroy(record)
                destroyed.append(record)
            except VnpuError as exc:
                errors.append(str(exc))
        return destroyed, errors

    def static_records(self) -> list[VnpuRecord]:
        return [r for r in self.ledger.records() if r.owner == OWNER_STATIC and r.state == "created"]
