"""The device plugin daemon: discovery, health monitor, one gRPC server per resource, the kubelet watch, node
publishing and metrics, wired together.

Kubelet restarts are the dangerous moment for a device plugin (a plugin that misses one is invisible until it is
restarted by hand). The supervisor loop checks every ``WATCH_INTERVAL_S`` that our socket still exists, that
``kubelet.sock`` is the one we registered with, and that the kubelet holds a ListAndWatch stream open; when any of
these breaks it serves a fresh socket and registers again, keeping the devices and their health.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence

from fuyao.contracts import (
    ANNOTATION_NODE_TOPOLOGY,
    NodeTopology,
    dump_annotation,
    npu_node_labels,
)
from fuyao.inventory import NodeInventory, discover
from fuyao.npusmi import NpuSmi, NpuSmiError

from . import cluster
from .config import PluginConfig
from .devices import DeviceRegistry, DeviceStatus
from .health import HealthMonitor
from .metrics import PluginMetrics
from .resource import NpuResource, ResourcePlugin
from .server import KUBELET_SOCKET, RegistrationFailed, ResourceServer

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1
STREAM_GRACE_S = 1.5
MAX_BACKOFF_S = 5.0


def node_topology(inventory: NodeInventory, statuses: dict[str, DeviceStatus]) -> NodeTopology:
    """The topology annotation with each device's current health."""
    topo = inventory.to_topology()
    devices = {i: d.model_copy(update={"health": statuses[i].health}) if i in statuses else d
               for i, d in topo.devices.items()}
    return topo.model_copy(update={"devices": devices})


class KubeletSession:
    """Keeps one resource served and registered with whichever kubelet currently owns ``kubelet.sock``."""

    def __init__(self, server: ResourceServer):
        self.server = server
        self.kubelet_socket = os.path.join(server.plugin_dir, KUBELET_SOCKET)
        self.registered_with: tuple[int, int, int] | None = None
        self.registered_at = 0.0
        self.next_attempt = 0.0
        self.backoff = 0.2
        self.stream_grace = STREAM_GRACE_S
        self.waiting_logged = False

    def kubelet_identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.kubelet_socket)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_ctime_ns

    def tick(self, now: float) -> None:
        name = self.server.resource.resource_name
        if not self.server.serving or not self.server.socket_intact():
            if self.server.serving:
                log.warning("socket %s was removed (kubelet restart?); serving a fresh one", self.server.socket_path,
                            extra={"resource": name})
            self.server.start()
            self.registered_with = None
        kubelet = self.kubelet_identity()
        if kubelet is None:
            if not self.waiting_logged:
                log.info("waiting for the kubelet at %s", self.kubelet_socket, extra={"resource": name})
                self.waiting_logged = True
            self.registered_with = None
            return
        self.waiting_logged = False
        if self.registered_with != kubelet:
            if now < self.next_attempt:
                return
            if self.registered_with is not None:
                log.warning("kubelet.sock was recreated (kubelet restart); registering again",
                            extra={"resource": name})
            try:
                self.server.register()
            except RegistrationFailed as exc:
                log.warning("registration of %s failed, retrying in %.1fs: %s", name, self.backoff, exc,
                            extra={"resource": name})
                self.next_attempt = now + self.backoff
                self.backoff = min(self.backoff * 2, MAX_BACKOFF_S)
                return
            self.registered_with, self.registered_at, self.backoff = kubelet, now, 0.2
            return
        servicer = self.server.servicer
        if servicer is not None and now - self.registered_at > self.stream_grace and \
                servicer.idle_for() > self.stream_grace:
            log.warning("the kubelet holds no ListAndWatch stream for %s; serving a fresh socket and registering "
                        "again", name, extra={"resource": name})
            self.stream_grace = min(self.stream_grace * 2, 30.0)
            self.server.start()
            self.registered_with = None
        elif servicer is not None and servicer.idle_for() == 0.0:
            self.stream_grace = STREAM_GRACE_S


