"""Device-level view of a node for the extender: which NPU dies, vNPU slices and AI cores are free, how they
spread over NUMA nodes and interconnect groups, and which ones a pod would get (with the kernel's placement
function — the same one the device plugin uses, so the scheduler's choice is the plugin's preference).

Free devices come from the node's ``npu.openfuyao.com/topology`` annotation (healthy devices) minus the devices
in the ``npu.openfuyao.com/assigned`` annotations of the pods on the node. Pure functions of a :class:`NodeInfo`.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fuyao import products
from fuyao.contracts import (
    RESOURCE_NPU,
    RESOURCE_NPU_CORE,
    RESOURCE_VNPU,
    DeviceHealth,
    NodeTopology,
    core_device_id,
)
from fuyao.placement import Placement, preferred_allocation

from .model import NodeInfo, NpuSteps
from .object_memo import ObjectMemo


def placements(topology: NodeTopology) -> dict[str, Placement]:
    """Each die's place; ordered by physical id, as the device plugin orders them (the annotation's keys are sorted
    as strings: Ascend910-10 before Ascend910-2)."""
    return {i: Placement(group=d.group, numa=d.numa_node, order=d.physical_id, card=d.npu_id)
            for i, d in topology.devices.items()}


_facts: ObjectMemo[tuple[products.Product, dict[str, Placement]]] = ObjectMemo()
"""Per topology: its product and its dies' places."""
_chosen: ObjectMemo[tuple[str, ...]] = ObjectMemo()
"""Per topology, by (free dies, count): the dies ``choose_npus`` picked."""


def _topology_facts(topology: NodeTopology) -> tuple[products.Product, dict[str, Placement]]:
    return _facts.get(topology, None, lambda: (products.product_of(topology), placements(topology)))


def product(node: NodeInfo) -> products.Product:
    """The node's product (its rules on NPU counts and which NPUs go together), a function of its topology."""
    assert node.topology is not None
    return _topology_facts(node.topology)[0]


def _placements(node: NodeInfo) -> dict[str, Placement]:
    assert node.topology is not None
    return _topology_facts(node.topology)[1]


def never(node: NodeInfo, count: int) -> bool:
    """The node's product never takes ``count`` NPUs in one pod."""
    assert node.topology is not None
    return products.count_problem(product(node), count, len(node.topology.devices)) is not None


def count_problem(node: NodeInfo, count: int) -> str | None:
    """Why a pod of ``count`` NPUs cannot get a set the node's product allows from the dies free now."""
    assert node.topology is not None
    return _free_problem(node.topology, free_npus(node), count)


def _free_problem(topology: NodeTopology, free: Sequence[str], count: int) -> str | None:
    """Why no set of ``count`` of the ``free`` dies that the product allows can go to one container."""
    down = 0
    if count > 1:  # a multi-die container never gets a die whose link is down
        linked = [d for d in free if topology.devices[d].link_up is not False]
        down, free = len(free) - len(linked), linked
    found, placed = _topology_facts(topology)
    problem = products.free_problem(found, free, count, placed, len(topology.devices))
    if problem is not None and down:
        problem += f" ({down} more free with their RoCE link down: those take single-NPU containers only)"
    return problem


def free_npus(node: NodeInfo) -> list[str]:
    """Healthy whole dies no pod holds and no static vNPU carves, in npu-smi order (memoised per node state)."""
    if node.topology is None:
        return []
    found = node.memo.get("free_npus")
    if found is None:
        taken = node.assigned.get(RESOURCE_NPU, set())
        # taken: assigned by our binder, or held per the kubelet (published by the device plugin)
        found = node.memo["free_npus"] = [i for i, d in node.topology.devices.items()
                                          if d.health == DeviceHealth.HEALTHY and not d.vnpus and not d.allocated
                                          and i not in taken]
    return list(found)


def unplaced_npus(node: NodeInfo) -> int:
    """NPUs held by pods whose devices we do not know (bound without ``npu.openfuyao.com/assigned``: by another
    binder, or under Volcano): the free dies by device cannot be trusted while this is above 0."""
    if node.topology is None:
        return 0
    return max(0, len(free_npus(node)) - max(0, node.free(RESOURCE_NPU)))


def free_vnpus(node: NodeInfo) -> list[str]:
    if node.topology is None:
        return []
    taken = node.assigned.get(RESOURCE_VNPU, set())
    return [s.id for d in node.topology.devices.values() if d.health == DeviceHealth.HEALTHY
            for s in d.vnpus if s.id not in taken]


def free_cores(node: NodeInfo) -> dict[str, list[str]]:
    """Per healthy die: its npu-core devices no pod holds."""
    if node.topology is None:
        return {}
    taken = node.assigned.get(RESOURCE_NPU_CORE, set())
    out: dict[str, list[str]] = {}
    for i, d in node.topology.devices.items():
        if d.health != DeviceHealth.HEALTHY or d.vnpus or not d.aicore:
            continue
        out[i] = [c for k in range(d.aicore) if (c := core_device_id(i, k)) not in taken]
    return out


