"""What NPUs a node has, how they are connected and which NUMA node each sits on.

One implementation shared by the device plugin (what to advertise, which devices to hand out together) and the
scheduler extender (through the ``npu.openfuyao.com/topology`` annotation it produces). :func:`build_inventory` is
a pure function of parsed npu-smi output; :func:`discover` is the I/O edge that runs npu-smi and reads sysfs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .contracts import DeviceHealth, DeviceTopology, InterconnectGroup, InterconnectKind, NodeTopology
from .npusmi import NpuSmi, NpuSmiError, NpuSmiPhysicalIdUnknown, NpuSmiUnsupported
from .npusmi.models import ChipMapping, NpuHealthState, NpuSmiInfo, PhyIdRemap, Topology

log = logging.getLogger(__name__)

# Link kinds of `npu-smi info -t topo` that mean a direct high-bandwidth NPU interconnect.
_FABRIC_LINKS = re.compile(r"^(HCCS|HCCS_SW|SIO|XLINK|UB)", re.IGNORECASE)
_UB_LINKS = re.compile(r"^UB", re.IGNORECASE)  # UnifiedBus (Ascend 950): a group of its own kind, not an HCCS one
_PCIE_SWITCH_LINKS = {"PIX"}
# First-generation 910 (A1) boards: two HCCS rings of four cards (0-3, 4-7).
_A1_MODELS = re.compile(r"^910(A|B|ProA|ProB|PremiumA)?$", re.IGNORECASE)


class NpuDevice(BaseModel):
    """One schedulable NPU die."""

    model_config = ConfigDict(frozen=True)

    id: str
    npu_id: int
    chip_id: int
    physical_id: int
    chip_model: str
    health: NpuHealthState
    bus_id: str | None = None
    numa_node: int | None = None
    group: str | None = None
    aicore: int | None = None
    memory_mb: int | None = None


class NodeInventory(BaseModel):
    """Every NPU die of a node, its interconnect groups and the versions npu-smi reported."""

    model_config = ConfigDict(frozen=True)

    chip_model: str
    driver_version: str | None
    tool_version: str | None
    devices: tuple[NpuDevice, ...]
    groups: tuple[InterconnectGroup, ...]
    numa_source: str  # "sysfs", "affinity-order" or "unknown"

    def device(self, device_id: str) -> NpuDevice:
        return next(d for d in self.devices if d.id == device_id)

    def to_topology(self) -> NodeTopology:
        """The value of the ``npu.openfuyao.com/topology`` node annotation."""
        return NodeTopology(
            chip_model=self.chip_model,
            driver_version=self.driver_version,
            devices={
                d.id: DeviceTopology(
                    npu_id=d.npu_id, chip_id=d.chip_id, physical_id=d.physical_id, chip_model=d.chip_model,
                    health=DeviceHealth.HEALTHY if d.health.schedulable else DeviceHealth.UNHEALTHY,
                    numa_node=d.numa_node, group=d.group, aicore=d.aicore, memory_mb=d.memory_mb)
                for d in self.devices
            },
            groups=self.groups,
        )


def chip_family(model: str) -> str:
    """``910B4`` → ``910``, ``Ascend910`` → ``910``, ``310P3`` → ``310P``, ``310B4`` → ``310B``."""
    m = re.search(r"(\d{3})([A-Za-z]?)", model)
    if not m:
        return re.sub(r"[^A-Za-z0-9]", "", model) or "NPU"
    number, suffix = m.group(1), m.group(2).upper()
    return number + suffix if number == "310" and suffix in ("P", "B") else number


def device_id(model: str, physical_id: int) -> str:
    """Stable device ID (MindCluster's form ``Ascend910-3``): physical ids survive restarts and re-plugging."""
    return f"Ascend{chip_family(model)}-{physical_id}"


def parse_cpu_list(text: str) -> set[int]:
    """``0-3,8,10-11`` → {0,1,2,3,8,10,11}; raises ValueError on garbage."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:
            raise ValueError(f"a descending range: {part!r}")
        cpus.update(range(first, last + 1))
    return cpus


def numa_from_affinity(affinity: Mapping[str, str | None],
                       node_cpus: Mapping[int, set[int]]) -> tuple[dict[str, int | None], str]:
    """NUMA node per topology label from its CPU Affinity range.

    A range maps to the sysfs NUMA node that contains all of its CPUs; when the host does not have those CPUs
    (a simulated node, or a container without sysfs), distinct ranges are numbered in order of their first CPU.
    """
    ranges = {label: r for label, r in affinity.items() if r}
    if not ranges:
        return {label: None for label in affinity}, "unknown"
    parsed: dict[str, set[int]] = {}
    for label, text in ranges.items():
        try:
            parsed[label] = parse_cpu_list(text)
        except ValueError:
            log.debug("unparseable CPU affinity %r for %s", text, label)
    by_sysfs: dict[str, int | None] = {}
    for label, cpus in parsed.items():
        by_sysfs[label] = next((node for node, node_set in sorted(node_cpus.items()) if cpus and cpus <= node_set),
                               None)
    if parsed and all(v is not None for v in by_sysfs.values()):
        return {label: by_sysfs.get(label) for label in affinity}, "sysfs"
    order = sorted({frozenset(c) for c in parsed.values()}, key=lambda s: min(s) if s else -1)
    index = {cpus: i for i, cpus in enumerate(order)}
    return {label: (index[frozenset(parsed[label])] if label in parsed else None) for label in affinity}, \
        "affinity-order"


def interconnect_groups(topo: Topology, label_to_device: Mapping[str, str]) -> list[InterconnectGroup]:
    """Connected components of the fabric (HCCS/SIO/UB) links, UB-joined ones of kind ``ub``; without fabric links,
    of same-PCIe-switch links."""
    labels = [lbl for lbl in topo.devices if lbl in label_to_device]

    def components(linked: Callable[[str], bool]) -> list[list[str]]:
        seen: set[str] = set()
        out: list[list[str]] = []
        for start in labels:
            if start in seen:
                continue
            stack, comp = [start], []
            seen.add(start)
            while stack:
                cur = stack.pop()
                comp.append(cur)
                for other in labels:
                    if other not in seen and linked(topo.links[cur].get(other, "")):
                        seen.add(other)
                        stack.append(other)
            out.append(sorted(comp, key=labels.index))
        return out

    fabric = components(lambda link: bool(_FABRIC_LINKS.match(link)))
    if any(len(c) > 1 for c in fabric):
        hccs = InterconnectKind.HCCS_MESH if len(fabric) == 1 else InterconnectKind.HCCS_RING
        kinds = [InterconnectKind.UB if any(_UB_LINKS.match(topo.links[a].get(b, "")) for a in comp for b in comp)
                 else hccs for comp in fabric]
        return [InterconnectGroup(id=f"{kind.value}-{i}", kind=kind, devices=tuple(label_to_device[x] for x in comp))
                for i, (kind, comp) in enumerate(zip(kinds, fabric, strict=True))]
    comps = components(lambda link: link.upper() in _PCIE_SWITCH_LINKS)
    return [InterconnectGroup(id=f"pcie-switch-{i}", kind=InterconnectKind.PCIE,
                              devices=tuple(label_to_device[x] for x in comp)) for i, comp in enumerate(comps)]


def _a1_ring_groups(devices: Iterable[NpuDevice]) -> list[InterconnectGroup]:
    rings: dict[int, list[str]] = {}
    for d in devices:
        rings.setdefault(d.npu_id // 4, []).append(d.id)
    return [InterconnectGroup(id=f"hccs-ring-{i}", kind=InterconnectKind.HCCS_RING, devices=tuple(ids))
            for i, ids in sorted(rings.items())]


def physical_ids(info: NpuSmiInfo, chip_map: Sequence[ChipMapping] | None = None,
                 remaps: Sequence[PhyIdRemap] = ()) -> dict[tuple[int, int], int]:
    """(NPU ID, Chip ID) → physical id (the N of ``/dev/davinciN``, what ``ASCEND_VISIBLE_DEVICES`` names), from what
    npu-smi states: the ``Phy-ID`` column of ``npu-smi info``, else the ``Chip Phy-ID`` column of ``info -m``, else
    an ``info -t phyid-remap`` answer. Never the logic id (``Chip Logic ID``, the 310P ``Device`` column): it is
    renumbered when a chip is missing and differs inside containers. Chips with none are left out."""
    stated = {(r.npu_id, r.chip_id): r.phy_id for r in remaps}
    stated.update({(m.npu_id, m.chip_id): m.phy_id for m in chip_map or () if m.is_compute_chip
                   and m.phy_id is not None})
    stated.update({(c.npu_id, c.chip_id): c.phy_id for c in info.chips if c.phy_id is not None})
    return {(c.npu_id, c.chip_id): stated[(c.npu_id, c.chip_id)] for c in info.chips
            if (c.npu_id, c.chip_id) in stated}


def logic_ids(info: NpuSmiInfo, chip_map: Sequence[ChipMapping] | None = None) -> dict[tuple[int, int], int]:
    """(NPU ID, Chip ID) → logic id where npu-smi prints one (``info -m``, the 310P ``Device`` column)."""
    out = {(m.npu_id, m.chip_id): m.logic_id for m in chip_map or () if m.is_compute_chip and m.logic_id is not None}
    out.update({(c.npu_id, c.chip_id): c.logic_id for c in info.chips if c.logic_id is not None})
    return out


def build_inventory(info: NpuSmiInfo, chip_map: list[ChipMapping] | None = None, topo: Topology | None = None,
                    node_cpus: Mapping[int, set[int]] | None = None,
                    aicore: Mapping[int, int] | None = None,
                    pci_numa: Mapping[str, int] | None = None,
                    remaps: Sequence[PhyIdRemap] = ()) -> NodeInventory:
    """The node's NPU inventory from parsed npu-smi output (pure; see :func:`discover` for the I/O).
    ``pci_numa``: each PCI device's NUMA node as sysfs knows it (lower-case bus id → node), used when the CPU
    affinity ranges do not give real NUMA nodes (an Arm A3 host's -t topo prints none). ``remaps``: ``info -t
    phyid-remap`` answers, for chips whose physical id neither table prints. A chip whose physical id is still
    unknown (:func:`physical_ids`) is left out, logged; :class:`NpuSmiPhysicalIdUnknown` when that is every chip."""
    phys = physical_ids(info, chip_map, remaps)
    unknown = tuple((c.npu_id, c.chip_id) for c in info.chips if (c.npu_id, c.chip_id) not in phys)
    if unknown:
        error = NpuSmiPhysicalIdUnknown(unknown, "npu-smi prints no Phy-ID for them and no 'info -t phyid-remap' "
                                                 "answer named them")
        if len(unknown) == len(info.chips):
            raise error
        log.error("%s: left out, the other chips are served", error)  # one such chip does not take the node out
    devices: list[NpuDevice] = []
    for chip in info.chips:
        phy = phys.get((chip.npu_id, chip.chip_id))
        if phy is None:
            continue
        memory = chip.hbm_mb or chip.memory_mb
        devices.append(NpuDevice(
            id=device_id(chip.name, phy), npu_id=chip.npu_id, chip_id=chip.chip_id, physical_id=phy,
            chip_model=chip.name, health=chip.health, bus_id=chip.bus_id,
            memory_mb=int(memory.total) if memory and memory.total else None,
            aicore=(aicore or {}).get(chip.npu_id)))
    numa_source = "unknown"
    groups: list[InterconnectGroup] = []
    if topo is not None:
        label_to_device = {}
        for label in topo.devices:
            index = int(re.sub(r"\D", "", label))
            match = next((d for d in devices if d.physical_id == index), None)
            if match:
                label_to_device[label] = match.id
        numa, numa_source = numa_from_affinity(topo.cpu_affinity, node_cpus or {})
        by_id = {label_to_device[lbl]: n for lbl, n in numa.items() if lbl in label_to_device}
        groups = interconnect_groups(topo, label_to_device)
        devices = [d.model_copy(update={"numa_node": by_id.get(d.id)}) for d in devices]
    if numa_source != "sysfs" and pci_numa and devices and all(
            d.bus_id and d.bus_id.lower() in pci_numa for d in devices):
        devices = [d.model_copy(update={"numa_node": pci_numa[(d.bus_id or "").lower()]}) for d in devices]
        numa_source = "sysfs"
    cards = len({d.npu_id for d in devices})
    if devices and _A1_MODELS.match(devices[0].chip_model) and cards in (4, 8) and (
            not any(g.kind in (InterconnectKind.HCCS_MESH, InterconnectKind.HCCS_RING) for g in groups)
            or (cards == 4 and len(groups) == 1 and len(groups[0].devices) == 4)):
        # a first-generation 910 board is HCCS rings of four whatever -t topo prints (no topology, only PCIe links,
        # or a half board's four cards that look like one mesh): its ring rules must apply
        groups = _a1_ring_groups(devices)
    group_of = {dev: g.id for g in groups for dev in g.devices}
    devices = [d.model_copy(update={"group": group_of.get(d.id)}) for d in devices]
    model = devices[0].chip_model if devices else ""
    return NodeInventory(chip_model=model, driver_version=info.driver_version, tool_version=info.tool_version,
                         devices=tuple(devices), groups=tuple(groups), numa_source=numa_source)


def read_pci_numa(sysfs_root: str | Path, bus_ids: Iterable[str]) -> dict[str, int]:
    """The NUMA node of each PCI device (``/sys/bus/pci/devices/<bus id>/numa_node``; -1, unknown, left out)."""
    out: dict[str, int] = {}
    for bus_id in bus_ids:
        key = bus_id.lower()
        try:
            node = int(Path(sysfs_root, "bus/pci/devices", key, "numa_node").read_text().strip())
        except (OSError, ValueError):
            continue
        if node >= 0:
            out[key] = node
    return out


def read_node_cpus(sysfs_root: str | Path = "/sys") -> dict[int, set[int]]:
    """CPUs of each NUMA node from ``/sys/devices/system/node/node*/cpulist`` (empty when unavailable)."""
    out: dict[int, set[int]] = {}
    for path in Path(sysfs_root, "devices/system/node").glob("node[0-9]*/cpulist"):
        try:
            out[int(path.parent.name[4:])] = parse_cpu_list(path.read_text())
        except (OSError, ValueError) as exc:
            log.debug("cannot read %s: %s", path, exc)
    return out


INFO_REREADS = 2
"""How often ``npu-smi info`` is read again when it lists fewer chips than the topology matrix."""


def davinci_numbers(dev_root: str | Path) -> list[int]:
    """The N of every ``davinciN`` device node under ``dev_root`` (the physical ids the driver made nodes for)."""
    try:
        names = [p.name for p in Path(dev_root).iterdir()]
    except OSError:
        return []
    return sorted(int(n[7:]) for n in names if re.fullmatch(r"davinci\d+", n))


def remap_physical_ids(npu_smi: NpuSmi, info: NpuSmiInfo, chip_map: Sequence[ChipMapping] | None,
                       dev_root: str | Path) -> list[PhyIdRemap]:
    """The physical ids of the chips whose physical id no table prints. On a host with every chip up
    (:func:`all_chips_up`) they are the logic ids, with no call. Otherwise ``npu-smi info -t phyid-remap -p N`` is
    asked which chip each candidate physical id is: their logic ids first, then the ``davinciN`` nodes under
    ``dev_root``; only npu-smi's answers are used, and a candidate it does not know is skipped."""
    wanted = {(c.npu_id, c.chip_id) for c in info.chips} - set(physical_ids(info, chip_map))
    if not wanted:
        return []
    logic = logic_ids(info, chip_map)
    davinci = davinci_numbers(dev_root)
    if all_chips_up(info, logic, davinci):
        log.info("npu-smi prints no physical ids; every chip is up (a /dev/davinciN for each logic id and no other),"
                 " so the logic ids are the physical ids")
        return [PhyIdRemap(phy_id=logic[k], logic_id=logic[k], npu_id=k[0], chip_id=k[1]) for k in sorted(wanted)]
    candidates = list(dict.fromkeys([logic[k] for k in sorted(wanted) if k in logic] + davinci))
    found: list[PhyIdRemap] = []
    for phy in candidates:
        if not wanted:
            break
        try:
            remap = npu_smi.phyid_remap(phy)
        except NpuSmiUnsupported as exc:
            log.warning("npu-smi info -t phyid-remap is not supported: %s", exc)
            break
        except NpuSmiError as exc:
            log.debug("npu-smi info -t phyid-remap -p %d: %s", phy, exc)
            continue
        if remap.phy_id == phy and (remap.npu_id, remap.chip_id) in wanted:
            found.append(remap)
            wanted.discard((remap.npu_id, remap.chip_id))
    return found


def all_chips_up(info: NpuSmiInfo, logic: Mapping[tuple[int, int], int], davinci: Sequence[int]) -> bool:
    """Whether the logic ids are the physical ids: every chip has a logic id, and the ``davinciN`` nodes are exactly
    those ids (logic ids are renumbered only when a chip is missing, which leaves a node without its logic id or a
    logic id without its node)."""
    ids = [logic.get((c.npu_id, c.chip_id)) for c in info.chips]
    return bool(ids) and None not in ids and sorted(ids) == sorted(davinci)  # type: ignore[type-var]


def discover(npu_smi: NpuSmi, sysfs_root: str | Path = "/sys", dev_root: str | Path = "/dev") -> NodeInventory:
    """Run npu-smi (info, -m, -t topo, -t common, -t phyid-remap when no table prints physical ids) and build the
    inventory. ``info`` errors propagate, and so does :class:`NpuSmiPhysicalIdUnknown` (no chip placed); the others
    only reduce what is known (logged)."""
    info = npu_smi.info()
    topo: Topology | None = None
    try:
        topo = npu_smi.topology()
    except NpuSmiUnsupported as exc:
        log.info("topology not supported by this device/driver: %s", exc)
    except NpuSmiError as exc:
        log.warning("npu-smi -t topo failed, NUMA and interconnect groups unknown: %s", exc)
    for _ in range(INFO_REREADS):
        if topo is None or len(topo.devices) <= len(info.chips):
            break
        # a table cut exactly at a chip's border parses as fewer chips; the topology matrix counts them all
        log.warning("npu-smi info lists %d chips but -t topo lists %d (output cut short?): reading it again",
                    len(info.chips), len(topo.devices))
        info = npu_smi.info()
    else:
        if topo is not None and len(topo.devices) > len(info.chips):
            log.warning("npu-smi info keeps listing %d chips where -t topo lists %d: serving the %d it lists",
                        len(info.chips), len(topo.devices), len(info.chips))
    chip_map: list[ChipMapping] | None = None
    if any(c.phy_id is None for c in info.chips):
        try:
            chip_map = npu_smi.chip_map()
        except NpuSmiError as exc:
            log.warning("npu-smi info -m failed: %s", exc)
    remaps = remap_physical_ids(npu_smi, info, chip_map, dev_root)
    aicore: dict[int, int] = {}
    for npu_id in sorted({c.npu_id for c in info.chips}):
        try:
            value = npu_smi.common(npu_id).first("Aicore Count")
        except NpuSmiError as exc:
            log.debug("npu-smi -t common -i %d failed: %s", npu_id, exc)
            continue
        if value and value.isdigit():
            aicore[npu_id] = int(value)
    return build_inventory(info, chip_map, topo, read_node_cpus(sysfs_root), aicore,
                           read_pci_numa(sysfs_root, [c.bus_id for c in info.chips if c.bus_id]), remaps)


__all__ = [
    "DeviceHealth",
    "NodeInventory",
    "NpuDevice",
    "build_inventory",
    "chip_family",
    "davinci_numbers",
    "device_id",
    "discover",
    "interconnect_groups",
    "numa_from_affinity",
    "parse_cpu_list",
    "physical_ids",
    "read_node_cpus",
]
