"""npu-smi tables cut off mid-table are a typed error (:class:`NpuSmiTruncated`) naming the last line and what was
expected, never a silently shorter or garbled reading; the health monitor keeps its last good state on one."""

from __future__ import annotations

import pytest

from fuyao.deviceplugin.devices import ChipHealth
from fuyao.deviceplugin.health import HealthMonitor
from fuyao.deviceplugin.metrics import PluginMetrics
from fuyao.inventory import build_inventory
from fuyao.npusmi import NpuSmiParseError, NpuSmiTruncated
from fuyao.npusmi import parse as p
from fuyao.npusmi.models import NpuSmiInfo
from tests.conftest import sample
from tests.support.phy_ids import remaps_in_table_order


def _cut_inside_line(name: str, line_index: int, keep: int) -> str:
    lines = sample(name).splitlines(keepends=True)
    return "".join(lines[:line_index]) + lines[line_index][:keep]


def test_a_template_row_cut_short_is_truncated_not_a_smaller_template() -> None:
    lines = sample("V2-template-info-310p3.txt").splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.startswith("|vir01"))
    text = _cut_inside_line("V2-template-info-310p3.txt", row, 42)  # "|vir01   1   3   1" (was read as vir01)
    with pytest.raises(NpuSmiTruncated) as err:
        p.parse_template_info(text)
    assert err.value.line_no == row + 1 and "expected the row to end with '|'" in str(err.value)


def test_the_last_vnpu_row_cut_short_is_truncated() -> None:
    lines = sample("V5-info-vnpu-two.txt").splitlines()
    row = max(i for i, ln in enumerate(lines) if "vir10_3c_32g" in ln)
    with pytest.raises(NpuSmiTruncated) as err:  # was: vNPU 213 with template "vi"
        p.parse_vnpu_info(_cut_inside_line("V5-info-vnpu-two.txt", row, 70))
    assert err.value.line_no == row + 1


def test_an_info_table_cut_after_half_a_chip_names_the_missing_border() -> None:
    lines = sample("S1-info-910b4-8.txt").splitlines()
    first_row = next(i for i, ln in enumerate(lines) if ln.startswith("| 3 "))
    with pytest.raises(NpuSmiTruncated) as err:  # was: "incomplete chip entry (1 rows, expected pairs)"
        p.parse_info("\n".join(lines[:first_row + 1]) + "\n")
    assert err.value.line_no == first_row + 1 and "expected a '+---+' line" in str(err.value)
    border = first_row - 1
    with pytest.raises(NpuSmiTruncated, match="inside a border line"):  # was: silently 3 chips
        p.parse_info(_cut_inside_line("S1-info-910b4-8.txt", border, 40))


@pytest.mark.parametrize("name,parser", [("S1-info-910b4-8.txt", p.parse_info),
                                         ("R2a-info-910c-a3-16dies.txt", p.parse_info),
                                         ("V2-template-info-310p3.txt", p.parse_template_info),
                                         ("R6a-template-info-910b4-1.txt", p.parse_template_info),
                                         ("V5-info-vnpu-two.txt", p.parse_vnpu_info)])
def test_every_cut_inside_a_table_line_is_an_error(name: str, parser) -> None:  # type: ignore[no-untyped-def]
    text = sample(name)
    full = parser(text)
    starts = {i + 1 for i, ch in enumerate(text) if ch == "\n"}
    for cut in range(1, len(text)):
        if cut in starts or text[cut] == "\n" or not text[text.rfind("\n", 0, cut) + 1:cut].strip():
            continue  # whole lines: a cut at a block's border reads as fewer blocks (discovery checks -t topo)
        try:
            got = parser(text[:cut])
        except NpuSmiParseError:
            continue
        assert got == full, f"cut at {cut} read silently: {text[max(0, cut - 40):cut]!r}"


class _CutOnce:
    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    def info(self) -> NpuSmiInfo:
        return p.parse_info(self.answers.pop(0))

    def close(self) -> int:
        return 0


def test_the_health_monitor_keeps_the_last_good_state_on_a_truncated_table() -> None:
    good = sample("S1-info-910b4-8.txt")
    lines = good.splitlines()
    sick = good.replace("| 2     910B4               | OK  ", "| 2     910B4               | Alarm", 1)
    cut = "\n".join(lines[:10]) + "\n"  # chip 0, then the first row of chip 1
    info = p.parse_info(good)
    chips = ChipHealth(build_inventory(info, remaps=remaps_in_table_order(info)).devices)
    monitor = HealthMonitor(_CutOnce([sick, cut]), chips, PluginMetrics("n"),  # type: ignore[arg-type]
                            interval_s=1.0, failure_threshold=3)
    monitor.poll_once()
    before = chips.statuses()
    assert not before["Ascend910-2"].healthy and before["Ascend910-0"].healthy
    monitor.poll_once()
    assert monitor.failures == 1 and chips.statuses() == before
