"""The resources the plugin advertises, each a set of :class:`~fuyao.deviceplugin.devices.Slot` with its own rules.

- :class:`NpuResource` — ``npu.huawei.com/NPU``: whole dies not carved into vNPUs.
- :class:`VnpuResource` — ``npu.huawei.com/vNPU``: static vNPUs created from the ConfigMap.
- :class:`CoreResource` — ``npu.huawei.com/npu-core``: one device per AICore (dynamic mode); Allocate creates a
  vNPU covering the cores the kubelet picked.

A die is offered under exactly one resource, so nothing is counted twice. The gRPC server
(:mod:`fuyao.deviceplugin.server`) only translates messages; what a resource decides lives here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from fuyao.contracts import (
    RESOURCE_NPU,
    RESOURCE_NPU_CORE,
    RESOURCE_VNPU,
    ContainerAssignment,
    core_device_id,
    socket_name_for,
    vnpu_device_id,
)
from fuyao.inventory import NodeInventory, NpuDevice
from fuyao.npusmi import NpuSmiError
from fuyao.placement import Placement, preferred_allocation
from fuyao.products import Product, product_of, shape_problem
from fuyao.vnpu.ledger import VnpuRecord
from fuyao.vnpu.manager import VnpuError, VnpuManager
from fuyao.vnpu.templates import Template

from .config import PluginConfig
from .container_spec import AllocationRefused, ContainerSpec, container_spec
from .devices import ResourceDevices, Slot

log = logging.getLogger(__name__)

SchedulerChoices = Callable[[str], Sequence[ContainerAssignment]]
"""resource name → what the scheduler assigned to pending pods' containers on this node (oldest pod first)."""


class ResourcePlugin(Protocol):
    """What the gRPC server and the supervisor need from a resource."""

    resource_name: str
    advertised: ResourceDevices

    @property
    def socket_name(self) -> str: ...

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]: ...

    def allocate(self, device_ids: Sequence[str]) -> ContainerSpec: ...


class SlotResource:
    """Shared behaviour: preferred allocation by placement, Allocate through :func:`container_spec`."""

    resource_name = ""
    product: Product | None = None  # rules on which NPUs go together (whole dies only)

    def __init__(self, inventory: NodeInventory, config: PluginConfig, advertised: ResourceDevices,
                 scheduler_choices: SchedulerChoices | None = None):
        self.inventory = inventory
        self.config = config
        self.advertised = advertised
        self.scheduler_choices = scheduler_choices
        self._order = {d.id: i for i, d in enumerate(inventory.devices)}
        self.links_down: Callable[[], Iterable[str]] = lambda: ()
        """Dies whose RoCE link is down (the fault manager's): whole dies for one-die requests only."""

    @property
    def socket_name(self) -> str:
        return socket_name_for(self.resource_name)

    def placement(self, slot: Slot) -> Placement:
        """Sub-devices of one die group by die (packing a die leaves others whole); dies by interconnect group."""
        return Placement(group=slot.parent.id, numa=slot.parent.numa_node,
                         order=self._order.get(slot.parent.id, 0) * 1000 + (slot.core or 0) +
                         (slot.vnpu.vnpu_id if slot.vnpu else 0))

    def choices(self) -> Sequence[ContainerAssignment]:
        if self.scheduler_choices is None or not self.config.prefer_scheduler_assignment:
            return ()
        try:
            return self.scheduler_choices(self.resource_name)
        except Exception as exc:  # the API server being slow or down must not fail pod admission
            log.warning("cannot read scheduler assignments of pending pods: %s", exc)
            return ()

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        slots = self.advertised.slots()
        placement = {i: self.placement(s) for i, s in slots.items()}
        down = set(self.links_down())
        single_only = [i for i, s in slots.items() if s.parent.id in down and s.vnpu is None and s.core is None]
        return preferred_allocation(available, must_include, size, placement, product=self.product,
                                    scheduler_choices=[c.devices for c in self.choices()], single_only=single_only,
                                    node_size=len(self.inventory.devices))

    def allocate(self, device_ids: Sequence[str]) -> ContainerSpec:
        return container_spec(device_ids, self.advertised.slots(), self.advertised.statuses(),
                              dev_root=self.config.dev_root, driver_mounts=self.config.driver_mounts,
                              host_root=self.config.host_root, extra_env=self.config.container_env)


class NpuResource(SlotResource):
    """Whole NPU dies, grouped by HCCS fabric and NUMA node."""

    resource_name = RESOURCE_NPU

    def __init__(self, inventory: NodeInventory, config: PluginConfig, advertised: ResourceDevices,
                 scheduler_choices: SchedulerChoices | None = None):
        super().__init__(inventory, config, advertised, scheduler_choices)
        self.product = product_of(inventory.to_topology())
        log.info("product %s: %s", self.product.name, self.product.description,
                 extra={"product": self.product.name})

    def placement(self, slot: Slot) -> Placement:
        return Placement(group=slot.parent.group, numa=slot.parent.numa_node, order=slot.parent.physical_id,
                         card=slot.parent.npu_id)  # ordered by physical id, as the extender orders them

    def allocate(self, device_ids: Sequence[str]) -> ContainerSpec:
        """Refuses a set the product forbids (a count it never takes, NPUs that must not go together), naming the
        rule; the scheduler extender refuses such pods before they reach a node."""
        assert self.product is not None
        slots = self.advertised.slots()
        known = [d for d in dict.fromkeys(device_ids) if d in slots]
        if len(known) == len(device_ids):
            problem = shape_problem(self.product, known, {i: self.placement(slots[i]) for i in known},
                                    len(self.inventory.devices))
            if problem is not None:
                raise AllocationRefused("FAILED_PRECONDITION", f"{', '.join(device_ids)}: {problem}")
        return super().allocate(device_ids)


