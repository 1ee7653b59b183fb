"""The device plugin killed (SIGKILL: an OOM kill, a node-level crash) and restarted under load, and what is lost.

A real ``fuyao-device-plugin`` process on the 8-NPU preset (910b4-8) against the kubelet stand-in and the fake
npu-smi, over real unix sockets. While a thread plays a kubelet admitting pods (GetPreferredAllocation over the free
devices, then Allocate, on the plugin's socket, each call with a deadline), the plugin is SIGKILLed and started again
with the same state. Nothing may be lost: every restart registers again and its first ListAndWatch list carries the
same eight devices with the health npu-smi reports (a device that went Critical before the kill is Unhealthy from the
first list on; one that recovered while the plugin was down is Healthy); devices held by pods are never offered; calls
during an outage fail with a gRPC error within their deadline; no npu-smi child outlives the plugin; a fresh socket
replaces the stale one.

The dynamic-vNPU crash (SIGKILL between npu-smi creating a vNPU and the ledger recording it) is already covered by
``tests/component/test_deviceplugin_vnpu.py::test_dynamic_lifecycles_with_failures_leak_nothing``.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import psutil
import pytest

from fuyao.contracts import RESOURCE_NPU
from fuyao.kubeletapi.deviceplugin.v1beta1 import api_pb2 as pb
from fuyao.kubeletapi.deviceplugin.v1beta1 import api_pb2_grpc as pb_grpc
from tests.support.deviceplugin import PluginUnderTest
from tests.support.kubelet import PluginConnection

pytestmark = pytest.mark.reliability

DEVICES = frozenset(f"Ascend910-{i}" for i in range(8))
SOCKET = "fuyao-npu.huawei.com-NPU.sock"
CALL_DEADLINE_S = 2.0
RESTART_BOUND_S = 20.0  # a Python process starting on a loaded 2-core machine; measured figures are far below
HELD = ["Ascend910-6", "Ascend910-7"]  # a long-running pod's devices, admitted before the first kill


@pytest.fixture
def plugin() -> Iterator[PluginUnderTest]:
    p = PluginUnderTest("910b4-8")
    try:
        yield p
    finally:
        p.close()


def npu_smi_processes(p: PluginUnderTest) -> list[psutil.Process]:
    """Live fake npu-smi processes working on this test's simulated node (other tests may run their own)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or not any(
                    "fake-npu-smi" in arg for arg in proc.info["cmdline"] or ()):
                continue
            if proc.environ().get("FAKE_NPU_SMI_STATE") == str(p.state):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_no_npu_smi(p: PluginUnderTest, timeout: float = 3.0) -> float:
    """With the plugin dead, any npu-smi of ours still alive is an orphan. Returns how long they took to go."""
    started = time.monotonic()
    while True:
        left = npu_smi_processes(p)
        if not left:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"orphaned npu-smi after the plugin was killed: "
                                 f"{[(c.pid, c.cmdline()) for c in left]}")
        time.sleep(0.05)


def kill(p: PluginUnderTest) -> float:
    """SIGKILL the plugin process only (its npu-smi children must die with it by themselves); returns when it is
    dead."""
    assert p.proc is not None
    p.assert_running()
    p.proc.kill()
    p.proc.wait(10)
    return time.monotonic()


@dataclass
class Call:
    kind: str  # "preferred" | "allocate"
    started: float
    seconds: float
    code: str  # "OK" or a grpc.StatusCode name
    devices: list[str]


