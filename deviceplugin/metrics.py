"""Prometheus metrics of the device plugin: per-NPU telemetry (the design doc's alerts use ``npu_utilization``)
and the plugin's own counters. Each daemon owns one registry, so tests can run several in a process."""

from __future__ import annotations

import contextlib
from collections.abc import Container, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from fuyao.inventory import NpuDevice
from fuyao.metrics_http import MetricsEndpoint
from fuyao.npusmi.models import ChipStatus

_DEVICE_LABELS = ("node", "device", "chip")
_MB = 1024 * 1024


class PluginMetrics:
    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.utilization = Gauge("npu_utilization", "AI Core utilization of the NPU, 0..1 (npu-smi AICore%)",
                                 _DEVICE_LABELS, registry=r)
        self.temperature = Gauge("npu_temperature_celsius", "NPU chip temperature", _DEVICE_LABELS, registry=r)
        self.power = Gauge("npu_power_watts", "NPU power draw", _DEVICE_LABELS, registry=r)
        self.hbm_used = Gauge("npu_hbm_used_bytes", "NPU HBM (or DDR on 310-class chips) in use", _DEVICE_LABELS,
                              registry=r)
        self.hbm_total = Gauge("npu_hbm_total_bytes", "NPU HBM (or DDR on 310-class chips) capacity", _DEVICE_LABELS,
                               registry=r)
        self.allocated = Gauge("npu_allocated", "1 while a container holds the whole NPU",
                               _DEVICE_LABELS, registry=r)
        self.health = Gauge("npu_health", "1 when the device is advertised Healthy, 0 when Unhealthy",
                            _DEVICE_LABELS, registry=r)
        self.allocations = Counter("fuyao_deviceplugin_allocations_total",
                                   "Allocate calls per container by result", ("resource", "result"), registry=r)
        self.allocate_seconds = Histogram(
            "fuyao_deviceplugin_allocate_duration_seconds", "Time to answer one Allocate call", ("resource",),
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 5.0, 10.0),
            registry=r)  # dynamic vNPUs: Allocate runs npu-smi's create
        self.registrations = Counter("fuyao_deviceplugin_registrations_total",
                                     "Registrations with the kubelet by result", ("resource", "result"), registry=r)
        self.registered = Gauge("fuyao_deviceplugin_registered", "1 while the resource is registered with the "
                                "running kubelet (0: waiting for it, registering, or serving a fresh socket)",
                                ("resource",), registry=r)
        self.npu_smi_failures = Counter("fuyao_deviceplugin_npu_smi_failures_total",
                                        "Failed npu-smi health polls", registry=r)
        self.devices = Gauge("fuyao_deviceplugin_devices", "Advertised devices by health",
                             ("resource", "health"), registry=r)
        self.vnpu_operations = Counter("fuyao_vnpu_operations_total", "vNPU creations and destructions by result",
                                       ("action", "result"), registry=r)
        self.vnpus = Gauge("fuyao_vnpu_vnpus", "vNPUs fuyao created that exist now", registry=r)
        self.fault = Gauge("fuyao_npu_fault", "1 while the NPU has a fault: its fault-table level (MindCluster's "
                           "names) and the plugin's action (keep, unhealthy, reset, isolate)",
                           ("node", "device", "level", "action"), registry=r)
        self.faults = Counter("fuyao_npu_faults_total", "NPU faults seen (a new code or level on an NPU), by level",
                              ("node", "level"), registry=r)
        self.resets = Counter("fuyao_npu_resets_total", "Hot resets of NPUs by result (ok, failed)",
                              ("node", "result"), registry=r)
        self.isolated = Gauge("fuyao_npu_isolated", "1 while the NPU is isolated (until an operator releases it)",
                              ("node", "device"), registry=r)
        self.link_up = Gauge("npu_link_up", "1 when the NPU's RoCE link is up (hccn_tool -link -g), 0 when down",
                             _DEVICE_LABELS, registry=r)
        self._fault_labels: dict[str, tuple[str, str, str, str]] = {}
        self._endpoint = MetricsEndpoint(self.registry)

    def observe_allocation(self, devices: Iterable[NpuDevice], held: Container[str]) -> None:
        for device in devices:
            self.allocated.labels(self.node, device.id, device.chip_model).set(1 if device.id in held else 0)

    def observe_chip(self, device: NpuDevice, chip: ChipStatus | None) -> None:
        """The chip's telemetry as npu-smi printed it; a value it no longer prints (or a chip it no longer lists:
        ``None``) leaves the page, instead of its last reading staying there for good."""
        labels = (self.node, device.id, device.chip_model)
        memory = (chip.hbm_mb or chip.memory_mb) if chip is not None else None
        readings = ((self.utilization, chip.aicore_percent / 100.0
                     if chip is not None and chip.aicore_percent is not None else None),
                    (self.temperature, chip.temp_c if chip is not None else None),
                    (self.power, chip.power_w if chip is not None else None),
                    (self.hbm_used, memory.used * _MB if memory is not None and memory.used is not None else None),
                    (self.hbm_total, memory.total * _MB if memory is not None and memory.total is not None else None))
        for family, value in readings:
            if value is not None:
                family.labels(*labels).set(value)
            else:
                with contextlib.suppress(KeyError):
                    family.remove(*labels)

    def set_health(self, device: NpuDevice, healthy: bool) -> None:
        self.health.labels(self.node, device.id, device.chip_model).set(1 if healthy else 0)

    def set_fault(self, device: NpuDevice, level: str | None, action: str | None) -> None:
        labels = (self.node, device.id, level, action) if level and action else None
        old = self._fault_labels.get(device.id)
        if old == labels:
            return
        if old is not None:
            self.fault.remove(*old)
            del self._fault_labels[device.id]
        if labels is not None:
            self.fault.labels(*labels).set(1)
            self._fault_labels[device.id] = labels

    def set_isolated(self, device: NpuDevice, isolated: bool) -> None:
        self.isolated.labels(self.node, device.id).set(1 if isolated else 0)

    def set_link(self, device: NpuDevice, up: bool | None) -> None:
        labels = (self.node, device.id, device.chip_model)
        if up is None:
            with contextlib.suppress(KeyError):
                self.link_up.remove(*labels)
        else:
            self.link_up.labels(*labels).set(1 if up else 0)

    def serve(self, address: str) -> tuple[str, int]:
        """Serve /metrics on ``HOST:PORT`` (port 0 picks a free one); returns the bound address."""
        return self._endpoint.serve(address)

    def shutdown(self) -> None:
        self._endpoint.shutdown()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