class DevicePluginDaemon:
    def __init__(self, config: PluginConfig, node_name: str | None = None):
        self.config = config
        self.node_name = node_name or config.node_name or os.environ.get("NODE_NAME") or socket.gethostname()
        self.npu_smi = NpuSmi(config.npu_smi.path, timeout_s=config.npu_smi.timeout)
        self.metrics = PluginMetrics(self.node_name)
        self.stop_event = threading.Event()
        self.inventory: NodeInventory | None = None
        self.registry: DeviceRegistry | None = None
        self.resources: list[ResourcePlugin] = []
        self.sessions: list[KubeletSession] = []
        self.monitor: HealthMonitor | None = None
        self.publisher: cluster.NodePublisher | None = None
        self.metrics_address: tuple[str, int] | None = None

    def request_stop(self) -> None:
        """Safe from a signal handler: ends the main loop and kills a hung npu-smi call."""
        self.stop_event.set()
        self.npu_smi.kill_running()

    def run(self) -> int:
        if self.config.metrics_address:
            self.metrics_address = self.metrics.serve(self.config.metrics_address)
            log.info("metrics on http://%s:%d/metrics", *self.metrics_address)
        try:
            inventory = self._discover()
            if inventory is None:
                return 0
            self._start(inventory)
            while not self.stop_event.is_set():
                now = time.monotonic()
                for session in self.sessions:
                    try:
                        session.tick(now)
                    except OSError as exc:
                        log.error("cannot serve %s: %s", session.server.socket_path, exc)
                self.stop_event.wait(WATCH_INTERVAL_S)
            return 0
        finally:
            self._shutdown()

    def _discover(self) -> NodeInventory | None:
        """Discover until it works or we are told to stop; a broken npu-smi at start must not kill the pod."""
        delay = min(self.config.health.interval, 5.0)
        while not self.stop_event.is_set():
            try:
                inventory = discover(self.npu_smi, self.config.sysfs_root)
            except NpuSmiError as exc:
                log.error("NPU discovery failed, retrying in %.1fs: %s", delay, exc, extra={"error": str(exc)})
            else:
                if inventory.devices:
                    log.info("discovered %d %s devices (NUMA from %s)", len(inventory.devices), inventory.chip_model,
                             inventory.numa_source,
                             extra={"devices": [d.id for d in inventory.devices],
                                    "groups": {g.id: list(g.devices) for g in inventory.groups}})
                    return inventory
                log.error("npu-smi reports no NPUs; retrying in %.1fs", delay)
            self.stop_event.wait(delay)
        return None

    def _start(self, inventory: NodeInventory) -> None:
        self.inventory = inventory
        self.registry = DeviceRegistry(inventory.devices)
        api = self._connect()
        choices = None
        if api is not None:
            self.publisher = cluster.NodePublisher(api, self.node_name)
            self.publisher.start()
            choices = cluster.PendingPodAssignments(api, self.node_name)
        self.resources = [NpuResource(inventory, self.config, self.registry, choices)]
        self.monitor = HealthMonitor(self.npu_smi, self.registry, self.metrics,
                                     interval_s=self.config.health.interval,
                                     failure_threshold=self.config.health.failure_threshold,
                                     on_change=self._publish)
        self.monitor.poll_once()  # advertise real health from the first ListAndWatch response
        self._publish()
        self.monitor.start()
        self.sessions = [KubeletSession(ResourceServer(r, self.config.device_plugin_dir, self.metrics))
                         for r in self.resources]

    def _connect(self) -> object | None:
        if not self.config.publish_node and not self.config.prefer_scheduler_assignment:
            log.info("node publishing and scheduler assignments turned off by config")
            return None
        try:
            api = cluster.connect(self.config.kubeconfig)
        except Exception as exc:
            log.error("cannot load cluster credentials (%s); running without a cluster", exc)
            return None
        if api is None:
            log.info("no cluster configured (no --kubeconfig, not in a pod): node publishing is off; serving the "
                     "kubelet only", extra={"node": self.node_name})
        return api

    def _publish(self) -> None:
        if self.publisher is None or self.inventory is None or self.registry is None \
                or not self.config.publish_node:
            return
        labels = npu_node_labels(self.inventory.chip_model, len(self.inventory.devices),
                                 self.inventory.driver_version, self.config.server_usage)
        topology = node_topology(self.inventory, self.registry.statuses())
        self.publisher.want(labels, {ANNOTATION_NODE_TOPOLOGY: dump_annotation(topology)})

    def _shutdown(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        for session in self.sessions:
            session.server.stop(grace_s=0.2)
        if self.publisher is not None:
            self.publisher.stop()
        self.npu_smi.kill_running()
        self.metrics.shutdown()
        log.info("stopped; sockets removed")

    def served_sockets(self) -> Sequence[str]:
        return [s.server.socket_path for s in self.sessions]
