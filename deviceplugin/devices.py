"""The devices one resource advertises and their health: a thread-safe registry with a change version.

ListAndWatch streams wait on the registry's version; the health monitor and Allocate update it. Health decisions
are pure functions of npu-smi output (:func:`statuses_from_info`, :func:`statuses_after_failures`), so they can be
tested without processes or clocks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from fuyao.contracts import DeviceHealth
from fuyao.inventory import NpuDevice
from fuyao.npusmi.models import ChipStatus, NpuSmiInfo


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


class DeviceRegistry:
    """The devices of one resource with their current status; ``version`` grows on every visible change."""

    def __init__(self, devices: Sequence[NpuDevice]):
        self._devices = {d.id: d for d in devices}
        self._status = {d.id: DeviceStatus(health=DeviceHealth.HEALTHY, reason="discovered") for d in devices}
        self._version = 1
        self._cond = threading.Condition()

    @property
    def devices(self) -> dict[str, NpuDevice]:
        return dict(self._devices)

    def device(self, device_id: str) -> NpuDevice | None:
        return self._devices.get(device_id)

    def status(self, device_id: str) -> DeviceStatus | None:
        with self._cond:
            return self._status.get(device_id)

    def statuses(self) -> dict[str, DeviceStatus]:
        with self._cond:
            return dict(self._status)

    def snapshot(self) -> tuple[int, tuple[AdvertisedDevice, ...]]:
        with self._cond:
            return self._version, tuple(
                AdvertisedDevice(id=d.id, health=self._status[d.id].health, numa_node=d.numa_node)
                for d in self._devices.values())

    def update(self, statuses: Mapping[str, DeviceStatus]) -> list[tuple[str, DeviceStatus, DeviceStatus]]:
        """Apply new statuses; returns (device, old, new) for every health change and bumps the version if any."""
        changes = []
        with self._cond:
            for device, new in statuses.items():
                old = self._status.get(device)
                if old is None:
                    continue
                if old.health != new.health:
                    changes.append((device, old, new))
                self._status[device] = new
            if changes:
                self._version += 1
                self._cond.notify_all()
        return changes

    def resend(self) -> None:
        """Make every ListAndWatch stream send the list again (after a failed Allocate, per the API contract)."""
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def wait_for_change(self, seen_version: int, timeout: float) -> int:
        """Block until the version differs from ``seen_version`` or ``timeout`` passes; returns the version."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen_version, timeout=timeout)
            return self._version
