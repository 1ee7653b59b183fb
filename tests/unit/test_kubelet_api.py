"""The kubelet API stubs (device plugin v1beta1, pod-resources v1): regenerating them changes nothing, and the
descriptors match upstream's packages, messages, fields and services."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from fuyao.kubeletapi.deviceplugin.v1beta1 import api_pb2
from fuyao.kubeletapi.podresources.v1 import api_pb2 as podresources_pb2

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


# Facts from k8s.io/kubelet pkg/apis/podresources/v1/api.proto.
PODRESOURCES_MESSAGES = {
    "AllocatableResourcesRequest": [],
    "AllocatableResourcesResponse": [("devices", 1, True, "ContainerDevices"), ("cpu_ids", 2, True, "int64"),
                                     ("memory", 3, True, "ContainerMemory")],
    "ListPodResourcesRequest": [],
    "ListPodResourcesResponse": [("pod_resources", 1, True, "PodResources")],
    "PodResources": [("name", 1, False, "string"), ("namespace", 2, False, "string"),
                     ("containers", 3, True, "ContainerResources"), ("cpu_ids", 4, True, "int64"),
                     ("memory", 5, True, "ContainerMemory")],
    "ContainerResources": [("name", 1, False, "string"), ("devices", 2, True, "ContainerDevices"),
                           ("cpu_ids", 3, True, "int64"), ("memory", 4, True, "ContainerMemory"),
                           ("dynamic_resources", 5, True, "DynamicResource")],
    "ContainerMemory": [("memory_type", 1, False, "string"), ("size", 2, False, "uint64"),
                        ("topology", 3, False, "TopologyInfo")],
    "ContainerDevices": [("resource_name", 1, False, "string"), ("device_ids", 2, True, "string"),
                         ("topology", 3, False, "TopologyInfo")],
    "TopologyInfo": [("nodes", 1, True, "NUMANode")],
    "NUMANode": [("ID", 1, False, "int64")],
    "DynamicResource": [("claim_name", 2, False, "string"), ("claim_namespace", 3, False, "string"),
                        ("claim_resources", 4, True, "ClaimResource")],
    "ClaimResource": [("cdi_devices", 1, True, "CDIDevice"), ("driver_name", 2, False, "string"),
                      ("pool_name", 3, False, "string"), ("device_name", 4, False, "string"),
                      ("share_id", 5, False, "string")],
    "CDIDevice": [("name", 1, False, "string")],
    "GetPodResourcesRequest": [("pod_name", 1, False, "string"), ("pod_namespace", 2, False, "string")],
    "GetPodResourcesResponse": [("pod_resources", 1, False, "PodResources")],
}
PODRESOURCES_SERVICES = {
    "PodResourcesLister": [
        ("List", "ListPodResourcesRequest", "ListPodResourcesResponse", False),
        ("GetAllocatableResources", "AllocatableResourcesRequest", "AllocatableResourcesResponse", False),
        ("Get", "GetPodResourcesRequest", "GetPodResourcesResponse", False),
    ],
}
APIS = [
    pytest.param(api_pb2, "v1beta1", UPSTREAM_MESSAGES, UPSTREAM_SERVICES, id="deviceplugin-v1beta1"),
    pytest.param(podresources_pb2, "v1", PODRESOURCES_MESSAGES, PODRESOURCES_SERVICES, id="podresources-v1"),
]
STUB_DIRS = ("fuyao/kubeletapi/deviceplugin/v1beta1", "fuyao/kubeletapi/podresources/v1")


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        return field.message_type.name
    return {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BOOL: "bool",
            FieldDescriptor.TYPE_INT32: "int32", FieldDescriptor.TYPE_INT64: "int64",
            FieldDescriptor.TYPE_UINT64: "uint64"}[field.type]


def test_regenerating_the_stubs_changes_nothing(tmp_path: Path) -> None:
    subprocess.run(["bash", str(REPO / "hack" / "gen-kubelet-api.sh"), str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    for stub_dir in STUB_DIRS:
        for name in GENERATED:
            fresh = tmp_path / stub_dir / name
            assert fresh.exists(), f"generator did not write {stub_dir}/{name}"
            assert filecmp.cmp(REPO / stub_dir / name, fresh, shallow=False), \
                f"{stub_dir}/{name} differs from a fresh generation: run hack/gen-kubelet-api.sh and commit it"


@pytest.mark.parametrize(("module", "package", "messages", "services"), APIS)
def test_package_and_messages_match_upstream(module, package, messages, services) -> None:  # type: ignore[no-untyped-def]
    file = module.DESCRIPTOR
    assert file.package == package
    assert set(file.message_types_by_name) == set(messages)
    for name, fields in messages.items():
        message = file.message_types_by_name[name]
        got = [(f.name, f.number, f.is_repeated, _type_name(f)) for f in message.fields]
        assert got == fields, f"message {name}"


@pytest.mark.parametrize(("module", "package", "messages", "services"), APIS)
def test_services_match_upstream(module, package, messages, services) -> None:  # type: ignore[no-untyped-def]
    file = module.DESCRIPTOR
    assert set(file.services_by_name) == set(services)
    for name, methods in services.items():
        service = file.services_by_name[name]
        assert service.full_name == f"{package}.{name}"
        got = [(m.name, m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods]
        assert got == methods


def test_wire_format_of_a_device_list_is_stable() -> None:
    # Hand-encoded: field 1 (devices, len 18) → Device{1: "a", 2: "Healthy", 3: TopologyInfo{1: NUMANode{1: 1}}}
    message = api_pb2.ListAndWatchResponse(devices=[api_pb2.Device(
        ID="a", health="Healthy", topology=api_pb2.TopologyInfo(nodes=[api_pb2.NUMANode(ID=1)]))])
    assert message.SerializeToString().hex() == "0a12" "0a0161" "12074865616c746879" "1a040a020801"
