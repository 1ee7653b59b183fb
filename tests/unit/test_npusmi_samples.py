"""Every real npu-smi sample we hold parses into the facts it shows (samples: tests/samples, sources in
docs/npu-smi-formats.md and ../shared/reference/npu-smi-samples.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fuyao.npusmi import NpuHealthState, NpuSmiUnsupported
from fuyao.npusmi import parse as p
from tests.conftest import REPO, SAMPLES, sample

# file → (tool version, driver version, chips, processes, first chip (npu, chip, phy, name, health),
#         last chip (npu, chip, phy), first chip memory total, first chip HBM total)
INFO_TABLES = {
    "S1-info-910b4-8.txt": ("24.1.rc3", "24.1.rc3", 8, 4, (0, 0, None, "910B4", "OK"), (7, 0, None), 0, 32768),
    "R1a-info-310p3-duo-processes.txt": ("24.1.0.1", "24.1.0.1", 4, 4, (1, 0, 0, "310P3", "OK"), (2, 1, 3),
                                         44280, None),
    "R1b-info-310p3-duo-dash.txt": ("25.5.1", "25.5.1", 4, 0, (1, 0, 0, "310P3", "OK"), (2, 1, 3), 44278, None),
    "R1e-info-310p3-single-noproc.txt": ("23.0.0", "23.0.0", 1, 0, (24, 0, 0, "310P3", "OK"), (24, 0, 0), 21527,
                                         None),
    "R1e-info-310p3-5digit-id.txt": ("25.5.2", "25.5.2", 1, 0, (32896, 0, 0, "310P3", "OK"), (32896, 0, 0), 44213,
                                     None),
    "R1f-info-310b4-alarm.txt": ("23.0.0", "23.0.0", 1, 0, (0, 0, 0, "310B4", "Alarm"), (0, 0, 0), 15609, None),
    "R1g-info-310-v20-nohugepages.txt": ("20.2.0", "20.2.0", 4, 0, (215, 0, 0, "310", "OK"), (215, 3, 3), 8192,
                                         None),
    "R1g-info-310-v21.txt": ("21.0.4", "21.0.4.B030", 4, 0, (6, 0, 3, "310", "OK"), (6, 3, 6), 8192, None),
    "R2a-info-910c-a3-16dies.txt": ("24.1.rc3.3", "24.1.rc3.3", 16, 8, (0, 0, 0, "Ascend910", "OK"), (7, 1, 15),
                                    0, 65536),
    "R2b-info-910c-v26-wide.txt": ("26.0.rc1", "26.0.rc1", 4, 2, (0, 0, 0, "Ascend910", "OK"), (5, 1, 11), 0,
                                   65536),
    "R3a-info-910prob-8.txt": ("24.1.0", "24.1.0", 8, 0, (0, 0, None, "910ProB", "OK"), (7, 0, None), 13553,
                               32768),
    "R3b-info-910a-v22-narrow.txt": ("22.0.3.1", "22.0.3.1", 8, 0, (0, 0, None, "910A", "OK"), (7, 0, None),
                                     15077, 32768),
    "R3c-info-910a-warning.txt": ("23.0.rc1.b070", "23.0.rc1.b070", 4, 0, (0, 0, None, "910A", "Warning"),
                                  (3, 0, None), 15137, 32768),
}


@pytest.mark.parametrize("name", sorted(INFO_TABLES))
def test_info_table(name: str) -> None:
    tool, driver, n_chips, n_procs, first, last, mem_total, hbm_total = INFO_TABLES[name]
    info = p.parse_info(sample(name))
    assert (info.tool_version, info.driver_version) == (tool, driver)
    assert len(info.chips) == n_chips
    assert len(info.processes) == n_procs
    c0 = info.chips[0]

    def shown_id(c: object) -> int | None:  # the A3 "Phy-ID" column or the 310/310P "Device" (logic id) column
        assert c.phy_id is None or c.logic_id is None  # type: ignore[attr-defined]
        return c.phy_id if c.phy_id is not None else c.logic_id  # type: ignore[attr-defined, no-any-return]

    assert (c0.npu_id, c0.chip_id, shown_id(c0), c0.name, c0.health_raw) == first
    assert (info.chips[-1].npu_id, info.chips[-1].chip_id, shown_id(info.chips[-1])) == last
    if "Chip    Device" in sample(name):  # a logic id, never taken for the physical one (/dev/davinciN)
        assert all(c.phy_id is None for c in info.chips)
    assert c0.memory_mb is not None and c0.memory_mb.total == mem_total
    assert (c0.hbm_mb.total if c0.hbm_mb else None) == hbm_total


def test_info_cells_and_missing_values() -> None:
    info = p.parse_info(sample("S1-info-910b4-8.txt"))
    six = info.chips[6]
    assert (six.power_w, six.temp_c, six.aicore_percent, six.bus_id) == (263.2, 46, 82, "0000:82:00.0")
    assert (six.hbm_mb.used, six.hbm_mb.total) == (30759, 32768)
    assert info.processes[0].pid == 582939 and info.processes[0].memory_mb == 19502
    assert info.processes[0].name is None  # empty cell
    a3 = p.parse_info(sample("R2a-info-910c-a3-16dies.txt"))
    assert a3.chips[1].power_w is None  # die 1 prints "-"
    assert a3.processes[0].name == "pt_main_thread"
    p310 = p.parse_info(sample("R1a-info-310p3-duo-processes.txt"))
    assert p310.chips[0].power_w is None  # "NA"
    assert p310.chips[0].hugepages.used == 7210
    assert p310.processes[0].name == "mindie_llm_back"
    alarm = p.parse_info(sample("R1f-info-310b4-alarm.txt")).chips[0]
    assert alarm.health is NpuHealthState.ALARM and not alarm.health.schedulable and alarm.bus_id is None


def test_npu_list_and_chip_maps() -> None:
    entries = p.parse_npu_list(sample("S5-info-l-910b4.txt"))
    assert [(e.npu_id, e.chip_count) for e in entries] == [(0, 1), (1, 1)]
    m = p.parse_chip_map(sample("S6-info-m-910b4.txt"))
    assert [(x.npu_id, x.chip_id, x.logic_id, x.name, x.is_compute_chip) for x in m[:2]] == [
        (0, 0, 0, "Ascend 910B4", True), (0, 1, None, "Mcu", False)]
    a3 = p.parse_chip_map(sample("R2c-info-m-910c-phyid.txt"))
    assert [(x.npu_id, x.chip_id, x.logic_id, x.phy_id) for x in a3] == [(0, 0, 0, 0), (0, 1, 1, 1),
                                                                          (0, 2, None, None), (1, 0, 2, 2)]
    old = p.parse_chip_map(sample("R1g-info-m-310-v21.txt"))
    assert [x.logic_id for x in old] == [0, 1, 2, 3, None] and old[0].name == "MiniD"
    assert len(p.parse_chip_map(sample("R3b-info-m-910a.txt"))) == 8


def test_health_reports() -> None:
    card = p.parse_health(sample("S7-health-card.txt"))
    assert (card.npu_id, card.health, card.error_codes) == (0, NpuHealthState.OK, ())
    chip = p.parse_health(sample("S7b-health-chip.txt"))
    assert chip.health is NpuHealthState.OK and chip.error_information == ()
    mcu = p.parse_health(sample("R5b-health-card-mcu.txt"))
    assert mcu.health is NpuHealthState.OK and mcu.chip_id == 0


def test_health_with_error_codes_in_source_format() -> None:
    text = ("\tHealth Status                  : Alarm\n"
            "\tError Code                     : 80E18005 80CB8009\n"
            "\tError Information              : node type=SOC, sensor type=Temperature\n\n"
            "\t                               : node type=HBM, sensor type=ECC\n")
    report = p.parse_health(text)
    assert report.health is NpuHealthState.ALARM
    assert report.error_codes == ("80E18005", "80CB8009")
    assert report.error_information == ("node type=SOC, sensor type=Temperature", "node type=HBM, sensor type=ECC")


@pytest.mark.parametrize("name,sections,key,value", [
    ("S8-memory-910b.txt", 1, "HBM Capacity(MB)", "32768"),
    ("S9-usages-910a.txt", 2, "DDR Capacity(MB)", "13553"),
    ("R2d-usages-910b-aivector.txt", 2, "Aivector Usage Rate(%)", "0"),
    ("S10-board-910.txt", 2, "PCIe Bus Info", "0000:61:00.0"),
    ("S11-common-910b.txt", 3, "Aicore Count", "20"),
    ("S13-ecc-910b.txt", 2, "HBM Double Bit Error Count", "0"),
])
def test_key_value_reports(name: str, sections: int, key: str, value: str) -> None:
    report = p.parse_key_values(sample(name))
    assert len(report.sections) == sections
    assert report.first(key) == value


def test_common_keeps_mcu_section_apart() -> None:
    report = p.parse_key_values(sample("S11-common-910b.txt"))
    assert report.section_with("Chip Name", "mcu") == {"Chip Name": "mcu", "Temperature(C)": "40"}
    assert report.first("Temperature(C)") == "46"


def test_topologies() -> None:
    mesh = p.parse_topology(sample("S12-topo-910b-hccs.txt"))
    assert len(mesh.devices) == 8 and mesh.link("NPU0", "NPU7") == "HCCS" and mesh.link("NPU3", "NPU3") == "X"
    assert mesh.cpu_affinity["NPU4"] == "0-23"
    a3 = p.parse_topology(sample("R4a-topo-910c-sio-noaffinity.txt"))
    assert a3.devices == ("Phy-ID12", "Phy-ID13") and a3.link("Phy-ID12", "Phy-ID13") == "SIO"
    assert a3.cpu_affinity == {"Phy-ID12": None, "Phy-ID13": None}
    ub = p.parse_topology(sample("R4d-topo-950-ub.txt"))
    assert ub.link("NPU0", "NPU1") == "UB" and ub.cpu_affinity["NPU7"] == "64-127,192-255"


def test_topology_unsupported_is_typed() -> None:
    with pytest.raises(NpuSmiUnsupported):
        p.parse_topology("This device does not support querying topo.\n")


@pytest.mark.parametrize("name,expected", [
    ("V2-template-info-310p3.txt", [("vir01", 1, 3, 1), ("vir02", 2, 6, 2), ("vir02_1c", 2, 6, 1),
                                    ("vir04", 4, 12, 4), ("vir04_3c", 4, 12, 3), ("vir04_3c_ndvpp", 4, 12, 3),
                                    ("vir04_4c_dvpp", 4, 12, 4)]),
    ("R6a-template-info-910b4-1.txt", [("vir10_3c_32g", 10, 32, 3), ("vir05_1c_16g", 5, 16, 1)]),
    ("R6b-template-info-910b4.txt", [("vir10_3c_16g", 10, 16, 3), ("vir10_4c_16g_m", 10, 16, 4),
                                     ("vir10_3c_16g_nm", 10, 16, 3), ("vir05_1c_8g", 5, 8, 1)]),
])
def test_template_info(name: str, expected: list[tuple[str, int, int, int]]) -> None:
    templates = p.parse_template_info(sample(name))
    assert [(t.name, t.aicore, t.memory_gb, t.aicpu) for t in templates] == expected
    assert templates[0].extra["VPC"].isdigit() and "JPEGE" in templates[0].extra


@pytest.mark.parametrize("name,total,ids,aicore_free", [
    ("V4-info-vnpu-empty.txt", 0, [], 20),
    ("V5-info-vnpu-two.txt", 2, [212, 213], 0),
    ("R7a-info-vnpu-910b4-empty-header.txt", 0, [], 20),
    ("R7a-info-vnpu-910b4-two-bound.txt", 2, [100, 101], 0),
])
def test_info_vnpu(name: str, total: int, ids: list[int], aicore_free: int) -> None:
    info = p.parse_vnpu_info(sample(name))
    assert info.total_vnpus == total and [v.vnpu_id for v in info.vnpus] == ids
    assert info.resources["AICORE"].free == aicore_free and info.resources["AICORE"].total == 20
    assert info.resources["PNGD"].free is None  # NA/NA


def test_info_vnpu_container_binding() -> None:
    info = p.parse_vnpu_info(sample("R7a-info-vnpu-910b4-two-bound.txt"))
    assert (info.vnpus[0].container_id, info.vnpus[0].status) == ("ffffffffffff", "1")
    assert info.vnpus[1].template == "vir10_3c_16g"


def test_set_results() -> None:
    ok = p.parse_set_result(sample("V3-create-vnpu-ok.txt"))
    assert (ok.status, ok.message) == ("OK", "Create vnpu success")
    failed = p.parse_set_result("create vnpu failed.\n")
    assert failed.status == "FAILED" and "failed" in failed.message


def test_every_shared_sample_has_a_fixture() -> None:
    """New samples added to the shared reference must get a fixture (and so a parser test)."""
    shared = REPO.parent / "shared" / "reference" / "npu-smi-samples.md"
    if not shared.exists():
        pytest.skip("shared reference not beside this checkout")
    ids = re.findall(r"^## (S\d+b?|V\d+)\. ", shared.read_text(), re.M)
    have = {f.name.split("-")[0] for f in Path(SAMPLES).glob("*.txt")}
    assert ids and set(ids) <= have, f"samples without a fixture: {sorted(set(ids) - have)}"


def test_a_process_table_in_bytes_gives_megabytes() -> None:
    # a 910 A1 capture headed "Process memory(B)": the process's memory was lost (None)
    text = sample("S1-info-910b4-8.txt")
    mb = p.parse_info(text).processes[0].memory_mb
    in_bytes = p.parse_info(text.replace("Process memory(MB)", "Process memory(B) ").replace(
        f"{int(mb or 0)}", f"{int((mb or 0) * 2**20)}", 1) if "Process memory(MB)" in text else text)
    assert mb and in_bytes.processes[0].memory_mb == mb
