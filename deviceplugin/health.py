"""Polls ``npu-smi info`` and feeds device health and telemetry into the chip health and the metrics.

One ``npu-smi info`` call per interval gives every chip's health, AICore usage, temperature, power and memory.
Chips npu-smi does not call OK are graded by their error codes (:mod:`fuyao.deviceplugin.faults`), which may keep them
in service, reset or isolate them. A failing or hanging npu-smi never stops the loop: the client's timeout kills
it, the failure is counted, and after ``failure_threshold`` consecutive failures every device is reported
Unhealthy with the reason logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from fuyao.npusmi import NpuSmi, NpuSmiClosed, NpuSmiError
from fuyao.npusmi.models import NpuSmiInfo

from .devices import ChipHealth, DeviceStatus, match_chips, statuses_after_failures, statuses_from_info
from .faults.manager import FaultManager
from .metrics import PluginMetrics

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, npu_smi: NpuSmi, chips: ChipHealth, metrics: PluginMetrics, *, interval_s: float,
                 failure_threshold: int, on_change: Callable[[], None] | None = None,
                 faults: FaultManager | None = None):
        self.npu_smi = npu_smi
        self.chips = chips
        self.metrics = metrics
        self.interval_s = interval_s
        self.failure_threshold = failure_threshold
        self.on_change = on_change
        self.faults = faults
        self.failures = 0
        self._graded: dict[str, DeviceStatus] = {}  # the last statuses fault handling gave
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)

    def poll_once(self) -> None:
        try:
            info = self.npu_smi.info()
        except NpuSmiClosed:
            return  # shutting down: not a device failure
        except NpuSmiError as exc:
            if self._stop.is_set():
                return  # the call was killed by the shutdown
            self._failed(str(exc))
            return
        except Exception as exc:  # a parser bug must not end health checking
            log.exception("unexpected error polling npu-smi")
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        if self.failures:
            log.info("npu-smi answers again after %d failed polls", self.failures, extra={"failures": self.failures})
        self.failures = 0
        statuses = statuses_from_info(self.chips.devices.values(), info)
        if self.faults is not None:
            try:
                statuses = self.faults.update(info, statuses)
                self._graded = statuses
            except Exception:  # a bug in fault handling must not end health checking
                # nor bring back a die it had taken out (isolated, faulted): those stay as the last grading said
                log.exception("fault handling failed; health from npu-smi's Health column, and the dies fault "
                              "handling had taken out stay out")
                statuses = {d: (self._graded[d] if d in self._graded and not self._graded[d].healthy else s)
                            for d, s in statuses.items()}
        if not self._apply(statuses) and self.faults is not None and self.faults.published_changed \
                and self.on_change is not None:
            self.on_change()
        if self.faults is not None:
            try:
                self.faults.run_resets()  # after the Unhealthy statuses are out
            except Exception:
                log.exception("hot reset failed")
            try:  # after the statuses too; a link change is published on its own
                self.faults.poll_links()
                with self.chips.cond:
                    self.faults.commit()
                if self.faults.published_changed and self.on_change is not None:
                    self.on_change()
            except Exception:
                log.exception("reading the NPUs' links failed")
        self._telemetry(info)

    def _failed(self, error: str) -> None:
        self.failures += 1
        self.metrics.npu_smi_failures.inc()
        if self.failures == self.failure_threshold:
            for device in self.chips.devices.values():  # npu-smi says nothing: no reading is current any more
                self.metrics.observe_chip(device, None)
            log.error("npu-smi failed %d times in a row; reporting every device Unhealthy: %s", self.failures, error,
                      extra={"failures": self.failures, "error": error})
        else:
            log.warning("npu-smi health poll failed (%d in a row): %s", self.failures, error,
                        extra={"failures": self.failures, "error": error})
        self._apply(statuses_after_failures(self.chips.statuses(), self.failures, self.failure_threshold, error))

    def _apply(self, statuses: dict[str, DeviceStatus]) -> bool:
        """Apply statuses; True when a health changed (and ``on_change`` was called). The devices' health and the
        fault report change together (under the chips' lock, which node publishing takes too), so the node's
        topology and faults annotations never disagree. ``npu_health`` is set under that lock too, so no
        ListAndWatch stream reports a health that the metrics do not show yet."""
        with self.chips.cond:
            changes = self.chips.update(statuses)
            if self.faults is not None:
                self.faults.commit()
            devices = self.chips.devices
            for device_id, status in statuses.items():
                if device_id in devices:
                    self.metrics.set_health(devices[device_id], status.healthy)
        for device_id, old, new in changes:
            log.log(logging.INFO if new.healthy else logging.WARNING, "device %s is now %s (%s)", device_id,
                    new.health.value, new.reason,
                    extra={"device": device_id, "health": new.health.value, "was": old.health.value,
                           "reason": new.reason})
        if changes and self.on_change is not None:
            self.on_change()
        return bool(changes)

    def _telemetry(self, info: NpuSmiInfo) -> None:
        for device, chip in match_chips(self.chips.devices.values(), info):
            self.metrics.observe_chip(device, chip)  # None: gone from npu-smi's table, so are its readings
