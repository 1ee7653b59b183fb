"""vNPU planning without processes: templates, the ConfigMap, fits and rejections, static changes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fuyao.inventory import NpuDevice
from fuyao.npusmi.models import NpuHealthState, VnpuEntry
from fuyao.vnpu.ledger import Ledger, VnpuRecord, dynamic_owner
from fuyao.vnpu.manager import choose_vnpu_id, entry_in_use, static_changes, vnpu_id_range
from fuyao.vnpu.plan import (
    ChipCapacity,
    PlanError,
    VnpuConfig,
    load_vnpu_config,
    make_plan,
    parse_memory_gb,
    parse_vnpu_config,
)
from fuyao.vnpu.templates import Template, builtin_templates, smallest_covering

B4 = builtin_templates("910B4")
B4_CAP = ChipCapacity(aicore=20, memory_gb=32, aicpu=7)
P3_CAP = ChipCapacity(aicore=8, memory_gb=24, aicpu=8)


def devices(model: str, n: int) -> list[NpuDevice]:
    family = "310P" if model.startswith("310P") else "910"
    return [NpuDevice(id=f"Ascend{family}-{i}", npu_id=i, chip_id=0, physical_id=i, chip_model=model,
                      health=NpuHealthState.OK, aicore=20, memory_mb=32768) for i in range(n)]


def plan_for(entries: list[dict], model: str = "910B4", cap: ChipCapacity = B4_CAP):  # type: ignore[no-untyped-def]
    devs = devices(model, 4)
    templates = B4 if model == "910B4" else builtin_templates(model)
    return make_plan(parse_vnpu_config({"devices": entries}), devs, templates, {d.id: cap for d in devs})


@pytest.mark.parametrize(("raw", "gb"), [("16GB", 16), ("16G", 16), ("16Gi", 16), ("8192MB", 8), (" 3 GB ", 3),
                                         (12, 12), ("1.5GB", 1.5)])
def test_memory_sizes(raw: str | int, gb: float) -> None:
    assert parse_memory_gb(raw) == gb


@pytest.mark.parametrize("raw", ["16TB", "lots", "-1GB", "0"])
def test_bad_memory_sizes(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_memory_gb(raw)


def test_builtin_catalog_matches_the_documented_sizes() -> None:
    # a 910B4's template-info (docs/vnpu.md, "Templates"): the media (_m) and media-less (_nm) halves too
    assert [(t.name, t.aicore, t.memory_gb, t.aicpu) for t in builtin_templates("Ascend910B4")] == [
        ("vir05_1c_8g", 5, 8, 1), ("vir10_3c_16g", 10, 16, 3), ("vir10_3c_16g_nm", 10, 16, 3),
        ("vir10_4c_16g_m", 10, 16, 4)]
    # 910B1 and 910B2C take the 24-core A2 templates of the 910B2 (MindCluster's chip → template map)
    assert builtin_templates("910B1") == builtin_templates("910B2C") == builtin_templates("910B2") != ()
    # the first-generation 910 (A1): no source gives its templates' memory and AICPUs
    assert builtin_templates("910ProB") == builtin_templates("910A") == builtin_templates("910") == ()
    assert len(builtin_templates("310P3")) == 7
    assert [t.name for t in smallest_covering(builtin_templates("310P3"), aicore=2)][:2] == ["vir02_1c", "vir02"]


@pytest.mark.parametrize(("entries", "expected"), [
    ([{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "8GB"}], [("Ascend910-0", "vir05_1c_8g", 4)]),
    ([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "16GB"}], [("Ascend910-0", "vir10_3c_16g", 2)]),
    # 6 GB → the smallest template with at least 6 GB
    ([{"device_id": "Ascend910-2", "vnpu_count": 3, "vnpu_memory": "6GB"}], [("Ascend910-2", "vir05_1c_8g", 3)]),
    # mixed templates on different chips, and a chip left whole
    ([{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "8GB"},
      {"device_id": "1", "vnpu_count": 1, "template": "vir10_4c_16g_m"},
      {"device_id": "2", "vnpu_count": 0}],
     [("Ascend910-0", "vir05_1c_8g", 4), ("Ascend910-1", "vir10_4c_16g_m", 1), ("Ascend910-2", None, 0)]),
])
def test_910b4_plans_that_fit(entries: list[dict], expected: list[tuple]) -> None:  # type: ignore[type-arg]
    plan = plan_for(entries)
    assert [(d.device_id, d.parts[0][0].name if d.parts else None, d.count) for d in plan.devices] == expected
    assert plan.carved == {d for d, t, n in expected if n}


@pytest.mark.parametrize(("entries", "message"), [
    ([{"device_id": "0", "vnpu_count": 3, "vnpu_memory": "16GB"}], "need 30 AICore, the chip has 20"),
    ([{"device_id": "0", "vnpu_count": 5, "vnpu_memory": "8GB"}], "need 25 AICore"),
    ([{"device_id": "1", "vnpu_count": 2, "template": "vir10_4c_16g_m"}], "need 8 AICPU, the chip has 7"),
    ([{"device_id": "0", "vnpu_count": 1, "vnpu_memory": "64GB"}], "no template has 64GB"),
    ([{"device_id": "0", "vnpu_count": 1, "template": "vir99"}], "unknown template 'vir99'"),
    ([{"device_id": "0", "vnpu_count": 1, "template": "vir05_1c_8g", "vnpu_memory": "16GB"}], "less than"),
    ([{"device_id": "9", "vnpu_count": 1, "vnpu_memory": "8GB"}], "no such device"),
    ([{"device_id": "0", "vnpu_count": 1}], "give vnpu_memory"),
    ([{"device_id": "0", "vnpu_count": 1, "vnpu_memory": "8GB"},
      {"device_id": "Ascend910-0", "vnpu_count": 1, "vnpu_memory": "8GB"}], "listed twice"),
])
def test_910b4_plans_rejected_naming_the_entry(entries: list[dict], message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(PlanError) as err:
        plan_for(entries)
    assert message in str(err.value)
    assert str(err.value).startswith(f"devices[{len(entries) - 1}]")


def test_a_later_bad_entry_rejects_the_whole_plan() -> None:
    with pytest.raises(PlanError) as err:
        plan_for([{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "8GB"},
                  {"device_id": "1", "vnpu_count": 9, "vnpu_memory": "8GB"}])
    assert err.value.entry == 1 and err.value.device_id == "1"


def test_310p3_plans() -> None:
    plan = plan_for([{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "6GB"},
                     {"device_id": "1", "vnpu_count": 7, "vnpu_memory": "3GB"}], "310P3", P3_CAP)
    assert [(d.parts[0][0].name, d.count) for d in plan.devices if d.parts] == [("vir02_1c", 4), ("vir01", 7)]
    with pytest.raises(PlanError, match=r"at most 7 \(rule 310p/vnpus\)"):
        plan_for([{"device_id": "0", "vnpu_count": 8, "vnpu_memory": "3GB"}], "310P3", P3_CAP)
    with pytest.raises(PlanError, match=r"need 12 AICore, the chip has 8"):
        plan_for([{"device_id": "0", "vnpu_count": 3, "vnpu_memory": "12GB"}], "310P3", P3_CAP)


def test_both_chips_of_a_duo_card_are_split_or_both_whole() -> None:
    # an Atlas 300I Duo: two 310P3 chips per card id, physical ids 0..3 on cards 0 and 1
    duo = [NpuDevice(id=f"Ascend310P-{p}", npu_id=p // 2, chip_id=p % 2, physical_id=p, chip_model="310P3",
                     health=NpuHealthState.OK) for p in range(4)]
    templates = builtin_templates("310P3")

    def plan(entries: list[dict]):  # type: ignore[no-untyped-def,type-arg]
        return make_plan(parse_vnpu_config({"devices": entries}), duo, templates, {d.id: P3_CAP for d in duo})

    with pytest.raises(PlanError, match=r"devices\[0\].*Ascend310P-2 is split but Ascend310P-3 .*card 1"):
        plan([{"device_id": "2", "vnpu_count": 2, "template": "vir04"}])
    with pytest.raises(PlanError, match="Duo"):  # listed, but kept whole
        plan([{"device_id": "0", "vnpu_count": 2, "template": "vir04"}, {"device_id": "1"}])
    both = plan([{"device_id": "0", "vnpu_count": 2, "template": "vir04"},
                 {"device_id": "Ascend310P-1", "vnpu_count": 4, "template": "vir02_1c"}])
    assert both.carved == {"Ascend310P-0", "Ascend310P-1"}
    # single-chip 310P cards (one chip per card id) are free to differ, as before
    assert plan_for([{"device_id": "0", "vnpu_count": 2, "template": "vir04"}], "310P3", P3_CAP).carved == {
        "Ascend310P-0"}


def test_chips_without_templates_cannot_be_carved() -> None:
    devs = devices("910ProB", 2)
    with pytest.raises(PlanError, match="cannot be split into vNPUs"):
        make_plan(parse_vnpu_config({"devices": [{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"}]}),
                  devs, (), {d.id: B4_CAP for d in devs})


@pytest.mark.parametrize(("data", "field"), [
    ({"devices": [{"device_id": "0", "vnpu_count": -1}]}, "devices.0.vnpu_count"),
    ({"devices": [{"device_id": "0", "vnpu_count": 17}]}, "devices.0.vnpu_count"),
    ({"devices": [{"device_id": "0", "vnpu_count": 1, "vnpu_memory": "big"}]}, "devices.0.vnpu_memory"),
    ({"devices": [{"device_id": "0", "vnpu_count": 1, "vnpu_mem": "8GB"}]}, "devices.0.vnpu_mem"),
    ({"device": []}, "device"),
])
def test_config_errors_name_the_field(data: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(PlanError) as err:
        parse_vnpu_config(data)
    assert repr(field) in str(err.value)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="cannot read"):
        load_vnpu_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{devices: []")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_vnpu_config(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"devices": [{"device_id": 0, "vnpu_count": 2, "vnpu_memory": "16GB"}]}))
    assert load_vnpu_config(good) == VnpuConfig.model_validate(
        {"devices": [{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "16GB"}]})


@pytest.mark.parametrize(("entry", "says"), [
    ({"device_id": "0", "vnpu_count": 2, "vnpu_memory": True}, "vnpu_memory"),
    ({"device_id": "0", "template": "vir10_3c_32g"}, "without vnpu_count"),
    ({"device_id": "0", "vnpu_memory": "16GB"}, "without vnpu_count"),
    ({"device_id": "0", "vnpu_count": True, "vnpu_memory": "16GB"}, "vnpu_count"),
    ({"device_id": "0", "mix": {"vir05_1c_16g": True}}, "mix"),
])
def test_garbage_vnpu_entries_are_refused_naming_the_field(tmp_path: Path, entry: dict, says: str) -> None:  # type: ignore[type-arg]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"devices": [entry]}))
    with pytest.raises(PlanError, match=says):
        load_vnpu_config(path)


def test_a_numeric_vnpu_memory_is_kept_as_a_size_that_parses_again() -> None:
    entry = VnpuConfig.model_validate({"devices": [{"device_id": "0", "vnpu_count": 2, "vnpu_memory": 1e-05}]})
    assert entry.devices[0].memory_gb == pytest.approx(1e-05)
    assert VnpuConfig.model_validate({"devices": [{"device_id": "0", "vnpu_count": 2, "vnpu_memory": 16}]}
                                     ).devices[0].memory_gb == 16


# --- static changes ---------------------------------------------------------------------------------------------
def rec(vnpu_id: int, template: str = "vir05_1c_8g", device: str = "Ascend910-0", owner: str = "static",
        state: str = "created") -> VnpuRecord:
    return VnpuRecord(vnpu_id=vnpu_id, device_id=device, npu_id=0, chip_id=0, template=template, owner=owner,
                      state=state, at=0.0)  # type: ignore[arg-type]


def test_static_changes_keep_create_destroy_forget() -> None:
    plan = plan_for([{"device_id": "0", "vnpu_count": 3, "vnpu_memory": "8GB"}])
    records = [rec(100), rec(101), rec(102, "vir10_3c_16g"), rec(103), rec(104, owner=dynamic_owner(["x-c0"]))]
    existing = {"Ascend910-0": {100, 102, 104, 105}}  # 101 and 103 vanished; 105 is not ours
    changes = static_changes(plan, records, existing)
    assert [r.vnpu_id for r in changes.keep] == [100]
    assert [r.vnpu_id for r in changes.destroy] == [102]
    assert sorted(r.vnpu_id for r in changes.forget) == [101, 103]
    assert [(d, t.name, n) for d, t, n in changes.create] == [("Ascend910-0", "vir05_1c_8g", 2)]


def test_static_changes_after_the_plan_drops_a_device() -> None:
    plan = plan_for([{"device_id": "1", "vnpu_count": 0}])
    changes = static_changes(plan, [rec(100), rec(101)], {"Ascend910-0": {100, 101}})
    assert [r.vnpu_id for r in changes.destroy] == [100, 101] and not changes.create


def test_a_shrinking_plan_keeps_the_vnpus_in_use_and_forgets_ids_another_template_took() -> None:
    """From two vir10 to one: the idle one goes, not the one a container holds (by id it would be the last). A
    record whose id npu-smi now shows with another template is someone else's vNPU: ours vanished."""
    plan = plan_for([{"device_id": "0", "vnpu_count": 1, "template": "vir10_3c_16g"}])
    records = [rec(100, "vir10_3c_16g"), rec(101, "vir10_3c_16g")]
    seen = {"Ascend910-0": {100: "vir10_3c_16g", 101: "vir10_3c_16g"}}
    changes = static_changes(plan, records, seen, in_use={("Ascend910-0", 101)})
    assert [r.vnpu_id for r in changes.keep] == [101] and [r.vnpu_id for r in changes.destroy] == [100]
    assert [r.vnpu_id for r in static_changes(plan, records, seen).destroy] == [101]  # nothing in use: by id
    other = static_changes(plan, records, {"Ascend910-0": {100: "vir10_3c_16g", 101: "vir05_1c_8g"}})
    assert [r.vnpu_id for r in other.forget] == [101] and not other.destroy


