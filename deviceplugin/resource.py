"""One advertised resource (``npu.huawei.com/NPU``): its devices, how it picks and hands them out.

The gRPC server (:mod:`deviceplugin.server`) only translates messages; everything a resource decides lives here,
so the vNPU resources can plug into the same server and supervisor by providing the same methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from fuyao.contracts import RESOURCE_NPU, InterconnectKind
from fuyao.inventory import NodeInventory

from .allocation import Placement, preferred_allocation
from .config import PluginConfig
from .container_spec import ContainerSpec, container_spec
from .devices import DeviceRegistry

log = logging.getLogger(__name__)

SchedulerChoices = Callable[[str], Sequence[Sequence[str]]]
"""resource name → device sets the scheduler assigned to pending pods on this node."""


class ResourcePlugin(Protocol):
    """What the gRPC server and the supervisor need from a resource."""

    resource_name: str
    registry: DeviceRegistry

    @property
    def socket_name(self) -> str: ...

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]: ...

    def allocate(self, device_ids: Sequence[str]) -> ContainerSpec: ...


def socket_name_for(resource_name: str) -> str:
    """``npu.huawei.com/NPU`` → ``fuyao-npu.huawei.com-NPU.sock`` (unique per resource, no path separators)."""
    return "fuyao-" + resource_name.replace("/", "-") + ".sock"


class NpuResource:
    """Whole NPU dies: one device per die, grouped by HCCS fabric and NUMA node."""

    resource_name = RESOURCE_NPU

    def __init__(self, inventory: NodeInventory, config: PluginConfig, registry: DeviceRegistry,
                 scheduler_choices: SchedulerChoices | None = None):
        self.inventory = inventory
        self.config = config
        self.registry = registry
        self.scheduler_choices = scheduler_choices
        self.placement = {d.id: Placement(group=d.group, numa=d.numa_node, order=i)
                          for i, d in enumerate(inventory.devices)}
        rings = [g for g in inventory.groups if g.kind == InterconnectKind.HCCS_RING]
        self.ring_rules = bool(rings) and len(rings) == len(inventory.groups) and all(
            len(g.devices) <= 4 for g in rings)

    @property
    def socket_name(self) -> str:
        return socket_name_for(self.resource_name)

    def preferred(self, available: Sequence[str], must_include: Sequence[str], size: int) -> list[str]:
        choices: Sequence[Sequence[str]] = ()
        if self.scheduler_choices is not None and self.config.prefer_scheduler_assignment:
            try:
                choices = self.scheduler_choices(self.resource_name)
            except Exception as exc:  # the API server being slow or down must not fail pod admission
                log.warning("cannot read scheduler assignments of pending pods: %s", exc)
        return preferred_allocation(available, must_include, size, self.placement, ring_rules=self.ring_rules,
                                    scheduler_choices=choices)

    def allocate(self, device_ids: Sequence[str]) -> ContainerSpec:
        return container_spec(device_ids, self.registry.devices, self.registry.statuses(),
                              dev_root=self.config.dev_root, driver_mounts=self.config.driver_mounts,
                              host_root=self.config.host_root)