def vnpu_slots(devices: dict[str, NpuDevice], records: Iterable[VnpuRecord]) -> list[Slot]:
    return [Slot(id=vnpu_device_id(r.device_id, r.vnpu_id), parent=devices[r.device_id], vnpu=r)
            for r in sorted(records, key=lambda r: (r.device_id, r.vnpu_id)) if r.device_id in devices]


class VnpuResource(SlotResource):
    """Static vNPUs: one device per vNPU in the ledger."""

    resource_name = RESOURCE_VNPU


def core_slots(devices: Iterable[NpuDevice], aicore: dict[str, int]) -> list[Slot]:
    return [Slot(id=core_device_id(d.id, k), parent=d, core=k) for d in devices for k in range(aicore.get(d.id, 0))]


class CoreResource(SlotResource):
    """Dynamic vNPUs: the kubelet counts AICores; Allocate turns the cores it picked into a vNPU."""

    resource_name = RESOURCE_NPU_CORE

    def __init__(self, inventory: NodeInventory, config: PluginConfig, advertised: ResourceDevices,
                 manager: VnpuManager, templates: Sequence[Template],
                 scheduler_choices: SchedulerChoices | None = None):
        super().__init__(inventory, config, advertised, scheduler_choices)
        self.manager = manager
        self.templates = tuple(templates)
        self._reserve_lock = threading.Lock()
        self._last_held: set[str] | None = None
        self._reserved: dict[str, str] = {}

    def allocate(self, device_ids: Sequence[str]) -> ContainerSpec:
        slots = self.advertised.slots()
        statuses = self.advertised.statuses()
        unknown = [d for d in device_ids if d not in slots]
        if unknown or not device_ids:
            raise AllocationRefused("INVALID_ARGUMENT", f"unknown npu-core devices {unknown or '(none)'}")
        unhealthy = {d: statuses[d].reason for d in device_ids if not statuses[d].healthy}
        if unhealthy:
            raise AllocationRefused("FAILED_PRECONDITION", "unavailable cores requested (" +
                                    "; ".join(f"{d}: {r}" for d, r in unhealthy.items()) + ")")
        parents = {slots[d].parent.id for d in device_ids}
        if len(parents) != 1:
            raise AllocationRefused("INVALID_ARGUMENT", f"the cores of one container must be on one chip, got "
                                                        f"cores of {sorted(parents)}")
        parent = slots[device_ids[0]].parent
        template = next((c.vnpu_template for c in self.choices()
                         if c.vnpu_template and set(c.devices) == set(device_ids)), None)
        try:
            record = self.manager.create_dynamic(parent.id, list(device_ids), self.templates, template)
        except (VnpuError, NpuSmiError) as exc:
            raise AllocationRefused("FAILED_PRECONDITION", str(exc)) from None
        finally:
            self.refresh_reserved(just_allocated=device_ids, only=parent.id)
        slot = Slot(id=vnpu_device_id(parent.id, record.vnpu_id), parent=parent, vnpu=record)
        spec = container_spec([slot.id], {slot.id: slot}, {slot.id: statuses[device_ids[0]]},
                              dev_root=self.config.dev_root, driver_mounts=self.config.driver_mounts,
                              host_root=self.config.host_root, extra_env=self.config.container_env)
        self.manager.touch(record)  # its grace period starts as the kubelet learns of the allocation
        return spec

    def refresh_reserved(self, held_cores: set[str] | None = None, just_allocated: Sequence[str] = (),
                         only: str | None = None) -> None:
        """Report as Unhealthy the cores the kubelet thinks free whose capacity is gone (a larger-than-asked
        vNPU, one awaiting collection, a foreign vNPU), so the kubelet's free count matches the chip's.
        ``held_cores``: what the kubelet holds (pod-resources, from the reconcile loop); without it (in Allocate),
        the last answer plus the cores just allocated."""
        with self._reserve_lock:
            if held_cores is not None:
                self._last_held = set(held_cores)
            elif self._last_held is None:
                self._last_held = {c for r in self.manager.ledger.records() if r.dynamic for c in r.cores}
            held_cores = self._last_held | set(just_allocated)
            slots = self.advertised.slots()
            reserved: dict[str, str] = {} if only is None else {
                i: r for i, r in self._reserved.items() if not i.startswith(only + "-c")}
            for device in self.inventory.devices:
                if only is not None and device.id != only:
                    continue
                mine = sorted((s for s in slots.values() if s.parent.id == device.id), key=lambda s: s.core or 0)
                if not mine:
                    continue
                try:
                    core = self.manager.observe(device.id).resources.get("AICORE")
                except Exception as exc:
                    log.debug("cannot read free AICores of %s: %s", device.id, exc)
                    continue
                if core is None or core.free is None:
                    continue
                unheld = [s for s in mine if s.id not in held_cores]
                surplus = len(unheld) - int(core.free)
                for s in unheld[len(unheld) - surplus:] if surplus > 0 else []:
                    reserved[s.id] = f"capacity used by a vNPU on {device.id}"
            self._reserved = reserved
            self.advertised.set_reserved(reserved)