@dataclass
class KubeletLoad:
    """A kubelet admitting pods on the plugin's socket: preferred allocation over the free devices, then Allocate;
    admitted pods are recorded in the stand-in's pod table (what pod-resources reports) and deleted again."""

    p: PluginUnderTest
    rng: random.Random = field(default_factory=lambda: random.Random(17))
    calls: list[Call] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    live: list[str] = field(default_factory=list)
    admitted: int = 0

    def __post_init__(self) -> None:
        # What the kubelet does once per registration, kept across restarts; a short reconnect backoff so the
        # caller notices the new socket promptly (gRPC's default starts at 1 s and doubles to 120 s).
        self.channel = grpc.insecure_channel("unix://" + str(self.p.plugin_dir / SOCKET), options=[
            ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
            ("grpc.max_reconnect_backoff_ms", 250)])
        self.stub = pb_grpc.DevicePluginStub(self.channel)
        self.thread = threading.Thread(target=self._run, name="kubelet-load", daemon=True)

    def start(self) -> KubeletLoad:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(CALL_DEADLINE_S * 3)
        assert not self.thread.is_alive(), "the load thread hangs"
        self.channel.close()

    def successes(self, kind: str, since: float) -> int:
        return sum(1 for c in list(self.calls) if c.kind == kind and c.code == "OK" and c.started >= since)

    def _call(self, kind: str, method, request, devices: list[str]):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        try:
            response = method(request, timeout=CALL_DEADLINE_S)
            code = "OK"
        except grpc.RpcError as exc:
            response, code = None, exc.code().name
        except Exception as exc:  # anything but a gRPC status is a caller that did not fail cleanly
            response, code = None, f"raised {type(exc).__name__}: {exc}"
        self.calls.append(Call(kind, started, time.monotonic() - started, code, devices))
        return response

    def _run(self) -> None:
        k = self.p.kubelet
        while not self.stop.is_set():
            free = k.free_devices(RESOURCE_NPU)
            size = self.rng.choice([1, 1, 2, 2, 4])
            if len(free) < size:
                self._release()
                continue
            response = self._call("preferred", self.stub.GetPreferredAllocation, pb.PreferredAllocationRequest(
                container_requests=[pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=free, allocation_size=size)]), free)
            chosen = free[:size]  # the kubelet's own pick when the plugin does not answer
            if response is not None:
                got = list(response.container_responses[0].deviceIDs)
                if len(got) != size or len(set(got)) != size or not set(got) <= set(free):
                    self.problems.append(f"preferred {got} for {size} of free {free}")
                else:
                    chosen = got
                if set(got) & set(HELD):
                    self.problems.append(f"preferred offered held devices: {got}")
            response = self._call("allocate", self.stub.Allocate, pb.AllocateRequest(
                container_requests=[pb.ContainerAllocateRequest(devices_ids=chosen)]), chosen)
            if response is not None:
                visible = response.container_responses[0].envs["ASCEND_VISIBLE_DEVICES"]
                want = ",".join(str(i) for i in sorted(int(d.rsplit("-", 1)[1]) for d in chosen))
                if visible != want:
                    self.problems.append(f"Allocate {chosen} answered ASCEND_VISIBLE_DEVICES={visible}")
                pod = f"load-{self.admitted}"
                self.admitted += 1
                with k._cond:
                    k.pods[pod] = {RESOURCE_NPU: list(chosen)}
                self.live.append(pod)
            self._release()
            self.stop.wait(0.02 if response is not None else 0.05)  # a kubelet's pace, not a busy loop

    def _release(self) -> None:
        while self.live and (len(self.live) > 2 or self.rng.random() < 0.3):
            self.p.kubelet.delete_pod(self.live.pop(0))


def health(devices: list[pb.Device]) -> dict[str, str]:
    return {d.ID: d.health for d in devices}


def check_list(devices: list[pb.Device], unhealthy: set[str], what: str) -> None:
    ids = [d.ID for d in devices]
    assert len(ids) == len(set(ids)), f"{what}: duplicated devices {sorted(ids)}"
    assert set(ids) == DEVICES, f"{what}: lost {sorted(DEVICES - set(ids))}, invented {sorted(set(ids) - DEVICES)}"
    got = {i for i, h in health(devices).items() if h != "Healthy"}
    assert got == unhealthy, f"{what}: Unhealthy {sorted(got)}, npu-smi says {sorted(unhealthy)}"
    assert set(health(devices).values()) <= {"Healthy", "Unhealthy"}


