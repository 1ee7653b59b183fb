"""The device plugin daemon: discovery, health monitor, one gRPC server per resource, the kubelet watch, node
publishing and metrics, wired together.

Kubelet restarts are the dangerous moment for a device plugin (a plugin that misses one is invisible until it is
restarted by hand). The supervisor loop checks every ``WATCH_INTERVAL_S`` that our socket still exists, that
``kubelet.sock`` is the one we registered with, and that the kubelet holds a ListAndWatch stream open; when any of
these breaks it serves a fresh socket and registers again, keeping the devices and their health.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence

from fuyao.backoff import Backoff
from fuyao.contracts import (
    ANNOTATION_NODE_FAULTS,
    ANNOTATION_NODE_TOPOLOGY,
    NPU_RESOURCES,
    RESOURCE_NPU,
    NodeTopology,
    NumaCpus,
    VnpuSlice,
    dump_annotation,
    npu_node_labels,
    parse_core_device_id,
    parse_vnpu_device_id,
)
from fuyao.inventory import NodeInventory, discover, read_node_cpus
from fuyao.kube_client import connect
from fuyao.npusmi import NpuSmi, NpuSmiError
from fuyao.vnpu.templates import Template
from fuyao.vnpu.usage import PodResourcesUnavailable, allocatable_cpus, holdings

from . import cluster
from .config import PluginConfig
from .devices import ChipHealth, DeviceStatus, Slot
from .faults.isolation import IsolationRecord
from .faults.manager import FaultManager, LinkSettings
from .faults.recovery import ResetPolicy
from .faults.table import load_table
from .health import HealthMonitor
from .metrics import PluginMetrics
from .resource import ResourcePlugin, SlotResource
from .server import KUBELET_SOCKET, RegistrationFailed, ResourceServer
from .vnpu_control import VnpuControl

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.1
ALLOCATION_POLL_S = 2.0  # how often allocations are read from the kubelet for the topology annotation
STREAM_GRACE_S = 1.5  # registered, but no ListAndWatch yet
STREAM_END_GRACE_S = 0.3  # the stream ended: a kubelet that restarts replaces kubelet.sock within this
MAX_BACKOFF_S = 1.0  # a refused Register is cheap; a new kubelet must be found within 2 s


def numa_cpu_counts(node_cpus: Mapping[int, set[int]], allocatable: frozenset[int],
                    exclusive: frozenset[int]) -> dict[int, NumaCpus]:
    """Per NUMA node: CPUs the static CPU manager can give exclusively, and those it gave. Empty when it gives
    none (the none policy) or the NUMA layout is unknown."""
    if not allocatable or not node_cpus:
        return {}
    return {node: NumaCpus(allocatable=len(cpus & allocatable), exclusive=len(cpus & allocatable & exclusive))
            for node, cpus in sorted(node_cpus.items())}


def node_topology(inventory: NodeInventory, statuses: dict[str, DeviceStatus],
                  slices: Sequence[Slot] = (), templates: Sequence[Template] = (),
                  allocated: frozenset[str] = frozenset(),
                  numa_cpus: Mapping[int, NumaCpus] | None = None,
                  holders: Mapping[str, str] | None = None,
                  links: Mapping[str, bool | None] | None = None) -> NodeTopology:
    """The topology annotation with each device's current health, its vNPU slices and whether a container holds
    it (so the scheduler extender knows which dies are taken, also for pods it did not bind), and the exclusive
    CPUs per NUMA node."""
    topo = inventory.to_topology()
    sizes = {t.name: t for t in templates}
    devices = {}
    for i, d in topo.devices.items():
        mine = tuple(
            VnpuSlice(id=s.id, vnpu_id=s.vnpu.vnpu_id, template=s.vnpu.template,
                      aicore=sizes[s.vnpu.template].aicore if s.vnpu.template in sizes else 0,
                      memory_mb=int(sizes[s.vnpu.template].memory_gb * 1024) if s.vnpu.template in sizes else 0)
            for s in slices if s.parent.id == i and s.vnpu is not None)
        update: dict[str, object] = {"vnpus": mine, "allocated": i in allocated,
                                     "holder": (holders or {}).get(i) if i in allocated else None,
                                     "link_up": (links or {}).get(i)}
        if i in statuses:
            update["health"] = statuses[i].health
        devices[i] = d.model_copy(update=update)
    return topo.model_copy(update={"devices": devices, "numa_cpus": dict(numa_cpus or {})})


class KubeletSession:
    """Keeps one resource served and registered with whichever kubelet currently owns ``kubelet.sock``.

    Re-registers (on a fresh socket) when our socket disappears, when ``kubelet.sock`` is recreated, when the
    kubelet's ListAndWatch stream ends and none replaces it within ``STREAM_END_GRACE_S``, or when the kubelet never
    opens one after registering. The old server is stopped before the new registration, so an old stream can never
    end after it (kubelets up to 1.34 then drop the new registration: kubernetes#121994).
    """

    def __init__(self, server: ResourceServer, stop: threading.Event | None = None):
        self.server = server
        self.stop = stop
        self.kubelet_socket = os.path.join(server.plugin_dir, KUBELET_SOCKET)
        self.registered_with: tuple[int, int] | None = None
        self.registered_at = 0.0
        self.opened_before = 0
        self.next_attempt = 0.0
        self.backoff = Backoff(initial=0.2, factor=2.0, cap=MAX_BACKOFF_S)
        """Between refused registrations with one kubelet socket."""
        self.backoff_for: tuple[int, int] | None = None
        self.stream_grace = Backoff(initial=STREAM_GRACE_S, factor=2.0, cap=30.0)
        """How long a registration may go without the kubelet's ListAndWatch stream before we register again."""
        self.waiting_logged = False

    def kubelet_identity(self) -> tuple[int, int] | None:
        """The socket file's identity. (Not its ctime: the kubelet's gRPC server changes the socket's mode right
        after creating it. An inode number reused by a restart is caught by our own socket's removal and the
        ListAndWatch stream's end.)"""
        try:
            st = os.stat(self.kubelet_socket)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _restart(self, why: str) -> None:
        log.warning("%s; serving a fresh socket and registering again", why,
                    extra={"resource": self.server.resource.resource_name})
        self.server.start()
        self.registered_with = None

    def tick(self, now: float) -> None:
        self._tick(now)
        self.server.metrics.registered.labels(self.server.resource.resource_name).set(
            0 if self.registered_with is None else 1)

    def _tick(self, now: float) -> None:
        name = self.server.resource.resource_name
        if not self.server.serving:
            self.server.start()
            self.registered_with = None
        elif not self.server.socket_intact():
            self._restart(f"socket {self.server.socket_path} was removed (kubelet restart?)")
        kubelet = self.kubelet_identity()
        if kubelet is None:
            if not self.waiting_logged:
                log.info("waiting for the kubelet at %s", self.kubelet_socket, extra={"resource": name})
                self.waiting_logged = True
            self.registered_with = None
            return
        self.waiting_logged = False
        if self.registered_with != kubelet:
            self._register(kubelet, now)
            return
        servicer = self.server.servicer
        if servicer is None:
            return
        open_now, opened, ended_at = servicer.stream_state()
        if open_now:
            self.stream_grace.reset()
        elif opened > self.opened_before and time.monotonic() - ended_at > STREAM_END_GRACE_S:
            self._restart(f"the kubelet's ListAndWatch stream for {name} ended")
        elif opened == self.opened_before and time.monotonic() - self.registered_at > self.stream_grace.current:
            self.stream_grace.next()
            self._restart(f"the kubelet opened no ListAndWatch stream for {name} after registering")

    def _register(self, kubelet: tuple[int, int], now: float) -> None:
        name = self.server.resource.resource_name
        if self.backoff_for != kubelet:  # a new kubelet: forget the backoff earned by the old socket
            self.backoff_for, self.next_attempt = kubelet, 0.0
            self.backoff.reset()
        if now < self.next_attempt:
            return
        if self.registered_with is not None:
            log.warning("kubelet.sock was recreated (kubelet restart); registering again", extra={"resource": name})
        servicer = self.server.servicer
        opened_before = servicer.stream_state()[1] if servicer is not None else 0
        try:
            self.server.register(self.stop)
        except RegistrationFailed as exc:
            if self.stop is not None and self.stop.is_set():
                return
            delay = self.backoff.next()
            failures = self.backoff.failures
            level = logging.WARNING if failures == 1 or failures % 60 == 0 else logging.DEBUG
            log.log(level, "registration of %s failed (%d in a row), retrying in %.1fs: %s", name, failures, delay,
                    exc, extra={"resource": name})
            self.next_attempt = now + delay
            return
        self.registered_with, self.registered_at, self.opened_before = kubelet, time.monotonic(), opened_before
        self.backoff.reset()


class DevicePluginDaemon:
    def __init__(self, config: PluginConfig, node_name: str | None = None):
        self.config = config
        self.node_name = node_name or config.node_name or os.environ.get("NODE_NAME") or socket.gethostname()
        self._publishing = threading.Lock()
        self.npu_smi = NpuSmi(config.npu_smi.path, timeout_s=config.npu_smi.timeout)
        self.metrics = PluginMetrics(self.node_name)
        self.stop_event = threading.Event()
        self.inventory: NodeInventory | None = None
        self.chips: ChipHealth | None = None
        self.vnpu: VnpuControl | None = None
        self.resources: list[ResourcePlugin] = []
        self.sessions: list[KubeletSession] = []
        self.monitor: HealthMonitor | None = None
        self.faults: FaultManager | None = None
        self.events: cluster.NodeEvents | None = None
        self.publisher: cluster.NodePublisher | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.holders: dict[str, str] = {}  # held die → the pod holding it (kubelet pod-resources)
        self.numa_cpus: dict[int, NumaCpus] = {}
        self.node_cpus: dict[int, set[int]] = {}  # NUMA node → CPUs (sysfs), when the dies' NUMA nodes come from it
        self._next_allocation_poll = 0.0

    def request_stop(self) -> None:
        """Safe from a signal handler: ends the main loop, kills a hung npu-smi call and refuses new ones."""
        self.stop_event.set()
        self.npu_smi.close()

    def run(self) -> int:
        if self.config.metrics_address:
            try:
                self.metrics_address = self.metrics.serve(self.config.metrics_address)
                log.info("metrics on http://%s:%d/metrics", *self.metrics_address)
            except OSError as exc:
                log.error("cannot serve metrics on %s (%s); running without metrics", self.config.metrics_address,
                          exc)
        try:
            if not self._hold_instance_lock():
                return 0
            inventory = self._discover()
            if inventory is None or self.stop_event.is_set():
                return 0
            self._start(inventory)
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= self._next_allocation_poll:  # the topology annotation and npu_allocated
                    self._next_allocation_poll = now + ALLOCATION_POLL_S
                    self._poll_allocations()
                for session in self.sessions:
                    try:
                        session.tick(now)
                    except OSError as exc:
                        log.error("cannot serve %s: %s", session.server.socket_path, exc)
                self.stop_event.wait(WATCH_INTERVAL_S)
            return 0
        finally:
            self._shutdown()

    def _hold_instance_lock(self) -> bool:
        """One plugin per device-plugin directory: two would delete each other's sockets and both carve vNPUs.
        The lock is an ``flock`` on a file in the vNPU ledger's directory (the node's state hostPath: seen by every
        plugin pod of the node, unlike an abstract unix socket, which is private to a pod's network namespace, and
        not in the device-plugin directory, whose files the kubelet deletes when it restarts); released when we
        die. A second instance (a rolling update with surge) waits for the first to exit."""
        key = hashlib.sha256(os.path.realpath(self.config.device_plugin_dir).encode()).hexdigest()[:16]
        path = os.path.join(os.path.dirname(os.path.abspath(self.config.vnpu.ledger)) or ".",
                            f".fuyao-device-plugin-{key}.lock")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._lock_file = open(path, "a")  # noqa: SIM115 - held open for the process's life
        except OSError as exc:
            log.error("cannot open the instance lock %s (%s): not checking for another plugin on this node", path,
                      exc.strerror or exc)
            return True
        logged = False
        while not self.stop_event.is_set():
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if not logged:
                    log.warning("another fuyao-device-plugin serves %s; waiting for it to exit",
                                self.config.device_plugin_dir)
                    logged = True
                self.stop_event.wait(1.0)
        return False

    def _discover(self) -> NodeInventory | None:
        """Discover until it works or we are told to stop; a broken npu-smi at start must not kill the pod."""
        retry = min(self.config.health.interval, 5.0)
        backoff = Backoff(initial=min(1.0, retry), factor=2.0, cap=retry)
        while not self.stop_event.is_set():
            try:
                inventory = discover(self.npu_smi, self.config.sysfs_root, self.config.dev_root)
            except NpuSmiError as exc:
                delay = backoff.next()
                log.error("NPU discovery failed, retrying in %.1fs: %s", delay, exc, extra={"error": str(exc)})
            else:
                if inventory.devices:
                    log.info("discovered %d %s devices (NUMA from %s)", len(inventory.devices), inventory.chip_model,
                             inventory.numa_source,
                             extra={"devices": [d.id for d in inventory.devices],
                                    "groups": {g.id: list(g.devices) for g in inventory.groups}})
                    return inventory
                delay = backoff.next()
                log.error("npu-smi reports no NPUs; retrying in %.1fs", delay)
            self.stop_event.wait(delay)
        return None

    def _start(self, inventory: NodeInventory) -> None:
        self.inventory = inventory
        if inventory.numa_source == "sysfs":  # CPUs per NUMA node only where the dies' NUMA nodes are real
            self.node_cpus = read_node_cpus(self.config.sysfs_root)
        self.chips = ChipHealth(inventory.devices)
        api = self._connect()
        choices = None
        if api is not None:
            self.publisher = cluster.NodePublisher(api, self.node_name)
            self.publisher.start()
            self.events = cluster.NodeEvents(api, self.node_name)
            self.events.start()
            choices = cluster.PendingPodAssignments(api, self.node_name)
        self.faults = self._fault_manager(inventory)
        self.monitor = HealthMonitor(self.npu_smi, self.chips, self.metrics,
                                     interval_s=self.config.health.interval,
                                     failure_threshold=self.config.health.failure_threshold,
                                     on_change=self._publish, faults=self.faults)
        self.monitor.poll_once()  # advertise real health from the first ListAndWatch response
        self.vnpu = VnpuControl(inventory, self.config, self.npu_smi, self.chips, self.metrics, choices)
        try:
            self.vnpu.start()  # static: apply the plan before advertising, so no die is offered twice
        except NpuSmiError as exc:
            log.error("vNPU reconcile at start failed (retried every %gs): %s", self.config.vnpu.reconcile_interval,
                      exc)
        self.vnpu.on_reconciled = self._publish
        self.resources = self.vnpu.resources()
        faults = self.faults
        for resource in self.resources:
            if isinstance(resource, SlotResource):
                resource.links_down = lambda: [d for d, up in faults.links.items() if up is False]
        self._publish()
        self.monitor.start()
        self._check_driver_mounts()
        self.sessions = [KubeletSession(ResourceServer(r, self.config.device_plugin_dir, self.metrics),
                                        self.stop_event) for r in self.resources]

    def _fault_manager(self, inventory: NodeInventory) -> FaultManager:
        health = self.config.health
        table = load_table(health.fault_table)  # validated with the config
        hccn: NpuSmi | None = None
        if health.hccn_tool:
            hccn = NpuSmi(health.hccn_tool, timeout_s=self.config.npu_smi.timeout)
            try:
                hccn.resolve()
            except NpuSmiError:
                log.info("hccn_tool %r not found: NPU link checks are off", health.hccn_tool)
                hccn = None
        log.info("fault table %s (%d codes; unknown codes: %s)", table.source, len(table.codes),
                 table.unknown_code.value)
        reset = health.reset
        return FaultManager(
            self.npu_smi, inventory.devices, table,
            ResetPolicy(enabled=reset.enabled, max_attempts=reset.max_attempts, window_s=reset.window,
                        settle_s=reset.settle),
            IsolationRecord(health.isolation_state), self.metrics, holders=self._holders_now, events=self.events,
            link=LinkSettings(hccn, health.link_interval), reset_timeout_s=reset.timeout,
            table_path=health.fault_table)

    def _holders_now(self) -> dict[str, str] | None:
        """Die → the pod holding it or a vNPU / AICore of it, asked of the kubelet now (before a reset); None when
        the kubelet does not answer."""
        try:
            held = holdings(self.config.vnpu.pod_resources_socket, NPU_RESOURCES, timeout_s=2.0)
        except PodResourcesUnavailable as exc:
            log.debug("holders unknown: %s", exc)
            return None
        out: dict[str, str] = {}
        for devices in held.holders.values():
            for device, pod in devices.items():
                parent = parse_vnpu_device_id(device) or parse_core_device_id(device)
                out[parent[0] if parent else device] = pod
        return out

    def _poll_allocations(self) -> None:
        """Which dies and exclusive CPUs containers hold (kubelet pod-resources); republish the topology when that
        changes."""
        socket = self.config.vnpu.pod_resources_socket
        try:
            held = holdings(socket, (RESOURCE_NPU,), timeout_s=2.0)
            numa_cpus = numa_cpu_counts(self.node_cpus, allocatable_cpus(socket, timeout_s=2.0),
                                        held.exclusive_cpus) if self.node_cpus else {}
        except PodResourcesUnavailable as exc:
            log.debug("allocations not published: %s", exc)
            return
        holders = held.holders[RESOURCE_NPU]
        if holders != self.holders or numa_cpus != self.numa_cpus:
            self.holders = holders
            self.numa_cpus = numa_cpus
            self._publish()

    def _check_driver_mounts(self) -> None:
        missing = [m.host_path for m in self.config.driver_mounts
                   if not os.path.exists(os.path.join(self.config.host_root, m.host_path.lstrip("/")))]
        if missing:
            log.warning("driver paths not visible under --host-root %s are left out of NPU containers: %s (mount "
                        "them into the plugin's pod at the same path, or set hostRoot)", self.config.host_root,
                        missing, extra={"missing": missing})

    def _connect(self) -> object | None:
        if not self.config.publish_node and not self.config.prefer_scheduler_assignment:
            log.info("node publishing and scheduler assignments turned off by config")
            return None
        try:
            api = connect(self.config.kubeconfig)
        except Exception as exc:
            log.error("cannot load cluster credentials (%s); running without a cluster", exc)
            return None
        if api is None:
            log.info("no cluster configured (no --kubeconfig, not in a pod): node publishing is off; serving the "
                     "kubelet only", extra={"node": self.node_name})
        return api

    def _publish(self) -> None:
        # called from the health thread, the vNPU thread and the main loop: one at a time, so an older snapshot
        # never replaces a newer one as the wanted state
        with self._publishing:
            self._publish_locked()

    def _publish_locked(self) -> None:
        if self.inventory is not None:
            self.metrics.observe_allocation(self.inventory.devices, self.holders)
        if self.publisher is None or self.inventory is None or self.chips is None \
                or not self.config.publish_node:
            return
        labels = npu_node_labels(self.inventory.chip_model, len(self.inventory.devices),
                                 self.inventory.driver_version, self.config.server_usage)
        slices: list[Slot] = self.vnpu.slices() if self.vnpu else []
        with self.chips.cond:  # health and faults as one health poll left them (HealthMonitor._apply)
            statuses = self.chips.statuses()
            faults = self.faults.published if self.faults else None
            links = self.faults.published_links if self.faults else None
        topology = node_topology(self.inventory, statuses, slices, self.vnpu.templates if self.vnpu else (),
                                 frozenset(self.holders), self.numa_cpus, self.holders, links)
        annotations = {ANNOTATION_NODE_TOPOLOGY: dump_annotation(topology)}
        if faults is not None:
            annotations[ANNOTATION_NODE_FAULTS] = dump_annotation(faults)
        self.publisher.want(labels, annotations)

    def _shutdown(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.vnpu is not None:
            self.vnpu.stop()
        for session in self.sessions:
            session.server.stop(grace_s=0.2)
        if self.publisher is not None:
            self.publisher.stop()
        if self.events is not None:
            self.events.stop()
        self.npu_smi.close()
        self.metrics.shutdown()
        log.info("stopped; sockets removed")
