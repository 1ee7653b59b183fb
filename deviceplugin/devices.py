"""The devices each resource advertises and their health.

:class:`ChipHealth` holds the health of every die; :class:`ResourceDevices` holds what one resource advertises
(whole dies, vNPUs or AICores — :class:`Slot`) and derives their health from their chip. ListAndWatch streams wait
on a resource's version; the health monitor, vNPU changes and failed Allocates move it. Health decisions
are pure functions of npu-smi output (:func:`statuses_from_info`, :func:`statuses_after_failures`), so they can be
tested without processes or clocks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from fuyao.contracts import DeviceHealth
from fuyao.inventory import NpuDevice
from fuyao.npusmi.models import ChipStatus, NpuSmiInfo
from fuyao.vnpu.ledger import VnpuRecord


class DeviceStatus(BaseModel):
    """A device's health as the kubelet sees it, and why."""

    model_config = ConfigDict(frozen=True)

    health: DeviceHealth
    reason: str

    @property
    def healthy(self) -> bool:
        return self.health == DeviceHealth.HEALTHY


class AdvertisedDevice(BaseModel):
    """One entry of a ListAndWatch response."""

    model_config = ConfigDict(frozen=True)

    id: str
    health: DeviceHealth
    numa_node: int | None


def match_chips(devices: Iterable[NpuDevice], info: NpuSmiInfo) -> list[tuple[NpuDevice, ChipStatus | None]]:
    """Each device with its row of an ``npu-smi info`` table (by physical id when printed, else card/chip)."""
    by_position = {(c.npu_id, c.chip_id): c for c in info.chips}
    by_phy = {c.phy_id: c for c in info.chips if c.phy_id is not None}
    return [(d, by_phy.get(d.physical_id) or by_position.get((d.npu_id, d.chip_id))) for d in devices]


def statuses_from_info(devices: Iterable[NpuDevice], info: NpuSmiInfo) -> dict[str, DeviceStatus]:
    """Health of each device from one ``npu-smi info`` table: OK/Warning healthy, Alarm/Critical/UNKNOWN not.

    A device missing from the table (the driver lost it) is unhealthy too.
    """
    out: dict[str, DeviceStatus] = {}
    for device, chip in match_chips(devices, info):
        if chip is None:
            out[device.id] = DeviceStatus(health=DeviceHealth.UNHEALTHY,
                                          reason=f"NPU {device.npu_id} chip {device.chip_id} missing from npu-smi info")
        elif chip.health.schedulable:
            out[device.id] = DeviceStatus(health=DeviceHealth.HEALTHY, reason=f"npu-smi health {chip.health.value}")
        else:
            out[device.id] = DeviceStatus(health=DeviceHealth.UNHEALTHY,
                                          reason=f"npu-smi health {chip.health_raw or chip.health.value}")
    return out


def statuses_after_failures(previous: Mapping[str, DeviceStatus], failures: int, threshold: int,
                            error: str) -> dict[str, DeviceStatus]:
    """After a failed npu-smi poll: keep the last known health until ``threshold`` consecutive failures, then
    report every device Unhealthy (we can no longer vouch for any of them)."""
    if failures < threshold:
        return dict(previous)
    reason = f"npu-smi failed {failures} times in a row: {error}"
    return {device: DeviceStatus(health=DeviceHealth.UNHEALTHY, reason=reason) for device in previous}


class ChipHealth:
    """Health of every NPU die of the node (one per daemon); resources derive their devices' health from it."""

    def __init__(self, devices: Sequence[NpuDevice]):
        self._devices = {d.id: d for d in devices}
        self._status = {d.id: DeviceStatus(health=DeviceHealth.HEALTHY, reason="discovered") for d in devices}
        self.cond = threading.Condition()
        self._subscribers: list[ResourceDevices] = []

    @property
    def devices(self) -> dict[str, NpuDevice]:
        return dict(self._devices)

    def status(self, device_id: str) -> DeviceStatus | None:
        with self.cond:
            return self._status.get(device_id)

    def statuses(self) -> dict[str, DeviceStatus]:
        with self.cond:
            return dict(self._status)

    def subscribe(self, resource: ResourceDevices) -> None:
        with self.cond:
            self._subscribers.append(resource)

    def update(self, statuses: Mapping[str, DeviceStatus]) -> list[tuple[str, DeviceStatus, DeviceStatus]]:
        """Apply new statuses; returns (device, old, new) for every health change; resources whose devices sit
        on a changed chip get a new version (their ListAndWatch streams send the list again)."""
        changes = []
        with self.cond:
            for device, new in statuses.items():
                old = self._status.get(device)
                if old is None:
                    continue
                if old.health != new.health:
                    changes.append((device, old, new))
                self._status[device] = new
            if changes:
                changed = {c[0] for c in changes}
                for resource in self._subscribers:
                    resource._chips_changed(changed)
                self.cond.notify_all()
        return changes