def test_vnpu_ids_and_binding() -> None:
    assert list(vnpu_id_range(1))[:2] == [116, 117] and len(vnpu_id_range(1)) == 16
    assert choose_vnpu_id(0, {100, 101, 103}) == 102
    assert choose_vnpu_id(0, set(range(100, 116))) is None
    # Atlas inference series (310P): phy_id*16+100 .. +107 only; the training, A2 and A3 parts: .. +115
    assert vnpu_id_range(1, "310P3") == range(116, 124) and vnpu_id_range(1, "910B4") == range(116, 132)
    assert choose_vnpu_id(0, set(range(100, 108)), "Ascend310P3") is None
    assert choose_vnpu_id(0, set(range(100, 108)), "910B3") == 108
    assert not entry_in_use(VnpuEntry(vnpu_id=100, vgroup_id=0, container_id="000000000000", status="0",
                                      template="t"))
    assert entry_in_use(VnpuEntry(vnpu_id=100, vgroup_id=0, container_id="3f2a9c1d0b7e", status="1", template="t"))


def test_ledger_round_trip_and_corruption(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.json")
    ledger.put(rec(100, state="pending"))
    ledger.put(rec(100))
    ledger.put(rec(101))
    assert [(r.vnpu_id, r.state) for r in ledger.records()] == [(100, "created"), (101, "created")]
    ledger.remove(rec(100))
    assert [r.vnpu_id for r in Ledger(tmp_path / "l.json").records()] == [101]
    (tmp_path / "l.json").write_text("{garbage")
    assert [r.vnpu_id for r in ledger.records()] == [101]  # restored from the last good copy
    assert list(tmp_path.glob("l.json.corrupt-*")), "the unreadable ledger is kept aside"
    (tmp_path / "l.json").write_text("{garbage")
    (tmp_path / "l.json.bak").write_text("also garbage")
    assert ledger.records() == []  # nothing trustworthy: empty (and everything on the chip counts as foreign)


def test_ledger_refuses_a_second_owner_and_removes_only_the_exact_record(tmp_path: Path) -> None:
    from fuyao.vnpu.ledger import LedgerConflict

    ledger = Ledger(tmp_path / "l.json")
    ledger.put(rec(100))
    with pytest.raises(LedgerConflict, match="already belongs to static"):
        ledger.put(rec(100, owner=dynamic_owner(["Ascend910-0-c0"])))
    assert not ledger.remove(rec(100, state="pending"))  # not the record that is there
    assert ledger.remove(rec(100)) and ledger.records() == []
    ledger.put(rec(101, state="pending"))
    ledger.replace(rec(101, state="pending"), rec(101))
    assert [(r.vnpu_id, r.state) for r in ledger.records()] == [(101, "created")]


@pytest.mark.parametrize(("mix", "problem"), [
    ({"vir10_3c_16g": 1, "vir05_1c_8g": 2}, None),  # a half and two quarters: 20 cores, 5 AICPUs
    ({"vir10_3c_16g": 2}, None),
    ({"vir10_4c_16g_m": 1, "vir10_3c_16g_nm": 1}, None),  # 7 AICPUs exactly
    ({"vir10_4c_16g_m": 1, "vir10_3c_16g": 1}, "vir10_4c_16g_m takes every media unit of the chip"),  # 13 VPC > 9
    ({"vir10_4c_16g_m": 2}, "2 x vir10_4c_16g_m need 8 AICPU, the chip has 7"),
    ({"vir10_3c_16g": 1, "vir05_1c_8g": 3}, "1 x vir10_3c_16g + 3 x vir05_1c_8g need 25 AICore, the chip has 20"),
    ({"vir-unknown": 1}, "unknown template 'vir-unknown'"),
])
def test_a_mixed_split_is_checked_as_a_whole(mix: dict[str, int], problem: str | None) -> None:
    if problem is None:
        plan = plan_for([{"device_id": "0", "mix": mix}])
        assert {t.name: n for t, n in plan.devices[0].parts} == mix
        assert plan.devices[0].count == sum(mix.values())
    else:
        with pytest.raises(PlanError, match=re.escape(problem)):
            plan_for([{"device_id": "0", "mix": mix}])


@pytest.mark.parametrize(("entry", "problem"), [
    ({"device_id": "0", "mix": {"vir05_1c_8g": 2}, "template": "vir05_1c_8g"}, "leave template and vnpu_memory out"),
    ({"device_id": "0", "mix": {"vir05_1c_8g": 2}, "vnpu_count": 3}, "mix makes 2 vNPUs"),
    ({"device_id": "0", "mix": {"vir05_1c_8g": 0}}, "a count of at least 1"),
])
def test_a_mix_that_contradicts_itself_is_refused_naming_it(entry: dict, problem: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(PlanError, match=re.escape(problem)):
        parse_vnpu_config({"devices": [entry]})


def test_310p_vgroup_rules() -> None:
    """docs/facts/vnpu-template-rules.md: 7 vNPUs and 4 vGroups per 310P chip, vir01 pairs share a 2-core vGroup,
    vir04_4c_dvpp only beside vir04_3c_ndvpp. The documented valid combinations fit, the invalid ones do not."""
    from fuyao.vnpu.plan import fits_all

    t = {x.name: x for x in builtin_templates("310P3")}
    cap = ChipCapacity(aicore=8, memory_gb=24, aicpu=7)

    def check(**mix: int) -> str | None:
        return fits_all(tuple((t[name], n) for name, n in mix.items()), cap)

    for valid in ({"vir04": 1, "vir04_3c": 1}, {"vir04": 1, "vir02": 1, "vir02_1c": 1},
                  {"vir02": 3, "vir02_1c": 1}, {"vir01": 6, "vir02_1c": 1}, {"vir04_4c_dvpp": 1, "vir04_3c_ndvpp": 1}):
        assert check(**valid) is None, valid
    assert "AICPU" in (check(vir02=4) or "")
    assert "rule 310p/vnpus" in (fits_all(((t["vir01"], 8),), ChipCapacity(aicore=8, memory_gb=24, aicpu=8)) or "")
    assert check(vir01=1, vir04=1, vir02_1c=1) is None  # a lone vir01's vGroup: 2 + 4 + 2 = 8 AICores
    # a lone vir01 costs its whole 2-core vGroup: on a chip with 7 AICores, 1 + 3 x 2 = 7 does not fit
    seven = ChipCapacity(aicore=7, memory_gb=24, aicpu=7)
    assert "rule 310p/vgroups" in (fits_all(((t["vir01"], 1), (t["vir02"], 3)), seven) or "")
    assert fits_all(((t["vir01"], 2), (t["vir02"], 2), (t["vir02_1c"], 1)), ChipCapacity(aicore=8, memory_gb=24,
                                                                                         aicpu=7)) is None
    assert "rule dvpp" in (check(vir04_4c_dvpp=1, vir02_1c=1) or "")
    # the 910 A1's vir02 / vir04 share names with 310P templates, not their rules: decided by the chip
    a1 = {x.name: x for x in (Template(name="vir04", aicore=4, memory_gb=8.0, aicpu=0),
                              Template(name="vir02", aicore=2, memory_gb=4.0, aicpu=0))}
    module = ChipCapacity(aicore=32, memory_gb=32, chip_model="910ProB")
    assert fits_all(((a1["vir04"], 8),), module) is None and fits_all(((a1["vir02"], 16),), module) is None
    assert "rule 310p/vnpus" in (fits_all(((t["vir01"], 8),), ChipCapacity(aicore=8, memory_gb=24, aicpu=8,
                                                                           chip_model="310P3")) or "")


def test_a_create_that_timed_out_stays_pending_until_the_driver_can_no_longer_act(tmp_path: Path) -> None:
    """npu-smi killed on a timeout may still finish creating the vNPU in the driver. Absent right after the timeout
    proves nothing: the record stays pending (its id reserved); recover() adopts the vNPU if it appears, and drops
    the record only after PENDING_GRACE_S. Dropping it at once leaked the vNPU, unrecorded."""
    from types import SimpleNamespace

    from fuyao.npusmi import NpuSmiTimeout
    from fuyao.vnpu import manager as m

    class SlowDriver:
        def __init__(self) -> None:
            self.vnpus: list[VnpuEntry] = []

        def vnpu_info(self, npu_id: int, chip_id: int) -> SimpleNamespace:
            return SimpleNamespace(vnpus=list(self.vnpus), resources={})

        def create_vnpu(self, npu_id: int, chip_id: int, template: str, vnpu_id: int) -> None:
            raise NpuSmiTimeout(5.0, ("npu-smi", "set", "-t", "create-vnpu"))

    driver = SlowDriver()
    ledger = Ledger(tmp_path / "ledger.json")
    manager = m.VnpuManager(driver, ledger, devices("910B4", 1))  # type: ignore[arg-type]
    template = next(t for t in B4 if t.name == "vir05_1c_8g")
    with pytest.raises(m.VnpuError, match="unknown outcome"):
        manager.create("Ascend910-0", template, dynamic_owner(["Ascend910-0-c0"]))
    assert [(r.vnpu_id, r.state) for r in ledger.records()] == [(100, "pending")]
    assert manager.recover() == [] and len(ledger.records()) == 1  # absent, but within the grace: kept
    driver.vnpus = [VnpuEntry(vnpu_id=100, vgroup_id=0, container_id=None, status=None, template="vir05_1c_8g")]
    assert [r.vnpu_id for r in manager.recover()] == [100]  # the driver finished it: adopted, never leaked
    assert [r.state for r in ledger.records()] == ["created"]
    with pytest.raises(m.VnpuError):
        manager.create("Ascend910-0", template, dynamic_owner(["Ascend910-0-c1"]))
    late = [r for r in ledger.records() if r.state == "pending"]
    assert [r.vnpu_id for r in late] == [101]
    with ledger.transaction():
        ledger.replace(late[0], late[0].model_copy(update={"at": late[0].at - m.PENDING_GRACE_S - 1}))
    manager.recover()
    assert [r.vnpu_id for r in ledger.records()] == [100]  # never appeared within the grace: dropped


def test_dynamic_creation_keeps_a_310p_chips_rules_and_tries_the_next_template(tmp_path: Path) -> None:
    """A dynamic vNPU on a 310P joins the vNPUs already there under the chip's rules (vir04_4c_dvpp takes every media
    unit: only vir04_3c_ndvpp may sit beside it); a template the rules refuse is skipped for the next one."""
    from types import SimpleNamespace

    from fuyao.vnpu import manager as m

    class Chip:
        def __init__(self) -> None:
            self.created: list[str] = []

        def vnpu_info(self, npu_id: int, chip_id: int) -> SimpleNamespace:
            entries = [VnpuEntry(vnpu_id=100, vgroup_id=0, container_id=None, status=None, template="vir04_4c_dvpp")]
            entries += [VnpuEntry(vnpu_id=101 + i, vgroup_id=1, container_id=None, status=None, template=t)
                        for i, t in enumerate(self.created)]
            used = 4 + sum(3 if t.startswith("vir04") else 2 for t in self.created)
            return SimpleNamespace(vnpus=entries, resources={"AICORE": SimpleNamespace(free=8 - used, total=8),
                                                             "AICPU": SimpleNamespace(free=7 - used, total=7)})

        def create_vnpu(self, npu_id: int, chip_id: int, template: str, vnpu_id: int) -> None:
            self.created.append(template)

    chip = Chip()
    templates = builtin_templates("310P3")
    manager = m.VnpuManager(chip, Ledger(tmp_path / "l.json"), devices("310P3", 1))  # type: ignore[arg-type]
    # two cores: vir02 / vir02_1c / vir04_3c would break the DVPP rule; the smallest allowed one is vir04_3c_ndvpp
    record = manager.create_dynamic("Ascend310P-0", ["Ascend310P-0-c4", "Ascend310P-0-c5"], templates)
    assert record.template == "vir04_3c_ndvpp" and chip.created == ["vir04_3c_ndvpp"]  # none refused was tried
    ndvpp = next(t for t in templates if t.name == "vir04_3c_ndvpp")  # a 5th vGroup, 12 cores: not on a 310P
    other = m.VnpuManager(chip, Ledger(tmp_path / "l2.json"), devices("910B4", 1))  # type: ignore[arg-type]
    assert other._chip_rules("Ascend910-0", chip.vnpu_info(0, 0), ndvpp, templates) is None  # 910: no vGroup rules
    assert "rule dvpp" in (other._chip_rules("Ascend910-0", chip.vnpu_info(0, 0), templates[0], templates) or "")

