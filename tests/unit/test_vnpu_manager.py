"""The vNPU manager and the device plugin's reconcile loop against an in-process npu-smi: dynamic vNPUs judged by
exactly the cores a container holds, static plan changes that wait for the surplus of a chip, pending creations
resolved after their grace whoever wrote them, records kept while a held vNPU is re-created, and the ledger's
durability."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU
from fuyao.inventory import NodeInventory, NpuDevice
from fuyao.kubeletapi.podresources.v1 import api_pb2 as pr
from fuyao.kubeletapi.podresources.v1 import api_pb2_grpc as pr_grpc
from fuyao.npusmi import NpuSmiCommandFailed, NpuSmiTimeout
from fuyao.npusmi.models import FreeTotal, NpuHealthState, VnpuEntry, VnpuInfo
from fuyao.vnpu import manager as m
from fuyao.vnpu.ledger import OWNER_STATIC, Ledger, VnpuRecord
from fuyao.vnpu.plan import DevicePlan, Plan
from fuyao.vnpu.templates import builtin_templates

T = {t.name: t for t in builtin_templates("910B3")}  # vir05_1c_16g 5/16G/1, vir10_3c_32g 10/32G/3
TEMPLATES = tuple(T.values())
CHIP = NpuDevice(id="Ascend910-0", npu_id=0, chip_id=0, physical_id=0, chip_model="910B3",
                 health=NpuHealthState.OK, aicore=20)
D = CHIP.id


def cores(ks: range) -> list[str]:
    return [f"{D}-c{k}" for k in ks]


class Driver:
    """npu-smi for 20-core, 7-AICPU 910B3 chips (one per npu id), in-process: it refuses what does not fit (as
    npu-smi checks AICores and AICPUs), shows containers bound to vNPUs, and fails on demand."""

    def __init__(self) -> None:
        self.vnpus: dict[int, dict[int, str]] = {}  # npu id → vNPU id → template
        self.bound: set[int] = set()  # vNPU ids a container uses (npu-smi shows its container id)
        self.ops: list[tuple[str, int | str]] = []
        self.info_faults: list[bool] = []  # one per info-vnpu call, first first: True → npu-smi fails
        self.create_timeouts = 0  # creations that time out before taking effect ...
        self.late: list[tuple[int, int, str]] = []  # ... and may still take effect in the driver (finish_late)

    def templates(self, npu_id: int | None = None) -> list[object]:
        raise NpuSmiCommandFailed("template-info is not supported", 1, "")

    def vnpu_info(self, npu_id: int, chip_id: int) -> VnpuInfo:
        if self.info_faults and self.info_faults.pop(0):
            raise NpuSmiCommandFailed("info-vnpu failed", 1, "")
        mine = self.vnpus.get(npu_id, {})
        used = sum(T[t].aicore for t in mine.values())
        cpus = sum(T[t].aicpu for t in mine.values())
        return VnpuInfo(resources={"AICORE": FreeTotal(free=20 - used, total=20),
                                   "Memory": FreeTotal(free=60, total=64),
                                   "AICPU": FreeTotal(free=7 - cpus, total=7)},
                        total_vnpus=len(mine),
                        vnpus=tuple(VnpuEntry(vnpu_id=i, vgroup_id=0, template=t,
                                              container_id="3f2a9c1d0b7e" if i in self.bound else "000000000000",
                                              status="1" if i in self.bound else "0") for i, t in mine.items()))

    def create_vnpu(self, npu_id: int, chip_id: int, template: str, vnpu_id: int | None = None) -> None:
        assert vnpu_id is not None
        if self.create_timeouts:
            self.create_timeouts -= 1
            self.late.append((npu_id, vnpu_id, template))
            raise NpuSmiTimeout(5.0, ("npu-smi", "set", "-t", "create-vnpu"))
        free = self.vnpu_info(npu_id, chip_id).resources
        if T[template].aicore > (free["AICORE"].free or 0) or T[template].aicpu > (free["AICPU"].free or 0) \
                or vnpu_id in self.vnpus.get(npu_id, {}):
            self.ops.append(("refused", template))
            raise NpuSmiCommandFailed("create vnpu failed.", 1, "")
        self.vnpus.setdefault(npu_id, {})[vnpu_id] = template
        self.ops.append(("create", vnpu_id))

    def destroy_vnpu(self, npu_id: int, chip_id: int, vnpu_id: int) -> None:
        if vnpu_id in self.bound or vnpu_id not in self.vnpus.get(npu_id, {}):
            raise NpuSmiCommandFailed(f"destroy vnpu {vnpu_id} failed.", 1, "")
        del self.vnpus[npu_id][vnpu_id]
        self.ops.append(("destroy", vnpu_id))

    def finish_late(self) -> None:
        """The killed npu-smi calls' creations take effect in the driver after all."""
        for npu_id, vnpu_id, template in self.late:
            self.vnpus.setdefault(npu_id, {})[vnpu_id] = template
        self.late.clear()


