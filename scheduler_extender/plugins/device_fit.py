"""Device fit: the pod's NPU / vNPU / npu-core / GPU requests fit the node's free devices, in a shape the node's
topology allows (a whole HCCS ring for 4 cards on 910 A1 boards; one die for a dynamic vNPU's cores).

Score: binpack (default) prefers nodes already busy, keeping whole cards and rings free for large jobs; spread
prefers empty nodes. A placement that stays inside one interconnect group scores higher than one that must span
groups.
"""

from __future__ import annotations

from typing import Literal

from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU

from .. import devices
from ..framework import Cycle, Rejection
from ..model import NodeInfo, PodInfo


class DeviceFitPlugin:
    name = "device-fit"

    def __init__(self, strategy: Literal["binpack", "spread"] = "binpack"):
        self.strategy = strategy

    def filter(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> Rejection | None:
        for resource, want in pod.accelerators.items():
            total = node.allocatable_int(resource)
            if total < want:
                return Rejection(f"node has {total} {resource}, the pod asks for {want}", unresolvable=True,
                                 code="node-too-small")
            free = node.free(resource)
            if free < want:
                return Rejection(f"insufficient {resource}: {free} free, {want} requested", code="insufficient-devices")
            if node.topology is None:
                continue
            if resource == RESOURCE_NPU:
                free_ids = devices.free_npus(node)
                if len(free_ids) < want:
                    return Rejection(f"{len(free_ids)} healthy free NPUs by device, {want} requested",
                                     code="insufficient-healthy-devices")
                unknown = devices.unplaced_npus(node)
                if unknown and devices.ring_board(node.topology) and want > 1:
                    return Rejection(f"{unknown} NPUs of this 910 A1 board are held by pods bound without "
                                     "npu.openfuyao.com/assigned: whether a whole ring is free is unknown",
                                     code="placement-unknown")
                if devices.ring_board(node.topology):
                    why = devices.ring_feasible(free_ids, node.topology, want)
                    if why:
                        return Rejection(why, unresolvable=want not in (1, 2, 4, len(node.topology.devices)),
                                         code="ring-shape")
            elif resource == RESOURCE_NPU_CORE:
                per_die = {d: len(c) for d, c in devices.free_cores(node).items()}
                if max(per_die.values(), default=0) < want:
                    return Rejection(f"no die has {want} free AI cores (most free on one die: "
                                     f"{max(per_die.values(), default=0)}); a vNPU lives on one die",
                                     code="cores-not-on-one-die")
            elif resource == RESOURCE_VNPU and len(devices.free_vnpus(node)) < want:
                return Rejection(f"{len(devices.free_vnpus(node))} free vNPU slices, {want} requested",
                                 code="insufficient-vnpus")
        return None

    def score(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> float:
        wanted = pod.accelerators
        if not wanted:
            return 0.5
        fractions = []
        for resource, want in wanted.items():
            total = node.allocatable_int(resource)
            if total <= 0:
                return 0.0
            fractions.append(min(1.0, (total - node.free(resource) + want) / total))
        fill = sum(fractions) / len(fractions)
        value = fill if self.strategy == "binpack" else 1.0 - fill
        want_npu = wanted.get(RESOURCE_NPU, 0)
        if want_npu and node.topology is not None and node.topology.groups:
            best = devices.cover(devices.free_group_sizes(node), want_npu)
            if best is not None:
                value = value * (1.0 if best <= 1 else 0.5)
        return value
