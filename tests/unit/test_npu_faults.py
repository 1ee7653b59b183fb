"""NPU fault handling as pure logic: the fault table (both file formats), the recovery decisions, and the npu-smi
reset / hccn_tool link formats (samples: tests/samples/F*, built from the npu-smi and hccn_tool sources, see
docs/facts/ascend-faults.md §2-4)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuyao.config_files import ConfigError
from fuyao.contracts import FaultAction
from fuyao.deviceplugin.faults.isolation import IsolatedNpu, IsolationRecord
from fuyao.deviceplugin.faults.recovery import FaultState, Observation, ResetPolicy, Step, assess
from fuyao.deviceplugin.faults.table import ACTIONS, FaultLevel, load_table, parse_table
from fuyao.npusmi import NpuHealthState, NpuSmiParseError, NpuSmiUnsupported
from fuyao.npusmi import parse as p
from tests.conftest import sample

H = NpuHealthState


# -- formats -------------------------------------------------------------------------------------------------------
def test_reset_results_parse_by_their_last_status_and_message() -> None:
    ok = p.parse_reset_result(sample("F1a-set-reset-chip-ok.txt"))
    assert (ok.status, ok.message) == ("OK", "Reset chip successfully.")
    failed = p.parse_reset_result(sample("F1b-set-reset-chip-fail.txt"))
    assert (failed.status, failed.message) == ("Fail", "Failed to reset chip")
    with pytest.raises(NpuSmiUnsupported):
        p.parse_reset_result(sample("F1c-set-reset-unsupported.txt"))
    assert p.parse_reset_result("Segmentation fault\nsomething else\nand more\n").status == "FAILED"


def test_chip_health_with_two_codes() -> None:
    report = p.parse_health(sample("F2a-health-chip-two-codes.txt"))
    assert report.health == H.ALARM and report.error_codes == ("80E01801", "80C98008")
    # one description per code: the second sits on a line of its own with no key (it was dropped)
    assert [i.split(",")[0] for i in report.error_information] == ["node type=HBM", "node type=AICORE"]


def test_link_status() -> None:
    assert p.parse_link_status(sample("F3a-hccn-link-up.txt")) is True
    assert p.parse_link_status(sample("F3b-hccn-link-down.txt")) is False
    for bad in ("", "link status: FLAPPING\n", "net health status: Success\n"):
        with pytest.raises(NpuSmiParseError):
            p.parse_link_status(bad)


# -- the table -----------------------------------------------------------------------------------------------------
def test_the_built_in_table_grades_codes_as_mindcluster_does() -> None:
    t = load_table()
    assert t.level_of_code("80E01801") == FaultLevel.RESTART_BUSINESS
    assert t.level_of_code("0x8c03a000") == FaultLevel.RESTART_NPU  # case and 0x do not matter
    assert t.level_of_code("80E18402") == FaultLevel.SEPARATE_NPU
    assert t.level_of_code("DEADBEEF") == t.unknown_code == FaultLevel.RESTART_BUSINESS
    # several codes: the most severe wins
    assert t.level(["80E21007", "8C03A000", "80C98008"], H.ALARM) == FaultLevel.RESTART_NPU
    # no code: npu-smi's Health decides (Warning is no fault; Alarm/Critical/UNKNOWN are the unknown level)
    assert t.level([], H.OK) is None and t.level([], H.WARNING) is None
    assert t.level([], H.CRITICAL) == t.level([], H.UNKNOWN) == FaultLevel.RESTART_BUSINESS


def test_every_level_has_an_action_and_severity_is_mindclusters_order() -> None:
    assert set(ACTIONS) == set(FaultLevel)
    order = [lv.value for lv in sorted(FaultLevel, key=lambda lv: lv.severity)]
    assert order.index("SeparateNPU") > order.index("PreSeparateNPU") > order.index("RestartNPU") \
        > order.index("FreeRestartNPU") > order.index("RestartBusiness") > order.index("RestartRequest") \
        > order.index("SubHealthFault") > order.index("NotHandleFault")
    assert FaultLevel.FREE_RESTART_NPU.action == FaultAction.RESET
    assert FaultLevel.NOT_HANDLE.action == FaultAction.KEEP


def test_mindcluster_faultcode_json_is_read_as_is_and_duplicates_take_the_worse_level() -> None:
    t = parse_table({"RestartBusinessCodes": ["A2301001"], "SeparateNPUCodes": ["A2301001", "80E18402"],
                     "PreSeparateNPUNetworkCodes": ["81078603"]}, "faultCode.json")
    assert t.level_of_code("A2301001") == FaultLevel.SEPARATE_NPU
    assert t.level_of_code("81078603") == FaultLevel.PRE_SEPARATE_NPU
    with pytest.raises(ConfigError, match="RestartNPUsCodes"):
        parse_table({"RestartNPUsCodes": []}, "faultCode.json")


@pytest.mark.parametrize(("data", "fragment"), [
    ({"version": "v2", "levels": {}}, "unsupported version"),
    ({"levels": {}}, "missing"),
    ({"version": "v1", "levels": {"Restart": ["80E01801"]}}, "levels.Restart"),
    ({"version": "v1", "levels": {"RestartNPU": [81078603]}}, "quote hex codes"),
    ({"version": "v1", "levels": {"RestartNPU": ["80E0180G"]}}, "not a hex fault code"),
    ({"version": "v1", "unknownCode": "Reboot"}, "unknownCode"),
    ({"version": "v1", "level": {}}, "level"),
])
def test_bad_tables_name_what_is_wrong(data: dict, fragment: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=fragment):
        parse_table(data, "t.yaml")


# -- decisions -----------------------------------------------------------------------------------------------------
POLICY = ResetPolicy(max_attempts=3, window_s=1000.0, settle_s=10.0)


def seen(level: FaultLevel | None, now: float = 0.0, holder: str | None = None, processes: int = 0,
         known: bool = True) -> Observation:
    return Observation(level=level, codes=("C0DE",) if level else (), holder=holder, processes=processes,
                       holders_known=known, now=now, wall=1_000_000 + now)


def test_keep_unhealthy_and_isolate_levels() -> None:
    keep, step = assess(None, seen(FaultLevel.SUB_HEALTH), POLICY)
    assert keep.healthy and step == Step.NONE
    sick, step = assess(None, seen(FaultLevel.RESTART_BUSINESS), POLICY)
    assert not sick.healthy and step == Step.NONE and sick.since == 1_000_000
    gone, step = assess(sick, seen(None, 5), POLICY)
    assert gone.healthy and gone.level is None and gone.since is None
    isolated, step = assess(None, seen(FaultLevel.SEPARATE_NPU), POLICY)
    assert step == Step.ISOLATE and isolated.isolated
    still, step = assess(isolated, seen(None, 99), POLICY)  # the code cleared: still isolated
    assert still.isolated and not still.healthy and step == Step.NONE


def test_reset_waits_for_a_free_chip_and_the_kubelets_answer() -> None:
    level = FaultLevel.FREE_RESTART_NPU
    for blocked in (seen(level, holder="default/p"), seen(level, processes=2), seen(level, known=False)):
        state, step = assess(None, blocked, POLICY)
        assert step == Step.NONE and not state.healthy and "pending" in state.note
    state, step = assess(None, seen(level), POLICY)
    assert step == Step.RESET and state.resets == (0.0,)


def test_resets_settle_then_repeat_then_isolate() -> None:
    level = FaultLevel.RESTART_NPU
    state, steps = None, []
    for now in range(0, 60, 2):
        state, step = assess(state, seen(level, float(now)), POLICY)
        steps.append((now, step))
    resets = [now for now, step in steps if step == Step.RESET]
    assert resets == [0, 10, 20]  # spaced by settle
    assert [now for now, step in steps if step == Step.ISOLATE] == [30]
    assert state is not None and state.isolated


def test_resets_outside_the_window_are_forgotten_and_reset_can_be_off() -> None:
    state = FaultState(resets=(0.0, 1.0, 2.0))
    _, step = assess(state, seen(FaultLevel.RESTART_NPU, 1500.0), POLICY)
    assert step == Step.RESET
    off, step = assess(None, seen(FaultLevel.RESTART_NPU), ResetPolicy(enabled=False))
    assert step == Step.NONE and not off.healthy and "turned off" in off.note


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([None, *FaultLevel]), st.booleans(), st.integers(0, 2)), max_size=60))
def test_no_reset_under_a_pod_and_never_more_than_max_attempts_in_a_window(events) -> None:  # type: ignore[no-untyped-def]
    state, resets = None, []
    for i, (level, held, procs) in enumerate(events):
        now = float(i * 7)
        state, step = assess(state, seen(level, now, "default/p" if held else None, procs), POLICY)
        if step == Step.RESET:
            assert not held and procs == 0 and level is not None and level.action == FaultAction.RESET
            resets.append(now)
        if state.isolated:
            assert not state.healthy
    for i, t in enumerate(resets):
        assert len([r for r in resets[i:] if r - t < POLICY.window_s]) <= POLICY.max_attempts


def test_the_isolation_record_survives_and_a_corrupt_one_is_set_aside(tmp_path) -> None:  # type: ignore[no-untyped-def]
    record = IsolationRecord(tmp_path / "iso.json")
    assert record.read() == {} and record.stamp() is None
    record.add("npu-3", IsolatedNpu(codes=("80E18402",), level="SeparateNPU", reason="SeparateNPU",
                                    since="2026-12-05T00:00:00Z"))
    assert IsolationRecord(tmp_path / "iso.json").read()["npu-3"].codes == ("80E18402",)
    assert record.release("npu-3") and not record.release("npu-3")
    (tmp_path / "iso.json").write_text("{not json")
    assert record.read() == {}
    assert list(tmp_path.glob("iso.json.corrupt-*"))
    (tmp_path / "iso.json").write_bytes(b"\xff\xfe not utf-8")  # set aside too (it crashed the plugin's start)
    assert record.read() == {} and not (tmp_path / "iso.json").exists()
    (tmp_path / "iso.json").mkdir()  # not a file: said, never raised
    assert record.read() == {}