@dataclass(frozen=True)
class Slot:
    """One device advertised to the kubelet: a whole die, a vNPU carved from one, or one AICore of one."""

    id: str
    parent: NpuDevice
    vnpu: VnpuRecord | None = None
    core: int | None = None


class ResourceDevices:
    """The devices one resource advertises; ``version`` grows on every change the kubelet must see."""

    def __init__(self, chips: ChipHealth, slots: Sequence[Slot] = (), numa: bool = True):
        """``numa``: tell the kubelet each device's NUMA node. Only when they are the host's real NUMA nodes
        (``NodeInventory.numa_source == "sysfs"``): numbers made up from CPU affinity order would have the kubelet's
        Topology Manager line CPUs up with the wrong node, or refuse pods under ``single-numa-node``."""
        self.chips = chips
        self.numa = numa
        self._slots = {s.id: s for s in slots}
        self._reserved: dict[str, str] = {}
        self._version = 1
        chips.subscribe(self)

    @property
    def cond(self) -> threading.Condition:
        return self.chips.cond

    def slots(self) -> dict[str, Slot]:
        with self.cond:
            return dict(self._slots)

    def slot(self, device_id: str) -> Slot | None:
        with self.cond:
            return self._slots.get(device_id)

    def status(self, device_id: str) -> DeviceStatus | None:
        """A reserved device (its capacity went to a larger vNPU) or a sick parent chip is Unhealthy."""
        with self.cond:
            slot = self._slots.get(device_id)
            if slot is None:
                return None
            if device_id in self._reserved:
                return DeviceStatus(health=DeviceHealth.UNHEALTHY, reason=self._reserved[device_id])
            return self.chips.status(slot.parent.id)

    def statuses(self) -> dict[str, DeviceStatus]:
        with self.cond:
            return {i: s for i in self._slots if (s := self.status(i)) is not None}

    def snapshot(self) -> tuple[int, tuple[AdvertisedDevice, ...]]:
        with self.cond:
            statuses = self.statuses()  # once (per device, a snapshot was quadratic: 384 cores, 0.1 s locked)
            return self._version, tuple(
                AdvertisedDevice(id=i, health=statuses[i].health,
                                 numa_node=slot.parent.numa_node if self.numa else None)
                for i, slot in self._slots.items())

    @property
    def version(self) -> int:
        return self._version

    def set_slots(self, slots: Sequence[Slot]) -> None:
        with self.cond:
            new = {s.id: s for s in slots}
            if new != self._slots:
                self._slots = new
                self._bump()

    def set_reserved(self, reserved: Mapping[str, str]) -> None:
        with self.cond:
            if dict(reserved) != self._reserved:
                self._reserved = dict(reserved)
                self._bump()

    def _chips_changed(self, chips: set[str]) -> None:  # called with cond held
        if any(s.parent.id in chips for s in self._slots.values()):
            self._version += 1

    def _bump(self) -> None:
        self._version += 1
        self.cond.notify_all()

    def resend(self) -> None:
        """Make every ListAndWatch stream send the list again (after a failed Allocate, per the API contract)."""
        with self.cond:
            self._bump()

    def wait_for_change(self, seen_version: int, timeout: float) -> int:
        """Block until the version differs from ``seen_version`` or ``timeout`` passes; returns the version."""
        with self.cond:
            self.cond.wait_for(lambda: self._version != seen_version, timeout=timeout)
            return self._version


def whole_device_slots(devices: Iterable[NpuDevice]) -> list[Slot]:
    return [Slot(id=d.id, parent=d) for d in devices]