def choose_npus(node: NodeInfo, count: int) -> list[str]:
    """The dies the device plugin would prefer for ``count`` (the kernel's placement function). A function of the
    topology, the free dies and the count: kept, since like nodes pass through the same states."""
    assert node.topology is not None
    return list(_choose(node.topology, tuple(free_npus(node)), count))


def _choose(topology: NodeTopology, free: tuple[str, ...], count: int,
            must: tuple[str, ...] = ()) -> tuple[str, ...]:
    found, placed = _topology_facts(topology)
    return _chosen.get(topology, (free, count, must), lambda: tuple(preferred_allocation(
        free, must, count, placed, product=found,
        single_only=[i for i, d in topology.devices.items() if d.link_up is False])))


@dataclass(frozen=True, eq=False)
class FreeDies:
    """A node's topology with its free whole dies (:func:`free_npus`): what placing a pod's containers one after
    another needs (the table's ``npu_dies`` column). Equal when the free dies are, of the same topology object
    (like nodes share one, see ``ObjectMemo``): frozen pydantic models compare and hash by value, which costs more
    than a row's class saves."""

    topology: NodeTopology
    free: tuple[str, ...]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FreeDies) and other.topology is self.topology and other.free == self.free

    def __hash__(self) -> int:
        return hash((id(self.topology), self.free))


@dataclass(frozen=True)
class NpuPlan:
    """Where a pod's NPU containers go (:func:`plan_npus`)."""

    sets: tuple[tuple[str, ...], ...]
    """Per running container (``NpuSteps.running``), in order: its dies (empty: it asks for none, or the plan
    failed before it)."""
    problem: str | None = None
    """Why a step gets no set the node's product allows (None: every step gets one)."""
    failed: int = -1
    """The step that failed: i < len(running) is running container i, len(running) + j the j-th plain init
    container of ``NpuSteps.init``."""
    init_sets: tuple[tuple[str, ...], ...] = ()
    """Per plain init container of ``NpuSteps.init``: its dies. The kubelet keeps them for the pod's whole life
    (those no later container reuses sit idle), so the binder writes them too and they count as taken."""
    reused: bool = False
    """Whether a step's dies were (or had to be) taken from a plain init container's (the failure's cause, when it
    failed there)."""


_plans: ObjectMemo[NpuPlan] = ObjectMemo()
"""Per topology, by (free dies, steps): what ``plan_npus`` found."""

MAX_SUBSETS = 4096
"""Reused sets are checked subset by subset up to this many (C(8, 4) = 70; C(16, 8) = 12,870 is refused)."""


def plan_npus(dies: FreeDies, steps: NpuSteps) -> NpuPlan:
    """The dies each of a pod's containers gets, as the kubelet's device manager hands them out (1.34
    ``ManagerImpl.Allocate`` / ``devicesToAllocate``): the init containers in spec order (plain ones and sidecars
    interleaved), then the containers, each from what the ones before left, each set checked against the product's
    rules (the device plugin's Allocate refuses a set they forbid). A plain init container's dies stay the pod's and
    are *reusable*: the next container asking for NPUs takes them first, before any other die. Asking for at most as
    many, it gets that many of them, which ones the kubelet's choice (no GetPreferredAllocation), so every such
    subset must be allowed; asking for more, it gets all of them plus what the placement function picks with them
    (GetPreferredAllocation's must-include). A sidecar's or a container's dies leave the reusable ones. Pure; kept
    per topology, free dies and steps."""
    return _plans.get(dies.topology, (dies.free, steps), lambda: _plan(dies.topology, dies.free, steps))


def node_dies(node: NodeInfo) -> FreeDies:
    """The node's :class:`FreeDies` (for the binder: a node of the cache, as it is now)."""
    assert node.topology is not None
    return FreeDies(node.topology, tuple(free_npus(node)))


def kubelet_order(steps: NpuSteps) -> list[tuple[bool, int]]:
    """The order the kubelet allocates a pod's containers' devices in: (plain init?, index into ``steps.init`` or
    ``steps.running``). A plain init container comes after the sidecars started before it (its ``before``)."""
    order: list[tuple[bool, int]] = []
    j = 0
    for i in range(len(steps.running)):
        while j < len(steps.init) and steps.init[j][1] <= i:
            order.append((True, j))
            j += 1
        order.append((False, i))
    order += [(True, k) for k in range(j, len(steps.init))]
    return order


def _plan(topology: NodeTopology, free: tuple[str, ...], steps: NpuSteps) -> NpuPlan:
    running = len(steps.running)
    sets: list[tuple[str, ...]] = [()] * running
    init_sets: list[tuple[str, ...]] = [()] * len(steps.init)
    held: set[str] = set()
    reuse: list[str] = []  # plain init containers' dies no later container took yet (the kubelet's devicesToReuse)
    for is_init, k in kubelet_order(steps):
        count = steps.init[k][0] if is_init else steps.running[k]
        if count <= 0:
            continue
        from_reuse = bool(reuse)
        if reuse and count <= len(reuse):
            chosen, problem = tuple(reuse[:count]), _subsets_problem(topology, reuse, count)
        else:
            left = tuple(d for d in free if d not in held)
            chosen, problem = _step(topology, left + tuple(reuse), count, must=tuple(reuse))
        if problem is not None:
            return NpuPlan(tuple(sets), problem, running + k if is_init else k, tuple(init_sets), from_reuse)
        held.update(chosen)
        if is_init:
            init_sets[k] = chosen
            reuse += [d for d in chosen if d not in reuse]
        else:
            sets[k] = chosen
            reuse = [d for d in reuse if d not in chosen]
    return NpuPlan(tuple(sets), init_sets=tuple(init_sets))


