"""The device plugin with vNPUs, as a process: static slices from the ConfigMap file and dynamic per-container
vNPUs, accounted through the kubelet stand-in (which also serves the pod-resources API)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU
from tests.support.deviceplugin import PluginUnderTest
from tests.support.kubelet import AdmissionFailed


@pytest.fixture
def made() -> Iterator[list[PluginUnderTest]]:
    plugins: list[PluginUnderTest] = []
    yield plugins
    for p in plugins:
        p.close()


def start(made: list[PluginUnderTest], mode: str, entries: list[dict] | None = None,  # type: ignore[type-arg]
          preset: str = "910b4-8", grace: str = "0.5s") -> PluginUnderTest:
    p = PluginUnderTest(preset)
    made.append(p)
    config = p.root / "plugin.yaml"
    config.write_text(f"version: v1\nvnpu: {{mode: {mode}, reconcileInterval: 0.3s, collectGrace: {grace}}}\n")
    args = ["--config", str(config)]
    if entries is not None:
        (p.root / "vnpu-config.json").write_text(json.dumps({"devices": entries}))
        args += ["--vnpu-config", str(p.root / "vnpu-config.json")]
    p.extra_args = tuple(args)
    p.start()
    return p


def chip_vnpus(p: PluginUnderTest) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(p.fake("fake", "show"))["vnpus"]


def ledger(p: PluginUnderTest) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(p.ledger.read_text())["records"] if p.ledger.exists() else []


def ids(devices) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(d.ID for d in devices)


def test_static_slices_replace_the_whole_die(made) -> None:  # type: ignore[no-untyped-def]
    p = start(made, "static", [{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "8GB"},
                               {"device_id": "5", "vnpu_count": 2, "template": "vir10_3c_16g"}])
    k = p.kubelet
    k.wait_registered(RESOURCE_NPU, timeout=30)
    k.wait_registered(RESOURCE_VNPU, timeout=30)
    npus = k.wait_devices(RESOURCE_NPU)
    slices = k.wait_devices(RESOURCE_VNPU, lambda ds: len(ds) == 6)
    assert ids(npus) == [f"Ascend910-{i}" for i in (1, 2, 3, 4, 6, 7)]
    assert ids(slices) == ["Ascend910-0-v100", "Ascend910-0-v101", "Ascend910-0-v102", "Ascend910-0-v103",
                           "Ascend910-5-v180", "Ascend910-5-v181"]
    parents = {d.rsplit("-v", 1)[0] for d in ids(slices)}
    assert not parents & set(ids(npus))  # no die is counted under two resources
    assert len(chip_vnpus(p)) == 6

    response = k.admit("pod-a", RESOURCE_VNPU, 1)
    assert response.envs["ASCEND_RUNTIME_OPTIONS"] == "VIRTUAL"
    assert response.envs["ASCEND_VNPU_SPECS"] in ("vir05_1c_8g", "vir10_3c_16g")
    assert response.envs["ASCEND_VISIBLE_DEVICES"] in {d.rsplit("-v", 1)[1] for d in ids(slices)}


def test_static_plan_change_waits_for_a_held_slice(made) -> None:  # type: ignore[no-untyped-def]
    p = start(made, "static", [{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "8GB"}])
    k = p.kubelet
    k.wait_registered(RESOURCE_VNPU, timeout=30)
    k.wait_devices(RESOURCE_VNPU, lambda ds: len(ds) == 4)
    held = k.admit("pod-a", RESOURCE_VNPU, 1).envs["ASCEND_VISIBLE_DEVICES"]
    time.sleep(0.05)
    (p.root / "vnpu-config.json").write_text(json.dumps({"devices": [{"device_id": "0", "vnpu_count": 0}]}))
    devices = k.wait_devices(RESOURCE_VNPU, lambda ds: len(ds) == 1, timeout=20)
    assert ids(devices) == [f"Ascend910-0-v{held}"]  # the held one stays until its pod is gone
    assert "Ascend910-0" not in ids(k.wait_devices(RESOURCE_NPU))
    k.delete_pod("pod-a")
    k.wait_devices(RESOURCE_VNPU, lambda ds: len(ds) == 0, timeout=20)
    k.wait_devices(RESOURCE_NPU, lambda ds: "Ascend910-0" in ids(ds), timeout=20)  # whole again
    assert chip_vnpus(p) == [] and ledger(p) == []


def test_an_impossible_plan_changes_nothing_and_the_plugin_keeps_serving(made) -> None:  # type: ignore[no-untyped-def]
    p = start(made, "static", [{"device_id": "0", "vnpu_count": 9, "vnpu_memory": "8GB"}])
    k = p.kubelet
    assert len(k.wait_devices(RESOURCE_NPU)) == 8
    entry = p.wait_log("rejected, nothing changed")
    assert "devices[0]" in str(entry["msg"]) and "AICore" in str(entry["msg"])
    assert chip_vnpus(p) == []


def test_dynamic_vnpu_per_container_and_destroyed_after_the_pod(made) -> None:  # type: ignore[no-untyped-def]
    p = start(made, "dynamic")
    k = p.kubelet
    k.wait_registered(RESOURCE_NPU_CORE, timeout=30)
    cores = k.wait_devices(RESOURCE_NPU_CORE)
    assert len(cores) == 8 * 20
    assert all(r.resource_name != RESOURCE_NPU for r in k.registrations)  # dies are offered as cores only
    response = k.admit("pod-a", RESOURCE_NPU_CORE, 3)  # 3 cores → the smallest template with >= 3: vir05_1c_8g
    assert response.envs["ASCEND_VNPU_SPECS"] == "vir05_1c_8g"
    vnpus = chip_vnpus(p)
    assert len(vnpus) == 1 and vnpus[0]["template"] == "vir05_1c_8g"
    chip = vnpus[0]["npu"]
    # 5 cores went to a 3-core request: two more cores of that chip are reported unavailable
    free_on_chip = [d for d in k.free_devices(RESOURCE_NPU_CORE) if d.startswith(f"Ascend910-{chip}-c")]
    assert len(k.wait_devices(RESOURCE_NPU_CORE, lambda ds: sum(
        1 for d in ds if d.ID.startswith(f"Ascend910-{chip}-c") and d.health == "Unhealthy") == 2)) == 160
    assert len(free_on_chip) in (15, 17)  # before or after the reservation reached the stand-in
    k.delete_pod("pod-a")
    deadline = time.monotonic() + 20
    while chip_vnpus(p) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chip_vnpus(p) == [] and ledger(p) == []
    k.wait_devices(RESOURCE_NPU_CORE, lambda ds: all(d.health == "Healthy" for d in ds), timeout=20)


def test_cores_of_two_chips_are_refused(made) -> None:  # type: ignore[no-untyped-def]
    p = start(made, "dynamic")
    k = p.kubelet
    k.wait_registered(RESOURCE_NPU_CORE, timeout=30)
    k.wait_devices(RESOURCE_NPU_CORE)
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        k.allocate(RESOURCE_NPU_CORE, ["Ascend910-0-c0", "Ascend910-1-c0"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "one chip" in err.value.details()
    assert chip_vnpus(p) == []


def test_dynamic_lifecycles_with_failures_leak_nothing(made) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(20261130)
    p = start(made, "dynamic", grace="0.2s")
    k = p.kubelet
    k.wait_registered(RESOURCE_NPU_CORE, timeout=30)
    k.wait_devices(RESOURCE_NPU_CORE)
    live: list[str] = []
    admitted = failed = 0
    for i in range(100):
        roll = rng.random()
        if roll < 0.10:
            p.fake("fake", "inject", "set -t create-vnpu*", "fail", "--times", "1")
        elif roll < 0.18:
            p.fake("fake", "inject", "set -t destroy-vnpu*", "fail", "--times", "1")
        elif roll < 0.22:
            k.restart()
            k.wait_registered(RESOURCE_NPU_CORE, timeout=15)
            k.wait_devices(RESOURCE_NPU_CORE)
        elif roll < 0.25:  # the plugin crashes and comes back (the DaemonSet restarts it)
            p.proc.kill()  # type: ignore[union-attr]
            p.proc.wait(10)  # type: ignore[union-attr]
            generation = len(k.registrations)
            p.start_kubelet = False
            p.start()
            k.wait(lambda g=generation: len(k.registrations) > g, timeout=30, what="the plugin back")
            k.wait_devices(RESOURCE_NPU_CORE)
        pod = f"pod-{i}"
        try:
            k.admit(pod, RESOURCE_NPU_CORE, rng.choice([1, 2, 5, 5, 8, 10]))
            live.append(pod)
            admitted += 1
        except AdmissionFailed:
            failed += 1
        while live and (len(live) > 6 or rng.random() < 0.4):
            k.delete_pod(live.pop(rng.randrange(len(live))))
    for pod in live:
        k.delete_pod(pod)
    p.fake("fake", "clear-faults")
    deadline = time.monotonic() + 30
    while (chip_vnpus(p) or ledger(p)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert admitted >= 60 and failed >= 1, (admitted, failed)
    assert chip_vnpus(p) == [], "leaked vNPUs"
    assert ledger(p) == []
    info = p.fake("info", "-t", "info-vnpu", "-i", "0", "-c", "0")
    assert "20/20" in info  # capacity restored
    p.assert_running()


def test_ledger_survives_for_static_slices_across_restart(made, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = start(made, "static", [{"device_id": "2", "vnpu_count": 2, "vnpu_memory": "16GB"}])
    k = p.kubelet
    k.wait_registered(RESOURCE_VNPU, timeout=30)
    before = ids(k.wait_devices(RESOURCE_VNPU, lambda ds: len(ds) == 2))
    p.terminate()
    p.start_kubelet = False
    p.start()
    k.wait(lambda: sum(1 for r in k.registrations if r.resource_name == RESOURCE_VNPU) >= 2, timeout=30,
           what="re-registration")
    assert ids(k.wait_devices(RESOURCE_VNPU, lambda ds: len(ds) == 2)) == before
    assert len(chip_vnpus(p)) == 2  # re-used, not duplicated
