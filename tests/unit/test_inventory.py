"""Inventory: device ids, NUMA nodes and interconnect groups for every preset and for real samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuyao import inventory as inv
from fuyao.contracts import ANNOTATION_NODE_TOPOLOGY, InterconnectKind, dump_annotation, parse_annotation
from fuyao.npusmi import NpuSmi
from fuyao.npusmi import parse as p
from tests.conftest import sample
from tests.support.phy_ids import remaps_in_table_order


@pytest.mark.parametrize("preset,count,groups,kind", [
    ("910b4-8", 8, [8], InterconnectKind.HCCS_MESH), ("910a1-8", 8, [4, 4], InterconnectKind.HCCS_RING),
    ("310p3-4", 4, [2, 2], InterconnectKind.PCIE), ("910c-8", 16, [16], InterconnectKind.HCCS_MESH),
])
def test_discover_presets(fake_node, tmp_path: Path, preset: str, count: int, groups: list[int], kind) -> None:
    node = fake_node(preset)
    found = inv.discover(NpuSmi(node.path), sysfs_root=tmp_path)  # no sysfs NUMA nodes
    assert len(found.devices) == count and len({d.id for d in found.devices}) == count
    assert [len(g.devices) for g in found.groups] == groups and {g.kind for g in found.groups} == {kind}
    assert all(d.group for d in found.devices) and all(d.aicore for d in found.devices)
    topo = found.to_topology()
    assert parse_annotation(ANNOTATION_NODE_TOPOLOGY, dump_annotation(topo)) == topo
    # Stable ids: a second discovery (a restart) gives the same ids.
    assert [d.id for d in inv.discover(NpuSmi(node.path), sysfs_root=tmp_path).devices] == [d.id for d in
                                                                                          found.devices]


def test_a1_rings_and_numa(fake_node, tmp_path: Path) -> None:
    found = inv.discover(NpuSmi(fake_node("910a1-8").path), sysfs_root=tmp_path)
    ring = {d.npu_id: d.group for d in found.devices}
    assert ring[0] == ring[3] != ring[4] == ring[7]
    assert [d.numa_node for d in found.devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert found.numa_source == "affinity-order"


def test_numa_from_sysfs(fake_node, tmp_path: Path) -> None:
    for node_id, cpus in {0: "0-47", 1: "48-95", 2: "96-143", 3: "144-191"}.items():
        d = tmp_path / f"devices/system/node/node{node_id}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
    found = inv.discover(NpuSmi(fake_node("910b4-8").path), sysfs_root=tmp_path)
    assert found.numa_source == "sysfs"
    assert [d.numa_node for d in found.devices] == [3, 3, 2, 2, 0, 0, 1, 1]


def test_failed_chip_is_unhealthy_in_topology(fake_node, tmp_path: Path) -> None:
    node = fake_node("910b4-8")
    node.run("fake", "set-health", "-i", "2", "Critical", "--code", "80E01801")
    topo = inv.discover(NpuSmi(node.path), sysfs_root=tmp_path).to_topology()
    assert topo.devices["Ascend910-2"].health.value == "Unhealthy"
    assert topo.devices["Ascend910-1"].health.value == "Healthy"


def test_topology_unsupported_leaves_groups_unknown(fake_node, tmp_path: Path) -> None:
    node = fake_node("910b4-8")
    node.run("fake", "inject", "info -t topo", "unsupported")
    found = inv.discover(NpuSmi(node.path), sysfs_root=tmp_path)
    assert found.groups == () and found.numa_source == "unknown" and len(found.devices) == 8


def test_real_samples_build() -> None:
    info = p.parse_info(sample("S1-info-910b4-8.txt"))
    found = inv.build_inventory(info, p.parse_chip_map(sample("S6-info-m-910b4.txt")),
                                p.parse_topology(sample("S12-topo-910b-hccs.txt")), remaps=remaps_in_table_order(info))
    assert [d.id for d in found.devices][:2] == ["Ascend910-0", "Ascend910-1"]
    assert [d.numa_node for d in found.devices] == [3, 3, 2, 2, 0, 0, 1, 1]
    a3 = inv.build_inventory(p.parse_info(sample("R2a-info-910c-a3-16dies.txt")))
    assert [d.physical_id for d in a3.devices] == list(range(16))
    duo_info = p.parse_info(sample("R1a-info-310p3-duo-processes.txt"))
    duo = inv.build_inventory(duo_info, remaps=remaps_in_table_order(duo_info))
    assert [d.id for d in duo.devices] == ["Ascend310P-0", "Ascend310P-1", "Ascend310P-2", "Ascend310P-3"]


@pytest.mark.parametrize("model,family", [("910B4", "910"), ("Ascend910", "910"), ("910ProB", "910"),
                                          ("310P3", "310P"), ("310B4", "310B"), ("310", "310")])
def test_chip_family(model: str, family: str) -> None:
    assert inv.chip_family(model) == family


def test_cpu_list() -> None:
    assert inv.parse_cpu_list("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    with pytest.raises(ValueError):
        inv.parse_cpu_list("zero")


def test_a_first_generation_910_half_board_keeps_its_ring_rules(fake_node, tmp_path: Path) -> None:
    # four 910 A1 cards that -t topo shows all HCCS-linked looked like one mesh: the product was generic and a
    # 3-card pod was admitted (the ring rule takes 1, 2 or 4); and cards whose topology shows no HCCS at all lost it
    from fuyao.npusmi.models import PhyIdRemap, Topology
    from fuyao.products import product_of

    full = inv.discover(NpuSmi(fake_node("910a1-8").path), sysfs_root=tmp_path)
    half = [d for d in full.devices if d.npu_id < 4]
    info = p.parse_info(NpuSmi(fake_node("910a1-8").path).run(["info"]))
    info = info.model_copy(update={"chips": [c for c in info.chips if c.npu_id < 4]})
    labels = tuple(f"NPU{d.physical_id}" for d in half)
    mesh = Topology(devices=labels, links={a: {b: "X" if a == b else "HCCS" for b in labels} for a in labels},
                    cpu_affinity={a: None for a in labels})
    remaps = [PhyIdRemap(phy_id=d.physical_id, logic_id=d.physical_id, npu_id=d.npu_id, chip_id=d.chip_id)
              for d in half]
    built = inv.build_inventory(info, topo=mesh, remaps=remaps)
    assert [g.kind for g in built.groups] == [InterconnectKind.HCCS_RING]
    assert product_of(built.to_topology()).name == "910-a1-half"
    pcie = Topology(devices=labels, links={a: {b: "X" if a == b else "PIX" for b in labels} for a in labels},
                    cpu_affinity={a: None for a in labels})
    assert product_of(inv.build_inventory(info, topo=pcie, remaps=remaps).to_topology()).name == "910-a1-half"


def test_numa_from_each_npus_pci_device_when_cpu_affinity_gives_none(fake_node, tmp_path: Path) -> None:
    # an Atlas 800 A3 (Arm) prints no CPU Affinity column: its dies had no NUMA node, and the kubelet got none
    node = fake_node("910c-8")
    info = p.parse_info(NpuSmi(node.path).run(["info"]))
    buses = sorted({c.bus_id for c in info.chips if c.bus_id})
    assert buses
    for i, bus in enumerate(buses):
        d = tmp_path / "bus/pci/devices" / bus.lower()
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{i // (len(buses) // 2 or 1)}\n")
    found = inv.discover(NpuSmi(node.path), sysfs_root=tmp_path)
    assert found.numa_source == "sysfs"
    by_bus = {d.bus_id: d.numa_node for d in found.devices}
    assert {by_bus[b] for b in buses} == {0, 1} and all(n is not None for n in by_bus.values())
    (tmp_path / "bus/pci/devices" / buses[0].lower() / "numa_node").write_text("-1\n")  # unknown to the kernel
    assert inv.discover(NpuSmi(node.path), sysfs_root=tmp_path).numa_source != "sysfs"
