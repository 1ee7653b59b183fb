"""Physical ids (the N of /dev/davinciN) come from what npu-smi states, never from the logic id.

Huawei's DCMI and npu-smi pages: "ls /dev/davinci*" gives the chips' physical ids; ``npu-smi info -t phyid-remap -p
phy_id`` names the NPU ID, Chip ID and logic id of one. The logic id (``info -m``'s Chip Logic ID, the 310P table's
Device column) is renumbered when a chip is missing, so taking it for the physical id hands out the wrong device file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuyao import inventory as inv
from fuyao.npusmi import NpuSmi, NpuSmiCommandFailed, NpuSmiParseError, NpuSmiPhysicalIdUnknown, NpuSmiUnsupported
from fuyao.npusmi import parse as p
from fuyao.npusmi.models import NpuSmiInfo, PhyIdRemap
from tests.conftest import sample

# Atlas 800 A2 with NPU 3 (physical id 3) not up at boot: the driver numbers the logic ids 0..6, so the chips on
# physical ids 4..7 carry logic ids 3..6.


def _without_npu(n: int) -> NpuSmiInfo:
    full = p.parse_info(sample("S1-info-910b4-8.txt"))
    return full.model_copy(update={"chips": tuple(c for c in full.chips if c.npu_id != n)})


CHIP_MAP_HEADER = "\t" + " ".join(f"{h:<30}" for h in ("NPU ID", "Chip ID", "Chip Logic ID", "Chip Name")) + "\n"
CHIP_MAP_WITHOUT_3 = CHIP_MAP_HEADER + "".join(
    f"\t{npu:<30} {0:<30} {logic:<30} Ascend 910B4\n\t{npu:<30} {1:<30} {'-':<30} Mcu\n"
    for logic, npu in enumerate([0, 1, 2, 4, 5, 6, 7]))


def remap_text(phy: int, logic: int, npu: int, chip: int) -> str:
    return "".join(f"\t{k:<30}:{v}\n" for k, v in (("Chip Physical ID", phy), ("Chip Logic ID", logic),
                                                   ("NPU ID", npu), ("Chip ID", chip)))


def test_phyid_remap_parses_the_documented_layouts() -> None:
    r = p.parse_phyid_remap(remap_text(6, 6, 3, 0))
    assert (r.phy_id, r.logic_id, r.npu_id, r.chip_id) == (6, 6, 3, 0)
    # Huawei's page prints it with spaces and no TAB
    doc = " Chip Physical ID            :0\n Chip Logic ID               :0\n NPU ID                      :0\n" \
          " Chip ID                     :0\n"
    assert p.parse_phyid_remap(doc) == PhyIdRemap(phy_id=0, logic_id=0, npu_id=0, chip_id=0)
    with pytest.raises(NpuSmiParseError, match="phyid-remap"):  # NPU ID -1: "this NPU is not available"
        p.parse_phyid_remap(remap_text(6, 6, -1, 0))
    with pytest.raises(NpuSmiParseError, match="Chip ID"):
        p.parse_phyid_remap(remap_text(6, 6, 3, 0).replace("Chip ID ", "Chip Xx "))


def test_the_310p_device_column_is_a_logic_id_not_a_physical_id() -> None:
    duo = p.parse_info(sample("R1a-info-310p3-duo-processes.txt"))
    assert [(c.phy_id, c.logic_id) for c in duo.chips] == [(None, 0), (None, 1), (None, 2), (None, 3)]
    a3 = p.parse_info(sample("R2a-info-910c-a3-16dies.txt"))
    assert [c.phy_id for c in a3.chips] == list(range(16)) and all(c.logic_id is None for c in a3.chips)


def test_a_missing_chip_no_longer_shifts_the_device_files() -> None:
    info, chip_map = _without_npu(3), p.parse_chip_map(CHIP_MAP_WITHOUT_3)
    # without an authoritative answer the chips are a typed error naming them (was: logic id 3 -> /dev/davinci3,
    # which is not NPU 4's device file)
    with pytest.raises(NpuSmiPhysicalIdUnknown) as err:
        inv.build_inventory(info, chip_map)
    assert (4, 0) in err.value.chips and "NPU 4 chip 0" in str(err.value)
    remaps = [PhyIdRemap(phy_id=npu, logic_id=logic, npu_id=npu, chip_id=0)
              for logic, npu in enumerate([0, 1, 2, 4, 5, 6, 7])]
    found = inv.build_inventory(info, chip_map, remaps=remaps)
    assert {d.npu_id: d.physical_id for d in found.devices} == {0: 0, 1: 1, 2: 2, 4: 4, 5: 5, 6: 6, 7: 7}
    assert "Ascend910-3" not in {d.id for d in found.devices}


class FakeHost:
    """npu-smi on the host above: physical ids 0-2 and 4-7, logic ids compacted to 0..6."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.by_phy = {npu: (logic, npu) for logic, npu in enumerate([0, 1, 2, 4, 5, 6, 7])}

    def info(self) -> NpuSmiInfo:
        return _without_npu(3)

    def topology(self) -> object:
        raise NpuSmiUnsupported("This device does not support querying topo.")

    def chip_map(self) -> object:
        return p.parse_chip_map(CHIP_MAP_WITHOUT_3)

    def common(self, npu_id: int) -> object:
        raise NpuSmiUnsupported("common")

    def phyid_remap(self, phy: int) -> PhyIdRemap:
        self.asked.append(phy)
        if phy not in self.by_phy:
            raise NpuSmiCommandFailed("npu-smi exited with code 255", 255, "")
        logic, npu = self.by_phy[phy]
        return p.parse_phyid_remap(remap_text(phy, logic, npu, 0))


