"""NPU faults handled by a real ``fuyao-device-plugin`` process over the fake npu-smi and hccn_tool and the kubelet
stand-in (which serves pod-resources): codes graded by the fault table, hot reset of a free chip, a held chip left
alone, isolation after failed resets and its release, a ConfigMap-style table override, and link state."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuyao.contracts import RESOURCE_NPU
from tests.support.deviceplugin import PluginUnderTest
from tests.support.polling import wait_for


@pytest.fixture
def make() -> Iterator:  # type: ignore[type-arg]
    made: list[PluginUnderTest] = []

    def start(*extra: str, preset: str = "910b4-8") -> PluginUnderTest:
        p = PluginUnderTest(preset, extra_args=("--link-interval", "0.3s", *extra))
        made.append(p)
        p.start()
        p.wait_ready()
        return p

    yield start
    for p in made:
        p.close()


def health(p: PluginUnderTest) -> dict[str, str]:
    conn = p.kubelet.connections[RESOURCE_NPU]
    return {d.ID: d.health for d in conn.lists[-1]}


def chip(p: PluginUnderTest, npu: int) -> dict:  # type: ignore[type-arg]
    return json.loads(p.fake("fake", "show"))["chips"].get(f"{npu}-0", {})


def hold(p: PluginUnderTest, pod: str, device: str) -> None:
    with p.kubelet._cond:
        p.kubelet.pods[pod] = {RESOURCE_NPU: [device]}


def test_a_chip_is_unhealthy_before_its_reset_starts_and_cannot_be_allocated_during_it(make) -> None:  # type: ignore[no-untyped-def]
    """A hot reset takes up to its timeout: the die's Unhealthy must reach the kubelet before it starts (else the
    die is advertised Healthy for that long and a pod can be given a chip being reset)."""
    import grpc

    p = make("--config", str(_config(reset_settle="1s")))
    p.fake("fake", "inject", "set -t reset*", "hang-after", "--seconds", "4")  # a slow reset
    p.fake("fake", "set-health", "-i", "2", "Critical", "--code", "8C03A000")
    wait_for(lambda: chip(p, 2).get("resets") == 1, 20, "the hot reset of NPU 2 under way")
    # the reset takes 4 s; the Unhealthy went out before it started (it came only after it before)
    wait_for(lambda: health(p)["Ascend910-2"] == "Unhealthy", 2, "NPU 2 Unhealthy while its reset runs")
    assert chip(p, 2).get("resets") == 1
    with pytest.raises(grpc.RpcError):
        p.kubelet.allocate(RESOURCE_NPU, ["Ascend910-2"])


def test_a_reset_level_fault_on_a_free_chip_is_reset_and_the_chip_comes_back(make) -> None:  # type: ignore[no-untyped-def]
    p = make("--config", str(_config(reset_settle="1s")))
    p.fake("fake", "set-health", "-i", "2", "Critical", "--code", "8C03A000")  # ProcMgr heartbeat: RestartNPU
    wait_for(lambda: chip(p, 2).get("resets") == 1, 20, "one hot reset of NPU 2")
    wait_for(lambda: set(health(p).values()) == {"Healthy"}, 20, "every NPU Healthy again")
    metrics = p.metrics()
    assert 'fuyao_npu_resets_total{node="node-a",result="ok"} 1.0' in metrics
    assert 'fuyao_npu_faults_total{level="RestartNPU",node="node-a"} 1.0' in metrics
    assert p.wait_log("recovered from 8C03A000")
    assert chip(p, 2).get("resets") == 1  # once: the chip came back, so no second reset


def test_a_held_chip_is_marked_not_reset_and_reset_once_released(make) -> None:  # type: ignore[no-untyped-def]
    p = make("--config", str(_config(reset_settle="1s")))
    hold(p, "inference-0", "Ascend910-5")
    p.fake("fake", "set-health", "-i", "5", "Alarm", "--code", "8C0E4E00")  # FreeRestartNPU
    wait_for(lambda: health(p)["Ascend910-5"] == "Unhealthy", 20, "NPU 5 Unhealthy")
    entry = p.wait_log("fault 8C0E4E00")
    assert "reset pending: held by pod default/inference-0" in str(entry["msg"])
    assert chip(p, 5).get("resets") is None  # the pod's chip is not reset under it
    assert "inference-0" in p.kubelet.pods  # nor is the pod touched
    with p.kubelet._cond:
        del p.kubelet.pods["inference-0"]  # the pod ends
    wait_for(lambda: chip(p, 5).get("resets") == 1, 20, "NPU 5 reset once free")
    wait_for(lambda: health(p)["Ascend910-5"] == "Healthy", 20, "NPU 5 back")


def test_a_chip_that_resets_cannot_cure_is_isolated_until_released(make) -> None:  # type: ignore[no-untyped-def]
    p = make("--config", str(_config(reset_settle="0.5s", max_attempts=2)))
    p.fake("fake", "set-health", "-i", "1", "Critical", "--code", "80E18005", "--survives-reset")  # RestartNPU
    wait_for(lambda: "fuyao_npu_isolated{device=\"Ascend910-1\",node=\"node-a\"} 1.0" in p.metrics(), 30,
             "NPU 1 isolated")
    assert chip(p, 1)["resets"] == 2  # maxAttempts resets, then isolation: no third
    record = json.loads(p.isolation.read_text())
    assert record["devices"]["Ascend910-1"]["codes"] == ["80E18005"]
    assert "after 2 resets" in record["devices"]["Ascend910-1"]["reason"]
    p.fake("fake", "set-health", "-i", "1", "OK")  # repaired...
    p.kubelet.wait_devices(RESOURCE_NPU, lambda ds: len(ds) == 8)
    assert health(p)["Ascend910-1"] == "Unhealthy"  # ...but isolated: stays out until released
    # a restart keeps the isolation (it is on disk)
    p.terminate()
    registrations = len(p.kubelet.registrations)
    p.start_kubelet = False  # the same kubelet stand-in
    p.start()
    p.kubelet.wait(lambda: len(p.kubelet.registrations) > registrations, 20, "the restarted plugin to register")
    p.wait_log("stays isolated")
    p.kubelet.wait(lambda: p.kubelet.connections[RESOURCE_NPU].lists, 20, "a device list after the restart")
    assert health(p)["Ascend910-1"] == "Unhealthy"  # still isolated after the restart
    out = subprocess.run([sys.executable, "-m", "fuyao.deviceplugin.cli", "--isolation-state", str(p.isolation),
                          "--release-npu", "Ascend910-1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "released Ascend910-1" in out.stdout, out.stderr
    wait_for(lambda: health(p)["Ascend910-1"] == "Healthy", 20, "NPU 1 back after the release ")
    again = subprocess.run([sys.executable, "-m", "fuyao.deviceplugin.cli", "--isolation-state", str(p.isolation),
                            "--release-npu", "Ascend910-1"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "not isolated" in again.stderr


def test_levels_come_from_the_table_and_a_mindcluster_table_overrides_them(make, tmp_path) -> None:  # type: ignore[no-untyped-def]
    table = tmp_path / "faultCode.json"  # MindCluster's format, as a user keeps it in a ConfigMap
    table.write_text(json.dumps({"NotHandleFaultCodes": ["80E01801"], "SeparateNPUCodes": ["0x80c98008"]}))
    p = make("--fault-table", str(table))
    p.fake("fake", "set-health", "-i", "3", "Alarm", "--code", "80E01801")  # built-in: RestartBusiness; here kept
    p.fake("fake", "set-health", "-i", "4", "Alarm", "--code", "80C98008")  # built-in: RestartRequest; here isolate
    wait_for(lambda: health(p)["Ascend910-4"] == "Unhealthy", 20, "NPU 4 isolated")
    assert health(p)["Ascend910-3"] == "Healthy"
    metrics = p.metrics()
    assert 'fuyao_npu_fault{action="keep",device="Ascend910-3",level="NotHandleFault",node="node-a"} 1.0' in metrics
    assert 'fuyao_npu_fault{action="isolate",device="Ascend910-4",level="SeparateNPU",node="node-a"} 1.0' in metrics
    assert chip(p, 4).get("resets") is None


def test_a_bad_fault_table_is_refused_with_its_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    table = tmp_path / "table.yaml"
    table.write_text("version: v1\nlevels:\n  RestartNPU: [81078603]\n")  # unquoted: YAML reads a number
    out = subprocess.run([sys.executable, "-m", "fuyao.deviceplugin.cli", "--fault-table", str(table)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "faultTable" in out.stderr and "quote hex codes" in out.stderr
    table.write_text(json.dumps({"RestartNPUCodes": ["not-hex"]}))
    table.rename(tmp_path / "t.json")
    out = subprocess.run([sys.executable, "-m", "fuyao.deviceplugin.cli", "--fault-table", str(tmp_path / "t.json")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not-hex" in out.stderr and "RestartNPUCodes[0]" in out.stderr


def test_a_link_down_is_published_and_the_chip_stays_healthy(make) -> None:  # type: ignore[no-untyped-def]
    p = make()
    wait_for(lambda: 'npu_link_up{chip="910B4",device="Ascend910-6",node="node-a"} 1.0' in p.metrics(), 20,
             "links read")
    p.fake("fake", "set-link", "-i", "6", "DOWN")
    wait_for(lambda: 'npu_link_up{chip="910B4",device="Ascend910-6",node="node-a"} 0.0' in p.metrics(), 20,
             "NPU 6 link down")
    assert health(p)["Ascend910-6"] == "Healthy"  # single-NPU pods may still use it
    p.wait_log("NPU Ascend910-6 link down")


def _config(*, reset_settle: str, max_attempts: int = 3) -> Path:
    path = Path(tempfile.mkdtemp(prefix="fdpc", dir="/tmp")) / "plugin.yaml"
    path.write_text(f"version: v1\nhealth:\n  reset: {{settle: {reset_settle}, maxAttempts: {max_attempts}}}\n")
    return path


def test_registration_and_allocation_are_metrics(make) -> None:  # type: ignore[no-untyped-def]
    """What the DevicePluginNotRegistered alert and the demo's NPU-allocation chart read."""
    p = make()
    # The gauge is set once the Register call has returned to the plugin, which may be after the kubelet has
    # already opened ListAndWatch (what make() waits for).
    wait_for(lambda: f'fuyao_deviceplugin_registered{{resource="{RESOURCE_NPU}"}} 1.0' in p.metrics(), 20,
             "the registered gauge at 1")
    assert 'npu_allocated{chip="910B4",device="Ascend910-2",node="node-a"} 0.0' in p.metrics()
    hold(p, "default/engine-0", "Ascend910-2")
    wait_for(lambda: 'npu_allocated{chip="910B4",device="Ascend910-2",node="node-a"} 1.0' in p.metrics(), 20,
             "NPU 2 counted as allocated once a container holds it")
    assert 'npu_allocated{chip="910B4",device="Ascend910-3",node="node-a"} 0.0' in p.metrics()


def test_an_isolation_the_record_cannot_keep_still_keeps_the_chip_out() -> None:
    # the isolation record's directory is unusable (here: a file where the directory should be): the plugin starts,
    # and a chip with an isolate-level fault is still advertised Unhealthy (it went back Healthy, through the
    # fallback for a failing fault handler)
    p = PluginUnderTest("910b4-8", extra_args=("--link-interval", "0.3s"))
    blocker = p.root / "not-a-directory"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file")
    p.isolation = blocker / "npu-isolated.json"
    try:
        p.start()
        p.wait_ready()
        p.fake("fake", "set-health", "-i", "2", "Warning", "--code", "80E18402")  # SeparateNPU: isolate at once
        p.wait_log("cannot be written")
        wait_for(lambda: health(p).get("Ascend910-2") == "Unhealthy", 20, "NPU 2 out")
        p.fake("fake", "set-health", "-i", "2", "OK")
        p.kubelet.wait_devices(RESOURCE_NPU, lambda ds: len(ds) == 8)
        time.sleep(2)  # several health polls: the chip stays isolated (in memory) and the plugin keeps running
        assert health(p)["Ascend910-2"] == "Unhealthy" and p.proc.poll() is None  # type: ignore[union-attr]
    finally:
        p.close()
