"""What containers hold right now, from the kubelet's pod-resources API (v1 ``List``, ``GetAllocatableResources``):
devices per resource and exclusive CPUs.

The reconciler destroys a vNPU only when no container holds it; this is how it knows. The device plugin also
publishes which dies and (under the static CPU manager) which CPUs are taken. The kubelet serves the API on
``/var/lib/kubelet/pod-resources/kubelet.sock`` (the DaemonSet mounts it read-only).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from fuyao.kubeletapi.podresources.v1 import api_pb2 as pb
from fuyao.kubeletapi.podresources.v1 import api_pb2_grpc as pb_grpc

DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"


class PodResourcesUnavailable(Exception):
    """The kubelet's pod-resources API did not answer: nothing may be assumed free."""


@dataclass(frozen=True)
class Holdings:
    holders: dict[str, dict[str, str]]
    """resource name → device ID → ``namespace/name`` of the pod holding it (the kubelet's truth, which can differ
    from what a scheduler planned)."""
    exclusive_cpus: frozenset[int]  # CPUs the static CPU manager gave containers (empty under the none policy)
    groups: dict[str, list[frozenset[str]]] = field(default_factory=dict)
    """resource name → the device IDs of it each container holds, one set per container (its allocation: the
    kubelet calls Allocate once per container and resource), however many entries the kubelet listed them in."""

    @property
    def devices(self) -> dict[str, set[str]]:
        """resource name → device IDs held by some container."""
        return {resource: set(held) for resource, held in self.holders.items()}


def holdings(socket_path: str, resources: Iterable[str], timeout_s: float = 5.0) -> Holdings:
    """What the containers on this node hold (one ``List`` call)."""
    wanted = set(resources)
    holders: dict[str, dict[str, str]] = {r: {} for r in wanted}
    groups: dict[str, list[frozenset[str]]] = {r: [] for r in wanted}
    cpus: set[int] = set()
    try:
        with grpc.insecure_channel("unix://" + socket_path) as channel:
            response = pb_grpc.PodResourcesListerStub(channel).List(pb.ListPodResourcesRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        raise _unavailable(socket_path, exc) from None
    for pod in response.pod_resources:
        for container in pod.containers:
            cpus.update(container.cpu_ids)
            # the kubelet lists one entry per device (and NUMA node), not one per resource: join them per container
            held: dict[str, set[str]] = {}
            for devices in container.devices:
                if devices.resource_name in wanted:
                    holders[devices.resource_name].update(
                        dict.fromkeys(devices.device_ids, f"{pod.namespace}/{pod.name}"))
                    held.setdefault(devices.resource_name, set()).update(devices.device_ids)
            for resource, ids in held.items():
                groups[resource].append(frozenset(ids))
    return Holdings(holders, frozenset(cpus), groups)


def held_devices(socket_path: str, resources: Iterable[str], timeout_s: float = 5.0) -> dict[str, set[str]]:
    """resource name → device IDs held by some container on this node."""
    return holdings(socket_path, resources, timeout_s).devices


def allocatable_cpus(socket_path: str, timeout_s: float = 5.0) -> frozenset[int]:
    """CPUs the kubelet can give containers exclusively (``GetAllocatableResources``; empty under the none CPU
    manager policy)."""
    try:
        with grpc.insecure_channel("unix://" + socket_path) as channel:
            response = pb_grpc.PodResourcesListerStub(channel).GetAllocatableResources(
                pb.AllocatableResourcesRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        raise _unavailable(socket_path, exc) from None
    return frozenset(response.cpu_ids)


def _unavailable(socket_path: str, exc: grpc.RpcError) -> PodResourcesUnavailable:
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    return PodResourcesUnavailable(f"kubelet pod-resources API at {socket_path}: {detail}")