def test_discovery_asks_phyid_remap_about_the_device_nodes(tmp_path: Path) -> None:
    for phy in (0, 1, 2, 4, 5, 6, 7):
        (tmp_path / f"davinci{phy}").touch()
    (tmp_path / "davinci_manager").touch()
    host = FakeHost()
    found = inv.discover(host, "/nonexistent", tmp_path)  # type: ignore[arg-type]
    assert {d.npu_id: d.physical_id for d in found.devices} == {0: 0, 1: 1, 2: 2, 4: 4, 5: 5, 6: 6, 7: 7}
    # logic ids first (right for 0-2), then the device nodes; each answer checked against the chip it names
    assert host.asked[:7] == [0, 1, 2, 3, 4, 5, 6] and 7 in host.asked
    # no device nodes visible (devRoot not mounted): the chip npu-smi did not place is left out (logged), not
    # guessed, and does not take the others with it
    found = inv.discover(FakeHost(), "/nonexistent", tmp_path / "empty")  # type: ignore[arg-type]
    assert {d.npu_id: d.physical_id for d in found.devices} == {0: 0, 1: 1, 2: 2, 4: 4, 5: 5, 6: 6}


def test_the_fake_npu_smi_answers_phyid_remap(fake_node) -> None:  # type: ignore[no-untyped-def]
    client = NpuSmi(fake_node("310p3-duo-4").path)
    remap = client.phyid_remap(3)
    assert (remap.phy_id, remap.chip_id) == (3, 1)
    with pytest.raises(NpuSmiCommandFailed):
        client.phyid_remap(99)


class NoRemapHost(FakeHost):
    """An older driver: no Phy-ID column and no ``phyid-remap`` subcommand."""

    def __init__(self, info: NpuSmiInfo, chip_map: str) -> None:
        super().__init__()
        self._info, self._chip_map = info, chip_map

    def info(self) -> NpuSmiInfo:
        return self._info

    def chip_map(self) -> object:
        return p.parse_chip_map(self._chip_map)

    def phyid_remap(self, phy: int) -> PhyIdRemap:
        raise NpuSmiUnsupported("Error: parameter phyid-remap is invalid.")


def test_without_phyid_remap_a_host_with_every_chip_up_takes_its_logic_ids(tmp_path: Path) -> None:
    full = _without_npu(99)  # every chip
    chip_map = CHIP_MAP_HEADER + "".join(f"\t{c.npu_id:<30} {0:<30} {c.npu_id:<30} Ascend 910B4\n" for c in full.chips)
    for chip in full.chips:
        (tmp_path / f"davinci{chip.npu_id}").touch()
    found = inv.discover(NoRemapHost(full, chip_map), "/nonexistent", tmp_path)  # type: ignore[arg-type]
    assert {d.npu_id: d.physical_id for d in found.devices} == {c.npu_id: c.npu_id for c in full.chips}
    # NPU 3 missing: the logic ids are compacted and no longer name the device nodes, so nothing is guessed
    (tmp_path / "davinci3").unlink()
    with pytest.raises(NpuSmiPhysicalIdUnknown):
        inv.discover(NoRemapHost(_without_npu(3), CHIP_MAP_WITHOUT_3), "/nonexistent",  # type: ignore[arg-type]
                     tmp_path)
