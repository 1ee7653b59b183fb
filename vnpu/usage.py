"""Which devices containers hold right now, from the kubelet's pod-resources API (v1 ``List``).

The reconciler destroys a vNPU only when no container holds it; this is how it knows. The kubelet serves the API on
``/var/lib/kubelet/pod-resources/kubelet.sock`` (the DaemonSet mounts it read-only).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from kubeletapi.podresources.v1 import api_pb2 as pb
from kubeletapi.podresources.v1 import api_pb2_grpc as pb_grpc

DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


class PodResourcesUnavailable(Exception):
    """The kubelet's pod-resources API did not answer: nothing may be assumed free."""


def held_devices(socket_path: str, resources: Iterable[str], timeout_s: float = 5.0) -> dict[str, set[str]]:
    """resource name → device IDs held by some container on this node."""
    wanted = set(resources)
    out: dict[str, set[str]] = {r: set() for r in wanted}
    try:
        with grpc.insecure_channel("unix://" + socket_path) as channel:
            response = pb_grpc.PodResourcesListerStub(channel).List(pb.ListPodResourcesRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        raise PodResourcesUnavailable(f"kubelet pod-resources API at {socket_path}: {detail}") from None
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if devices.resource_name in wanted:
                    out[devices.resource_name].update(devices.device_ids)
    return out
