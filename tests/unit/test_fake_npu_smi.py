"""The fake npu-smi prints the real formats (checked against real captures) and keeps state like the real one."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from fuyao.npusmi import NpuHealthState, NpuSmi, NpuSmiCommandFailed
from fuyao.npusmi import parse as p
from tests.conftest import sample

PRESETS = {"910b4-8": (8, 1, "910B4"), "910a1-8": (8, 1, "910ProB"), "310p3-4": (4, 1, "310P3"),
           "910c-8": (8, 2, "Ascend910")}


def _frame(text: str) -> list[str]:
    """The shape of a boxed table: every line's column-separator positions (values blanked)."""
    return [re.sub(r"[^|+]", " ", line).rstrip() for line in text.splitlines() if line.startswith(("+", "|"))]


@pytest.mark.parametrize("preset,real", [
    ("910b4-8", "S1-info-910b4-8.txt"), ("910a1-8", "R3a-info-910prob-8.txt"),
    ("910c-8", "R2a-info-910c-a3-16dies.txt"), ("310p3-4", "R1e-info-310p3-single-noproc.txt"),
])
def test_info_table_has_the_real_frame(fake_node, preset: str, real: str) -> None:
    fake = fake_node(preset).run("info").stdout
    real_frames, fake_frames = set(_frame(sample(real))), set(_frame(fake))
    assert fake_frames <= real_frames | {f for f in fake_frames if f.startswith("|") and f.count("|") == 2}
    real_lines = sample(real).splitlines()
    assert fake.splitlines()[3:5] == real_lines[3:5]  # header rows identical


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_parse_with_our_parsers(fake_node, preset: str) -> None:
    npus, dies, name = PRESETS[preset]
    node = fake_node(preset)
    client = NpuSmi(node.path)
    info = client.info()
    assert len(info.chips) == npus * dies and {c.name for c in info.chips} == {name}
    assert all(c.health is NpuHealthState.OK for c in info.chips)
    chip_map = [m for m in client.chip_map() if m.is_compute_chip]
    assert len(chip_map) == npus * dies
    assert len(client.npu_list()) == npus
    topo = client.topology()
    assert len(topo.devices) == npus * dies
    first = info.chips[0].npu_id
    assert client.health(first).health is NpuHealthState.OK
    assert client.common(first).first("Aicore Count") is not None
    assert client.usages(first).first("Chip ID") == "0"


def test_topology_kinds(fake_node) -> None:
    ring = NpuSmi(fake_node("910a1-8").path).topology()
    assert ring.link("NPU0", "NPU3") == "HCCS" and ring.link("NPU0", "NPU4") == "SYS"
    pcie = NpuSmi(fake_node("310p3-4").path).topology()
    assert pcie.link("NPU0", "NPU1") == "PIX" and pcie.link("NPU0", "NPU2") == "SYS"
    a3 = NpuSmi(fake_node("910c-8").path).topology()
    assert a3.link("Phy-ID0", "Phy-ID1") == "SIO" and a3.link("Phy-ID0", "Phy-ID2") == "HCCS"
    assert set(a3.cpu_affinity.values()) == {None}


def test_template_info_matches_the_real_capture(fake_node) -> None:
    fake = fake_node("910b4-8").run("info", "-t", "template-info").stdout
    assert fake == sample("R6b-template-info-910b4.txt")


def test_vnpu_ids_are_the_products_documented_range(fake_node) -> None:  # type: ignore[no-untyped-def]
    """phy_id*16+100 .. +107 on the Atlas inference series (310P), .. +115 on the others."""
    client = NpuSmi(fake_node("310p3-4").path)
    with pytest.raises(NpuSmiCommandFailed, match="create vnpu failed"):
        client.create_vnpu(0, 0, "vir01", vnpu_id=108)
    assert client.create_vnpu(0, 0, "vir01", vnpu_id=107).status == "OK"
    assert NpuSmi(fake_node("910b4-8").path).create_vnpu(0, 0, "vir05_1c_8g", vnpu_id=115).status == "OK"


