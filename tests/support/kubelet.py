"""A kubelet stand-in for device-plugin tests: the kubelet's side of the device-plugin API over real unix sockets.

It serves ``Registration`` on ``<dir>/kubelet.sock`` with the generated stubs, and on every Register it does what
the kubelet's device manager does: dials the plugin's endpoint (a basename inside the directory), asks for its
options, and keeps a ListAndWatch stream open, recording every device list. ``restart()`` behaves like a kubelet
restart: every socket in the directory is removed and ``kubelet.sock`` is recreated. With ``pod_resources_socket``
it also serves the pod-resources API over its pod table (``admit`` / ``delete_pod`` play the kubelet's part).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from fuyao.kubeletapi.deviceplugin.v1beta1 import api_pb2 as pb
from fuyao.kubeletapi.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from fuyao.kubeletapi.podresources.v1 import api_pb2 as pr
from fuyao.kubeletapi.podresources.v1 import api_pb2_grpc as pr_grpc

# <DNS subdomain>/<name>, like the kubelet's IsExtendedResourceName check
EXTENDED_RESOURCE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass
class Registration:
    resource_name: str
    endpoint: str
    version: str
    preferred_available: bool
    at: float
    generation: int


@dataclass
class PluginConnection:
    registration: Registration
    channel: grpc.Channel
    stub: pb_grpc.DevicePluginStub
    lists: list[list[pb.Device]] = field(default_factory=list)
    stream: object | None = None
    ended: bool = False


class AdmissionFailed(Exception):
    pass


class PodResourcesServicer(pr_grpc.PodResourcesListerServicer):
    """The kubelet's pod-resources API over the stand-in's pod table."""

    def __init__(self, kubelet: KubeletStandIn):
        self.kubelet = kubelet

    def List(self, request: pr.ListPodResourcesRequest, context: grpc.ServicerContext) -> pr.ListPodResourcesResponse:
        with self.kubelet._cond:
            pods = {name: dict(containers) for name, containers in self.kubelet.pods.items()}
            cpus = {name: list(ids) for name, ids in self.kubelet.pod_cpus.items()}
        return pr.ListPodResourcesResponse(pod_resources=[
            pr.PodResources(name=name, namespace="default", containers=[
                pr.ContainerResources(name="main", cpu_ids=cpus.get(name, []), devices=[
                    pr.ContainerDevices(resource_name=resource, device_ids=ids)
                    for resource, ids in pods.get(name, {}).items()])])
            for name in sorted(set(pods) | set(cpus))])

    def GetAllocatableResources(self, request: pr.AllocatableResourcesRequest,
                                context: grpc.ServicerContext) -> pr.AllocatableResourcesResponse:
        """Like the kubelet: CPUs only under the static CPU manager policy (``allocatable_cpus`` set)."""
        with self.kubelet._cond:
            return pr.AllocatableResourcesResponse(cpu_ids=list(self.kubelet.allocatable_cpus))


class KubeletStandIn(pb_grpc.RegistrationServicer):
    def __init__(self, plugin_dir: str, pod_resources_socket: str | None = None):
        self.plugin_dir = plugin_dir
        self.socket_path = os.path.join(plugin_dir, "kubelet.sock")
        self.pod_resources_socket = pod_resources_socket
        self.registrations: list[Registration] = []
        self.connections: dict[str, PluginConnection] = {}
        self.pods: dict[str, dict[str, list[str]]] = {}  # pod → resource → device IDs (the kubelet's checkpoint)
        self.pod_cpus: dict[str, list[int]] = {}  # pod → exclusive CPUs (static CPU manager)
        self.allocatable_cpus: list[int] = []  # empty: the none CPU manager policy
        self.generation = 0
        self._server: grpc.Server | None = None
        self._pr_server: grpc.Server | None = None
        self._cond = threading.Condition()

    # Pods ---------------------------------------------------------------------------------------------------------
    def free_devices(self, resource: str) -> list[str]:
        """Healthy advertised devices no pod holds: what the kubelet offers GetPreferredAllocation."""
        with self._cond:
            conn = self.connections.get(resource)
            latest = conn.lists[-1] if conn and conn.lists else []
            held = {d for pod in self.pods.values() for d in pod.get(resource, [])}
            return [d.ID for d in latest if d.health == "Healthy" and d.ID not in held]

    def admit(self, pod: str, resource: str, size: int) -> pb.ContainerAllocateResponse:
        """What the kubelet does for a container asking ``size`` of ``resource``: pick (asking the plugin), call
        Allocate, record the devices (so pod-resources reports them). Raises :class:`AdmissionFailed`."""
        free = self.free_devices(resource)
        if len(free) < size:
            raise AdmissionFailed(f"{resource}: {len(free)} free, {size} requested")
        chosen = self.preferred(resource, free, size)
        if len(chosen) != size or not set(chosen) <= set(free):
            chosen = free[:size]  # the kubelet falls back to its own pick
        try:
            response = self.allocate(resource, chosen).container_responses[0]
        except grpc.RpcError as exc:
            raise AdmissionFailed(f"Allocate {chosen}: {exc.code().name} {exc.details()}") from None
        with self._cond:
            self.pods.setdefault(pod, {})[resource] = list(chosen)
        return response

    def pin_cpus(self, pod: str, cpus: list[int]) -> None:
        """What the static CPU manager does for a Guaranteed pod with integer CPUs: exclusive CPUs."""
        with self._cond:
            self.pod_cpus[pod] = list(cpus)

    def delete_pod(self, pod: str) -> None:
        with self._cond:
            self.pods.pop(pod, None)
            self.pod_cpus.pop(pod, None)

    # Registration service -------------------------------------------------------------------------------------
    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.Empty:
        """Like the kubelet's device manager: validate, dial the plugin back and ask its options before answering
        (a plugin whose socket does not answer fails registration), then stream ListAndWatch in the background."""
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported version {request.version}")
        if "/" in request.endpoint:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "endpoint must be a basename")
        if not EXTENDED_RESOURCE.match(request.resource_name) or request.resource_name.startswith("kubernetes.io/"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid extended resource {request.resource_name!r}")
        channel = grpc.insecure_channel("unix://" + os.path.join(self.plugin_dir, request.endpoint))
        stub = pb_grpc.DevicePluginStub(channel)
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            options = stub.GetDevicePluginOptions(pb.Empty(), timeout=5)
        except (grpc.FutureTimeoutError, grpc.RpcError) as exc:
            channel.close()
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot dial plugin {request.endpoint}: {exc}")
        reg = Registration(request.resource_name, request.endpoint, request.version,
                           options.get_preferred_allocation_available, time.monotonic(), self.generation)
        conn = PluginConnection(reg, channel, stub)
        with self._cond:
            old = self.connections.get(reg.resource_name)
            self.connections[reg.resource_name] = conn
            self.registrations.append(reg)
            self._cond.notify_all()
        if old is not None:
            old.channel.close()
        threading.Thread(target=self._stream, args=(conn,), daemon=True).start()
        return pb.Empty()

    def _stream(self, conn: PluginConnection) -> None:
        stub = conn.stub
        try:
            stream = stub.ListAndWatch(pb.Empty())
            conn.stream = stream
            for response in stream:
                with self._cond:
                    conn.lists.append(list(response.devices))
                    self._cond.notify_all()
        except grpc.RpcError:
            pass
        finally:
            with self._cond:
                conn.ended = True
                self._cond.notify_all()

    # Lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> KubeletStandIn:
        os.makedirs(self.plugin_dir, exist_ok=True)
        self.generation += 1
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port("unix://" + self.socket_path)
        server.start()
        self._server = server
        if self.pod_resources_socket:
            os.makedirs(os.path.dirname(self.pod_resources_socket), exist_ok=True)
            pr_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            pr_grpc.add_PodResourcesListerServicer_to_server(PodResourcesServicer(self), pr_server)
            pr_server.add_insecure_port("unix://" + self.pod_resources_socket)
            pr_server.start()
            self._pr_server = pr_server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(2)
            self._server = None
        if self._pr_server is not None:
            self._pr_server.stop(0).wait(2)
            self._pr_server = None
        with self._cond:
            conns = list(self.connections.values())
            self.connections.clear()
        for conn in conns:
            conn.channel.close()

    def drop_streams(self) -> None:
        """Forget every plugin (close our connections) while keeping kubelet.sock: a kubelet that lost a plugin."""
        with self._cond:
            conns = list(self.connections.values())
            self.connections.clear()
        for conn in conns:
            conn.channel.close()

    def restart(self) -> None:
        """Like a kubelet restart: stop, remove every socket in the directory, serve a new kubelet.sock."""
        self.stop()
        for name in os.listdir(self.plugin_dir):
            if name.endswith(".sock"):
                os.unlink(os.path.join(self.plugin_dir, name))
        self.start()

    # Waiting -----------------------------------------------------------------------------------------------------
    def wait(self, predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self._cond.wait(min(remaining, 0.1))

    def wait_registered(self, resource: str, generation: int | None = None, timeout: float = 10.0) -> Registration:
        gen = self.generation if generation is None else generation
        return self.wait(lambda: next((r for r in reversed(self.registrations)
                                       if r.resource_name == resource and r.generation == gen), None),
                         timeout, f"{resource} to register with kubelet generation {gen}")  # type: ignore[return-value]

    def wait_devices(self, resource: str, predicate: Callable[[list[pb.Device]], bool] = lambda d: bool(d),
                     timeout: float = 10.0) -> list[pb.Device]:
        def latest() -> tuple[list[pb.Device]] | None:  # a tuple, so an empty list still counts as found
            conn = self.connections.get(resource)
            if conn and conn.lists and predicate(conn.lists[-1]):
                return (conn.lists[-1],)
            return None

        found = self.wait(latest, timeout, f"a device list of {resource} matching the test")
        return found[0]  # type: ignore[index]

    def plugin(self, resource: str) -> pb_grpc.DevicePluginStub:
        return self.connections[resource].stub

    def allocate(self, resource: str, *containers: list[str]) -> pb.AllocateResponse:
        return self.plugin(resource).Allocate(pb.AllocateRequest(container_requests=[
            pb.ContainerAllocateRequest(devices_ids=ids) for ids in containers]), timeout=5)

    def preferred(self, resource: str, available: list[str], size: int,
                  must_include: list[str] | None = None) -> list[str]:
        response = self.plugin(resource).GetPreferredAllocation(pb.PreferredAllocationRequest(container_requests=[
            pb.ContainerPreferredAllocationRequest(available_deviceIDs=available,
                                                   must_include_deviceIDs=must_include or [],
                                                   allocation_size=size)]), timeout=5)
        return list(response.container_responses[0].deviceIDs)
