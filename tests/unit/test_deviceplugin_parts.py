"""Device plugin decisions without processes: config, health, container specs, node patches, assignments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuyao.contracts import (
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_NPU,
    RESOURCE_VNPU,
    ContainerAssignment,
    DeviceHealth,
    PodAssignment,
    dump_annotation,
)
from fuyao.deviceplugin.cluster import assignments_for, node_patch
from fuyao.deviceplugin.config import ConfigError, build_config, load_config_file
from fuyao.deviceplugin.container_spec import AllocationRefused, container_spec
from fuyao.deviceplugin.daemon import node_topology
from fuyao.deviceplugin.devices import (
    ChipHealth,
    DeviceStatus,
    ResourceDevices,
    Slot,
    statuses_after_failures,
    statuses_from_info,
    whole_device_slots,
)
from fuyao.deviceplugin.resource import socket_name_for
from fuyao.inventory import build_inventory
from fuyao.npusmi import parse
from fuyao.npusmi.models import NpuHealthState
from fuyao.vnpu.ledger import VnpuRecord
from tests.conftest import sample
from tests.support.phy_ids import remaps_in_table_order

HEALTHY = DeviceStatus(health=DeviceHealth.HEALTHY, reason="ok")


@pytest.fixture(scope="module")
def inventory():  # type: ignore[no-untyped-def]
    info = parse.parse_info(sample("S1-info-910b4-8.txt"))
    return build_inventory(info, topo=parse.parse_topology(sample("S12-topo-910b-hccs.txt")),
                           remaps=remaps_in_table_order(info))


# --- config ---------------------------------------------------------------------------------------------------------
def test_config_file_values_and_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("version: v1\nnpuSmi: {path: /opt/npu-smi, timeout: 3s}\nhealth: {interval: 2s, "
                    "failureThreshold: 5}\ndriverMounts:\n  - {hostPath: /usr/local/dcmi}\nserverUsage: infer\n")
    config = build_config(load_config_file(path), {"health.interval": "500ms", "node_name": "n1"})
    assert config.npu_smi.path == "/opt/npu-smi" and config.npu_smi.timeout == 3.0
    assert config.health.interval == 0.5 and config.health.failure_threshold == 5
    assert [m.host_path for m in config.driver_mounts] == ["/usr/local/dcmi"]
    assert config.driver_mounts[0].read_only and config.driver_mounts[0].target == "/usr/local/dcmi"
    assert config.node_name == "n1" and config.server_usage == "infer"


def test_defaults_match_the_documented_ones() -> None:
    config = build_config({})
    assert config.device_plugin_dir == "/var/lib/kubelet/device-plugins"
    assert config.health.interval == 5.0 and config.metrics_address == "127.0.0.1:9400"
    assert config.dev_root == "/dev" and all(m.read_only for m in config.driver_mounts)


@pytest.mark.parametrize(("text", "field"), [
    ("version: v1\nhealth: {interval: 5x}\n", "health.interval"),
    ("version: v1\nhealth: {failureThreshold: 0}\n", "health.failureThreshold"),
    ("version: v1\nhelth: {interval: 5s}\n", "helth"),
    ("version: v1\ndriverMounts: [{hostPath: relative/path}]\n", "driverMounts.0.hostPath"),
    ("version: v1\nmetricsAddress: nonsense\n", "metricsAddress"),
    ("version: v1\nserverUsage: gaming\n", "serverUsage"),
    ("version: v1\ncontainerEnv: {ASCEND_VISIBLE_DEVICES: '0'}\n", "containerEnv"),
    ("version: v1\ncontainerEnv: {'bad name': x}\n", "containerEnv"),
    ("version: v2\n", "version"),
    ("devRoot: /dev\n", "version"),
])
def test_invalid_config_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        build_config(load_config_file(path))
    assert err.value.field == field
    assert repr(field) in str(err.value)


def test_unreadable_or_non_yaml_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [v1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(bad)


# --- health ---------------------------------------------------------------------------------------------------------
def test_health_strings_map_to_kubelet_health(inventory) -> None:  # type: ignore[no-untyped-def]
    text = sample("S1-info-910b4-8.txt")
    info = parse.parse_info(text)
    chips = list(info.chips)
    chips[1] = chips[1].model_copy(update={"health": NpuHealthState.WARNING})
    chips[2] = chips[2].model_copy(update={"health": NpuHealthState.ALARM, "health_raw": "Alarm"})
    chips[3] = chips[3].model_copy(update={"health": NpuHealthState.CRITICAL, "health_raw": "Critical"})
    chips[4] = chips[4].model_copy(update={"health": NpuHealthState.UNKNOWN, "health_raw": "UNKNOWN"})
    del chips[5]
    statuses = statuses_from_info(inventory.devices, info.model_copy(update={"chips": tuple(chips)}))
    health = {d: s.health.value for d, s in statuses.items()}
    assert health == {"Ascend910-0": "Healthy", "Ascend910-1": "Healthy", "Ascend910-2": "Unhealthy",
                      "Ascend910-3": "Unhealthy", "Ascend910-4": "Unhealthy", "Ascend910-5": "Unhealthy",
                      "Ascend910-6": "Healthy", "Ascend910-7": "Healthy"}
    assert "Critical" in statuses["Ascend910-3"].reason and "missing" in statuses["Ascend910-5"].reason


def test_failures_below_threshold_keep_health_then_all_unhealthy() -> None:
    previous = {"a": HEALTHY, "b": DeviceStatus(health=DeviceHealth.UNHEALTHY, reason="Critical")}
    assert statuses_after_failures(previous, 2, 3, "timeout") == previous
    after = statuses_after_failures(previous, 3, 3, "npu-smi timed out")
    assert {s.health for s in after.values()} == {DeviceHealth.UNHEALTHY}
    assert "3 times" in after["a"].reason and "timed out" in after["a"].reason


def test_resource_versions_move_on_health_slot_and_reservation_changes(inventory) -> None:  # type: ignore[no-untyped-def]
    chips = ChipHealth(inventory.devices)
    whole = ResourceDevices(chips, whole_device_slots(inventory.devices[:4]))
    other = ResourceDevices(chips, whole_device_slots(inventory.devices[4:]))
    version, devices = whole.snapshot()
    assert len(devices) == 4 and {d.numa_node for d in devices} == {2, 3}
    assert chips.update({"Ascend910-0": DeviceStatus(health=DeviceHealth.HEALTHY, reason="npu-smi OK")}) == []
    assert whole.snapshot()[0] == version
    changes = chips.update({"Ascend910-0": DeviceStatus(health=DeviceHealth.UNHEALTHY, reason="Critical")})
    assert [c[0] for c in changes] == ["Ascend910-0"]
    assert whole.wait_for_change(version, 0.01) == version + 1
    assert other.snapshot()[0] == 1  # a chip it does not advertise changed: no resend
    assert whole.status("Ascend910-0").reason == "Critical"
    whole.resend()
    assert whole.snapshot()[0] == version + 2
    whole.set_reserved({"Ascend910-1": "capacity used by a vNPU"})
    assert whole.status("Ascend910-1").health == DeviceHealth.UNHEALTHY and whole.snapshot()[0] == version + 3
    whole.set_slots(whole_device_slots(inventory.devices[:4]))  # unchanged: no new version
    assert whole.snapshot()[0] == version + 3


# --- container spec -------------------------------------------------------------------------------------------------
def _spec(inventory, ids, existing, statuses=None, **kw):  # type: ignore[no-untyped-def]
    devices = {s.id: s for s in whole_device_slots(inventory.devices)}
    return container_spec(ids, devices, statuses or {i: HEALTHY for i in devices}, dev_root="/devroot",
                          driver_mounts=build_config({}).driver_mounts, exists=lambda p: p in existing, **kw)


def test_container_spec_uses_physical_ids_existing_nodes_and_mounts(inventory) -> None:  # type: ignore[no-untyped-def]
    existing = {"/devroot/davinci3", "/devroot/davinci1", "/devroot/davinci_manager", "/devroot/hisi_hdc",
                "/usr/local/Ascend/driver/lib64"}
    spec = _spec(inventory, ["Ascend910-3", "Ascend910-1"], existing)
    assert spec.envs == {"ASCEND_VISIBLE_DEVICES": "1,3"}
    assert [(d.container_path, d.host_path) for d in spec.devices] == [
        ("/dev/davinci1", "/devroot/davinci1"), ("/dev/davinci3", "/devroot/davinci3"),
        ("/dev/davinci_manager", "/devroot/davinci_manager"), ("/dev/hisi_hdc", "/devroot/hisi_hdc")]
    assert [(m.host_path, m.read_only) for m in spec.mounts] == [("/usr/local/Ascend/driver/lib64", True)]
    assert spec.annotations == {"npu.openfuyao.com/devices": "Ascend910-1,Ascend910-3"}


def test_container_spec_refusals_name_the_problem(inventory) -> None:  # type: ignore[no-untyped-def]
    existing = {f"/devroot/davinci{i}" for i in range(8)}
    with pytest.raises(AllocationRefused) as err:
        _spec(inventory, ["Ascend910-1", "GPU-0"], existing)
    assert err.value.code == "INVALID_ARGUMENT" and "GPU-0" in str(err.value)
    sick = {d.id: HEALTHY for d in inventory.devices} | {
        "Ascend910-2": DeviceStatus(health=DeviceHealth.UNHEALTHY, reason="npu-smi health Critical")}
    with pytest.raises(AllocationRefused) as err:
        _spec(inventory, ["Ascend910-2"], existing, statuses=sick)
    assert err.value.code == "FAILED_PRECONDITION" and "Ascend910-2: npu-smi health Critical" in str(err.value)
    with pytest.raises(AllocationRefused, match="/devroot/davinci4"):
        _spec(inventory, ["Ascend910-4"], existing - {"/devroot/davinci4"})
    with pytest.raises(AllocationRefused, match="no devices"):
        _spec(inventory, [], existing)


def test_container_spec_for_vnpu_slices(inventory) -> None:  # type: ignore[no-untyped-def]
    parent = inventory.devices[2]
    record = VnpuRecord(vnpu_id=133, device_id=parent.id, npu_id=2, chip_id=0, template="vir05_1c_8g",
                        owner="static", state="created", at=0.0)
    slot = Slot(id="Ascend910-2-v133", parent=parent, vnpu=record)
    slots = {slot.id: slot} | {s.id: s for s in whole_device_slots(inventory.devices)}
    spec = container_spec([slot.id], slots, {i: HEALTHY for i in slots}, dev_root="/devroot", driver_mounts=(),
                          exists=lambda p: p in {"/devroot/vdavinci133", "/devroot/davinci_manager"})
    # an existing vNPU: its id and VIRTUAL, never ASCEND_VNPU_SPECS (Ascend's runtime would try to create one on
    # "physical chip 133" and refuse the container); the template is in the container's annotations
    assert spec.envs == {"ASCEND_VISIBLE_DEVICES": "133", "ASCEND_RUNTIME_OPTIONS": "VIRTUAL"}
    assert spec.annotations["npu.openfuyao.com/vnpu-templates"] == "vir05_1c_8g"
    # the host's vdavinci133 at /dev/davinci133, as Ascend's docker runtime mounts a VIRTUAL device: one
    # /dev/davinci[0-9]* in the container, which is what CANN and Ray's NPU manager count
    assert [(d.container_path, d.host_path) for d in spec.devices] == [
        ("/dev/davinci133", "/devroot/vdavinci133"), ("/dev/davinci_manager", "/devroot/davinci_manager")]
    with pytest.raises(AllocationRefused, match="cannot mix"):
        container_spec([slot.id, "Ascend910-0"], slots, {i: HEALTHY for i in slots}, dev_root="/devroot",
                       driver_mounts=(), exists=lambda p: True)
    # no /dev/vdavinci133 (a --dev-root that is not the host's /dev, a driver that did not make it): refused,
    # naming the node, instead of a container that starts without its device
    with pytest.raises(AllocationRefused, match="/devroot/vdavinci133 for vNPU Ascend910-2-v133 does not exist"):
        container_spec([slot.id], slots, {i: HEALTHY for i in slots}, dev_root="/devroot", driver_mounts=(),
                       exists=lambda p: p == "/devroot/davinci_manager")


def test_container_env_reaches_every_npu_container_and_never_overrides_the_devices(inventory) -> None:  # type: ignore[no-untyped-def]
    existing = {"/devroot/davinci2"}
    spec = _spec(inventory, ["Ascend910-2"], existing,
                 extra_env={"LD_LIBRARY_PATH": "/usr/local/Ascend/driver/lib64", "ASCEND_VISIBLE_DEVICES": "7"})
    assert spec.envs == {"LD_LIBRARY_PATH": "/usr/local/Ascend/driver/lib64", "ASCEND_VISIBLE_DEVICES": "2"}


# --- node publishing and scheduler assignments ----------------------------------------------------------------------
def test_node_patch_only_carries_differences() -> None:
    assert node_patch({"a": "1"}, {"x": "y"}, {"a": "1"}, {"x": "y"}) is None
    assert node_patch({"a": "1"}, {}, {"a": "2", "b": "3"}, {}) == {"metadata": {"labels": {"a": "2", "b": "3"}}}
    assert node_patch({}, {"x": "old"}, {}, {"x": "new"}) == {"metadata": {"annotations": {"x": "new"}}}


def test_topology_annotation_carries_current_health(inventory) -> None:  # type: ignore[no-untyped-def]
    statuses = {d.id: HEALTHY for d in inventory.devices}
    statuses["Ascend910-6"] = DeviceStatus(health=DeviceHealth.UNHEALTHY, reason="Critical")
    topo = node_topology(inventory, statuses)
    assert topo.devices["Ascend910-6"].health == DeviceHealth.UNHEALTHY
    assert topo.devices["Ascend910-5"].health == DeviceHealth.HEALTHY
    assert json.loads(dump_annotation(topo))["devices"]["Ascend910-6"]["health"] == "Unhealthy"


def test_topology_annotation_names_the_pod_holding_each_die(inventory) -> None:  # type: ignore[no-untyped-def]
    statuses = {d.id: HEALTHY for d in inventory.devices}
    topo = node_topology(inventory, statuses, allocated=frozenset({"Ascend910-2"}),
                         holders={"Ascend910-2": "llm/decode-0", "Ascend910-3": "llm/stale"})
    assert topo.devices["Ascend910-2"].allocated and topo.devices["Ascend910-2"].holder == "llm/decode-0"
    assert topo.devices["Ascend910-3"].holder is None  # only held dies carry a holder
    assert json.loads(dump_annotation(topo))["devices"]["Ascend910-2"]["holder"] == "llm/decode-0"


def test_assignments_for_reads_this_nodes_npu_choices_and_skips_bad_ones() -> None:
    def ann(node: str, resource: str, devices: tuple[str, ...]) -> dict[str, str]:
        value = PodAssignment(node=node, containers=(ContainerAssignment(container="c", resource=resource,
                                                                          devices=devices),))
        return {ANNOTATION_POD_ASSIGNED: dump_annotation(value)}

    pods = [
        ("ns/a", ann("n1", RESOURCE_NPU, ("Ascend910-2", "Ascend910-3"))),
        ("ns/b", ann("n2", RESOURCE_NPU, ("Ascend910-0",))),
        ("ns/c", ann("n1", RESOURCE_VNPU, ("Ascend910-0-vir01",))),
        ("ns/d", {ANNOTATION_POD_ASSIGNED: "{not json"}),
        ("ns/e", {}),
    ]
    assert [c.devices for c in assignments_for(RESOURCE_NPU, "n1", pods)] == [("Ascend910-2", "Ascend910-3")]
    assert [c.devices for c in assignments_for(RESOURCE_VNPU, "n1", pods)] == [("Ascend910-0-vir01",)]


def test_socket_names_are_basenames_unique_per_resource() -> None:
    names = {socket_name_for(r) for r in (RESOURCE_NPU, RESOURCE_VNPU, "npu.huawei.com/npu-core")}
    assert len(names) == 3 and all("/" not in n and n.endswith(".sock") for n in names)


def test_telemetry_of_a_chip_npu_smi_no_longer_reports_leaves_the_page() -> None:
    # a chip gone from npu-smi's table (or npu-smi failing) kept its last utilization, temperature, power and HBM
    # readings for good: dashboards and alerts saw a dead chip as busy and warm
    from prometheus_client import generate_latest

    from fuyao.deviceplugin.metrics import PluginMetrics
    from fuyao.inventory import NpuDevice, NpuHealthState
    from fuyao.npusmi.models import ChipStatus, Fraction

    metrics = PluginMetrics("node-a")
    device = NpuDevice(id="Ascend910-0", npu_id=0, chip_id=0, physical_id=0, chip_model="910B4",
                       health=NpuHealthState.OK)
    chip = ChipStatus(npu_id=0, chip_id=0, name="910B4", health=NpuHealthState.OK, health_raw="OK", power_w=90.0,
                      temp_c=41.0, aicore_percent=50.0, hbm_mb=Fraction(used=1024, total=32768))
    metrics.observe_chip(device, chip)
    page = generate_latest(metrics.registry).decode()
    assert 'npu_temperature_celsius{chip="910B4",device="Ascend910-0",node="node-a"} 41.0' in page
    metrics.observe_chip(device, chip.model_copy(update={"temp_c": None}))  # no longer printed: no reading
    assert "npu_temperature_celsius{" not in generate_latest(metrics.registry).decode()
    metrics.observe_chip(device, None)
    page = generate_latest(metrics.registry).decode()
    assert "Ascend910-0" not in page.split("npu_utilization")[-1].split("# HELP")[0]
    assert all(f"{name}{{" not in page for name in ("npu_power_watts", "npu_hbm_used_bytes", "npu_utilization"))