def restart(p: PluginUnderTest) -> tuple[PluginConnection, float, float]:
    """Start the plugin again with the same state; (its kubelet connection, seconds to register, seconds to the
    first device list)."""
    k = p.kubelet
    before = len(k.registrations)
    p.start_kubelet = False
    started = time.monotonic()
    p.start()
    k.wait(lambda: len(k.registrations) > before, RESTART_BOUND_S, "the restarted plugin to register")
    registered = time.monotonic() - started
    conn = k.connections[RESOURCE_NPU]
    k.wait(lambda: conn.lists, RESTART_BOUND_S, "the first ListAndWatch list after the restart")
    return conn, registered, time.monotonic() - started


def test_sigkill_under_load_loses_no_device(plugin: PluginUnderTest) -> None:
    p, k = plugin, plugin.kubelet
    p.start()
    check_list(p.wait_ready(), set(), "first start")
    conns = [k.connections[RESOURCE_NPU]]
    assert k.allocate(RESOURCE_NPU, HELD).container_responses[0].envs["ASCEND_VISIBLE_DEVICES"] == "6,7"
    with k._cond:
        k.pods["held"] = {RESOURCE_NPU: list(HELD)}  # a long-running pod: pod-resources reports it throughout
    load = KubeletLoad(p).start()
    outages: list[tuple[float, float]] = []
    figures: list[dict[str, float]] = []
    socket_path = p.plugin_dir / SOCKET
    try:
        for r in range(5):
            # a chip goes Critical and the kubelet hears of it before the kill
            p.fake("fake", "set-health", "-i", str(r), "Critical", "--code", "80E01801")
            k.wait_devices(RESOURCE_NPU, lambda ds, r=r: health(ds)[f"Ascend910-{r}"] == "Unhealthy")
            since = time.monotonic()
            k.wait(lambda s=since: load.successes("allocate", s) >= 3, 15, "Allocate calls under load")
            old_socket = os.stat(socket_path)
            killed_at = kill(p)
            orphan_s = wait_no_npu_smi(p)
            assert socket_path.exists()  # SIGKILL leaves the stale socket behind for the next start to replace
            if r:  # the previous chip recovers while no plugin runs: the new one must not carry stale health
                p.fake("fake", "set-health", "-i", str(r - 1), "OK")
            time.sleep(0.3)  # the outage goes on for a while under load
            started_wall, restarted_at = time.time(), time.monotonic()
            conn, registered_s, listed_s = restart(p)
            conns.append(conn)
            check_list(conn.lists[0], {f"Ascend910-{r}"}, f"round {r}, first list after the restart")
            new_socket = os.stat(socket_path)
            assert new_socket.st_mtime >= started_wall - 0.05 > old_socket.st_mtime, "the stale socket was reused"
            assert {n for n in os.listdir(p.plugin_dir) if n.endswith(".sock")} == {"kubelet.sock", SOCKET}
            listed = time.monotonic()
            k.wait(lambda t=listed: load.successes("allocate", t) >= 1, 15, "the caller to get through again")
            back = min(c.started for c in list(load.calls) if c.code == "OK" and c.started >= killed_at)
            outages.append((killed_at, back))  # until the first call that got through again
            figures.append({"registered_s": registered_s, "listed_s": listed_s, "outage_s": back - killed_at,
                            "caller_back_after_registration_s": back - restarted_at - registered_s,
                            "orphans_gone_s": orphan_s})
            assert registered_s < RESTART_BOUND_S and listed_s < RESTART_BOUND_S
    finally:
        load.close()
    p.assert_running()

    # Nothing lost on the kubelet's side: every list any kubelet connection ever received has the eight devices.
    for n, conn in enumerate(conns):
        for m, devices in enumerate(conn.lists):
            ids = [d.ID for d in devices]
            assert len(ids) == 8 and set(ids) == DEVICES, f"connection {n}, list {m}: {sorted(ids)}"
    check_list(k.wait_devices(RESOURCE_NPU), {"Ascend910-4"}, "at the end")
    assert k.pods["held"] == {RESOURCE_NPU: HELD}
    assert len([r for r in k.registrations if r.resource_name == RESOURCE_NPU]) >= 6

    # The caller: answers checked, failures only during outages, only gRPC errors, never past the deadline.
    assert not load.problems, load.problems[:10]
    slowest = max(c.seconds for c in load.calls)
    assert slowest <= CALL_DEADLINE_S + 0.5, f"a call took {slowest:.2f}s (deadline {CALL_DEADLINE_S}s)"
    unclean = [c for c in load.calls if c.code not in ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                                                       "FAILED_PRECONDITION")]
    assert not unclean, unclean[:5]
    outside = [c for c in load.calls if c.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
               and not any(a - CALL_DEADLINE_S <= c.started <= b for a, b in outages)]
    assert not outside, f"calls failed while the plugin was up: {outside[:5]}"
    # a refusal may only name a chip that went Critical before the kubelet's list said so
    refused = [c for c in load.calls if c.code == "FAILED_PRECONDITION"]
    assert all(set(c.devices) & {f"Ascend910-{r}" for r in range(5)} for c in refused), refused[:5]
    failed = [c for c in load.calls if c.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")]
    for a, b in outages:
        assert any(a - CALL_DEADLINE_S <= c.started <= b for c in failed), "the load never hit this outage"
    allocates = [c for c in load.calls if c.kind == "allocate"]
    print(f"\ndevice plugin SIGKILL under load: kills={len(outages)} calls={len(load.calls)} "
          f"allocate={len(allocates)} allocate_ok={sum(c.code == 'OK' for c in allocates)} "
          f"failed_in_outages={len(failed)} refused={len(refused)} admitted={load.admitted} devices_lost=0 "
          f"slowest_call={slowest:.3f}s registrations={len(k.registrations)}")
    for n, f in enumerate(figures):
        print(f"  round {n}: " + " ".join(f"{key}={value:.2f}" for key, value in f.items()))


def _hung_child(p: PluginUnderTest, command: str, timeout: float = 20.0) -> psutil.Process:
    """The plugin's npu-smi child running ``command`` once it is inside the injected hang (the fault is used up as
    the call reaches it; before that the child may still be starting, e.g. a pyenv shim)."""
    assert p.proc is not None
    daemon = psutil.Process(p.proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not json.loads(p.fake("fake", "show"))["faults"]:
            for child in daemon.children(recursive=True):
                try:
                    if " ".join(child.cmdline()).endswith(f"fake-npu-smi {command}"):
                        return child
                except psutil.NoSuchProcess:
                    continue
        p.assert_running()
        time.sleep(0.05)
    raise AssertionError(f"no npu-smi {command!r} hung in the plugin")


def test_sigkill_during_a_hung_npu_smi_leaves_no_orphan(plugin: PluginUnderTest) -> None:
    """SIGKILL cannot be handled, so nothing in the plugin kills its npu-smi children: they must die with it (the
    parent-death signal), not go on as orphans (a hung driver call, or a vNPU create finishing after the crash)."""
    p = plugin
    p.extra_args = ("--npu-smi-timeout", "60s")  # the plugin itself would never end these calls in time
    p.start()
    check_list(p.wait_ready(), set(), "first start")
    # a health poll hangs in the driver
    p.fake("fake", "inject", "info", "hang", "--seconds", "60", "--times", "1")
    hung = _hung_child(p, "info")
    kill(p)
    hung.wait(3)  # raises psutil.TimeoutExpired if it outlives the plugin
    wait_no_npu_smi(p)
    # the restarted plugin's discovery hangs too
    p.fake("fake", "inject", "info -t topo", "hang", "--seconds", "60", "--times", "1")
    p.start_kubelet = False  # the kubelet stand-in keeps running
    p.start()
    hung = _hung_child(p, "info -t topo")
    kill(p)
    hung.wait(3)
    wait_no_npu_smi(p)
    # and the next start is whole
    conn, registered_s, listed_s = restart(p)
    check_list(conn.lists[0], set(), "after two kills with npu-smi in flight")
    assert registered_s < RESTART_BOUND_S
    print(f"\nhung npu-smi kills=2 registered_s={registered_s:.2f} listed_s={listed_s:.2f}")
