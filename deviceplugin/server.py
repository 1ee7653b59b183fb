"""The gRPC side of one resource: serves the DevicePlugin service on its own unix socket and registers with the
kubelet. Translates protobuf messages to the resource's decisions and back; decides nothing itself."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from fuyao.kubeletapi.deviceplugin.v1beta1 import api_pb2 as pb
from fuyao.kubeletapi.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc

from .container_spec import AllocationRefused, ContainerSpec
from .metrics import PluginMetrics
from .resource import ResourcePlugin

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
REGISTER_TIMEOUT_S = 15.0  # above the kubelet's 10 s dial back to the plugin
_STREAM_POLL_S = 0.5


class RegistrationFailed(Exception):
    pass


def _to_pb(spec: ContainerSpec) -> pb.ContainerAllocateResponse:
    return pb.ContainerAllocateResponse(
        envs=spec.envs,
        mounts=[pb.Mount(container_path=m.container_path, host_path=m.host_path, read_only=m.read_only)
                for m in spec.mounts],
        devices=[pb.DeviceSpec(container_path=d.container_path, host_path=d.host_path, permissions=d.permissions)
                 for d in spec.devices],
        annotations=spec.annotations,
    )


class DevicePluginServicer(pb_grpc.DevicePluginServicer):
    def __init__(self, resource: ResourcePlugin, metrics: PluginMetrics, stopping: threading.Event):
        self.resource = resource
        self.metrics = metrics
        self.stopping = stopping
        self._streams: set[object] = set()
        self.streams_opened = 0
        self.last_stream_end = 0.0
        self._lock = threading.Lock()

    def GetDevicePluginOptions(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def ListAndWatch(self, request: pb.Empty, context: grpc.ServicerContext) -> Iterator[pb.ListAndWatchResponse]:
        advertised = self.resource.advertised
        token = object()
        with self._lock:
            self._streams.add(token)
            self.streams_opened += 1
        # Noticed the moment the kubelet goes away, not when the generator next wakes up.
        context.add_callback(lambda: self._stream_ended(token))
        log.info("kubelet opened ListAndWatch for %s", self.resource.resource_name,
                 extra={"resource": self.resource.resource_name})
        try:
            seen = -1
            while context.is_active() and not self.stopping.is_set():
                if advertised.version == seen:  # nothing changed: no list is built
                    advertised.wait_for_change(seen, _STREAM_POLL_S)
                    continue
                version, devices = advertised.snapshot()
                if version != seen:
                    seen = version
                    healthy = sum(1 for d in devices if d.health.value == "Healthy")
                    self.metrics.devices.labels(self.resource.resource_name, "Healthy").set(healthy)
                    self.metrics.devices.labels(self.resource.resource_name, "Unhealthy").set(len(devices) - healthy)
                    yield pb.ListAndWatchResponse(devices=[
                        pb.Device(ID=d.id, health=d.health.value,
                                  topology=None if d.numa_node is None else
                                  pb.TopologyInfo(nodes=[pb.NUMANode(ID=d.numa_node)]))
                        for d in devices])
                advertised.wait_for_change(seen, _STREAM_POLL_S)
        finally:
            self._stream_ended(token)

    def _stream_ended(self, token: object) -> None:
        with self._lock:
            if token not in self._streams:
                return
            self._streams.discard(token)
            self.last_stream_end = time.monotonic()
        log.info("ListAndWatch stream for %s ended", self.resource.resource_name,
                 extra={"resource": self.resource.resource_name})

    def GetPreferredAllocation(self, request: pb.PreferredAllocationRequest,
                               context: grpc.ServicerContext) -> pb.PreferredAllocationResponse:
        responses = []
        for req in request.container_requests:
            chosen = self.resource.preferred(list(req.available_deviceIDs), list(req.must_include_deviceIDs),
                                             req.allocation_size)
            log.info("preferred allocation for %s: %s", self.resource.resource_name, chosen,
                     extra={"resource": self.resource.resource_name, "size": req.allocation_size,
                            "available": len(req.available_deviceIDs), "devices": chosen})
            responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return pb.PreferredAllocationResponse(container_responses=responses)

    def Allocate(self, request: pb.AllocateRequest, context: grpc.ServicerContext) -> pb.AllocateResponse:
        name = self.resource.resource_name
        started = time.perf_counter()
        responses = []
        try:
            for req in request.container_requests:
                spec = self.resource.allocate(list(req.devices_ids))
                responses.append(_to_pb(spec))
                log.info("allocated %s", list(req.devices_ids),
                         extra={"resource": name, "devices": list(req.devices_ids), "envs": spec.envs})
            self.metrics.allocations.labels(name, "ok").inc(len(responses))
        except AllocationRefused as exc:
            self.metrics.allocations.labels(name, "refused").inc()
            log.warning("refused Allocate: %s", exc, extra={"resource": name})
            # The API asks for a fresh ListAndWatch update whenever an allocation fails.
            self.resource.advertised.resend()
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        finally:
            self.metrics.allocate_seconds.labels(name).observe(time.perf_counter() - started)
        return pb.AllocateResponse(container_responses=responses)

    def PreStartContainer(self, request: pb.PreStartContainerRequest,
                          context: grpc.ServicerContext) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()

    def stream_state(self) -> tuple[int, int, float]:
        """(streams open now, streams opened so far, monotonic time the last one ended or 0)."""
        with self._lock:
            return len(self._streams), self.streams_opened, self.last_stream_end


class ResourceServer:
    """Serves one resource on ``<plugin dir>/<socket name>`` and registers it with the kubelet."""

    def __init__(self, resource: ResourcePlugin, plugin_dir: str, metrics: PluginMetrics):
        self.resource = resource
        self.plugin_dir = plugin_dir
        self.metrics = metrics
        self.socket_path = os.path.join(plugin_dir, resource.socket_name)
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()
        self.servicer: DevicePluginServicer | None = None
        self.socket_identity: tuple[int, int] | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Serve on a fresh socket (a stale file from a previous run is removed first)."""
        self.stop()
        os.makedirs(self.plugin_dir, exist_ok=True)
        _unlink(self.socket_path)
        self._stopping = threading.Event()
        self.servicer = DevicePluginServicer(self.resource, self.metrics, self._stopping)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="dp-grpc"),
                             options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_DevicePluginServicer_to_server(self.servicer, server)
        try:
            port = server.add_insecure_port("unix://" + self.socket_path)
        except RuntimeError as exc:  # grpcio raises instead of returning 0 on bind failures
            raise OSError(f"cannot listen on {self.socket_path}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {self.socket_path}")
        server.start()
        self._server = server
        st = os.stat(self.socket_path)
        self.socket_identity = (st.st_dev, st.st_ino)
        log.info("serving %s on %s", self.resource.resource_name, self.socket_path,
                 extra={"resource": self.resource.resource_name, "socket": self.socket_path})

    def register(self, stop: threading.Event | None = None) -> None:
        """Register with ``kubelet.sock``; :class:`RegistrationFailed` says why not. ``stop`` cancels the call
        (the kubelet dials us back inside Register, which can take up to its 10 s dial timeout)."""
        kubelet = os.path.join(self.plugin_dir, KUBELET_SOCKET)
        name = self.resource.resource_name
        request = pb.RegisterRequest(
            version=API_VERSION, endpoint=self.resource.socket_name, resource_name=name,
            options=pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True))
        try:
            with grpc.insecure_channel("unix://" + kubelet) as channel:
                call = pb_grpc.RegistrationStub(channel).Register.future(request, timeout=REGISTER_TIMEOUT_S)
                done = threading.Event()
                call.add_done_callback(lambda _call: done.set())
                while not done.wait(0.05):
                    if stop is not None and stop.is_set():
                        call.cancel()
                        raise RegistrationFailed("shutting down")
                call.result()
        except grpc.RpcError as exc:
            self.metrics.registrations.labels(name, "error").inc()
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise RegistrationFailed(f"kubelet at {kubelet} refused or did not answer: {detail}") from None
        self.metrics.registrations.labels(name, "ok").inc()
        log.info("registered %s with the kubelet", name,
                 extra={"resource": name, "endpoint": self.resource.socket_name})

    def socket_intact(self) -> bool:
        """False when our socket file was removed or replaced (the kubelet deletes plugin sockets on restart)."""
        try:
            st = os.stat(self.socket_path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.socket_identity

    def stop(self, grace_s: float = 0.5) -> None:
        """Stop serving; grpc removes the socket file (only one instance runs per node: see the daemon's lock)."""
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1.0)
            self._server = None
            self.socket_identity = None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