def test_vnpu_create_list_destroy(fake_node) -> None:
    node = fake_node("910b4-8")
    client = NpuSmi(node.path)
    assert client.vnpu_info(0, 0).total_vnpus == 0
    assert client.create_vnpu(0, 0, "vir10_3c_16g").message == "Create vnpu success"
    assert client.create_vnpu(0, 0, "vir05_1c_8g", vnpu_id=105).status == "OK"
    info = client.vnpu_info(0, 0)
    assert [v.vnpu_id for v in info.vnpus] == [100, 105]
    # memory: the driver keeps 4 of the 32 GB and gives each vNPU its share of the rest (16g → 14, 8g → 7)
    assert (info.resources["AICORE"].free, info.resources["Memory"].free, info.resources["AICPU"].free) == (5, 7, 3)
    assert info.resources["Memory"].total == 32
    # capacity: 10 more cores do not fit; an id outside phy*16+100..115 is refused; ids are per chip
    with pytest.raises(NpuSmiCommandFailed, match="create vnpu failed"):
        client.create_vnpu(0, 0, "vir10_3c_16g")
    with pytest.raises(NpuSmiCommandFailed, match="create vnpu failed"):
        client.create_vnpu(1, 0, "vir05_1c_8g", vnpu_id=100)
    with pytest.raises(NpuSmiCommandFailed, match="create vnpu failed"):
        client.create_vnpu(0, 0, "no-such-template")
    assert client.destroy_vnpu(0, 0, 100).message == "Destroy vnpu 100 success"
    with pytest.raises(NpuSmiCommandFailed, match="destroy vnpu 100 failed"):
        client.destroy_vnpu(0, 0, 100)
    assert [v["vnpu_id"] for v in json.loads(node.state.read_text())["vnpus"]] == [105]


