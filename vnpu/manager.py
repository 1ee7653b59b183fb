"""Creates and destroys vNPUs with npu-smi, keeping the ledger true to the hardware.

Decisions are pure (:func:`static_changes`, :func:`choose_vnpu_id`, :func:`entry_in_use`); :class:`VnpuManager`
is the I/O edge. Rules that keep vNPUs from leaking or vanishing under a workload:

- a vNPU is recorded ``pending`` before it is created, ``created`` after (see :mod:`fuyao.vnpu.ledger`);
- only vNPUs in the ledger are destroyed, and never one in use (npu-smi shows a container bound to it, or the
  caller's ``in_use`` set — from the kubelet's pod-resources API — names it);
- a vNPU that disappeared behind our back (a reboot) is forgotten, not recreated twice;
- a pending creation is resolved only ``PENDING_GRACE_S`` after it began, whoever wrote it (a killed npu-smi call
  may still finish in the driver), and a record is replaced, never removed, before its vNPU is re-created — a
  re-create that never takes effect puts the record back (``created``, retried), it is never dropped;
- a die with no vNPU is carved only once no container may hold it whole (``apply``'s ``held_whole`` and
  ``withdraw_grace``);
- a static plan change creates nothing on a chip while surplus vNPUs of the old plan are still on it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import psutil

from fuyao.inventory import NpuDevice
from fuyao.npusmi import NpuSmi, NpuSmiError, NpuSmiTimeout, NpuSmiUnsupported
from fuyao.npusmi.models import FreeTotal, VnpuEntry, VnpuInfo

from .ledger import OWNER_STATIC, Ledger, VnpuRecord, dynamic_owner
from .plan import ChipCapacity, Plan, fits_all, vnpu_id_count
from .templates import Template, aicpu_with_vnpus, smallest_covering

log = logging.getLogger(__name__)

_UNBOUND_CONTAINERS = {"", "0", "-", "NA", "000000000000"}


class VnpuError(Exception):
    """A vNPU could not be created or destroyed; the message says which and why."""


class VnpuOutcomeUnknown(VnpuError):
    """npu-smi failed in a way that leaves a creation's outcome unknown: its record stays pending (never retried
    with another template or id meanwhile)."""


def entry_in_use(entry: VnpuEntry) -> bool:
    """npu-smi shows a container bound to the vNPU (a non-zero status or container id)."""
    container = (entry.container_id or "").strip()
    status = (entry.status or "0").strip()
    return container not in _UNBOUND_CONTAINERS or status not in ("0", "")


def vnpu_id_range(physical_id: int, chip_model: str = "") -> range:
    """The vNPU ids a chip may use: ``phy*16+100`` … ``+107`` on a 310P (Atlas inference series), … ``+115`` on
    the others (:func:`~fuyao.vnpu.plan.vnpu_id_count`)."""
    start = physical_id * 16 + 100
    return range(start, start + vnpu_id_count(chip_model))


def choose_vnpu_id(physical_id: int, taken: Iterable[int], chip_model: str = "") -> int | None:
    used = set(taken)
    return next((i for i in vnpu_id_range(physical_id, chip_model) if i not in used), None)


def with_sriov_aicpus(info: VnpuInfo, chip_model: str) -> VnpuInfo:
    """``info-vnpu`` with the AICPUs the driver budgets vNPUs with. A chip without vNPUs has SR-IOV off and reports
    its AICPUs before the first vNPU turns data CPUs into AICPUs (a 910B4: ``6/6``, then ``x/7``): its free and total
    AICPUs are raised to the model's figure with vNPUs (:func:`~fuyao.vnpu.templates.aicpu_with_vnpus`), when
    known and higher. A chip with vNPUs already reports that figure; it is returned as it is."""
    cpu = info.resources.get("AICPU")
    sriov = aicpu_with_vnpus(chip_model)
    if info.vnpus or cpu is None or cpu.total is None or sriov is None or sriov <= cpu.total:
        return info
    extra = sriov - cpu.total
    raised = FreeTotal(free=None if cpu.free is None else cpu.free + extra, total=float(sriov))
    return info.model_copy(update={"resources": {**info.resources, "AICPU": raised}})


@dataclass
class Changes:
    keep: list[VnpuRecord] = field(default_factory=list)
    create: list[tuple[str, Template, int]] = field(default_factory=list)  # (device, template, how many)
    destroy: list[VnpuRecord] = field(default_factory=list)
    forget: list[VnpuRecord] = field(default_factory=list)  # ledger entries whose vNPU no longer exists


def static_changes(plan: Plan, records: Sequence[VnpuRecord],
                   existing: Mapping[str, Collection[int] | Mapping[int, str]],
                   in_use: Collection[tuple[str, int]] = ()) -> Changes:
    """What to do to make the static vNPUs match ``plan``. ``existing``: device → the vNPU ids npu-smi reports
    (or id → its template: a record whose id now holds another template is someone else's vNPU, and ours has
    vanished). ``in_use``: (device, vNPU id) pairs containers hold: when a template has more than it needs, the
    ones in use are kept first."""
    changes = Changes()
    static = [r for r in records if r.owner == OWNER_STATIC and r.state == "created"]
    devices = {r.device_id for r in static} | {d.device_id for d in plan.devices}
    busy = set(in_use)
    for device in sorted(devices):
        target = plan.for_device(device)
        ours = [r for r in static if r.device_id == device]
        seen = existing.get(device, ())
        alive = [r for r in ours if r.vnpu_id in seen and (not isinstance(seen, Mapping)
                                                           or seen[r.vnpu_id] in ("", r.template))]
        changes.forget.extend(r for r in ours if r not in alive)
        parts = target.parts if target is not None else ()
        wanted = {t.name for t, _ in parts}
        changes.destroy.extend(r for r in alive if r.template not in wanted)
        for template, want in parts:
            matching = sorted((r for r in alive if r.template == template.name),
                              key=lambda r: ((r.device_id, r.vnpu_id) not in busy, r.vnpu_id))
            changes.keep.extend(matching[:want])
            changes.destroy.extend(matching[want:])
            if want > len(matching):
                changes.create.append((device, template, want - len(matching)))
    return changes


@dataclass
class ApplyReport:
    created: list[VnpuRecord] = field(default_factory=list)
    destroyed: list[VnpuRecord] = field(default_factory=list)
    kept: list[VnpuRecord] = field(default_factory=list)
    in_use: list[VnpuRecord] = field(default_factory=list)  # should go, but a container uses it
    retiring: list[VnpuRecord] = field(default_factory=list)  # should go: withdrawn first, destroyed later
    forgotten: list[VnpuRecord] = field(default_factory=list)
    adopted: list[VnpuRecord] = field(default_factory=list)  # pending records whose vNPU turned out to exist
    rolled_back: list[VnpuRecord] = field(default_factory=list)  # created, then destroyed: the chip's split failed
    errors: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # dies in the plan not carved yet: a container may hold them
    deferred: list[str] = field(default_factory=list)  # chips whose new vNPUs wait for their surplus ones to go
    withdrawing: list[str] = field(default_factory=list)  # dies to carve once withdrawn from whole offers long enough

    def summary(self) -> dict[str, object]:
        return {
            "created": [f"{r.device_id}/{r.vnpu_id}:{r.template}" for r in self.created],
            "destroyed": [f"{r.device_id}/{r.vnpu_id}:{r.template}" for r in self.destroyed],
            "kept": len(self.kept), "in_use_not_destroyed": [f"{r.device_id}/{r.vnpu_id}" for r in self.in_use],
            "forgotten": [f"{r.device_id}/{r.vnpu_id}" for r in self.forgotten],
            "adopted": [f"{r.device_id}/{r.vnpu_id}" for r in self.adopted], "errors": self.errors,
            "retiring": [f"{r.device_id}/{r.vnpu_id}" for r in self.retiring],
            "rolled_back": [f"{r.device_id}/{r.vnpu_id}:{r.template}" for r in self.rolled_back],
            "waiting_for_release": self.waiting, "waiting_for_surplus": self.deferred,
            "waiting_for_withdrawal": self.withdrawing,
        }


Presence = Literal["present", "absent", "unknown"]


def _process_alive(pid: int | None, started: float | None) -> bool:
    """Whether the process that wrote a pending record still runs (same pid *and* start time: pids are reused)."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        return started is None or abs(proc.create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


