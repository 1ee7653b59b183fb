"""Per-node features, computed once when a node or the pods on it change (not per request), and kept column-wise
in a :class:`NodeTable` so that a decision over thousands of nodes is a handful of array operations.

kube-scheduler asks about up to every node of the cluster per pod, twice (filter, prioritize). Evaluating Python
plugins node by node costs ~10 µs per node — 100+ ms at 5,000 nodes. Here the per-node work (free devices, ring
and NUMA covers, requested totals, measured usage, business-type counts) happens in the watch's update path; a
request gathers the candidate rows and each plugin answers for all of them at once (see ``framework``).

Also here: :class:`PdIndex`, the cluster-wide count of prefill/decode pods per group, phase and node, maintained
incrementally by the cache (rebuilding it per request would cost O(pods)).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from fuyao.contracts import (
    ACCELERATOR_RESOURCES,
    ANNOTATION_NODE_TOPOLOGY,
    RESOURCE_BATCH_CPU,
    RESOURCE_BATCH_MEMORY,
    RESOURCE_NPU_CORE,
    RESOURCE_VNPU,
    BusinessType,
    DeviceHealth,
    NodeTopology,
)

from . import devices
from .model import NodeInfo, PodInfo
from .object_memo import ObjectMemo

MAX_COVER = 32
"""NPU counts up to this have their NUMA / group / ring feasibility precomputed (910C nodes have 16 dies)."""
NUMA_SLOTS = 8
"""Nodes with at most this many NUMA nodes get the joint NPU + CPU table (larger ones: NPUs only)."""

RESOURCE_COLUMN = {r: i for i, r in enumerate(ACCELERATOR_RESOURCES)}
BUSINESS_COLUMN = {b: i for i, b in enumerate(BusinessType)}
NO_USAGE = -np.inf
UNHELD_CLASSES = 1024
"""Row classes that no node is in are kept this many (see ``NodeTable.classes``)."""

# name → (dtype, trailing shape, empty value)
COLUMNS: dict[str, tuple[Any, tuple[int, ...], Any]] = {
    "alloc": (np.int64, (len(ACCELERATOR_RESOURCES),), 0),  # allocatable per accelerator resource
    "free": (np.int64, (len(ACCELERATOR_RESOURCES),), 0),  # allocatable - requested by pods on the node
    "topo": (np.bool_, (), False),  # publishes npu.openfuyao.com/topology
    "topo_problem": (object, (), None),  # without a topology: why its annotation did not parse (None: absent)
    "shaped": (np.bool_, (), False),  # the node's product has rules on which NPUs go together (fuyao.products)
    "n_devices": (np.int32, (), 0),
    "free_by_device": (np.int32, (), 0),  # healthy whole dies no pod holds
    "free_linked": (np.int32, (), 0),  # of those, the dies whose RoCE link is not down (multi-die requests)
    "npu_dies": (object, (), None),  # devices.FreeDies: the free dies themselves (several containers' placement)
    "unplaced": (np.int32, (), 0),  # NPUs held by pods whose devices are unknown
    "ruled": (np.bool_, (), False),  # the product limits counts or shapes (counts_ok / counts_never apply)
    "counts_ok": (np.int64, (), 0),  # bit k: the product's rules allow a k-NPU pod with the dies free now
    "counts_never": (np.int64, (), 0),  # bit k: the product never takes k NPUs in one pod
    "count_reasons": (object, (), ()),  # ((k, why not), ...) for the counts that fail now
    "die_cores_max": (np.int32, (), 0),  # most free AI cores on one die
    "vnpus_free": (np.int32, (), 0),
    "numa_known": (np.bool_, (), False),  # the dies have NUMA nodes
    "numa_need": (np.int8, (MAX_COVER + 1,), 0),  # k → NUMA nodes the free dies need for k (0: cannot)
    "numa_ideal": (np.int8, (MAX_COVER + 1,), 0),  # k → NUMA nodes on the empty node (0: cannot)
    "numa_free": (object, (), None),  # free dies per NUMA node (for reasons)
    # with exclusive CPUs per NUMA node published (static CPU manager): [k, d] → the most free exclusive CPUs on
    # at most k NUMA nodes that together have at least d free dies (-1: no k NUMA nodes have d free dies)
    "cpu_numa": (np.bool_, (), False),
    "numa_joint": (np.int32, (NUMA_SLOTS + 1, MAX_COVER + 1), -1),
    "numa_joint_ideal": (np.int32, (NUMA_SLOTS + 1, MAX_COVER + 1), -1),  # the same on the empty node
    "numa_cpus_free": (object, (), None),  # free exclusive CPUs per NUMA node (for reasons)
    "has_groups": (np.bool_, (), False),
    "group_need": (np.int8, (MAX_COVER + 1,), 0),  # k → interconnect groups the free dies need (0: cannot)
    "cpu_alloc": (np.int64, (), 0),  # milli
    "cpu_req": (np.int64, (), 0),
    "mem_alloc": (np.int64, (), 0),  # bytes
    "mem_req": (np.int64, (), 0),
    "usage_at": (np.float64, (), NO_USAGE),  # qos.openfuyao.com/usage updatedAt
    "cpu_ratio": (np.float64, (), 0.0),
    "mem_ratio": (np.float64, (), 0.0),
    "be_pressure": (np.float64, (), 0.0),
    "colocation": (np.bool_, (), False),
    "batch_alloc": (np.int64, (2,), 0),  # batch-cpu (milli), batch-memory (bytes)
    "batch_free": (np.int64, (2,), 0),
    "business": (np.int32, (len(BusinessType),), 0),  # running pods per business type
    "domain": (np.int32, (), -1),  # interned value of the prefill/decode topology label (-1: none)
}


def _covers(sizes: list[int]) -> list[int]:
    """k → how many of the (descending) ``sizes`` add up to k, for k in 0..MAX_COVER (0: they never do)."""
    out = [0] * (MAX_COVER + 1)
    total = k = 0
    for n, size in enumerate(sizes, start=1):
        total += size
        while k < min(total, MAX_COVER):
            k += 1
            out[k] = n
    return out


def node_row(info: NodeInfo) -> dict[str, Any]:
    """The features of one node (everything the plugins read), from its parsed state. Pure, so kept in the node's
    memo (cleared whenever the node changes): a node tabulated again is not computed again. Do not modify it."""
    kept = info.memo.get("row")
    if kept is not None:
        row: dict[str, Any] = kept
        return row
    row = info.memo["row"] = _node_row(info)
    return row


def _frozen(values: Mapping[str, Any]) -> tuple[Any, ...]:
    """A row's values (``node_row``) as one hashable key, column by column (absent: the column's empty value)."""
    return tuple(_freeze(values.get(name, empty)) for name, (_dtype, _shape, empty) in COLUMNS.items()
                 if name != "domain")


def _freeze(value: Any) -> Any:
    """Hashable and equal exactly when ``value`` is (lists of numbers, most columns: one ``tuple`` call)."""
    if isinstance(value, list):
        value = tuple(value)
    elif isinstance(value, dict):
        value = tuple(value.items())  # built in sorted order (a different order is only another class)
    try:
        hash(value)
    except TypeError:
        return tuple(_freeze(v) for v in value) if isinstance(value, tuple) else repr(value)
    return value


def _node_row(info: NodeInfo) -> dict[str, Any]:
    row: dict[str, Any] = {
        "alloc": [info.allocatable_int(r) for r in ACCELERATOR_RESOURCES],
        "free": [info.free(r) for r in ACCELERATOR_RESOURCES],
        "cpu_alloc": info.cpu_allocatable_milli, "cpu_req": info.cpu_requested_milli,
        "mem_alloc": info.memory_allocatable, "mem_req": info.memory_requested,
        "colocation": info.colocation,
        "batch_alloc": [info.allocatable_int(RESOURCE_BATCH_CPU), info.allocatable_int(RESOURCE_BATCH_MEMORY)],
        "batch_free": list(info.batch_free()),
    }
    if info.usage is not None:
        row.update(usage_at=info.usage.updated_at, cpu_ratio=info.usage.cpu_ratio,
                   mem_ratio=info.usage.memory_ratio, be_pressure=info.usage.be_pressure)
    business = [0] * len(BusinessType)
    for pod in info.pods:
        if not pod.terminal and pod.business is not None:
            business[BUSINESS_COLUMN[pod.business]] += 1
    row["business"] = business
    if info.topology is not None:
        row.update(_topology_row(info))
    else:
        row["topo_problem"] = next((p for p in info.problems if ANNOTATION_NODE_TOPOLOGY in p), None)
    return row


_topology_rows: ObjectMemo[dict[str, Any]] = ObjectMemo()
"""What ``_topology_row`` computed, per topology, by what else it reads: like nodes share one parsed topology
(``model``) and pass through the same states."""


def _topology_row(info: NodeInfo) -> dict[str, Any]:
    """The columns a node's NPU topology gives: a function of the topology, the free dies, the assigned cores and
    vNPUs and the NPUs held without known dies (kept per those; do not modify the result)."""
    topo = info.topology
    assert topo is not None
    free = devices.free_npus(info)
    unplaced = devices.unplaced_npus(info)
    key = (tuple(free), unplaced, frozenset(info.assigned.get(RESOURCE_NPU_CORE, ())),
           frozenset(info.assigned.get(RESOURCE_VNPU, ())))
    return _topology_rows.get(topo, key, lambda: _compute_topology_row(info, topo, free, unplaced))


def _compute_topology_row(info: NodeInfo, topo: NodeTopology, free: list[str], unplaced: int) -> dict[str, Any]:
    product = devices.product(info)
    row: dict[str, Any] = dict(
        topo=True, shaped=product.shaped, n_devices=len(topo.devices), free_by_device=len(free),
        npu_dies=devices.FreeDies(topo, tuple(free)),
        free_linked=sum(1 for d in free if topo.devices[d].link_up is not False),
        unplaced=unplaced, vnpus_free=len(devices.free_vnpus(info)), die_cores_max=_most_free_cores(info),
        has_groups=bool(topo.groups), group_need=_covers(devices.free_group_sizes(info)))
    if product.counts is not None or product.shaped:
        ok = never = 0
        reasons = []
        for k in range(1, min(len(topo.devices), 62) + 1):
            problem = devices.count_problem(info, k)
            if problem is None:
                ok |= 1 << k
            else:
                reasons.append((k, problem))
                if devices.never(info, k):
                    never |= 1 << k
        row.update(ruled=True, counts_ok=ok, counts_never=never, count_reasons=tuple(reasons))
    if any(d.numa_node is not None for d in topo.devices.values()):
        row.update(numa_known=True, numa_need=_covers(devices.free_numa_sizes(info)),
                   numa_ideal=_covers(devices.healthy_numa_sizes(info)),
                   numa_free=dict(sorted(Counter(topo.devices[d].numa_node for d in free).items(), key=str)))
    row.update(_numa_cpu_rows(info, free))
    return row


def _most_free_cores(info: NodeInfo) -> int:
    """Most free AI cores on one die (the free core IDs are only listed when some are held)."""
    if info.assigned.get(RESOURCE_NPU_CORE):
        return max((len(c) for c in devices.free_cores(info).values()), default=0)
    assert info.topology is not None
    return max((d.aicore for d in info.topology.devices.values()
                if d.health == DeviceHealth.HEALTHY and not d.vnpus and d.aicore), default=0)


@lru_cache(maxsize=4096)
def joint_table(per_numa: tuple[tuple[int, int], ...]) -> tuple[tuple[int, ...], ...]:
    """[k][d] → the most CPUs on at most k of the NUMA nodes ``per_numa`` = [(free dies, free CPUs)...] that have
    at least d dies together (-1: none do). Every subset is tried (at most 2^NUMA_SLOTS)."""
    best = [[-1] * (MAX_COVER + 1) for _ in range(NUMA_SLOTS + 1)]
    m = len(per_numa)
    for subset in range(1 << m):
        dies = cpus = k = 0
        for i in range(m):
            if subset >> i & 1:
                k += 1
                dies += per_numa[i][0]
                cpus += per_numa[i][1]
        row = best[k]
        d = min(dies, MAX_COVER)
        if cpus > row[d]:
            row[d] = cpus
    for k in range(NUMA_SLOTS + 1):
        row = best[k]
        for d in range(MAX_COVER - 1, -1, -1):  # at least d dies
            row[d] = max(row[d], row[d + 1])
        if k:
            previous = best[k - 1]  # at most k NUMA nodes
            for d in range(MAX_COVER + 1):
                row[d] = max(row[d], previous[d])
    return tuple(tuple(row) for row in best)


def _numa_cpu_rows(info: NodeInfo, free: list[str]) -> dict[str, Any]:
    """The joint NPU + CPU tables, when the node publishes its exclusive CPUs per NUMA node and every usable die
    has a NUMA node among them."""
    topo = info.topology
    assert topo is not None
    if not topo.numa_cpus or len(topo.numa_cpus) > NUMA_SLOTS:
        return {}
    usable = {i: d for i, d in topo.devices.items() if d.health == DeviceHealth.HEALTHY and not d.vnpus}
    if any(d.numa_node not in topo.numa_cpus for d in usable.values()):
        return {}
    nodes = sorted(topo.numa_cpus)
    free_dies = Counter(topo.devices[d].numa_node for d in free)
    all_dies = Counter(d.numa_node for d in usable.values())
    cpus = {n: topo.numa_cpus[n] for n in nodes}
    return {
        "cpu_numa": True,
        "numa_joint": joint_table(tuple((free_dies[n], max(0, cpus[n].allocatable - cpus[n].exclusive))
                                        for n in nodes)),
        "numa_joint_ideal": joint_table(tuple((all_dies[n], cpus[n].allocatable) for n in nodes)),
        "numa_cpus_free": {n: max(0, cpus[n].allocatable - cpus[n].exclusive) for n in nodes},
    }


class NodeTable:
    """Rows of :data:`COLUMNS`, one per node, in numpy arrays that grow by doubling; deleted rows are reused.
    Not thread-safe: the owner (the cache) serialises writes and the reads of a request."""

    def __init__(self, domain_key: str, capacity: int = 64, long_lived: bool = False):
        self.domain_key = domain_key
        self.index: dict[str, int] = {}
        self.names: list[str | None] = []
        self.labels: list[Mapping[str, str]] = []
        self.domains: dict[str, int] = {}  # interned values of the domain label
        self.domain_names: list[str] = []
        self.version = 0  # grows when a node's domain changes (memos of domain counts key on it)
        self._spare: list[int] = []
        self.cols: dict[str, np.ndarray] = {}
        self.classes = np.full(0, -1, dtype=np.int64)
        """Per row: its *class*, the same for rows whose every column holds the same values (-1: no node). Plugins
        that decide from a row alone decide equal rows alike, so per-row results are kept per class (the
        framework's decision cache, ``row_cache``): in a cluster of like nodes, a row that changes usually becomes
        a class already decided."""
        self.class_stamps = np.zeros(0, dtype=np.int64)
        """Per class: when it was last given to a new content (a counter). Results kept for a class stay valid
        while its stamp does."""
        self._class_of: dict[tuple[Any, int], int] = {}  # (content, domain) → class
        self._class_keys: list[tuple[Any, int] | None] = []
        self._class_rows: list[int] = []  # per class: the rows that have it
        self._unheld: OrderedDict[int, None] = OrderedDict()
        """Classes no row has now, oldest first: kept (with the results kept for them) up to
        :data:`UNHELD_CLASSES`, for a row that comes back to that state; then the oldest is given to a new
        content."""
        self._contents: list[Any] = []  # per row: its columns' values, frozen (without the domain)
        self._clock = 0
        self.long_lived = long_lived
        """The cluster cache's table (rows outlive requests, so per-row results are worth keeping); a request's own
        table is not."""
        self.decisions: dict[Any, Any] = {}
        """Per-row results kept for this table by the framework (see ``Framework``); dropped with the table."""
        self._capacity = 0
        self._grow(capacity)

    @classmethod
    def of(cls, infos: Iterable[NodeInfo], domain_key: str, capacity: int = 64, long_lived: bool = False) -> NodeTable:
        table = cls(domain_key, capacity, long_lived)
        for info in infos:
            table.put(info)
        return table

    def _grow(self, capacity: int) -> None:
        for name, (dtype, shape, empty) in COLUMNS.items():
            grown = np.empty((capacity, *shape), dtype=dtype)
            if dtype is object:
                grown.fill(empty)
            else:
                grown[...] = empty
            old = self.cols.get(name)
            if old is not None:
                grown[: self._capacity] = old
            self.cols[name] = grown
        classes = np.full(capacity, -1, dtype=np.int64)
        classes[: self._capacity] = self.classes
        self.classes = classes
        self._contents.extend([None] * (capacity - self._capacity))
        self.names.extend([None] * (capacity - self._capacity))
        self.labels.extend([{}] * (capacity - self._capacity))
        self._spare.extend(range(capacity - 1, self._capacity - 1, -1))
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self.index)

    def _domain_id(self, labels: Mapping[str, str]) -> int:
        value = labels.get(self.domain_key)
        if value is None:
            return -1
        found = self.domains.get(value)
        if found is None:
            found = self.domains[value] = len(self.domain_names)
            self.domain_names.append(value)
        return found

    def put(self, info: NodeInfo) -> int:
        values = node_row(info)  # first: a node whose row cannot be computed claims no row
        row = self.index.get(info.name)
        if row is None:
            if not self._spare:
                self._grow(self._capacity * 2)
            row = self._spare.pop()
            self.index[info.name] = row
            self.names[row] = info.name
        for name, (_dtype, _shape, empty) in COLUMNS.items():
            self.cols[name][row] = values.get(name, empty)
        domain = self._domain_id(info.labels)
        if self.cols["domain"][row] != domain:
            self.version += 1
        self.cols["domain"][row] = domain
        self.labels[row] = info.labels
        content = info.memo.get("row-content")
        if content is None:
            content = info.memo["row-content"] = _frozen(values)
        self._contents[row] = content
        self._classify(row, (content, domain))
        return row

    def _classify(self, row: int, key: tuple[Any, int] | None) -> None:
        """Give ``row`` the class of ``key`` (None: no class, the row is free)."""
        old = int(self.classes[row])
        if old >= 0:
            if self._class_keys[old] == key:
                return
            self._class_rows[old] -= 1
            if self._class_rows[old] == 0:
                self._unheld[old] = None
        if key is None:
            self.classes[row] = -1
            return
        found = self._class_of.get(key)
        if found is None:
            if len(self._unheld) > UNHELD_CLASSES:
                found, _ = self._unheld.popitem(last=False)
                del self._class_of[self._class_keys[found]]  # type: ignore[arg-type]
            else:
                found = len(self._class_keys)
                self._class_keys.append(None)
                self._class_rows.append(0)
                if found >= len(self.class_stamps):
                    stamps = np.zeros(max(64, 2 * len(self.class_stamps)), dtype=np.int64)
                    stamps[: len(self.class_stamps)] = self.class_stamps
                    self.class_stamps = stamps
            self._class_of[key] = found
            self._class_keys[found] = key
            self._clock += 1
            self.class_stamps[found] = self._clock  # a new content: results kept for this class are void
        elif self._class_rows[found] == 0:
            del self._unheld[found]
        self._class_rows[found] += 1
        self.classes[row] = found

    def remove(self, name: str) -> None:
        row = self.index.pop(name, None)
        if row is None:
            return
        for column, (_dtype, _shape, empty) in COLUMNS.items():
            self.cols[column][row] = empty
        self.names[row] = None
        self.labels[row] = {}
        self._contents[row] = None
        self._classify(row, None)
        self._spare.append(row)
        self.version += 1

    def set_domain_key(self, key: str) -> None:
        """Re-intern the domain column for another label key (the configured prefill/decode topology key)."""
        if key == self.domain_key:
            return
        self.domain_key = key
        self.domains, self.domain_names = {}, []
        for row in self.index.values():
            domain = self.cols["domain"][row] = self._domain_id(self.labels[row])
            self._classify(row, (self._contents[row], domain))
        self.version += 1

    def view(self, names: Sequence[str]) -> tuple[NodeView, list[str]]:
        """The rows of ``names`` (in that order), and the names this table does not know."""
        array = np.fromiter(map(self.index.get, names, itertools.repeat(-1, len(names))), dtype=np.int64,
                            count=len(names))
        missing = np.flatnonzero(array < 0)
        if len(missing):
            unknown = [names[i] for i in missing.tolist()]
            keep = np.flatnonzero(array >= 0)
            return NodeView(self, array[keep], [names[i] for i in keep.tolist()]), unknown
        return NodeView(self, array, names if isinstance(names, list) else list(names)), []

    def view_all(self) -> NodeView:
        names = list(self.index)
        return NodeView(self, np.fromiter((self.index[n] for n in names), dtype=np.int64, count=len(names)), names)


class NodeView:
    """Some rows of a :class:`NodeTable` (the candidates of one request), in request order. A column is gathered
    on first use (``view.free``, ``view.numa_need``…)."""

    def __init__(self, table: NodeTable, rows: np.ndarray, names: list[str]):
        self.table = table
        self.rows = rows
        self.names = names
        self._positions: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    def __getattr__(self, column: str) -> np.ndarray:
        try:
            source = self.table.cols[column]
        except KeyError:
            raise AttributeError(column) from None
        gathered: np.ndarray = source[self.rows]
        self.__dict__[column] = gathered
        return gathered

    def take(self, at: np.ndarray) -> NodeView:
        """The candidates at positions ``at`` (in that order), as a view of their own."""
        names = self.names
        view = NodeView(self.table, self.rows[at], [names[i] for i in at.tolist()])
        for column, gathered in list(self.__dict__.items()):
            if column in self.table.cols:  # already gathered: slice instead of gathering again
                view.__dict__[column] = gathered[at]
        return view

    def positions(self, node_names: Iterable[str]) -> tuple[np.ndarray, list[str]]:
        """Positions in this view of those ``node_names`` that are in it (and those names, same order)."""
        if self._positions is None:
            self._positions = np.full(self.table._capacity, -1, dtype=np.int64)
            self._positions[self.rows] = np.arange(len(self.rows))
        names = list(node_names)
        get = self.table.index.get
        rows = np.fromiter((get(name, -1) for name in names), dtype=np.int64, count=len(names))
        rows[rows >= len(self._positions)] = -1  # a node added after this view was taken
        found = np.where(rows >= 0, self._positions[rows], -1)
        keep = np.flatnonzero(found >= 0)
        return found[keep], [names[i] for i in keep.tolist()]

    def domain_values(self, counts: Mapping[str, int]) -> np.ndarray:
        """Per candidate: ``counts`` of the value of its domain label (0 without the label)."""
        lut = np.zeros(len(self.table.domain_names) + 1, dtype=np.int64)  # last slot: domain -1
        for value, n in counts.items():
            found = self.table.domains.get(value)
            if found is not None:
                lut[found] = n
        values: np.ndarray = lut[self.domain]
        return values


class PdIndex:
    """Running prefill/decode pods: (group, phase) → node name → count. Updated by the cache as pods come, go and
    get assumed; read by the prefill/decode plugin."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], Counter[str]] = {}
        self._by_domain: dict[tuple[str, str, int, int], Counter[str]] = {}

    @staticmethod
    def _key(pod: PodInfo) -> tuple[str, str] | None:
        if pod.phase is None or pod.pd_group is None or pod.terminal or not pod.node_name:
            return None
        return pod.pd_group, pod.phase.value

    def add(self, pod: PodInfo, sign: int = 1) -> None:
        key = self._key(pod)
        if key is None:
            return
        counts = self.counts.setdefault(key, Counter())
        node = pod.node_name or ""
        counts[node] += sign
        if counts[node] <= 0:
            del counts[node]
            if not counts:
                del self.counts[key]
        self._by_domain.clear()

    def remove(self, pod: PodInfo) -> None:
        self.add(pod, -1)

    def clear(self) -> None:
        self.counts.clear()
        self._by_domain.clear()

    @classmethod
    def of(cls, infos: Iterable[NodeInfo]) -> PdIndex:
        index = cls()
        for info in infos:
            for pod in info.pods:
                index.add(pod if pod.node_name else _on(pod, info.name))
        return index

    def on_nodes(self, group: str, phase: str) -> Counter[str]:
        return self.counts.get((group, phase), Counter())

    def by_domain(self, group: str, phase: str, table: NodeTable) -> Counter[str]:
        """Pods of (group, phase) per value of ``table``'s domain label (nodes the table does not know, or without
        the label, are left out)."""
        key = (group, phase, id(table), table.version)
        found = self._by_domain.get(key)
        if found is None:
            found = Counter()
            domain = table.cols["domain"]
            for name, n in self.on_nodes(group, phase).items():
                row = table.index.get(name)
                if row is not None and domain[row] >= 0:
                    found[table.domain_names[domain[row]]] += n
            if len(self._by_domain) > 4096:
                self._by_domain.clear()
            self._by_domain[key] = found
        return found


def _on(pod: PodInfo, node: str) -> PodInfo:
    return dataclasses.replace(pod, node_name=node)


__all__ = [
    "BUSINESS_COLUMN",
    "COLUMNS",
    "MAX_COVER",
    "NO_USAGE",
    "NUMA_SLOTS",
    "RESOURCE_COLUMN",
    "NodeTable",
    "NodeView",
    "PdIndex",
    "joint_table",
    "node_row",
]
