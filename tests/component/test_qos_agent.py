"""``fuyao-qos-agent`` as a real process on a temp cgroup tree, without a cluster: ``--once --dry-run`` prints a
report that follows its schema and changes nothing; bad flags and config exit 2 naming the field; no cgroup
hierarchy exits 1; SIGTERM stops the daemon."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from fuyao.qos.agent import Report
from tests.support.cgroups import FakeCgroupTree

UID = "0a1b2c3d-0000-4000-8000-00000000000a"


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fuyao.qos.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin"})


def test_once_dry_run_prints_the_report_and_changes_nothing(tmp_path: Path) -> None:
    tree = FakeCgroupTree(tmp_path, 2, "systemd")
    tree.add_pod(UID, "besteffort", memory=2**30)
    before = tree.weight(UID)
    result = run("--once", "--dry-run", "--cgroup-root", str(tmp_path), "--sample-gap", "0.2")
    assert result.returncode == 0, result.stderr
    report = Report.model_validate_json(result.stdout)
    assert report.dry_run and not report.cluster and "cgroup v2, systemd driver" in report.cgroup
    assert [p.uid for p in report.pods] == [UID] and report.pods[0].memory_bytes == 2**30
    assert report.pods[0].qos == "LS" and any("no cluster configured" in n for n in report.notes)
    assert report.batch["kubernetes.io/batch-cpu"] >= 0 and report.node_usage["memory_capacity_bytes"] > 0
    assert tree.weight(UID) == before  # a dry run writes nothing


def test_invalid_flags_and_config_exit_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "qos.yaml"
    config.write_text("version: v1\nmemoryEviction: {highPercent: 120}\n")
    result = run("--config", str(config))
    assert result.returncode == 2 and "highPercent" in result.stderr
    config.write_text("version: v2\n")
    result = run("--config", str(config))
    assert result.returncode == 2 and "version" in result.stderr
    result = run("--interval", "fast")
    assert result.returncode == 2 and "interval" in result.stderr
    assert "LS/BE colocation" in run("--help").stdout


def test_a_metrics_address_that_is_no_host_port_exits_2_naming_the_field(tmp_path: Path) -> None:
    """Checked with the config, before any watch starts: not a ValueError or OverflowError from the HTTP server."""
    FakeCgroupTree(tmp_path, 2, "cgroupfs").add_pod(UID, "burstable")
    for address in ("localhost", "127.0.0.1:99999"):
        result = run("--cgroup-root", str(tmp_path), "--metrics-address", address, "--interval", "0.2s")
        assert result.returncode == 2 and "metricsAddress" in result.stderr, (address, result.stderr)
        assert "Traceback" not in result.stderr


def test_no_kubepods_hierarchy_exits_1_saying_where_it_looked(tmp_path: Path) -> None:
    result = run("--once", "--cgroup-root", str(tmp_path))
    assert result.returncode == 1 and "no kubepods cgroup under" in result.stderr


def test_sigterm_stops_the_daemon(tmp_path: Path) -> None:
    FakeCgroupTree(tmp_path, 1, "cgroupfs").add_pod(UID, "burstable")
    proc = subprocess.Popen([sys.executable, "-m", "fuyao.qos.cli", "--cgroup-root", str(tmp_path),
                             "--interval", "0.2s", "--metrics-address", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = []  # its log up to the metrics line (a loaded machine takes seconds to import it)
        for line in proc.stderr:  # type: ignore[union-attr]
            started.append(line)
            if "metrics on http://127.0.0.1:" in line:
                break
        assert started and "metrics on" in started[-1], "".join(started)
        time.sleep(0.5)  # the signal handlers come right after
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