@pytest.fixture
def driver() -> Driver:
    return Driver()


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.json")


@pytest.fixture
def manager(driver: Driver, ledger: Ledger) -> m.VnpuManager:
    return m.VnpuManager(driver, ledger, [CHIP], templates=TEMPLATES)  # type: ignore[arg-type]


def later() -> float:
    """A kubelet answer old enough to judge every vNPU made so far (past any collect grace)."""
    return time.time() + 3600


def age(ledger: Ledger, record: VnpuRecord, seconds: float) -> VnpuRecord:
    older = record.model_copy(update={"at": record.at - seconds})
    with ledger.transaction():
        ledger.replace(record, older)
    return older


def test_a_kubelet_answer_asked_while_npu_smi_created_the_vnpu_does_not_judge_it(
        manager: m.VnpuManager, driver: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create that took longer than the grace (npu-smi slow, or killed at its timeout after acting): a reconcile
    that asked the kubelet meanwhile (no pod holds the cores yet: Allocate has not returned) waited for the ledger,
    then destroyed the vNPU Allocate was about to hand out. Its age counts from the create's end."""
    create = driver.create_vnpu

    def slow(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        create(*args, **kwargs)

    monkeypatch.setattr(driver, "create_vnpu", slow)
    began = time.time()
    record = manager.create_dynamic(D, cores(range(5)), TEMPLATES)
    asked = began + 0.2  # while npu-smi worked
    assert manager.collect_dynamic([], min_age_s=0.1, observed_at=asked) == ([], [])
    assert driver.vnpus[0] == {record.vnpu_id: record.template}
    # an answer asked a grace after the create ended, still without it: collected
    destroyed, _ = manager.collect_dynamic([], min_age_s=0.1, observed_at=time.time() + 0.2)
    assert [r.vnpu_id for r in destroyed] == [record.vnpu_id]


# --- dynamic vNPUs: held means exactly its cores --------------------------------------------------------------------
def test_a_dead_pods_vnpu_goes_although_a_new_pod_holds_a_superset_of_its_cores(manager: m.VnpuManager,
                                                                                   driver: Driver) -> None:
    """Pod A got c0-c4 (a vir05); A died; pod B got c0-c9 (a vir10). B holds every core of A's vNPU, but not A's
    allocation: A's vNPU must go, or it lives as long as B, its cores reported Unhealthy all that time."""
    a = manager.create_dynamic(D, cores(range(5)), TEMPLATES)
    b = manager.create_dynamic(D, cores(range(10)), TEMPLATES)
    assert (a.template, b.template) == ("vir05_1c_16g", "vir10_3c_32g")
    destroyed, errors = manager.collect_dynamic([frozenset(cores(range(10)))], observed_at=later())
    assert [r.vnpu_id for r in destroyed] == [a.vnpu_id] and not errors
    assert driver.vnpus[0] == {b.vnpu_id: "vir10_3c_32g"}
    # exactly its cores: kept; some of them only (a new pod given part of a dead pod's cores): not kept
    assert manager.collect_dynamic([frozenset(cores(range(10)))], observed_at=later()) == ([], [])
    assert [r.vnpu_id for r in manager.collect_dynamic([frozenset(cores(range(5)))], observed_at=later())[0]] \
        == [b.vnpu_id]


class _PerDeviceKubelet(pr_grpc.PodResourcesListerServicer):
    """The kubelet's List as it really answers: one ContainerDevices per device (and NUMA node), not one per
    resource (kubelet containerDevicesFromResourceDeviceInstances)."""

    def __init__(self, containers: dict[str, dict[str, list[str]]]):
        self.containers = containers

    def List(self, request: pr.ListPodResourcesRequest, context: grpc.ServicerContext) -> pr.ListPodResourcesResponse:
        return pr.ListPodResourcesResponse(pod_resources=[pr.PodResources(name="pod", namespace="ns", containers=[
            pr.ContainerResources(name=name, devices=[
                pr.ContainerDevices(resource_name=resource, device_ids=[device],
                                    topology=pr.TopologyInfo(nodes=[pr.NUMANode(ID=numa)]))
                for resource, devices in held.items() for device in devices for numa in (0, 1)])
            for name, held in self.containers.items()])])


@pytest.fixture
def per_device_kubelet(tmp_path: Path) -> Iterator[tuple[str, _PerDeviceKubelet]]:
    socket = str(tmp_path / "pod-resources.sock")
    servicer = _PerDeviceKubelet({})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pr_grpc.add_PodResourcesListerServicer_to_server(servicer, server)
    server.add_insecure_port("unix://" + socket)
    server.start()
    yield socket, servicer
    server.stop(0).wait(2)


def test_the_cores_each_container_holds_are_one_group_however_the_kubelet_splits_them(
        per_device_kubelet: tuple[str, _PerDeviceKubelet]) -> None:
    """The kubelet lists a container's devices one per entry: grouping per entry made every multi-core vNPU look
    held by nobody. A group is all the devices of one resource one container holds (its allocation)."""
    from fuyao.vnpu.usage import holdings

    socket, kubelet = per_device_kubelet
    kubelet.containers = {"main": {RESOURCE_NPU_CORE: cores(range(5))},
                          "side": {RESOURCE_NPU_CORE: cores(range(5, 7)), RESOURCE_NPU: ["Ascend910-3"]}}
    found = holdings(socket, (RESOURCE_NPU_CORE, RESOURCE_NPU))
    assert sorted(found.groups[RESOURCE_NPU_CORE], key=len) == [frozenset(cores(range(5, 7))),
                                                              frozenset(cores(range(5)))]
    assert found.groups[RESOURCE_NPU] == [frozenset({"Ascend910-3"})]
    assert found.devices[RESOURCE_NPU_CORE] == set(cores(range(7)))


# --- re-creating a held vNPU never loses its record ------------------------------------------------------------------
def test_a_held_vnpu_that_vanished_keeps_its_record_when_re_creating_it_fails(manager: m.VnpuManager,
                                                                               driver: Driver, ledger: Ledger) -> None:
    record = manager.create_dynamic(D, cores(range(5)), TEMPLATES)
    held = [frozenset(cores(range(5)))]
    driver.vnpus[0].clear()  # a reboot: the driver lost it; the container still holds its cores
    driver.info_faults = [False, True]  # the probe sees it absent, then npu-smi fails in the re-create
    destroyed, errors = manager.collect_dynamic(held, observed_at=later())
    assert not destroyed and errors and "info-vnpu failed" in errors[0]
    assert [(r.vnpu_id, r.owner, r.state) for r in ledger.records()] == [(record.vnpu_id, record.owner, "created")]
    driver.vnpus[0] = {110: "vir10_3c_32g", 111: "vir10_3c_32g"}  # someone else's: the driver refuses ours
    destroyed, errors = manager.collect_dynamic(held, observed_at=later())
    assert not destroyed and errors and "create vnpu failed" in errors[0]
    assert [(r.vnpu_id, r.state) for r in ledger.records()] == [(record.vnpu_id, "created")]
    del driver.vnpus[0][111]
    assert manager.collect_dynamic(held, observed_at=later()) == ([], [])  # the next round re-creates it
    assert driver.vnpus[0][record.vnpu_id] == "vir05_1c_16g"
    assert [(r.vnpu_id, r.owner, r.state) for r in ledger.records()] == [(record.vnpu_id, record.owner, "created")]


# --- static plan changes wait for the surplus of a chip --------------------------------------------------------------
def plan(*parts: tuple[str, int]) -> Plan:
    return Plan(devices=(DevicePlan(device_id=D, npu_id=0, chip_id=0, physical_id=0,
                                    parts=tuple((T[name], n) for name, n in parts)),))


def test_a_plan_change_on_a_chip_with_a_held_vnpu_waits_instead_of_churning(manager: m.VnpuManager,
                                                                            driver: Driver) -> None:
    """2 x vir10 → 4 x vir05 while a container holds vir10 100: the new vNPUs cannot fit until 100 is gone.
    Creating them anyway had the driver refuse one and the split roll back — destroy and create every round."""
    first = manager.apply(plan(("vir10_3c_32g", 2)), set(), held_whole=set())
    assert [r.vnpu_id for r in first.created] == [100, 101] and not first.errors
    quarters = plan(("vir05_1c_16g", 4))
    driver.ops.clear()
    rounds = []
    for destroyable in (set(), {(D, 101)}, {(D, 101)}, {(D, 101)}):  # 101 withdrawn, then destroyable
        report = manager.apply(quarters, {(D, 100)}, destroyable, held_whole=set())
        rounds.append((list(driver.ops), report.errors, report.deferred))
        driver.ops.clear()
    assert rounds == [([], [], [D]), ([("destroy", 101)], [], [D]), ([], [], [D]), ([], [], [D])]
    assert driver.vnpus[0] == {100: "vir10_3c_32g"}
    report = manager.apply(quarters, set(), {(D, 100)}, held_whole=set())  # the pod is gone
    assert not report.errors and not report.deferred and not report.rolled_back
    assert driver.ops == [("destroy", 100)] + [("create", i) for i in range(100, 104)]
    assert driver.vnpus[0] == dict.fromkeys(range(100, 104), "vir05_1c_16g")


def test_a_chip_whose_surplus_cannot_be_destroyed_gets_no_new_vnpus(manager: m.VnpuManager,
                                                                    driver: Driver) -> None:
    manager.apply(plan(("vir10_3c_32g", 2)), set(), held_whole=set())
    driver.bound = {101}  # npu-smi shows a container on it (the kubelet does not know): kept, the chip waits
    driver.ops.clear()
    report = manager.apply(plan(("vir05_1c_16g", 4)), set(), held_whole=set())
    assert driver.ops == [("destroy", 100)] and report.deferred == [D] and not report.errors
    report = manager.apply(plan(("vir05_1c_16g", 4)), None, held_whole=set())  # kubelet unknown: nothing goes
    assert report.deferred == [D] and [r.vnpu_id for r in report.in_use] == [101]
    driver.bound = set()
    report = manager.apply(plan(("vir05_1c_16g", 4)), set(), held_whole=set())
    assert not report.errors and len(report.created) == 4 and set(driver.vnpus[0].values()) == {"vir05_1c_16g"}


# --- pending creations ---------------------------------------------------------------------------------------------
def _dead_process() -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    import psutil

    started = psutil.Process(proc.pid).create_time()
    proc.wait(10)
    return proc.pid, started


def test_a_pending_record_of_another_process_waits_out_the_grace_too(manager: m.VnpuManager, driver: Driver,
                                                                      ledger: Ledger) -> None:
    """A plugin killed by its liveness probe while npu-smi created a vNPU (or a timed-out create of another
    process): the killed call may still finish in the driver. Absent now proves nothing until the grace is over."""
    pid, started = _dead_process()
    pending = VnpuRecord(vnpu_id=100, device_id=D, npu_id=0, chip_id=0, template="vir05_1c_16g",
                         owner=OWNER_STATIC, state="pending", at=time.time(), pid=pid, pid_started=started)
    ledger.put(pending)
    assert manager.recover() == [] and ledger.records() == [pending]  # absent, inside the grace: kept
    driver.vnpus[0] = {100: "vir05_1c_16g"}  # the driver finished it
    assert [r.vnpu_id for r in manager.recover()] == [100] and ledger.records()[0].state == "created"
    ledger.put(pending.model_copy(update={"vnpu_id": 101}))
    assert manager.recover() == [] and len(ledger.records()) == 2
    age(ledger, next(r for r in ledger.records() if r.vnpu_id == 101), m.PENDING_GRACE_S + 1)
    manager.recover()
    assert [r.vnpu_id for r in ledger.records()] == [100]  # never appeared within the grace: dropped


def test_a_retried_allocate_reuses_the_pending_creation_instead_of_making_a_second_vnpu(
        manager: m.VnpuManager, driver: Driver, ledger: Ledger) -> None:
    driver.create_timeouts = 1
    with pytest.raises(m.VnpuOutcomeUnknown):
        manager.create_dynamic(D, cores(range(5)), TEMPLATES)
    driver.ops.clear()
    with pytest.raises(m.VnpuOutcomeUnknown, match=r"vNPU 100 .*retry in \d+ s"):  # the kubelet retries Allocate
        manager.create_dynamic(D, cores(range(5)), TEMPLATES)
    assert driver.ops == [] and [(r.vnpu_id, r.state) for r in ledger.records()] == [(100, "pending")]
    driver.finish_late()
    record = manager.create_dynamic(D, cores(range(5)), TEMPLATES)  # it appeared: adopted, not made twice
    assert (record.vnpu_id, record.state) == (100, "created") and driver.ops == []
    assert driver.vnpus[0] == {100: "vir05_1c_16g"}
    # a timed-out creation that never appears: refused within the grace, then made anew
    driver.create_timeouts = 1
    with pytest.raises(m.VnpuOutcomeUnknown):
        manager.create_dynamic(D, cores(range(10, 15)), TEMPLATES)
    driver.late.clear()  # the driver never acts
    pending = next(r for r in ledger.records() if r.state == "pending")
    age(ledger, pending, m.PENDING_GRACE_S + 1)
    again = manager.create_dynamic(D, cores(range(10, 15)), TEMPLATES)
    assert again.state == "created" and driver.vnpus[0][again.vnpu_id] == "vir05_1c_16g"
    assert sorted((r.vnpu_id, r.state) for r in ledger.records()) == [(100, "created"), (again.vnpu_id, "created")]


# --- the device plugin's loop ----------------------------------------------------------------------------------------
def _control(tmp_path: Path, driver: Driver, monkeypatch: pytest.MonkeyPatch, mode: str):  # type: ignore[no-untyped-def]
    from fuyao.deviceplugin import vnpu_control
    from fuyao.deviceplugin.config import build_config
    from fuyao.deviceplugin.devices import ChipHealth
    from fuyao.deviceplugin.metrics import PluginMetrics
    from fuyao.vnpu.usage import Holdings

    nobody = Holdings(holders={RESOURCE_NPU: {}, RESOURCE_NPU_CORE: {}, RESOURCE_VNPU: {}},
                      exclusive_cpus=frozenset(), groups={})
    monkeypatch.setattr(vnpu_control, "holdings", lambda *args, **kwargs: nobody)
    inventory = NodeInventory(chip_model="910B3", driver_version=None, tool_version=None, devices=(CHIP,),
                              groups=(), numa_source="unknown")
    config = build_config(None, {"vnpu.mode": mode, "vnpu.ledger": str(tmp_path / "ledger.json"),
                                 "vnpu.reconcile_interval": 0.05, "vnpu.collect_grace": 0.01})
    return vnpu_control.VnpuControl(inventory, config, driver, ChipHealth(inventory.devices),  # type: ignore[arg-type]
                                    PluginMetrics("node"))


def test_the_reconcile_loop_starts_although_the_first_reconcile_fails(tmp_path: Path, driver: Driver,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamic mode with a static vNPU left from static mode, npu-smi failing at start: the first reconcile fails.
    The loop must start anyway and retry (it used to never start: the leftover lived until the next restart)."""
    driver.vnpus[0] = {100: "vir10_3c_32g"}
    Ledger(tmp_path / "ledger.json").put(VnpuRecord(vnpu_id=100, device_id=D, npu_id=0, chip_id=0,
                                                    template="vir10_3c_32g", owner=OWNER_STATIC, state="created",
                                                    at=0.0))
    control = _control(tmp_path, driver, monkeypatch, "dynamic")
    driver.info_faults = [True] * 50  # npu-smi fails every info-vnpu for a while
    try:
        control.start()
        assert control._thread is not None and control._thread.is_alive()
        driver.info_faults = []
        deadline = time.monotonic() + 10
        while driver.vnpus[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert driver.vnpus[0] == {} and Ledger(tmp_path / "ledger.json").records() == []
    finally:
        control.stop()


def test_a_retiring_slice_is_timed_from_its_withdrawal_not_from_the_rounds_start(
        tmp_path: Path, driver: Driver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice the plan drops is destroyed a grace after it stopped being offered. It is withdrawn once apply
    returns, and apply can take seconds (npu-smi creates on other chips): timed from the round's start, it was
    destroyed up to that long early, while a container the kubelet gave it just before the withdrawal was
    starting."""
    control = _control(tmp_path, driver, monkeypatch, "static")
    clock = _Clock()
    control.manager.clock = clock
    record = VnpuRecord(vnpu_id=100, device_id=D, npu_id=0, chip_id=0, template="vir10_3c_32g", owner=OWNER_STATIC,
                        state="created", at=0.0)

    def slow_apply(*args, **kwargs) -> m.ApplyReport:  # type: ignore[no-untyped-def]
        clock.now += 10
        return m.ApplyReport(retiring=[record])

    monkeypatch.setattr(control.manager, "apply", slow_apply)
    monkeypatch.setattr(control, "_current_plan", lambda: Plan(devices=()))
    control.held_at = time.time()
    control._reconcile_static(set())
    assert control._retiring == {(D, 100): 1010.0}  # withdrawn when apply returned


def test_whatever_the_first_reconcile_raises_the_loop_starts_and_retries(tmp_path: Path, driver: Driver,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    control = _control(tmp_path, driver, monkeypatch, "dynamic")
    rounds: list[float] = []

    def reconcile() -> None:
        rounds.append(time.monotonic())
        if len(rounds) == 1:
            raise NpuSmiCommandFailed("info-vnpu failed", 1, "")

    monkeypatch.setattr(control, "reconcile", reconcile)
    try:
        control.start()  # logs the failure (retried every 0.05s), never raises
        deadline = time.monotonic() + 10
        while len(rounds) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(rounds) >= 3
    finally:
        control.stop()


# --- the ledger ------------------------------------------------------------------------------------------------------
def test_the_ledger_syncs_its_directory_after_each_rename(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename is durable only once its directory is synced: a power loss could otherwise bring back the ledger
    from before a create (a vNPU made, its record gone)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ledger.put(VnpuRecord(vnpu_id=100, device_id=D, npu_id=0, chip_id=0, template="vir05_1c_16g", owner=OWNER_STATIC,
                          state="created", at=0.0))
    assert synced == ["file", "dir", "file", "dir"]  # the ledger, then its backup: each written, then renamed



# --- a die is withdrawn from whole offers before it is carved --------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_free_die_is_carved_only_after_it_was_withdrawn_from_whole_offers_for_the_grace(
        manager: m.VnpuManager, driver: Driver) -> None:
    """The kubelet may hand the die out whole in the moment before the plugin stops offering it (and shows that
    only after Allocate returns): carving it at once gave its vNPUs to other pods while that container used it."""
    clock = _Clock()
    manager.clock = clock
    halves = plan(("vir10_3c_32g", 2))
    report = manager.apply(halves, set(), held_whole=set(), withdraw_grace=30)
    assert report.withdrawing == [D] and not report.created and driver.vnpus == {}  # the caller withdraws it now
    assert report.summary()["waiting_for_withdrawal"] == [D]
    clock.now += 29
    assert manager.apply(halves, set(), held_whole=set(), withdraw_grace=30).withdrawing == [D]
    clock.now += 2  # withdrawn past the grace, but the kubelet's fresh answer shows it handed out whole meanwhile
    report = manager.apply(halves, set(), held_whole={D}, withdraw_grace=30)
    assert report.waiting == [D] and not report.created and driver.vnpus == {}
    clock.now += 60  # released: a fresh grace, counted from now
    assert manager.apply(halves, set(), held_whole=set(), withdraw_grace=30).withdrawing == [D]
    clock.now += 30
    report = manager.apply(halves, set(), held_whole=set(), withdraw_grace=30)
    assert [r.vnpu_id for r in report.created] == [100, 101] and not report.withdrawing


def test_the_withdrawal_grace_runs_from_the_withdrawal_to_the_question(manager: m.VnpuManager,
                                                                          driver: Driver) -> None:
    """The grace is what the kubelet had to record a whole-die Allocate made just before the withdrawal: it runs from
    when the caller stopped offering the die (after an apply that may take seconds) to when the kubelet was asked
    (before the next apply), not from one apply's start to the next's."""
    clock = _Clock()
    manager.clock = clock
    halves = plan(("vir10_3c_32g", 2))
    assert manager.apply(halves, set(), held_whole=set(), withdraw_grace=30, asked_at=999).withdrawing == [D]
    clock.now += 10  # the rest of that round's apply (slow creates on other chips), then the withdrawal
    manager.withdrawn_at(clock.now)
    clock.now += 26  # 36 s after the first apply, but the question was only 25 s after the withdrawal
    report = manager.apply(halves, set(), held_whole=set(), withdraw_grace=30, asked_at=clock.now - 1)
    assert report.withdrawing == [D] and driver.vnpus == {}
    clock.now += 6  # asked 30 s after the withdrawal, still free: carved
    report = manager.apply(halves, set(), held_whole=set(), withdraw_grace=30, asked_at=clock.now - 1)
    assert [r.vnpu_id for r in report.created] == [100, 101] and not report.withdrawing
    # a caller that offers no die whole: carved at once, whatever the question's time
    other = m.VnpuManager(Driver(), Ledger(manager.ledger.path.parent / "other.json"), [CHIP],  # type: ignore[arg-type]
                          templates=TEMPLATES)
    assert len(other.apply(halves, set(), held_whole=set(), withdraw_grace=0, asked_at=0.0).created) == 2


# --- AICPUs: before and after SR-IOV ---------------------------------------------------------------------------------
B4 = NpuDevice(id="Ascend910-0", npu_id=0, chip_id=0, physical_id=0, chip_model="910B4", health=NpuHealthState.OK,
               aicore=20)
B4_T = {t.name: t for t in builtin_templates("910B4")}


class SriovDriver(Driver):
    """A 910B4 as npu-smi shows it: 6 AICPUs while it has no vNPU, 7 once one exists (SR-IOV turns data CPUs into
    AICPUs)."""

    def vnpu_info(self, npu_id: int, chip_id: int) -> VnpuInfo:
        mine = self.vnpus.get(npu_id, {})
        total = 7 if mine else 6
        return VnpuInfo(resources={"AICORE": FreeTotal(free=20 - sum(B4_T[t].aicore for t in mine.values()), total=20),
                                   "Memory": FreeTotal(free=28, total=32),
                                   "AICPU": FreeTotal(free=total - sum(B4_T[t].aicpu for t in mine.values()),
                                                      total=total)},
                        total_vnpus=len(mine),
                        vnpus=tuple(VnpuEntry(vnpu_id=i, vgroup_id=0, template=t, container_id="000000000000",
                                              status="0") for i, t in mine.items()))

    def create_vnpu(self, npu_id: int, chip_id: int, template: str, vnpu_id: int | None = None) -> None:
        assert vnpu_id is not None
        self.vnpus.setdefault(npu_id, {})[vnpu_id] = template


def test_the_aicpu_budget_of_an_uncarved_chip_counts_the_aicpus_sr_iov_adds(tmp_path: Path) -> None:
    """An uncarved 910B4 reports 6/6 AICPUs, 1/7 after two vir10_3c_16g: planning with the 6 refused the media half
    beside the media-less one (4 + 3 = 7 AICPUs) until some vNPU happened to exist."""
    from fuyao.vnpu.plan import make_plan, parse_vnpu_config

    driver = SriovDriver()
    manager = m.VnpuManager(driver, Ledger(tmp_path / "l.json"), [B4], templates=tuple(B4_T.values()))  # type: ignore[arg-type]
    config = parse_vnpu_config({"devices": [{"device_id": "0", "mix": {"vir10_4c_16g_m": 1, "vir10_3c_16g_nm": 1}}]})
    for state in ({}, {100: "vir10_3c_16g"}):  # uncarved, then with a vNPU of another tool on it
        driver.vnpus[0] = dict(state)
        cap = manager.capacity(D)
        assert cap is not None and cap.aicpu == 7
    driver.vnpus[0] = {}
    uncarved = manager.capacity(D, for_plan=True)
    assert uncarved is not None and uncarved.aicpu == 7
    made = make_plan(config, [B4], tuple(B4_T.values()), {D: uncarved})
    report = manager.apply(made, set(), held_whole=set())
    assert not report.errors and sorted(driver.vnpus[0].values()) == ["vir10_3c_16g_nm", "vir10_4c_16g_m"]
    assert manager.capacity(D, for_plan=True).aicpu == 7  # type: ignore[union-attr]  # free 0 + ours 7: the same


# --- vNPU ids per product ---------------------------------------------------------------------------------------------
def test_a_310p_chip_uses_only_its_eight_documented_vnpu_ids(driver: Driver, tmp_path: Path) -> None:
    chip = NpuDevice(id="Ascend310P-1", npu_id=1, chip_id=0, physical_id=1, chip_model="310P3",
                     health=NpuHealthState.OK, aicore=8)
    ledger = Ledger(tmp_path / "l.json")
    manager = m.VnpuManager(driver, ledger, [chip], templates=TEMPLATES)  # type: ignore[arg-type]
    with pytest.raises(m.VnpuError, match=r"vNPU 124 .*310P3 with physical id 1 has vNPU ids 116\.\.123"):
        manager.create(chip.id, T["vir05_1c_16g"], OWNER_STATIC, vnpu_id=124)
    for i in range(116, 124):  # every id of the chip taken (by records of ours)
        ledger.put(VnpuRecord(vnpu_id=i, device_id=chip.id, npu_id=1, chip_id=0, template="vir05_1c_16g",
                              owner=OWNER_STATIC, state="created", at=0.0))
    with pytest.raises(m.VnpuError, match=r"no free vNPU id: .*116\.\.123, all taken"):
        manager.create(chip.id, T["vir05_1c_16g"], OWNER_STATIC)
    assert driver.ops == []  # npu-smi was never asked for an id the driver refuses


# --- a held vNPU's re-create that never takes effect -----------------------------------------------------------------
def test_a_held_vnpus_re_create_that_times_out_and_never_appears_keeps_its_record(
        manager: m.VnpuManager, driver: Driver, ledger: Ledger) -> None:
    """The re-create of a vanished vNPU a container holds times out and never takes effect: once its grace was
    over, the pending record was dropped — the container's vNPU forgotten, never re-created again."""
    record = manager.create_dynamic(D, cores(range(5)), TEMPLATES)
    held = [frozenset(cores(range(5)))]
    driver.vnpus[0].clear()  # a reboot
    driver.create_timeouts = 1
    destroyed, errors = manager.collect_dynamic(held, observed_at=later())
    assert not destroyed and errors and "unknown outcome" in errors[0]
    driver.late.clear()  # the killed call never takes effect
    pending = ledger.records()[0]
    assert (pending.state, pending.recreate) == ("pending", True)
    age(ledger, pending, m.PENDING_GRACE_S + 1)
    manager.recover()
    assert [(r.vnpu_id, r.owner, r.state, r.recreate) for r in ledger.records()] == [
        (record.vnpu_id, record.owner, "created", False)]
    assert manager.collect_dynamic(held, observed_at=later()) == ([], [])  # re-created at last
    assert driver.vnpus[0] == {record.vnpu_id: "vir05_1c_16g"}
    assert [(r.vnpu_id, r.state) for r in ledger.records()] == [(record.vnpu_id, "created")]