def test_vnpu_device_nodes_follow_create_and_destroy(fake_node, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With FAKE_NPU_SMI_DEV the simulated driver makes /dev/vdavinci<id> with a vNPU and removes it with the vNPU."""
    dev = tmp_path / "dev"
    dev.mkdir()
    monkeypatch.setenv("FAKE_NPU_SMI_DEV", str(dev))
    client = NpuSmi(fake_node("910b4-8").path)
    client.create_vnpu(1, 0, "vir05_1c_8g")
    assert sorted(p.name for p in dev.iterdir()) == ["vdavinci116"]  # chip 1: ids 116..131
    with pytest.raises(NpuSmiCommandFailed):
        client.create_vnpu(1, 0, "no-such-template")
    assert sorted(p.name for p in dev.iterdir()) == ["vdavinci116"]  # a failed create makes nothing
    client.destroy_vnpu(1, 0, 116)
    assert list(dev.iterdir()) == []


def test_vnpu_in_use_cannot_be_destroyed(fake_node) -> None:
    node = fake_node("310p3-4")
    client = NpuSmi(node.path)
    client.create_vnpu(32, 0, "vir04")  # 310P hosts number cards by slot
    state = json.loads(node.state.read_text())
    state["vnpus"][0].update(container_id="ffffffffffff", status=1)
    node.state.write_text(json.dumps(state))
    vnpu_id = state["vnpus"][0]["vnpu_id"]
    assert vnpu_id == 116  # phy 1 → 116..131
    with pytest.raises(NpuSmiCommandFailed):
        client.destroy_vnpu(32, 0, vnpu_id)


def test_concurrent_creates_never_overbook(fake_node) -> None:
    node = fake_node("910b4-8")
    client = NpuSmi(node.path)

    def create(_: int) -> bool:
        try:
            client.create_vnpu(2, 0, "vir05_1c_8g")
            return True
        except NpuSmiCommandFailed:
            return False

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    assert sum(results) == 4  # 20 cores / 5 per slice
    assert client.vnpu_info(2, 0).total_vnpus == 4


def test_health_faults_and_error_codes(fake_node) -> None:
    node = fake_node("910c-8")
    node.run("fake", "set-health", "-i", "3", "-c", "1", "Critical", "--code", "80E01801", "--code", "80CB8009")
    client = NpuSmi(node.path)
    chips = {(c.npu_id, c.chip_id): c.health for c in client.info().chips}
    assert chips[(3, 1)] is NpuHealthState.CRITICAL and chips[(3, 0)] is NpuHealthState.OK
    card = client.health(3)
    assert card.health is NpuHealthState.CRITICAL and card.error_codes == ("80E01801", "80CB8009")
    assert client.health(3, 0).health is NpuHealthState.OK
    # Without an error code npu-smi shows OK even when the state is Warning/Alarm/Critical.
    node.run("fake", "set-health", "-i", "4", "Alarm")
    assert client.health(4).health is NpuHealthState.OK
    node.run("fake", "set-health", "-i", "3", "-c", "1", "OK")
    assert client.health(3).health is NpuHealthState.OK


def test_bad_state_file_is_reported(fake_node) -> None:
    node = fake_node("910b4-8")
    node.state.write_text('{"preset": "910b4-8", "topology": "torus"}')
    proc = node.run("info", check=False)
    assert proc.returncode == 2 and "topology" in proc.stderr
    node.state.write_text("{not json")
    assert "not valid JSON" in node.run("info", check=False).stderr


def test_version_and_help(fake_node) -> None:
    node = fake_node("310p3-4")
    assert node.run("-v").stdout == "npu-smi version: 24.1.0.1\n"
    assert node.run("-h").stdout.startswith("Usage: npu-smi <Command|-h|-v> [Options...]")
    assert "Error parameter of -t" in node.run("info", "-t", "bogus", check=False).stdout


def test_parse_info_roundtrip_values(fake_node) -> None:
    node = fake_node("910b4-8")
    state = json.loads(node.state.read_text())
    state["chips"] = {"5-0": {"aicore_percent": 77, "memory_used_mb": 30000, "power_w": 250.5, "temp_c": 47}}
    node.state.write_text(json.dumps(state))
    chip = p.parse_info(node.run("info").stdout).chips[5]
    assert (chip.aicore_percent, chip.hbm_mb.used, chip.power_w, chip.temp_c) == (77, 30000, 250.5, 47)


def test_hot_reset_through_the_client_and_the_fakes_fault_switches(fake_node) -> None:  # type: ignore[no-untyped-def]
    node = fake_node("910b4-8")
    client = NpuSmi(node.path, timeout_s=10)
    node.run("fake", "set-health", "-i", "2", "Critical", "--code", "8C03A000")
    assert client.reset_chip(2, 0).message == "Reset chip successfully."
    assert client.health(2, 0).health == NpuHealthState.OK  # the reset cleared the fault
    node.run("fake", "set-health", "-i", "3", "Alarm", "--code", "80E18005", "--survives-reset")
    client.reset_chip(3, 0)
    assert client.health(3, 0).error_codes == ("80E18005",)
    node.run("fake", "set-health", "-i", "4", "Alarm", "--code", "80E18005", "--reset-fails")
    with pytest.raises(NpuSmiCommandFailed, match="Failed to reset chip"):
        client.reset_chip(4, 0)
    state = json.loads(node.run("fake", "show").stdout)["chips"]
    assert (state["2-0"]["resets"], state["3-0"]["resets"], state["4-0"]["resets"]) == (1, 1, 1)
    # without the confirmation, nothing happens
    aborted = node.run("set", "-t", "reset", "-i", "5", "-c", "0")
    assert "User aborts reset chip" in aborted.stdout
    assert "resets" not in json.loads(node.run("fake", "show").stdout)["chips"].get("5-0", {})


def test_fake_hccn_tool_reports_links_by_logic_id(fake_node) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from tests.support.deviceplugin import FAKE_HCCN_TOOL

    node = fake_node("910c-8")  # two dies per NPU: logic id = npu * 2 + die
    node.run("fake", "set-link", "-i", "1", "-c", "1", "DOWN")

    def hccn(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(FAKE_HCCN_TOOL), *args], env=node.env(), capture_output=True,
                              text=True, timeout=30)

    assert p.parse_link_status(hccn("-i", "3", "-link", "-g").stdout) is False
    assert p.parse_link_status(hccn("-i", "2", "-link", "-g").stdout) is True
    assert hccn("-i", "3", "-net_health", "-g").stdout == "net health status: Fault\n"
    bad = hccn("-i", "99", "-link", "-g")
    assert bad.returncode == 1 and "invalid" in bad.stdout