_SELF_STARTED = psutil.Process().create_time()
PENDING_GRACE_S = 60.0
"""A pending creation found absent is dropped only this long after it began, whoever wrote it (this process after a
timeout, a plugin killed by its liveness probe, ``fuyao-vnpu`` in another pid namespace): the killed npu-smi call
may still take effect in the driver (dropping it sooner would leak that vNPU, unrecorded)."""


def pending_expired(record: VnpuRecord, now: float) -> bool:
    """Whether a pending creation began long enough ago that its npu-smi call can no longer take effect."""
    return now - record.at >= PENDING_GRACE_S


class VnpuManager:
    """All vNPU changes of a node go through here, each inside the ledger's transaction."""

    def __init__(self, npu_smi: NpuSmi, ledger: Ledger, devices: Sequence[NpuDevice],
                 on_event: Callable[[str, str], None] | None = None,
                 templates: Sequence[Template] = ()):
        self.npu_smi = npu_smi
        self.ledger = ledger
        self.devices = {d.id: d for d in devices}
        self.on_event = on_event  # (action, result) → metrics
        self.templates = {t.name: t for t in templates}
        self.clock: Callable[[], float] = time.monotonic
        self._withdrawn: dict[str, float] = {}  # die → when it stopped being offered whole (clock)
        self._unconfirmed: set[str] = set()  # dies first found to carve by the last apply: withdrawn_at() stamps them

    # Observation -----------------------------------------------------------------------------------------------
    def device(self, device_id: str) -> NpuDevice:
        """The chip of a device id; :class:`NpuSmiError` naming it when today's inventory has no such chip (a
        ledger record from before a chip went missing, or before its ids changed): never a crash."""
        found = self.devices.get(device_id)
        if found is None:
            raise NpuSmiError(f"{device_id} is not in this node's inventory (npu-smi info lists no such chip now); "
                              "its vNPU records are left as they are")
        return found

    def _chip_model(self, device_id: str) -> str:
        found = self.devices.get(device_id)
        return found.chip_model if found is not None else ""

    def observe(self, device_id: str) -> VnpuInfo:
        """The chip's ``info-vnpu``, its AICPUs counted as the driver budgets vNPUs (:func:`with_sriov_aicpus`)."""
        d = self.device(device_id)
        return with_sriov_aicpus(self.npu_smi.vnpu_info(d.npu_id, d.chip_id), d.chip_model)

    def probe(self, device_id: str, vnpu_id: int, template: str | None = None) -> Presence:
        """Is the vNPU on the chip? ``unknown`` when npu-smi cannot tell (never treat that as absent)."""
        try:
            entries = {e.vnpu_id: e for e in self.observe(device_id).vnpus}
        except NpuSmiError as exc:
            log.warning("cannot check vNPU %d on %s: %s", vnpu_id, device_id, exc)
            return "unknown"
        found = entries.get(vnpu_id)
        return "present" if found is not None and (template is None or found.template == template) else "absent"

    def capacity(self, device_id: str, info: VnpuInfo | None = None, *, for_plan: bool = False) -> ChipCapacity | None:
        """What the chip offers. ``for_plan``: what a static plan may use — the free resources plus those of our
        own static vNPUs (the plan keeps or replaces them); vNPUs of others and dynamic ones are taken. Without
        ``info-vnpu`` (unsupported), the inventory's AICore count. AICores and AICPUs decide; memory is reported
        only (see :class:`ChipCapacity`)."""
        try:
            info = info or self.observe(device_id)
        except NpuSmiUnsupported:
            info = None
        except NpuSmiError as exc:
            log.warning("cannot read vNPU capacity of %s: %s", device_id, exc)
            info = None
        model = self._chip_model(device_id)
        if info is not None:
            r = info.resources
            core, mem, cpu = r.get("AICORE"), r.get("Memory"), r.get("AICPU")
            if core and core.total is not None and mem and mem.total is not None:
                if not for_plan:
                    return ChipCapacity(aicore=int(core.total), memory_gb=mem.total, chip_model=model,
                                        aicpu=int(cpu.total) if cpu and cpu.total is not None else None)
                alive = {e.vnpu_id: e.template for e in info.vnpus}
                ours = [self.templates.get(r.template) for r in self.ledger.records()
                        if r.device_id == device_id and r.owner == OWNER_STATIC and r.state == "created"
                        and alive.get(r.vnpu_id) in ("", r.template)]  # a vanished one's room is free already
                sizes = [t for t in ours if t is not None]
                return ChipCapacity(
                    chip_model=model, aicore=int(core.free or 0) + sum(t.aicore for t in sizes),
                    memory_gb=(mem.free or 0) + sum(t.memory_gb for t in sizes),
                    aicpu=(int(cpu.free or 0) + sum(t.aicpu for t in sizes)) if cpu and cpu.free is not None else None)
        d = self.devices.get(device_id)
        if d is None or d.aicore is None:
            return None
        return ChipCapacity(aicore=d.aicore, memory_gb=float("inf"), chip_model=d.chip_model)

    def existing(self, device_ids: Iterable[str]) -> dict[str, dict[int, VnpuEntry]]:
        out: dict[str, dict[int, VnpuEntry]] = {}
        for device_id in device_ids:
            out[device_id] = {e.vnpu_id: e for e in self.observe(device_id).vnpus}
        return out

    # Recovery ----------------------------------------------------------------------------------------------------
    def recover(self) -> list[VnpuRecord]:
        """Resolve creations left pending by a process that is gone (or by a create of ours that timed out): adopt
        the vNPU if npu-smi shows it, drop the record if npu-smi shows it absent once ``PENDING_GRACE_S`` has passed
        since the creation began, leave it otherwise (or if npu-smi cannot tell). Returns the adopted records."""
        adopted = []
        with self.ledger.transaction():
            for record in [r for r in self.ledger.records() if r.state == "pending"]:
                if record.pid != os.getpid() and _process_alive(record.pid, record.pid_started):
                    continue  # its creator may still be waiting on npu-smi
                presence = self.probe(record.device_id, record.vnpu_id, record.template)
                if presence == "present":
                    done = record.model_copy(update={"state": "created", "pid": None, "pid_started": None,
                                                     "recreate": False})
                    self.ledger.replace(record, done)
                    adopted.append(done)
                    log.info("adopted vNPU %d on %s (created before a crash)", record.vnpu_id, record.device_id,
                             extra={"device": record.device_id, "vnpu": record.vnpu_id, "template": record.template})
                elif presence == "absent" and pending_expired(record, time.time()):
                    self._expire(record)
        return adopted

    def _expire(self, record: VnpuRecord) -> None:
        """A pending creation that never took effect and no longer can: dropped — unless it re-created a vNPU a
        container holds (``recreate``), whose record goes back to ``created`` (its vNPU still absent), so the next
        :meth:`collect_dynamic` re-creates it again (or drops it once nobody holds it)."""
        if record.recreate:
            back = record.model_copy(update={"state": "created", "pid": None, "pid_started": None, "recreate": False})
            self.ledger.replace(record, back)
            log.warning("re-creating vNPU %d on %s never took effect; its record is kept and the re-create retried",
                        record.vnpu_id, record.device_id,
                        extra={"device": record.device_id, "vnpu": record.vnpu_id, "owner": record.owner})
            return
        self.ledger.remove(record)  # the killed npu-smi call can no longer take effect
        log.info("dropped pending vNPU %d on %s: it was never created", record.vnpu_id, record.device_id,
                 extra={"device": record.device_id, "vnpu": record.vnpu_id})

    # Changes ----------------------------------------------------------------------------------------------------
    def create(self, device_id: str, template: Template, owner: str, vnpu_id: int | None = None,
               replacing: VnpuRecord | None = None) -> VnpuRecord:
        """Create a vNPU (``vnpu_id``: re-create a known one with its id; ``replacing``: its record, which the pending
        record replaces in one write and which is put back if the driver refuses — a record is never removed before
        its replacement is written). Raises :class:`VnpuError`, or :class:`NpuSmiError` when npu-smi cannot list the
        chip's vNPUs (nothing changed); when npu-smi failed in a way that leaves the outcome unknown, the record stays
        pending for :meth:`recover`."""
        try:
            d = self.device(device_id)
        except NpuSmiError as exc:
            raise VnpuError(str(exc)) from None
        ids = vnpu_id_range(d.physical_id, d.chip_model)
        where = f"a {d.chip_model or 'chip'} with physical id {d.physical_id} has vNPU ids {ids.start}..{ids.stop - 1}"
        if vnpu_id is not None and vnpu_id not in ids:
            raise VnpuError(f"cannot create vNPU {vnpu_id} on {device_id}: {where} (phy_id*16+100 .. "
                            f"+{99 + len(ids)})")
        with self.ledger.transaction():
            entries = {e.vnpu_id for e in self.observe(device_id).vnpus}
            if vnpu_id is None:
                taken = entries | {r.vnpu_id for r in self.ledger.records() if r.device_id == device_id}
                vnpu_id = choose_vnpu_id(d.physical_id, taken, d.chip_model)
                if vnpu_id is None:
                    raise VnpuError(f"{device_id} has no free vNPU id: {where}, all taken")
            record = VnpuRecord(vnpu_id=vnpu_id, device_id=device_id, npu_id=d.npu_id, chip_id=d.chip_id,
                                template=template.name, owner=owner, state="pending", at=time.time(),
                                pid=os.getpid(), pid_started=_SELF_STARTED, recreate=replacing is not None)
            if replacing is not None:
                self.ledger.replace(replacing, record)
            else:
                self.ledger.put(record)
            try:
                self.npu_smi.create_vnpu(d.npu_id, d.chip_id, template.name, vnpu_id=vnpu_id)
            except NpuSmiError as exc:
                # The driver may have acted before the call failed (a timeout): look before giving up. After a
                # timeout the driver may still act (the killed npu-smi's call finishing in the kernel): absent
                # now proves nothing, so the record stays pending and recover() decides after PENDING_GRACE_S.
                presence = self.probe(device_id, vnpu_id, template.name)
                if presence == "absent" and isinstance(exc, NpuSmiTimeout):
                    presence = "unknown"
                if presence == "absent":
                    if replacing is not None:
                        self.ledger.replace(record, replacing)  # still there, still held: the next round retries
                    else:
                        self.ledger.remove(record)
                    self._event("create", "error")
                    raise VnpuError(f"cannot create {template.name} vNPU {vnpu_id} on {device_id}: {exc}") from None
                if presence == "unknown":
                    self._event("create", "error")
                    raise VnpuOutcomeUnknown(f"creating {template.name} vNPU {vnpu_id} on {device_id} has an unknown "
                                             f"outcome ({exc}); it stays pending until npu-smi answers") from None
                log.warning("npu-smi reported an error but vNPU %d on %s exists; keeping it: %s", vnpu_id,
                            device_id, exc)
            # its age counts from now: a reconcile that asked the kubelet while npu-smi worked (a create can take
            # seconds, or its whole timeout) must not judge the vNPU by that answer before Allocate returns
            done = record.model_copy(update={"state": "created", "at": time.time(), "pid": None,
                                             "pid_started": None, "recreate": False})
            self.ledger.replace(record, done)
        self._event("create", "ok")
        log.info("created vNPU %d (%s) on %s for %s", vnpu_id, template.name, device_id, owner,
                 extra={"device": device_id, "vnpu": vnpu_id, "template": template.name, "owner": owner})
        return done

    def destroy(self, record: VnpuRecord) -> None:
        with self.ledger.transaction():
            try:
                self.npu_smi.destroy_vnpu(record.npu_id, record.chip_id, record.vnpu_id)
            except NpuSmiError as exc:
                if self.probe(record.device_id, record.vnpu_id) != "absent":
                    self._event("destroy", "error")
                    raise VnpuError(f"cannot destroy vNPU {record.vnpu_id} on {record.device_id}: {exc}") from None
                log.info("vNPU %d on %s was already gone", record.vnpu_id, record.device_id)
            self.ledger.remove(record)
        self._event("destroy", "ok")
        log.info("destroyed vNPU %d (%s) on %s", record.vnpu_id, record.template, record.device_id,
                 extra={"device": record.device_id, "vnpu": record.vnpu_id, "template": record.template,
                        "owner": record.owner})

    def _event(self, action: str, result: str) -> None:
        if self.on_event is not None:
            self.on_event(action, result)

    def apply(self, plan: Plan, in_use: set[tuple[str, int]] | None,
              destroyable: set[tuple[str, int]] | None = None,
              held_whole: Collection[str] | None = (), withdraw_grace: float = 0.0,
              asked_at: float | None = None) -> ApplyReport:
        """Make the static vNPUs match ``plan``. ``in_use``: (device, vNPU id) pairs containers hold, from the
        kubelet; None when that is unknown — then nothing is destroyed (creations still happen on chips with no
        surplus vNPU). A chip whose surplus vNPUs stay (in use, retiring, or not destroyed) gets no new ones until
        they are gone (``deferred``): the new split is planned for the chip without them. ``destroyable``:
        when given, only these surplus vNPUs are destroyed now; the others are reported as ``retiring`` (the
        caller stops advertising them first and destroys them a grace period later). ``held_whole``: dies a
        container holds as a whole NPU (None: unknown): a die with no vNPU yet is not carved while it may be held
        (its vNPUs would be handed to other pods while the container uses the die); it is carved once released.
        ``withdraw_grace``: for a caller that offers dies whole (the device plugin's ``npu.huawei.com/NPU``), which
        must stop offering every die the plan carves (``plan.carved``) as soon as apply reports it
        (``withdrawing``): such a die is carved only on an apply at least this long after the first that found it
        free, and only if ``held_whole`` (asked anew, after the withdrawal) still does not name it — the kubelet may
        have handed it out whole just before the withdrawal and records that only after Allocate returns. A die
        found held starts over. 0 (a caller that offers no die whole): carved at once. The grace runs from the
        withdrawal the caller reports with :meth:`withdrawn_at` (else from this apply) to ``asked_at``, when
        ``held_whole`` was asked (``clock`` time; else now): an apply that takes seconds (slow creates elsewhere)
        or a question asked well before it must not count toward it."""
        with self.ledger.transaction():
            report = ApplyReport(adopted=self.recover())
            records = self.ledger.records()
            devices = sorted({d.device_id for d in plan.devices} | {r.device_id for r in records
                                                                    if r.owner == OWNER_STATIC})
            missing = {d for d in devices if d not in self.devices}
            for device_id in sorted(missing):  # its records stay: the chip may come back with its vNPUs
                report.errors.append(f"{device_id} is not in this node's inventory now: its vNPUs are left as they "
                                     "are until it is")
            observed = self.existing(d for d in devices if d not in missing)
            templates = {d: {i: e.template for i, e in entries.items()} for d, entries in observed.items()}
            bound = {(d, i) for d, entries in observed.items() for i, e in entries.items() if entry_in_use(e)}
            changes = static_changes(plan.without(missing), [r for r in records if r.device_id not in missing],
                                     templates, in_use=set(in_use or ()) | bound)
            report.kept = changes.keep
            for record in changes.forget:
                self.ledger.remove(record)
                report.forgotten.append(record)
                log.warning("vNPU %d on %s vanished (reboot or someone else destroyed it); forgetting it",
                            record.vnpu_id, record.device_id)
            busy = set(in_use or ())
            surplus_left: set[str] = set()  # chips that still carry vNPUs the plan no longer wants
            for record in changes.destroy:
                entry = observed.get(record.device_id, {}).get(record.vnpu_id)
                key = (record.device_id, record.vnpu_id)
                if in_use is None or key in busy or (entry is not None and entry_in_use(entry)):
                    report.in_use.append(record)
                    surplus_left.add(record.device_id)
                    log.info("vNPU %d on %s is no longer in the plan; kept while %s", record.vnpu_id,
                             record.device_id, "a container uses it" if in_use is not None else
                             "the kubelet's view of which containers use it is unknown")
                    continue
                if destroyable is not None and key not in destroyable:
                    report.retiring.append(record)
                    surplus_left.add(record.device_id)
                    continue
                try:
                    self.destroy(record)
                    report.destroyed.append(record)
                except VnpuError as exc:
                    report.errors.append(str(exc))
                    surplus_left.add(record.device_id)
            by_device: dict[str, list[tuple[Template, int]]] = {}
            for device_id, template, count in changes.create:
                by_device.setdefault(device_id, []).append((template, count))
            for device_id, parts in by_device.items():
                if device_id in surplus_left:
                    # the new vNPUs do not fit beside the old ones: creating them would have the driver refuse one
                    # and the split roll back, every round, while the old ones stay
                    report.deferred.append(device_id)
                    log.info("%s: its new vNPUs (%s) are created once the vNPUs the plan dropped are gone", device_id,
                             " + ".join(f"{n} x {t.name}" for t, n in parts))
                    continue
                fresh = not observed.get(device_id) and not any(r.device_id == device_id for r in records)
                if fresh and not self._may_carve(device_id, held_whole, withdraw_grace, report, asked_at):
                    continue
                self._withdrawn.pop(device_id, None)
                self._unconfirmed.discard(device_id)
                report.created.extend(self._create_split(device_id, parts, report))
            for device_id in set(self._withdrawn) - set(by_device):  # no longer to carve here
                del self._withdrawn[device_id]
                self._unconfirmed.discard(device_id)
            return report

    def withdrawn_at(self, at: float) -> None:
        """The caller stopped offering whole, at ``at`` (``clock`` time), the dies the last :meth:`apply` first
        found to carve (``withdrawing``): their grace runs from then."""
        for device_id in self._unconfirmed:
            if device_id in self._withdrawn:
                self._withdrawn[device_id] = at
        self._unconfirmed.clear()

    def _may_carve(self, device_id: str, held_whole: Collection[str] | None, withdraw_grace: float,
                   report: ApplyReport, asked_at: float | None = None) -> bool:
        """Whether a die with no vNPU may be carved now (see :meth:`apply`); else it is reported ``waiting`` (held,
        or unknown) or ``withdrawing`` (free, but not withdrawn from whole offers for ``withdraw_grace`` yet)."""
        if held_whole is not None and device_id in held_whole:
            self._withdrawn.pop(device_id, None)  # once released, it must stay withdrawn a whole grace again
            self._unconfirmed.discard(device_id)
        if held_whole is None or device_id in held_whole:
            report.waiting.append(device_id)
            log.info("%s is in the vNPU plan but %s: carved once it is free", device_id,
                     "a container holds it whole" if held_whole is not None else
                     "the kubelet's view of who holds it is unknown")
            return False
        if withdraw_grace <= 0:
            return True  # a caller that offers no die whole
        if device_id not in self._withdrawn:
            self._withdrawn[device_id] = self.clock()  # until the caller says when it withdrew it (withdrawn_at)
            self._unconfirmed.add(device_id)
        now = self.clock() if asked_at is None else asked_at
        if now - self._withdrawn[device_id] < withdraw_grace:
            report.withdrawing.append(device_id)
            log.info("%s is in the vNPU plan and free: carved once it has not been offered whole for %gs and is "
                     "still free", device_id, withdraw_grace)
            return False
        return True

    def _create_split(self, device_id: str, parts: list[tuple[Template, int]], report: ApplyReport) -> list[VnpuRecord]:
        """Create the missing vNPUs of one chip — a chip with no surplus vNPU of ours left (:meth:`apply` defers the
        others), so of ours only those the plan keeps are beside them. If the driver refuses one, undo what this call
        created on the chip, so it is left with the vNPUs it had when the call began rather than half carved; the
        next apply tries again (a destroy that fails in the undo leaves the older ones, reported)."""
        made: list[VnpuRecord] = []
        for template, count in parts:
            for k in range(count):
                try:
                    made.append(self.create(device_id, template, OWNER_STATIC))
                except (VnpuError, NpuSmiError) as exc:
                    undone = self._roll_back(made)
                    report.errors.append(f"{device_id}: the driver refused vNPU {k + 1} of {count} x {template.name} "
                                         f"({exc}); rolled back the {undone} created on this chip in this apply")
                    kept = len(made) - undone  # a failed destroy leaves the older ones: still there
                    report.rolled_back.extend(made[kept:])
                    return made[:kept]
        return made

    def _roll_back(self, records: list[VnpuRecord]) -> int:
        """Destroy ``records`` (newest first); returns how many were destroyed (a failure leaves the rest, logged,
        for the next reconcile)."""
        done = 0
        for record in reversed(records):
            try:
                self.destroy(record)
                done += 1
            except VnpuError as exc:
                log.error("rolling back vNPU %d on %s failed: %s", record.vnpu_id, record.device_id, exc,
                          extra={"device": record.device_id, "vnpu": record.vnpu_id})
                break
        return done

    def create_dynamic(self, device_id: str, cores: Sequence[str], templates: Sequence[Template],
                       template_name: str | None = None) -> VnpuRecord:
        """The vNPU for a container given ``cores`` (npu-core devices of one chip): ``template_name`` when the
        scheduler chose one, else the smallest template with at least that many AICores that still fits the chip.
        The same core set again re-uses its vNPU (the kubelet only hands out devices whose holder is gone); while an
        earlier creation for it has an unknown outcome (its npu-smi call timed out), that one is adopted once it
        appears, and the retry is refused with :class:`VnpuOutcomeUnknown` until then (or until its grace is over)."""
        owner = dynamic_owner(cores)
        with self.ledger.transaction():
            pending = next((r for r in self.ledger.records() if r.owner == owner and r.state == "pending"), None)
            if pending is not None:
                adopted = self._settle_pending(pending)
                if adopted is not None:
                    return adopted
            existing = next((r for r in self.ledger.records() if r.owner == owner and r.state == "created"), None)
            if existing is not None:
                presence = self.probe(existing.device_id, existing.vnpu_id, existing.template)
                if presence == "unknown":
                    raise VnpuError(f"cannot tell whether vNPU {existing.vnpu_id} on {existing.device_id} still "
                                    "exists (npu-smi does not answer)")
                if presence == "present":
                    fresh = existing.model_copy(update={"at": time.time()})  # a new holder: a new grace period
                    self.ledger.replace(existing, fresh)
                    return fresh
                self.ledger.remove(existing)
            info = self.observe(device_id)
            free = {k: v.free for k, v in info.resources.items()}
            candidates = smallest_covering(templates, aicore=len(cores))
            if template_name is not None:
                candidates = [t for t in candidates if t.name == template_name]
                if not candidates:
                    raise VnpuError(f"the scheduler's template {template_name!r} is unknown here or has fewer than "
                                    f"{len(cores)} AICores (templates: {[t.name for t in templates]})")
            refused: list[str] = []
            for template in candidates:
                # AICores and AICPUs, as npu-smi checks them; never the memory figure (ChipCapacity)
                if (free.get("AICORE") is None or template.aicore <= (free["AICORE"] or 0)) and \
                        (free.get("AICPU") is None or template.aicpu <= (free["AICPU"] or 0)):
                    problem = self._chip_rules(device_id, info, template, templates)
                    if problem:
                        refused.append(problem)
                        continue
                    try:
                        return self.create(device_id, template, owner)
                    except VnpuOutcomeUnknown:
                        raise
                    except VnpuError as exc:  # the driver refused this one: the next template may do
                        refused.append(str(exc))
            if refused:
                raise VnpuError(f"{device_id} has no room for a {len(cores)}-core vNPU: {'; '.join(refused)}")
            if not candidates:
                raise VnpuError(f"no template has {len(cores)} AICores (templates: {[t.name for t in templates]})")
            raise VnpuError(f"{device_id} has no room for a {len(cores)}-core vNPU (free: "
                            f"{free.get('AICORE')} AICore, {free.get('Memory')} GB, {free.get('AICPU')} AICPU)")

    def _settle_pending(self, pending: VnpuRecord) -> VnpuRecord | None:
        """An earlier creation for the same cores whose outcome is unknown: its vNPU (adopted, with a new grace
        period) once npu-smi shows it; None once its grace is over without it (the record is dropped: create anew);
        else :class:`VnpuOutcomeUnknown` — a second vNPU for the same container must not be made meanwhile."""
        presence = self.probe(pending.device_id, pending.vnpu_id, pending.template)
        now = time.time()
        if presence == "present":
            done = pending.model_copy(update={"state": "created", "pid": None, "pid_started": None, "at": now,
                                              "recreate": False})
            self.ledger.replace(pending, done)
            log.info("adopted vNPU %d on %s: the earlier creation for these cores finished", pending.vnpu_id,
                     pending.device_id, extra={"device": pending.device_id, "vnpu": pending.vnpu_id,
                                               "template": pending.template, "owner": pending.owner})
            return done
        if presence == "absent" and pending_expired(pending, now):
            self._expire(pending)  # a re-create's record is back to created: the caller finds it absent, anew
            return None
        wait = max(1, math.ceil(pending.at + PENDING_GRACE_S - now))
        why = ("npu-smi cannot tell now whether it exists" if presence == "unknown" else
               f"its creation was interrupted {now - pending.at:.0f} s ago (npu-smi timed out, or its caller stopped) "
               "and may still take effect in the driver")
        raise VnpuOutcomeUnknown(
            f"vNPU {pending.vnpu_id} ({pending.template}) on {pending.device_id} for these cores may still be "
            f"created: {why}; retry in {wait} s (it is adopted once it appears, or made anew once "
            f"{PENDING_GRACE_S:g} s have passed without it)")

    def _chip_rules(self, device_id: str, info: VnpuInfo, template: Template,
                    templates: Sequence[Template]) -> str | None:
        """Why ``template`` may not join the chip's vNPUs under its family's rules (a 310P's vGroups and at most 7
        vNPUs; on every chip, a template taking every media unit shares it only with media-less ones), None when
        it may; the AICore and AICPU budget is checked by the caller."""
        r = info.resources
        core, cpu = r.get("AICORE"), r.get("AICPU")
        capacity = ChipCapacity(aicore=int(core.total) if core and core.total is not None else 10**6,
                                memory_gb=float("inf"), chip_model=self._chip_model(device_id),
                                aicpu=int(cpu.total) if cpu and cpu.total is not None else None)
        if not capacity.is_310p:  # no vGroups: of the rules only the media one is left
            capacity = ChipCapacity(aicore=10**6, memory_gb=float("inf"), chip_model=capacity.chip_model)
        known = {t.name: t for t in templates} | self.templates
        counts = Counter(e.template for e in info.vnpus)
        counts[template.name] += 1
        if any(name not in known for name in counts):
            return None  # a vNPU of a template we do not know: npu-smi decides
        return fits_all(tuple((known[name], n) for name, n in counts.items()), capacity)

    def collect_dynamic(self, held_groups: Collection[frozenset[str]] | None, min_age_s: float = 0.0,
                        templates: Sequence[Template] = (),
                        observed_at: float | None = None) -> tuple[list[VnpuRecord], list[str]]:
        """Destroy our dynamic vNPUs whose cores no container holds; re-create (same id and template) those a
        container holds but that vanished (a node reboot; its record is replaced, never removed first, so a failed
        re-create is retried next time). ``held_groups``: the cores each container holds (one set per container):
        a vNPU is held when a container holds exactly its cores, the set Allocate created it for — a new pod given
        some of a dead pod's cores, or all of them and more, does not keep the dead pod's vNPU alive. It is the
        kubelet's answer, asked at
        ``observed_at``: only vNPUs created at least ``min_age_s`` before that moment can be judged by it (the kubelet
        records an allocation after Allocate returns). ``held_groups`` None (the kubelet's view is unknown) changes
        nothing: a vNPU is never destroyed on a guess."""
        if held_groups is None:
            return [], []
        destroyed, errors = [], []
        sizes = {t.name: t for t in templates} | self.templates
        held = set(held_groups)
        with self.ledger.transaction():
            for record in self.ledger.records():
                if not record.dynamic or record.state != "created":
                    continue
                if record.cores in held:
                    template = sizes.get(record.template)
                    if template is not None and self.probe(record.device_id, record.vnpu_id) == "absent":
                        try:
                            self.create(record.device_id, template, record.owner, record.vnpu_id, replacing=record)
                            log.warning("re-created vNPU %d on %s: a container holds it but it had vanished",
                                        record.vnpu_id, record.device_id)
                        except (VnpuError, NpuSmiError) as exc:
                            errors.append(f"{record.device_id}: cannot re-create vNPU {record.vnpu_id} a container "
                                          f"holds (retried next time): {exc}")
                    continue
                if record.at > (observed_at if observed_at is not None else time.time()) - min_age_s:
                    continue  # too young for this answer of the kubelet to know about it
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

    def touch(self, record: VnpuRecord) -> VnpuRecord:
        """Restart a record's grace period (call it as the Allocate that handed the vNPU out returns: the kubelet
        records the allocation only then)."""
        with self.ledger.transaction():
            current = next((r for r in self.ledger.records() if r.device_id == record.device_id
                            and r.vnpu_id == record.vnpu_id and r.owner == record.owner), None)
            if current is None:
                return record
            fresh = current.model_copy(update={"at": time.time()})
            self.ledger.replace(current, fresh)
            return fresh

    def static_records(self) -> list[VnpuRecord]:
        return [r for r in self.ledger.records() if r.owner == OWNER_STATIC and r.state == "created"]
