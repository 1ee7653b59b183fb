"""The device-plugin API stubs: regenerating them changes nothing, and the descriptor matches upstream v1beta1."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from deviceplugin.api.v1beta1 import api_pb2

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")

# Facts from k8s.io/kubelet pkg/apis/deviceplugin/v1beta1/api.proto: message → [(field, number, repeated, type)].
UPSTREAM_MESSAGES = {
    "DevicePluginOptions": [
        ("pre_start_required", 1, False, "bool"),
        ("get_preferred_allocation_available", 2, False, "bool"),
    ],
    "RegisterRequest": [
        ("version", 1, False, "string"),
        ("endpoint", 2, False, "string"),
        ("resource_name", 3, False, "string"),
        ("options", 4, False, "DevicePluginOptions"),
    ],
    "Empty": [],
    "ListAndWatchResponse": [
        ("devices", 1, True, "Device"),
    ],
    "TopologyInfo": [
        ("nodes", 1, True, "NUMANode"),
    ],
    "NUMANode": [
        ("ID", 1, False, "int64"),
    ],
    "Device": [
        ("ID", 1, False, "string"),
        ("health", 2, False, "string"),
        ("topology", 3, False, "TopologyInfo"),
    ],
    "PreStartContainerRequest": [
        ("devices_ids", 1, True, "string"),
    ],
    "PreStartContainerResponse": [],
    "PreferredAllocationRequest": [
        ("container_requests", 1, True, "ContainerPreferredAllocationRequest"),
    ],
    "ContainerPreferredAllocationRequest": [
        ("available_deviceIDs", 1, True, "string"),
        ("must_include_deviceIDs", 2, True, "string"),
        ("allocation_size", 3, False, "int32"),
    ],
    "PreferredAllocationResponse": [
        ("container_responses", 1, True, "ContainerPreferredAllocationResponse"),
    ],
    "ContainerPreferredAllocationResponse": [
        ("deviceIDs", 1, True, "string"),
    ],
    "AllocateRequest": [
        ("container_requests", 1, True, "ContainerAllocateRequest"),
    ],
    "ContainerAllocateRequest": [
        ("devices_ids", 1, True, "string"),
    ],
    "CDIDevice": [
        ("name", 1, False, "string"),
    ],
    "AllocateResponse": [
        ("container_responses", 1, True, "ContainerAllocateResponse"),
    ],
    "ContainerAllocateResponse": [
        ("envs", 1, True, "EnvsEntry"),
        ("mounts", 2, True, "Mount"),
        ("devices", 3, True, "DeviceSpec"),
        ("annotations", 4, True, "AnnotationsEntry"),
        ("cdi_devices", 5, True, "CDIDevice"),
    ],
    "Mount": [
        ("container_path", 1, False, "string"),
        ("host_path", 2, False, "string"),
        ("read_only", 3, False, "bool"),
    ],
    "DeviceSpec": [
        ("container_path", 1, False, "string"),
        ("host_path", 2, False, "string"),
        ("permissions", 3, False, "string"),
    ],
}
UPSTREAM_SERVICES = {
    "Registration": [("Register", "RegisterRequest", "Empty", False)],
    "DevicePlugin": [
        ("GetDevicePluginOptions", "Empty", "DevicePluginOptions", False),
        ("ListAndWatch", "Empty", "ListAndWatchResponse", True),
        ("GetPreferredAllocation", "PreferredAllocationRequest", "PreferredAllocationResponse", False),
        ("Allocate", "AllocateRequest", "AllocateResponse", False),
        ("PreStartContainer", "PreStartContainerRequest", "PreStartContainerResponse", False),
    ],
}


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.name
    return {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BOOL: "bool",
            FieldDescriptor.TYPE_INT32: "int32", FieldDescriptor.TYPE_INT64: "int64"}[field.type]


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    subprocess.run(["bash", str(REPO / "hack" / "gen-deviceplugin-api.sh"), str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    committed = REPO / "deviceplugin" / "api" / "v1beta1"
    fresh = tmp_path / "deviceplugin" / "api" / "v1beta1"
    for name in GENERATED:
        assert (fresh / name).exists(), f"generator did not write {name}"
        assert filecmp.cmp(committed / name, fresh / name, shallow=False), \
            f"{name} differs from a fresh generation: run hack/gen-deviceplugin-api.sh and commit the result"


def test_package_and_messages_match_upstream_v1beta1() -> None:
    file = api_pb2.DESCRIPTOR
    assert file.package == "v1beta1"
    assert set(file.message_types_by_name) == set(UPSTREAM_MESSAGES)
    for name, fields in UPSTREAM_MESSAGES.items():
        message = file.message_types_by_name[name]
        got = [(f.name, f.number, f.is_repeated, _type_name(f)) for f in message.fields]
        assert got == fields, f"message {name}"


def test_services_match_upstream_v1beta1() -> None:
    file = api_pb2.DESCRIPTOR
    assert set(file.services_by_name) == set(UPSTREAM_SERVICES)
    for name, methods in UPSTREAM_SERVICES.items():
        service = file.services_by_name[name]
        assert service.full_name == f"v1beta1.{name}"
        got = [(m.name, m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods]
        assert got == methods


def test_wire_format_of_a_device_list_is_stable() -> None:
    # Hand-encoded: field 1 (devices, len 18) → Device{1: "a", 2: "Healthy", 3: TopologyInfo{1: NUMANode{1: 1}}}
    message = api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(
        ID="a", health="Healthy", topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=1)]))])
    assert message.SerializeToString().hex() == "0a12" "0a0161" "12074865616c746879" "1a040a020801"
