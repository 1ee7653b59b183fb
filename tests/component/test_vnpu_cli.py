"""fuyao-vnpu against the stateful fake npu-smi: plans for every preset, idempotent apply, vNPUs in use, and a
crash between npu-smi creating a vNPU and the ledger recording it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuyao.npu_sim.state import load_preset, preset_names
from tests.conftest import FAKE, REPO


class Node:
    def __init__(self, tmp: Path, preset: str):
        self.tmp = tmp
        self.env = {**os.environ, "FAKE_NPU_SMI_STATE": str(tmp / "npu.json")}
        self.ledger = tmp / "ledger.json"
        self.fake("fake", "init", "--preset", preset)

    def fake(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, str(FAKE), *args], env=self.env, capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def config(self, entries: list[dict]) -> str:  # type: ignore[type-arg]
        path = self.tmp / "vnpu-config.json"
        path.write_text(json.dumps({"devices": entries}))
        return str(path)

    def command(self, verb: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "fuyao.vnpu.cli", verb, "--npu-smi", str(FAKE), "--ledger", str(self.ledger),
                "--log-level", "warning", *args]

    def vnpu(self, verb: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        extra = ("--no-kubelet",) if verb in ("apply", "gc", "list") else ()
        proc = subprocess.run(self.command(verb, *extra, *args), env=self.env, capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        assert proc.returncode == code, proc.stdout + proc.stderr
        return proc

    def vnpus(self) -> list[dict]:  # type: ignore[type-arg]
        return json.loads(self.fake("fake", "show"))["vnpus"]

    def ledger_records(self) -> list[dict]:  # type: ignore[type-arg]
        return json.loads(self.ledger.read_text())["records"] if self.ledger.exists() else []


@pytest.mark.parametrize(("preset", "entries", "code", "expect"), [
    ("910b4-8", [{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "8GB"}], 0, "4 x vir05_1c_8g on Ascend910-0"),
    ("910b4-8", [{"device_id": "0", "vnpu_count": 3, "vnpu_memory": "16GB"}], 2, "need 30 AICore"),
    ("910b4-8", [{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"},
                 {"device_id": "1", "vnpu_count": 2, "template": "vir10_3c_16g_nm"}], 0,
     "2 x vir10_3c_16g_nm on Ascend910-1"),
    ("310p3-4", [{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "6GB"}], 0, "4 x vir02_1c on Ascend310P-0"),
    ("310p3-4", [{"device_id": "0", "vnpu_count": 1, "template": "vir04"},
                 {"device_id": "1", "vnpu_count": 9, "vnpu_memory": "3GB"}], 2, "devices[1]"),
    # a 310P3 has 7 AI CPUs: two 4-AICPU vir04 do not fit, vir04 + vir04_3c would
    ("310p3-4", [{"device_id": "0", "vnpu_count": 2, "template": "vir04"}], 2, "need 8 AICPU, the chip has 7"),
    ("910a1-8", [{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"}], 2, "cannot be split"),
    ("910c-8", [{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "16GB"}], 0, "2 x vir06_1c_16g on Ascend910-0"),
    # a 64 GB 910B shows 60 GB free (the driver keeps 4): its two 32g halves still plan (AICores and AICPUs decide)
    ("910b3-8", [{"device_id": "0", "vnpu_count": 2, "template": "vir10_3c_32g"}], 0,
     "2 x vir10_3c_32g on Ascend910-0"),
    ("910b3-8", [{"device_id": "0", "vnpu_count": 3, "template": "vir10_3c_32g"}], 2, "need 30 AICore"),
])
def test_plan_every_preset(tmp_path: Path, preset: str, entries: list[dict], code: int, expect: str) -> None:  # type: ignore[type-arg]
    node = Node(tmp_path, preset)
    proc = node.vnpu("plan", "--config", node.config(entries), code=code)
    assert expect in proc.stdout + proc.stderr
    assert node.vnpus() == []  # plan never changes anything


def test_apply_is_idempotent_and_follows_plan_changes(tmp_path: Path) -> None:
    node = Node(tmp_path, "910b4-8")
    config = node.config([{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "8GB"},
                          {"device_id": "1", "vnpu_count": 2, "vnpu_memory": "16GB"}])
    first = json.loads(node.vnpu("apply", "--config", config, "--json").stdout)
    assert len(first["created"]) == 6 and not first["errors"]
    second = json.loads(node.vnpu("apply", "--config", config, "--json").stdout)
    assert second["created"] == [] and second["destroyed"] == [] and second["kept"] == 6
    assert len(node.vnpus()) == 6 and len(node.ledger_records()) == 6

    # shrink device 0 to 2; a container holds vNPU 103 (npu-smi shows it bound): it is one of the two kept, and the
    # idle surplus goes at once (keeping the lowest ids would leave the chip over its plan until the pod ends)
    node.fake("fake", "bind-vnpu", "103")
    smaller = node.config([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"},
                           {"device_id": "1", "vnpu_count": 2, "vnpu_memory": "16GB"}])
    third = json.loads(node.vnpu("apply", "--config", smaller, "--json").stdout)
    assert third["destroyed"] == ["Ascend910-0/101:vir05_1c_8g", "Ascend910-0/102:vir05_1c_8g"]
    assert third["in_use_not_destroyed"] == []
    node.fake("fake", "unbind-vnpu", "103")
    fourth = json.loads(node.vnpu("apply", "--config", smaller, "--json").stdout)
    assert fourth["destroyed"] == [] and fourth["kept"] == 4
    assert sorted(v["vnpu_id"] for v in node.vnpus()) == [100, 103, 116, 117]
    # shrink again with 103 idle now: by id, the highest goes
    one = node.config([{"device_id": "0", "vnpu_count": 1, "vnpu_memory": "8GB"},
                       {"device_id": "1", "vnpu_count": 2, "vnpu_memory": "16GB"}])
    assert json.loads(node.vnpu("apply", "--config", one, "--json").stdout)["destroyed"] == [
        "Ascend910-0/103:vir05_1c_8g"]


def test_vnpus_made_by_others_are_left_alone(tmp_path: Path) -> None:
    node = Node(tmp_path, "910b4-8")
    node.fake("set", "-t", "create-vnpu", "-i", "0", "-c", "0", "-f", "vir05_1c_8g", "-v", "100")
    config = node.config([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"}])
    report = json.loads(node.vnpu("apply", "--config", config, "--json").stdout)
    assert report["created"] == ["Ascend910-0/101:vir05_1c_8g", "Ascend910-0/102:vir05_1c_8g"]
    node.vnpu("apply", "--config", node.config([{"device_id": "0", "vnpu_count": 0}]))
    assert [v["vnpu_id"] for v in node.vnpus()] == [100]  # the foreign one survives
    listed = json.loads(node.vnpu("list", "--json").stdout)
    assert listed == [{"device": "Ascend910-0", "vnpu_id": 100, "template": "vir05_1c_8g", "owner": "not fuyao",
                       "state": "-", "in_use": False}]


def test_an_invalid_plan_creates_nothing(tmp_path: Path) -> None:
    node = Node(tmp_path, "910b4-8")
    config = node.config([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"},
                          {"device_id": "1", "vnpu_count": 1, "template": "vir-unknown"}])
    proc = node.vnpu("apply", "--config", config, code=2)
    assert "plan rejected, nothing changed" in proc.stderr and "devices[1]" in proc.stderr
    assert node.vnpus() == [] and node.ledger_records() == []


def test_without_the_kubelets_view_nothing_is_destroyed(tmp_path: Path) -> None:
    node = Node(tmp_path, "910b4-8")
    node.vnpu("apply", "--config", node.config([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"}]))
    proc = subprocess.run(node.command("apply", "--json", "--pod-resources-socket", str(tmp_path / "no.sock"),
                                       "--config", node.config([{"device_id": "0", "vnpu_count": 0}])),
                          env=node.env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "pod-resources" in proc.stderr
    assert json.loads(proc.stdout)["in_use_not_destroyed"] == ["Ascend910-0/100", "Ascend910-0/101"]
    assert len(node.vnpus()) == 2


def test_crash_between_create_and_record_leaves_no_orphan_and_no_duplicate(tmp_path: Path) -> None:
    node = Node(tmp_path, "910b4-8")
    config = node.config([{"device_id": "0", "vnpu_count": 3, "vnpu_memory": "8GB"}])
    # the second create takes effect, then npu-smi hangs: we kill fuyao-vnpu while it waits
    node.fake("fake", "inject", "set -t create-vnpu*-v 101*", "hang-after", "--seconds", "30")
    proc = subprocess.Popen(node.command("apply", "--no-kubelet", "--config", config, "--npu-smi-timeout", "60"),
                            env=node.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while len(node.vnpus()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(node.vnpus()) == 2, "the hanging create never took effect"
    os.killpg(proc.pid, signal.SIGKILL)  # the tool dies; its npu-smi dies with it (parent-death signal)
    proc.wait(10)
    states = {r["vnpu_id"]: r["state"] for r in node.ledger_records()}
    assert states == {100: "created", 101: "pending"}
    node.fake("fake", "clear-faults")

    report = json.loads(node.vnpu("apply", "--config", config, "--json").stdout)
    assert report["adopted"] == ["Ascend910-0/101"]
    assert report["created"] == ["Ascend910-0/102:vir05_1c_8g"]
    on_chip = sorted(v["vnpu_id"] for v in node.vnpus())
    assert on_chip == [100, 101, 102]  # no duplicate
    assert sorted(r["vnpu_id"] for r in node.ledger_records() if r["state"] == "created") == on_chip  # no orphan


def test_crash_before_the_create_took_effect_drops_the_intent(tmp_path: Path) -> None:
    node = Node(tmp_path, "910b4-8")
    config = node.config([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"}])
    node.fake("fake", "inject", "set -t create-vnpu*", "hang", "--seconds", "30")
    proc = subprocess.Popen(node.command("apply", "--no-kubelet", "--config", config, "--npu-smi-timeout", "60"),
                            env=node.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not node.ledger_records() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert [r["state"] for r in node.ledger_records()] == ["pending"] and node.vnpus() == []
    node.fake("fake", "clear-faults")
    # the killed npu-smi call may still finish in the driver: the intent keeps its id until the grace is over
    report = json.loads(node.vnpu("apply", "--config", config, "--json").stdout)
    assert report["adopted"] == [] and report["created"] == ["Ascend910-0/101:vir05_1c_8g",
                                                            "Ascend910-0/102:vir05_1c_8g"]
    assert [(r["vnpu_id"], r["state"]) for r in node.ledger_records()] == [(100, "pending"), (101, "created"),
                                                                           (102, "created")]
    data = json.loads(node.ledger.read_text())
    data["records"][0]["at"] -= 61  # PENDING_GRACE_S later, never having appeared: dropped
    node.ledger.write_text(json.dumps(data))
    report = json.loads(node.vnpu("apply", "--config", config, "--json").stdout)
    assert report["adopted"] == [] and report["created"] == [] and report["kept"] == 2
    assert len(node.vnpus()) == 2 and [r["vnpu_id"] for r in node.ledger_records()] == [101, 102]


def test_apply_leaves_a_die_a_pod_holds_whole_uncarved(tmp_path: Path) -> None:
    """Like the device plugin: a die the plan newly splits while a container holds it as a whole NPU is not carved
    (its vNPUs would go to other pods while that container uses the die); the kubelet's pod-resources API says."""
    from fuyao.contracts import RESOURCE_NPU
    from tests.support.kubelet import KubeletStandIn

    node = Node(tmp_path, "910b4-8")
    socket = tmp_path / "pr.sock"
    kubelet = KubeletStandIn(str(tmp_path / "dp"), str(socket)).start()
    try:
        kubelet.pods["decode-0"] = {RESOURCE_NPU: ["Ascend910-0"]}
        config = node.config([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"},
                              {"device_id": "1", "vnpu_count": 2, "vnpu_memory": "8GB"}])

        def apply() -> dict:  # type: ignore[type-arg]
            proc = subprocess.run(node.command("apply", "--json", "--pod-resources-socket", str(socket),
                                               "--device-plugin-dir", str(tmp_path / "dp"), "--config", config),
                                  env=node.env, capture_output=True, text=True, timeout=120, cwd=REPO)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            return json.loads(proc.stdout)  # type: ignore[no-any-return]

        report = apply()
        assert report["waiting_for_release"] == ["Ascend910-0"] and not report["errors"]
        assert sorted({v["npu"] for v in node.vnpus()}) == [1]
        kubelet.delete_pod("decode-0")
        assert len(apply()["created"]) == 2 and sorted({v["npu"] for v in node.vnpus()}) == [0, 1]
    finally:
        kubelet.stop()
    proc = subprocess.run(node.command("apply", "--json", "--pod-resources-socket", str(socket), "--device-plugin-dir",
                                       str(tmp_path / "dp"), "--config", node.config([])),
                          env=node.env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and "pod-resources" in proc.stderr  # the kubelet is gone: nothing destroyed
    assert json.loads(proc.stdout)["in_use_not_destroyed"] and len(node.vnpus()) == 4


def test_apply_refuses_while_the_device_plugin_serves_static_vnpus(tmp_path: Path) -> None:
    """The plugin applies its own ConfigMap and offers the slices: an apply from here would fight its plan and
    destroy slices the kubelet may be handing out. Refused, naming why; a stale socket (plugin gone) does not count."""
    import socket

    from fuyao.deviceplugin.resource import socket_name_for
    from fuyao.vnpu.cli import STATIC_SLICES_SOCKET

    assert socket_name_for("npu.huawei.com/vNPU") == STATIC_SLICES_SOCKET
    node = Node(tmp_path, "910b4-8")
    plugins = tmp_path / "dp"
    plugins.mkdir()
    config = node.config([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"}])
    command = node.command("apply", "--pod-resources-socket", str(tmp_path / "none.sock"), "--device-plugin-dir",
                           str(plugins), "--config", config)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as plugin:
        plugin.bind(str(plugins / STATIC_SLICES_SOCKET))
        plugin.listen(1)
        proc = subprocess.run(command, env=node.env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "apply refused, nothing changed: the device plugin serves static vNPUs" in proc.stderr
    assert node.vnpus() == [] and node.ledger_records() == []
    # the socket file is left behind, nobody listens: no plugin, apply goes ahead (the die is not carved while the
    # kubelet's view is unknown, as the plugin would not)
    proc = subprocess.run(command, env=node.env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert node.vnpus() == [] and "dies not carved yet stay whole" in proc.stderr
    node.vnpu("apply", "--config", config)  # --no-kubelet: no kubelet, no device plugin
    assert len(node.vnpus()) == 2


def test_gc_destroys_unheld_dynamic_vnpus_only_when_the_kubelets_view_is_known(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from fuyao.inventory import discover
    from fuyao.npusmi import NpuSmi
    from fuyao.vnpu.ledger import Ledger
    from fuyao.vnpu.manager import VnpuManager
    from fuyao.vnpu.templates import builtin_templates

    node = Node(tmp_path, "910b4-8")
    monkeypatch.setenv("FAKE_NPU_SMI_STATE", node.env["FAKE_NPU_SMI_STATE"])
    npu_smi = NpuSmi(str(FAKE))
    manager = VnpuManager(npu_smi, Ledger(node.ledger), discover(npu_smi).devices)
    record = manager.create_dynamic("Ascend910-2", ["Ascend910-2-c0", "Ascend910-2-c1"], builtin_templates("910B4"))
    assert record.template == "vir05_1c_8g" and len(node.vnpus()) == 1

    proc = subprocess.run(node.command("gc", "--json", "--pod-resources-socket", str(tmp_path / "none.sock")),
                          env=node.env, capture_output=True, text=True, timeout=60, cwd=REPO)
    report = json.loads(proc.stdout)
    assert report["destroyed"] == [] and "pod-resources" in report["pod_resources"]
    assert len(node.vnpus()) == 1  # unknown kubelet view: kept

    report = json.loads(node.vnpu("gc", "--json").stdout)  # still younger than the grace period: kept
    assert report["destroyed"] == [] and len(node.vnpus()) == 1
    report = json.loads(node.vnpu("gc", "--json", "--grace", "0").stdout)  # --no-kubelet: nobody bound
    assert report["destroyed"] == ["Ascend910-2/132"]
    assert node.vnpus() == [] and node.ledger_records() == []


def test_plan_counts_vnpus_of_others_against_the_chip(tmp_path: Path) -> None:
    node = Node(tmp_path, "910b4-8")
    node.fake("set", "-t", "create-vnpu", "-i", "0", "-c", "0", "-f", "vir10_3c_16g", "-v", "110")  # not ours
    config = node.config([{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "8GB"}])
    proc = node.vnpu("apply", "--config", config, code=2)
    assert "need 20 AICore, the chip has 10" in proc.stderr
    assert [v["vnpu_id"] for v in node.vnpus()] == [110]  # nothing half-applied
    fits = node.config([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "8GB"}])
    assert len(json.loads(node.vnpu("apply", "--config", fits, "--json").stdout)["created"]) == 2
    # re-applying the same plan counts our own vNPUs as available to it, not as taken
    assert json.loads(node.vnpu("apply", "--config", fits, "--json").stdout)["kept"] == 2


SPLITTABLE = [p for p in preset_names() if load_preset(p).get("templates")]  # every preset whose chips split


@pytest.mark.parametrize("preset", SPLITTABLE)
@pytest.mark.parametrize("parts", [2, 4])
def test_half_and_quarter_chip_splits_of_every_preset_plan_and_apply(tmp_path: Path, preset: str,
                                                                     parts: int) -> None:
    """The split into halves and quarters of each chip model, with the templates its driver lists, whatever the
    chip's free-memory figure says; one part more is refused before anything is created."""
    node = Node(tmp_path, preset)
    state = json.loads(node.fake("fake", "show"))
    template = next(t for t in state["templates"] if t["aicore"] * parts == state["aicore"]
                    and t["aicpu"] * parts <= state["aicpu"])
    # an Atlas 300I Duo card's two chips are split together (or neither): physical ids 0 and 1 share card 0
    chips = ["0", "1"] if "duo" in preset else ["0"]
    split = node.config([{"device_id": c, "vnpu_count": parts, "template": template["name"]} for c in chips])
    report = json.loads(node.vnpu("apply", "--config", split, "--json").stdout)
    assert len(report["created"]) == parts * len(chips) and not report["errors"], report
    assert [v["template"] for v in node.vnpus()] == [template["name"]] * parts * len(chips)
    node.vnpu("apply", "--config", node.config([{"device_id": "0", "vnpu_count": 0}]))
    assert node.vnpus() == []
    too_many = node.config([{"device_id": c, "vnpu_count": parts + 1, "template": template["name"]} for c in chips])
    proc = node.vnpu("apply", "--config", too_many, code=2)
    assert "plan rejected, nothing changed" in proc.stderr and "AICore" in proc.stderr
    assert node.vnpus() == [] and node.ledger_records() == []


def test_a_driver_refusal_rolls_back_the_chips_split_and_names_chip_and_template(tmp_path: Path) -> None:
    node = Node(tmp_path, "910b4-8")
    # the driver refuses the third vNPU of device 0 (as firmware may, for reasons npu-smi does not check)
    node.fake("fake", "inject", "set -t create-vnpu -i 0 -c 0 -f vir05_1c_8g -v 102*", "fail")
    config = node.config([{"device_id": "0", "vnpu_count": 4, "template": "vir05_1c_8g"},
                          {"device_id": "1", "vnpu_count": 2, "template": "vir10_3c_16g"}])
    report = json.loads(node.vnpu("apply", "--config", config, "--json", code=1).stdout)
    assert len(report["errors"]) == 1
    error = report["errors"][0]
    assert error.startswith("Ascend910-0: the driver refused vNPU 3 of 4 x vir05_1c_8g"), error
    assert "rolled back the 2" in error
    assert sorted(report["rolled_back"]) == ["Ascend910-0/100:vir05_1c_8g", "Ascend910-0/101:vir05_1c_8g"]
    assert report["created"] == ["Ascend910-1/116:vir10_3c_16g", "Ascend910-1/117:vir10_3c_16g"]
    assert sorted(v["vnpu_id"] for v in node.vnpus()) == [116, 117]  # device 0 as it was: whole
    assert sorted(r["vnpu_id"] for r in node.ledger_records()) == [116, 117]


def test_a_mixed_split_applies_changes_and_rolls_back_as_one(tmp_path: Path) -> None:
    """A 64 GB 910B as a half and two quarters; then as four quarters (the half goes, two quarters are added);
    a refusal in the middle of a mix leaves the chip as it was."""
    node = Node(tmp_path, "910b3-8")
    mixed = node.config([{"device_id": "0", "mix": {"vir10_3c_32g": 1, "vir05_1c_16g": 2}}])
    report = json.loads(node.vnpu("apply", "--config", mixed, "--json").stdout)
    assert sorted(report["created"]) == ["Ascend910-0/100:vir10_3c_32g", "Ascend910-0/101:vir05_1c_16g",
                                         "Ascend910-0/102:vir05_1c_16g"] and not report["errors"]
    quarters = node.config([{"device_id": "0", "mix": {"vir05_1c_16g": 4}}])
    report = json.loads(node.vnpu("apply", "--config", quarters, "--json").stdout)
    assert report["destroyed"] == ["Ascend910-0/100:vir10_3c_32g"] and report["kept"] == 2
    assert sorted(v["template"] for v in node.vnpus()) == ["vir05_1c_16g"] * 4
    node.vnpu("apply", "--config", node.config([{"device_id": "1", "vnpu_count": 0}]))  # device 0 back to whole
    assert node.vnpus() == []
    node.fake("fake", "inject", "set -t create-vnpu -i 0 -c 0 -f vir05_1c_16g -v 102*", "fail")
    mixed = node.config([{"device_id": "0", "mix": {"vir10_3c_32g": 1, "vir05_1c_16g": 2}}])  # one file: rewrite
    report = json.loads(node.vnpu("apply", "--config", mixed, "--json", code=1).stdout)
    assert "refused vNPU 2 of 2 x vir05_1c_16g" in report["errors"][0] and "rolled back the 2" in report["errors"][0]
    assert node.vnpus() == [] and node.ledger_records() == []


def test_records_of_a_chip_missing_from_the_inventory_are_left_alone_not_a_crash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chip npu-smi no longer lists (or whose id changed) while the ledger holds its vNPUs: apply and gc report it
    and carry on with the other chips; its records stay for when it is back (never forgotten, never a KeyError)."""
    from fuyao.inventory import discover
    from fuyao.npusmi import NpuSmi
    from fuyao.vnpu.cli import _plan
    from fuyao.vnpu.ledger import Ledger
    from fuyao.vnpu.manager import VnpuManager
    from fuyao.vnpu.templates import builtin_templates

    node = Node(tmp_path, "910b4-8")
    monkeypatch.setenv("FAKE_NPU_SMI_STATE", node.env["FAKE_NPU_SMI_STATE"])
    npu_smi = NpuSmi(str(FAKE))
    inventory = discover(npu_smi)
    devices = inventory.devices
    manager = VnpuManager(npu_smi, Ledger(node.ledger), devices, templates=builtin_templates("910B4"))
    plan = _plan(npu_smi, inventory, manager, node.config([{"device_id": "0", "vnpu_count": 2, "vnpu_memory": "16GB"},
                                                           {"device_id": "1", "vnpu_count": 2, "vnpu_memory": "16GB"}]))
    assert not manager.apply(plan, in_use=set()).errors and len(node.ledger_records()) == 4
    shorter = VnpuManager(npu_smi, Ledger(node.ledger), [d for d in devices if d.id != "Ascend910-1"])
    report = shorter.apply(plan, in_use=set())
    assert any("Ascend910-1 is not in this node's inventory" in e for e in report.errors)
    assert len(report.kept) == 2 and not report.forgotten and len(node.ledger_records()) == 4
    assert shorter.probe("Ascend910-1", 100) == "unknown"
    assert shorter.collect_dynamic(held_groups=[]) == ([], [])
