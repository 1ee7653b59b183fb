"""The NPU operator's pure parts (issue 21): status and conditions from observations, node feature discovery over
a fake sysfs tree, the driver version readers, and the CRD generated from the API types."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from fuyao.npu_operator.api import Component, PolicySpec, PolicyStatus, StateType, crd
from fuyao.npu_operator.driver import version_from_board, version_from_file
from fuyao.npu_operator.nfd import ascend_devices, node_labels
from fuyao.npu_operator.status import Observed, Workload, component_statuses, policy_status
from tests.conftest import sample

NODES = ("npu-0", "npu-1", "npu-2")


def healthy(**overrides) -> Observed:  # type: ignore[no-untyped-def]
    ds = Workload(desired=3, ready=3, updated=3, version="0.1.0")
    base = dict(
        npu_nodes=NODES,
        workloads={Component.DEVICE_PLUGIN: ds, Component.EXPORTER: ds, Component.VALIDATOR: ds,
                   Component.SCHEDULER_EXTENDER: Workload(desired=1, ready=1, updated=1)},
        allocatable=dict.fromkeys(NODES, 8), driver_versions=dict.fromkeys(NODES, "24.1.rc2"),
        validation={n: (True, "8 NPUs") for n in NODES}, extender_answers=True)
    base.update(overrides)
    return Observed(**base)  # type: ignore[arg-type]


def states(spec: PolicySpec, seen: Observed) -> dict[str, tuple[StateType, str]]:
    return {s.name.value: (s.state.type, s.state.message) for s in component_statuses(spec, seen)}


def test_a_working_stack_is_running_and_ready() -> None:
    spec = PolicySpec.model_validate({"driver": {"version": "24.1.rc2"}})
    status = policy_status(spec, healthy(), generation=3)
    got = {s.name: s.state.type for s in status.component_statuses}
    assert got[Component.QOS_AGENT] == got[Component.VNPU] == StateType.DISABLED  # off by default
    assert {t for c, t in got.items() if c not in (Component.QOS_AGENT, Component.VNPU)} == {StateType.RUNNING}
    ready = {c.type: c.status for c in status.conditions}
    assert ready == {"Ready": "True", "Progressing": "False", "Degraded": "False"}
    assert status.observed_generation == 3


def test_a_dead_device_plugin_pod_degrades_it_and_names_the_node() -> None:
    seen = healthy(workloads={**healthy().workloads, Component.DEVICE_PLUGIN: Workload(
        desired=3, ready=2, updated=3, not_ready_nodes=("npu-1",))})
    kind, message = states(PolicySpec(), seen)["devicePlugin"]
    assert kind == StateType.DEGRADED and "npu-1" in message and "1 of 3 pods not ready" in message
    status = policy_status(PolicySpec(), seen, 1)
    conditions = {c.type: c for c in status.conditions}
    assert conditions["Ready"].status == "False" and conditions["Degraded"].status == "True"
    assert "devicePlugin (PodsNotReady)" in conditions["Degraded"].message


def test_ready_pods_without_allocatable_npus_are_degraded() -> None:
    seen = healthy(allocatable={"npu-0": 8, "npu-1": 0, "npu-2": 8})
    kind, message = states(PolicySpec(), seen)["devicePlugin"]
    assert kind == StateType.DEGRADED and "npu-1" in message and "allocatable" in message


def test_a_firmware_mismatch_is_reported_and_the_versions_shown() -> None:
    spec = PolicySpec.model_validate({"driver": {"version": "24.1.rc2", "firmwareVersion": "7.5.0.1.220"}})
    versions = {"npu-0": "24.1.rc2", "npu-1": "24.1.rc2", "npu-2": "24.1.rc2"}
    seen = healthy(driver_versions=versions,
                   firmware_versions={"npu-0": "7.5.0.1.220", "npu-1": "7.1.0.3.220", "npu-2": None})
    kind, message = states(spec, seen)["driver"]
    assert kind == StateType.DEGRADED and message == "expected firmware 7.5.0.1.220, found 7.1.0.3.220 on npu-1"
    fine = healthy(driver_versions=versions, firmware_versions=dict.fromkeys(versions, "7.5.0.1.220"))
    assert states(spec, fine)["driver"] == (StateType.RUNNING, "driver 24.1.rc2 (firmware 7.5.0.1.220) on 3 node(s)")


def test_a_driver_mismatch_is_never_silent() -> None:
    spec = PolicySpec.model_validate({"driver": {"version": "24.1.rc2"}})
    seen = healthy(driver_versions={"npu-0": "24.1.rc2", "npu-1": "23.0.5", "npu-2": None})
    kind, message = states(spec, seen)["driver"]
    assert kind == StateType.DEGRADED and "expected driver 24.1.rc2" in message and "23.0.5 on npu-1" in message
    kind, message = states(PolicySpec(), seen)["driver"]  # no expected version: unknown nodes are pending
    assert kind == StateType.PENDING and "npu-2" in message


def test_rollouts_validation_and_the_extender() -> None:
    rolling = healthy(workloads={**healthy().workloads, Component.DEVICE_PLUGIN: Workload(
        desired=3, ready=3, updated=1)})
    assert states(PolicySpec(), rolling)["devicePlugin"][0] == StateType.PENDING
    failed = healthy(validation={"npu-0": (True, ""), "npu-1": (False, "0 NPUs in npu-smi info"), "npu-2": (None, "")})
    kind, message = states(PolicySpec(), failed)["validator"]
    assert kind == StateType.FAILED and "npu-1" in message and "0 NPUs" in message
    mute = healthy(extender_answers=False)
    assert states(PolicySpec(), mute)["schedulerExtender"][0] == StateType.DEGRADED
    missing = healthy(workloads={})
    assert states(PolicySpec(), missing)["devicePlugin"] == (StateType.PENDING,
                                                             "the device plugin DaemonSet is not created yet")
    assert states(PolicySpec(), healthy(npu_nodes=()))["nodeFeatureDiscovery"][0] == StateType.PENDING


def test_condition_transition_times_move_only_on_change() -> None:
    t0, t1 = datetime(2026, 12, 5, 10, tzinfo=UTC), datetime(2026, 12, 5, 11, tzinfo=UTC)
    first = policy_status(PolicySpec(), healthy(), 1, now=t0)
    again = policy_status(PolicySpec(), healthy(), 1, previous=first, now=t1)
    assert [c.last_transition_time for c in again.conditions] == [c.last_transition_time for c in first.conditions]
    broken = policy_status(PolicySpec(), healthy(extender_answers=False), 1, previous=again, now=t1)
    times = {c.type: c.last_transition_time for c in broken.conditions}
    assert times["Ready"] == times["Degraded"] == "2026-12-05T11:00:00Z" and times["Progressing"].startswith(
        "2026-12-05T10")
    assert PolicyStatus.model_validate(broken.model_dump(by_alias=True)) == broken  # round-trips by its API names


def test_the_spec_refuses_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        PolicySpec.model_validate({"devicePlugin": {"enabeld": True}})
    with pytest.raises(ValidationError):
        PolicySpec.model_validate({"vnpu": {"mode": "sometimes"}})
    assert not PolicySpec.model_validate({"validator": {"enabled": False}}).enabled(Component.VALIDATOR)


def test_node_feature_discovery_over_a_fake_sysfs(tmp_path: Path) -> None:
    def device(address: str, vendor: str, device_id: str) -> None:
        d = tmp_path / "bus" / "pci" / "devices" / address
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device_id + "\n")

    assert ascend_devices(tmp_path) == [] and node_labels([]) == {}
    device("0000:01:00.0", "0x8086", "0x1572")  # an Intel NIC
    device("0000:02:00.0", "0x19e5", "0x1822")  # a Huawei NIC: not an NPU
    device("0000:c1:00.0", "0x19e5", "0xd802")
    device("0000:c2:00.0", "0x19e5", "0xd802")
    found = ascend_devices(tmp_path)
    assert found == [("0000:c1:00.0", "910B"), ("0000:c2:00.0", "910B")]
    assert node_labels(found) == {"accelerator": "huawei-ascend-npu", "accelerate-type": "910B"}
    assert node_labels(found, "910B4")["accelerate-type"] == "910B4"


def test_driver_versions() -> None:
    assert version_from_board(sample("S10-board-910.txt")) == "23.0.5"
    assert version_from_file("Version=24.1.rc2\nascendhal_version=7.35.23\n") == "24.1.rc2"
    assert version_from_file("garbage") is None


def test_the_crd_is_structural_and_names_the_policy() -> None:
    doc = crd()
    version = doc["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]["properties"]
    assert set(spec) == {"driver", "devicePlugin", "vnpu", "nodeFeatureDiscovery", "exporter", "schedulerExtender",
                         "qosAgent", "validator"}
    assert spec["vnpu"]["properties"]["mode"]["enum"] == ["static", "dynamic"]
    assert spec["vnpu"]["properties"]["config"]["x-kubernetes-preserve-unknown-fields"] is True
    status = schema["properties"]["status"]["properties"]["componentStatuses"]["items"]["properties"]
    assert status["state"]["properties"]["type"]["enum"] == [t.value for t in StateType]

    def refs(node: object) -> bool:
        return (isinstance(node, dict) and ("$ref" in node or any(refs(v) for v in node.values()))) or \
            (isinstance(node, list) and any(refs(v) for v in node))
    assert not refs(schema)


def test_a_component_whose_prerequisite_is_off_fails_naming_the_field() -> None:
    spec = PolicySpec.model_validate({"devicePlugin": {"enabled": False}, "vnpu": {"enabled": True}})
    got = states(spec, healthy())
    for component in ("exporter", "vnpu", "validator"):
        kind, message = got[component]
        assert kind == StateType.FAILED and "spec.devicePlugin.enabled: true" in message, component
    # the driver check reads the device plugin's labels too: discovery off (the cluster runs its own) is fine
    nfd_off = states(PolicySpec.model_validate({"nodeFeatureDiscovery": {"enabled": False}}), healthy())
    assert nfd_off["driver"][0] == StateType.RUNNING


def test_an_invalid_spec_is_a_condition_naming_the_field() -> None:
    from fuyao.npu_operator.status import invalid_spec_status

    previous = policy_status(PolicySpec(), healthy(), generation=3)
    status = invalid_spec_status("spec.driver.version: Input should be a valid string", 4, previous)
    conditions = {c.type: (c.status, c.reason, c.message) for c in status.conditions}
    assert conditions["Ready"] == ("False", "InvalidSpec", "spec.driver.version: Input should be a valid string")
    assert status.observed_generation == 4 and status.component_statuses == previous.component_statuses


def test_the_validation_pod_asks_for_what_the_node_offers_and_a_refused_pod_is_retried() -> None:
    from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU
    from fuyao.npu_operator.controller import _finished_at, validator_resource

    plain, dynamic = PolicySpec(), PolicySpec.model_validate({"vnpu": {"enabled": True, "mode": "dynamic"}})
    static = PolicySpec.model_validate({"vnpu": {"enabled": True, "mode": "static"}})
    assert validator_resource(plain, {RESOURCE_NPU: "8"}) == RESOURCE_NPU
    assert validator_resource(dynamic, {RESOURCE_NPU_CORE: "160"}) == RESOURCE_NPU_CORE
    assert validator_resource(dynamic, {}) == RESOURCE_NPU_CORE
    assert validator_resource(static, {RESOURCE_NPU: "0", RESOURCE_VNPU: "32"}) == RESOURCE_VNPU  # all carved
    assert validator_resource(static, {RESOURCE_NPU: "4", RESOURCE_VNPU: "16"}) == RESOURCE_NPU
    refused = {"metadata": {"creationTimestamp": "2026-12-07T00:00:00Z"},
               "status": {"phase": "Failed", "reason": "UnexpectedAdmissionError"}}  # no container ever ran
    assert _finished_at(refused) == datetime(2026, 12, 7, tzinfo=UTC).timestamp()
