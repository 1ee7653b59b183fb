"""Contracts: JSON schemas round-trip, bad values name their key and field, scalar keys parse strictly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from fuyao import contracts as c
from fuyao.config_files import parse_duration

device = hs.builds(
    c.DeviceTopology, npu_id=hs.integers(0, 64), chip_id=hs.integers(0, 1), physical_id=hs.integers(0, 128),
    chip_model=hs.sampled_from(["910B4", "310P3", "Ascend910"]), health=hs.sampled_from(list(c.DeviceHealth)),
    numa_node=hs.none() | hs.integers(0, 7), group=hs.none() | hs.text(min_size=1, max_size=12),
    aicore=hs.none() | hs.integers(0, 32), memory_mb=hs.none() | hs.integers(0, 131072),
    vnpus=hs.lists(hs.builds(c.VnpuSlice, id=hs.text(min_size=1, max_size=20), vnpu_id=hs.integers(100, 400),
                             template=hs.sampled_from(["vir05_1c_8g", "vir10_3c_16g"]), aicore=hs.integers(1, 10),
                             memory_mb=hs.integers(1, 32768)), max_size=3).map(tuple))


@given(hs.dictionaries(hs.from_regex(r"Ascend910-[0-9]{1,2}", fullmatch=True), device, min_size=1, max_size=16))
def test_node_topology_round_trip(devices: dict[str, c.DeviceTopology]) -> None:
    ids = tuple(devices)
    topo = c.NodeTopology(chip_model="910B4", driver_version="24.1.rc3", devices=devices,
                          groups=(c.InterconnectGroup(id="hccs-mesh-0", kind=c.InterconnectKind.HCCS_MESH,
                                                      devices=ids),))
    raw = c.dump_annotation(topo)
    assert c.parse_annotation(c.ANNOTATION_NODE_TOPOLOGY, raw) == topo
    assert c.dump_annotation(c.parse_annotation(c.ANNOTATION_NODE_TOPOLOGY, raw)) == raw


@given(hs.lists(hs.builds(c.ContainerAssignment, container=hs.text(min_size=1, max_size=10),
                          resource=hs.sampled_from(c.ACCELERATOR_RESOURCES),
                          devices=hs.lists(hs.text(min_size=1, max_size=12), min_size=1, max_size=8).map(tuple),
                          vnpu_template=hs.none() | hs.just("vir05_1c_8g")), min_size=1, max_size=4))
def test_pod_assignment_round_trip(containers: list[c.ContainerAssignment]) -> None:
    value = c.PodAssignment(node="node-1", containers=tuple(containers))
    assert c.parse_annotation(c.ANNOTATION_POD_ASSIGNED, c.dump_annotation(value)) == value


def _topology_json(**device_overrides: object) -> str:
    dev = {"npu_id": 0, "chip_id": 0, "physical_id": 0, "chip_model": "910B4", "health": "Healthy"}
    dev.update(device_overrides)
    return json.dumps({"schema_version": 1, "chip_model": "910B4", "devices": {"Ascend910-0": dev}})


@pytest.mark.parametrize("raw,field,fragment", [
    (_topology_json(numa_node="zero"), "devices.Ascend910-0.numa_node", "integer"),
    (_topology_json(health="Sick"), "devices.Ascend910-0.health", "Healthy"),
    (_topology_json(npu_id=-1), "devices.Ascend910-0.npu_id", "greater than or equal"),
    ('{"schema_version": 1, "devices": {}}', "chip_model", "required"),
    ('{"schema_version": 2, "chip_model": "x", "devices": {}}', "schema_version", "unsupported"),
    ('{"schema_version": 1, "chip_model": "x", "devices": {}, "groups": [{"id": "g", "kind": "pcie", '
     '"devices": ["nope"]}]}', None, "unknown devices"),
    ("{not json", None, "not valid JSON"),
    ("[1, 2]", None, "JSON object"),
])
def test_invalid_topology_names_key_and_field(raw: str, field: str | None, fragment: str) -> None:
    with pytest.raises(c.ContractError) as err:
        c.parse_annotation(c.ANNOTATION_NODE_TOPOLOGY, raw)
    assert err.value.key == c.ANNOTATION_NODE_TOPOLOGY
    assert c.ANNOTATION_NODE_TOPOLOGY in str(err.value) and fragment in str(err.value)
    if field:
        assert err.value.field == field


def test_invalid_assignment_resource() -> None:
    raw = json.dumps({"node": "n1", "containers": [{"container": "c", "resource": "npu.huawei.com/npu",
                                                    "devices": ["Ascend910-0"]}]})
    with pytest.raises(c.ContractError) as err:
        c.parse_annotation(c.ANNOTATION_POD_ASSIGNED, raw)
    assert err.value.field == "containers.0.resource" and "unknown resource" in str(err.value)


def test_unknown_annotation_key() -> None:
    with pytest.raises(c.ContractError, match="not a JSON annotation"):
        c.parse_annotation("example.com/other", "{}")


def test_keys_are_lowercase_dns_prefixes() -> None:
    keys = [v for k, v in vars(c).items() if k.startswith(("LABEL_", "ANNOTATION_")) and isinstance(v, str)]
    for key in keys:
        prefix, _, name = key.rpartition("/")
        assert prefix == prefix.lower(), key
        assert name and len(name) <= 63, key
    assert c.ANNOTATION_ENABLE_ROUTER == "inference.openfuyao.com/enable-router"


def test_node_labels_are_valid_label_values() -> None:
    labels = c.npu_node_labels("Ascend 910B4", 8, "24.1.rc3 (build 7)", c.ServerUsage.INFER)
    assert labels == {"accelerator": "huawei-ascend-npu", "accelerate-type": "Ascend-910B4",
                      "npu.openfuyao.com/device-count": "8", "node.kubernetes.io/npu-driver": "24.1.rc3--build-7",
                      "server-usage": "infer"}
    assert all(c.is_label_value(v) for v in labels.values())
    assert "server-usage" not in c.npu_node_labels("910B4", 8, None)


@given(hs.text(max_size=100))
def test_label_value_always_valid(raw: str) -> None:
    assert c.is_label_value(c.label_value(raw))


@pytest.mark.parametrize("labels,annotations,qos,source", [
    ({"volcano.sh/qos": "BE"}, {"volcano.sh/qos-level": "LS"}, "BE", "volcano.sh/qos"),
    ({}, {"volcano.sh/qos-level": "-3"}, "BE", "volcano.sh/qos-level"),
    ({}, {"volcano.sh/qos-level": "HLS"}, "LS", "volcano.sh/qos-level"),
    ({"koordinator.sh/qosClass": "BE"}, {}, "BE", "koordinator.sh/qosClass"),
    ({"koordinator.sh/qosClass": "LSR"}, {}, "LS", "koordinator.sh/qosClass"),
    ({}, {}, "LS", None),
])
def test_qos_precedence(labels, annotations, qos: str, source: str | None) -> None:
    result = c.resolve_qos(labels, annotations)
    assert (result.qos.value, result.source, result.problems) == (qos, source, ())


def test_qos_invalid_value_falls_through_and_is_reported() -> None:
    result = c.resolve_qos({"volcano.sh/qos": "gold", "koordinator.sh/qosClass": "BE"},
                           {"volcano.sh/qos-level": "9"})
    assert result.qos is c.QoSClass.BE and result.source == c.LABEL_KOORDINATOR_QOS
    assert len(result.problems) == 2
    assert "volcano.sh/qos" in result.problems[0] and "'gold'" in result.problems[0]
    assert "out of range" in result.problems[1]


def test_scalar_pod_keys() -> None:
    assert c.parse_business_type("io-intensive") is c.BusinessType.IO_INTENSIVE
    with pytest.raises(c.ContractError, match=r"business\.workload/type.*'gpu-heavy'"):
        c.parse_business_type("gpu-heavy")
    assert c.parse_numa_policy("single-numa-node") is c.NumaPolicy.SINGLE_NUMA_NODE
    with pytest.raises(c.ContractError, match="numa-topology-policy"):
        c.parse_numa_policy("strict")
    assert c.parse_phase({"phase": "Prefill"}) is c.Phase.PREFILL
    assert c.parse_phase({"llm-d.ai/role": "prefill-decode"}) is c.Phase.BOTH
    assert c.parse_phase({"app": "x"}) is None
    with pytest.raises(c.ContractError, match="'phase'"):
        c.parse_phase({"phase": "encode"})
    assert c.pd_group({"app": "llama", c.LABEL_PD_GROUP: "g1"}) == "g1"
    assert c.parse_vnpu_mode("dynamic") is c.VnpuMode.DYNAMIC


def test_router_service_settings() -> None:
    settings = c.RouterServiceSettings.from_annotations({
        c.ANNOTATION_ENABLE_ROUTER: "true", c.ANNOTATION_KV_CACHE_POLICY: "lru",
        c.ANNOTATION_HEALTH_CHECK_PATH: "/healthz", c.ANNOTATION_HEALTH_CHECK_INTERVAL: "1m30s"})
    assert settings == c.RouterServiceSettings(enabled=True, kv_cache_policy=c.KvCachePolicy.LRU,
                                               health_check_path="/healthz", health_check_interval_s=90.0)
    assert c.RouterServiceSettings.from_annotations({}).enabled is False
    for key, value, fragment in [(c.ANNOTATION_ENABLE_ROUTER, "yes", "true"),
                                 (c.ANNOTATION_HEALTH_CHECK_PATH, "health", "absolute"),
                                 (c.ANNOTATION_HEALTH_CHECK_INTERVAL, "10 parsecs", "duration"),
                                 (c.ANNOTATION_HEALTH_CHECK_INTERVAL, "0s", "positive"),
                                 (c.ANNOTATION_KV_CACHE_POLICY, "MRU", "LRU")]:
        with pytest.raises(c.ContractError) as err:
            c.RouterServiceSettings.from_annotations({key: value})
        assert err.value.key == key and fragment in str(err.value)


@pytest.mark.parametrize("raw,seconds", [("10s", 10), ("500ms", 0.5), ("1m30s", 90), ("2h", 7200), ("15", 15)])
def test_durations(raw: str, seconds: float) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw,fragment", [("10 parsecs", "such as 10s"), ("0s", "positive"), ("", "such as"),
                                          ("-5", "positive"), ("1m30", "such as")])
def test_bad_durations_say_what_is_expected(raw: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(raw)


def test_qos_answers_are_kept_per_value_and_a_non_string_is_still_refused() -> None:
    first = c.resolve_qos({"volcano.sh/qos": "be"}, {})
    assert c.resolve_qos({"volcano.sh/qos": "be", "app": "x"}, {"other": "y"}) is first  # kept: same three values
    assert c.resolve_qos({"volcano.sh/qos": "LS"}, {}).qos is c.QoSClass.LS
    odd = c.resolve_qos({"volcano.sh/qos": ["BE"]}, {"volcano.sh/qos-level": "BE"})  # type: ignore[dict-item]
    assert odd.qos is c.QoSClass.BE and odd.source == c.ANNOTATION_VOLCANO_QOS_LEVEL and len(odd.problems) == 1