def _subsets_problem(topology: NodeTopology, reused: Sequence[str], count: int) -> str | None:
    """Why some set of ``count`` of the ``reused`` dies (the kubelet picks which) is one the product forbids."""
    found, placed = _topology_facts(topology)
    problem = products.count_problem(found, count, len(topology.devices))
    if problem is not None or not found.shaped or count <= 1:
        return problem
    if math.comb(len(reused), count) > MAX_SUBSETS:
        return (f"the kubelet gives it {count} of the {len(reused)} NPUs of the init containers before it, which "
                "ones its own choice: too many such sets to check against the product's rules")
    for subset in itertools.combinations(reused, count):
        problem = products.shape_problem(found, subset, placed, len(topology.devices))
        if problem is not None:
            return (f"the kubelet gives it {count} of the {len(reused)} NPUs the init containers before it held "
                    f"({', '.join(reused)}), which ones its own choice, and {', '.join(subset)} is not a set "
                    f"the product allows: {problem}")
    return None


def _step(topology: NodeTopology, free: tuple[str, ...], count: int,
          must: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str | None]:
    """One container's dies from ``free`` (with every one of ``must``) and why the product's rules refuse them
    (None: they allow them)."""
    if count <= 0:
        return (), None
    if not must:
        problem = _free_problem(topology, free, count)
        if problem is not None:
            return (), problem
    chosen = _choose(topology, free, count, must)
    if len(chosen) < count:
        return (), f"{len(free)} NPUs free, {count} requested"
    found, placed = _topology_facts(topology)
    return chosen, products.shape_problem(found, chosen, placed, len(topology.devices))


def choose_cores(node: NodeInfo, count: int) -> list[str]:
    """``count`` free cores of one die: the die with the fewest free cores that still fits (best fit)."""
    fitting = [(len(cores), parent, cores) for parent, cores in free_cores(node).items() if len(cores) >= count]
    if not fitting:
        return []
    _, _, cores = min(fitting)
    return cores[:count]


def choose_vnpus(node: NodeInfo, count: int) -> list[str]:
    """``count`` free static slices, packed on the die with the fewest free slices that fits (else any)."""
    if node.topology is None:
        return []
    free = set(free_vnpus(node))
    by_die = [[s.id for s in d.vnpus if s.id in free] for d in node.topology.devices.values()]
    fitting = sorted((len(s), s) for s in by_die if len(s) >= count)
    if fitting:
        return fitting[0][1][:count]
    return sorted(free)[:count]


T = TypeVar("T")


def _memo(node: NodeInfo, key: str, compute: Callable[[], T]) -> T:
    if key not in node.memo:
        node.memo[key] = compute()
    found: T = node.memo[key]
    return found


def free_numa_sizes(node: NodeInfo) -> list[int]:
    """Free dies per NUMA node, largest first (dies with unknown NUMA count as their own node). Memoised."""
    def compute() -> list[int]:
        assert node.topology is not None
        per = Counter(node.topology.devices[d].numa_node if node.topology.devices[d].numa_node is not None
                      else f"?{d}" for d in free_npus(node))
        return sorted(per.values(), reverse=True)
    return _memo(node, "free_numa_sizes", compute)


def healthy_numa_sizes(node: NodeInfo) -> list[int]:
    """Healthy whole dies per NUMA node, largest first: the shape of the node when empty. Memoised."""
    def compute() -> list[int]:
        assert node.topology is not None
        per = Counter(d.numa_node if d.numa_node is not None else f"?{i}" for i, d in node.topology.devices.items()
                      if d.health == DeviceHealth.HEALTHY and not d.vnpus)
        return sorted(per.values(), reverse=True)
    return _memo(node, "healthy_numa_sizes", compute)


def free_group_sizes(node: NodeInfo) -> list[int]:
    """Free dies per interconnect group, largest first. Memoised."""
    def compute() -> list[int]:
        assert node.topology is not None
        return sorted(Counter(node.topology.devices[d].group for d in free_npus(node)).values(), reverse=True)
    return _memo(node, "free_group_sizes", compute)


__all__ = [
    "FreeDies",
    "NpuPlan",
    "choose_cores",
    "choose_npus",
    "choose_vnpus",
    "count_problem",
    "free_cores",
    "free_group_sizes",
    "free_npus",
    "free_numa_sizes",
    "free_vnpus",
    "healthy_numa_sizes",
    "never",
    "node_dies",
    "placements",
    "plan_npus",
    "product",
    "unplaced_npus",
]
