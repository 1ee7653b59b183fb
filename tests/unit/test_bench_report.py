"""The benchmarks' output: quantile curves, the JSON and its charts, and the published results in docs/benchmarks/
(every embedded chart exists and is what the committed JSON draws)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import report

REPO = Path(__file__).resolve().parents[2]
PUBLISHED = REPO / "docs" / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=300))
def test_a_quantile_curve_runs_from_the_minimum_to_the_maximum_in_order(values: list[float]) -> None:
    curve = report.quantiles(values, digits=9)
    assert len(curve) == report.QUANTILE_STEPS + 1
    assert curve[0] == round(min(values), 9) and curve[-1] == round(max(values), 9)
    assert curve == sorted(curve)
    assert curve[report.QUANTILE_STEPS // 2] in {round(v, 9) for v in values}  # a sample, not an interpolation


def test_a_quantile_curve_is_scaled_and_empty_samples_give_none() -> None:
    assert report.quantiles([0.001, 0.002, 0.003], scale=1e3)[:: report.QUANTILE_STEPS] == [1.0, 3.0]
    assert report.quantiles([]) == []
    median = report.quantiles(list(range(101)))[report.QUANTILE_STEPS // 2]
    assert median == statistics.median(range(101))


def test_a_bench_writes_its_json_and_the_charts_drawn_from_it(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from bench import qos_bench

    rows = [qos_bench.measure(tmp_path / f"v{v}", v, driver, pods=4, cycles=5) for v, driver in ((1, "cgroupfs"),
                                                                                               (2, "systemd"))]
    result = {"benchmark": "qos-agent-cycle", "results": rows}
    written = report.emit(result, tmp_path / "out", "qos", qos_bench.charts)
    assert json.loads(capsys.readouterr().out) == result  # stdout still carries the JSON
    assert [p.name for p in written] == ["qos.json", "qos-cycle.png"]
    assert json.loads((tmp_path / "out" / "qos.json").read_text()) == result
    assert (tmp_path / "out" / "qos-cycle.png").read_bytes().startswith(PNG)
    assert all(len(row["cdf_ms"]) == report.QUANTILE_STEPS + 1 for row in rows)
    assert report.emit(result, Path("-"), "qos", qos_bench.charts) == []  # stdout only


def test_redraw_refuses_a_directory_without_benchmark_json(tmp_path: Path) -> None:
    assert report.redraw(tmp_path) == []


def test_every_chart_docs_benchmarks_embeds_is_drawn_from_the_committed_json(tmp_path: Path) -> None:
    text = (REPO / "docs" / "benchmarks.md").read_text()
    embedded = set(re.findall(r"!\[[^\]]*\]\(benchmarks/([^)]+\.png)\)", text))
    assert embedded, "docs/benchmarks.md embeds no chart"
    committed = {p.name for p in PUBLISHED.glob("*.png")}
    assert embedded <= committed, f"embedded but not committed: {sorted(embedded - committed)}"
    for name in list(report.BENCHES):
        if (PUBLISHED / f"{name}.json").exists():
            (tmp_path / f"{name}.json").write_text((PUBLISHED / f"{name}.json").read_text())
    drawn = {p.name for p in report.redraw(tmp_path)}
    assert drawn == committed, f"committed charts no JSON draws: {sorted(committed - drawn)}; " \
                               f"drawn but not committed: {sorted(drawn - committed)}"
    assert all((tmp_path / name).read_bytes().startswith(PNG) for name in drawn)
