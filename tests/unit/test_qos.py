"""QoS agent: cgroup layouts (v1/v2 x cgroupfs/systemd, real file names and formats), the batch formula, CPU
suppression with hysteresis, eviction order and stop condition, a full cycle against a temp cgroup tree."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fuyao.contracts import QoSClass
from fuyao.qos import cgroups, policy
from fuyao.qos.agent import DEFAULT_CONVERSION, Agent, Report
from fuyao.qos.collect import Collector, HostReading
from fuyao.qos.config import ConfigError, build_config
from fuyao.qos.kube import NodeState, pod_facts
from fuyao.qos.metrics import AgentMetrics
from tests.support.cgroups import FakeCgroupTree

GiB = 2**30
LAYOUTS = [(1, "cgroupfs"), (1, "systemd"), (2, "cgroupfs"), (2, "systemd")]
UID_LS, UID_BE, UID_BE2 = "0a1b2c3d-0000-4000-8000-00000000000a", "0a1b2c3d-0000-4000-8000-00000000000b", \
    "0a1b2c3d-0000-4000-8000-00000000000c"


@pytest.mark.parametrize(("version", "driver"), LAYOUTS)
def test_layouts_are_detected_and_pods_found_read_and_written(tmp_path: Path, version: int, driver: str) -> None:
    tree = FakeCgroupTree(tmp_path, version, driver)  # type: ignore[arg-type]
    tree.add_pod(UID_LS, "guaranteed", cpu_ns=5_000_000_000, memory=3 * GiB, inactive_file=GiB, quota_us=200_000)
    tree.add_pod(UID_BE, "besteffort", cpu_ns=7_000_000_000, memory=GiB, shares=2)
    layout = cgroups.detect(tmp_path)
    assert (layout.version, layout.driver) == (version, driver)
    pods = cgroups.pod_cgroups(layout)
    assert set(pods) == {UID_LS, UID_BE}  # systemd's underscores turned back into dashes
    assert pods[UID_LS].tier == "guaranteed" and pods[UID_BE].tier == "besteffort"
    assert cgroups.cpu_usage_ns(layout, pods[UID_LS]) == 5_000_000_000
    assert cgroups.memory_working_set(layout, pods[UID_LS]) == 2 * GiB  # usage - inactive file
    assert cgroups.cpu_limit(layout, pods[UID_LS]) == cgroups.CpuLimit(200_000, 100_000)
    assert cgroups.cpu_limit(layout, pods[UID_BE]).quota_us is None
    for write in cgroups.cpu_limit_write(layout, pods[UID_BE], cgroups.CpuLimit(50_000)):
        cgroups.apply(write)
    assert tree.quota(UID_BE) == ("50000 100000" if version == 2 else "50000")
    for write in cgroups.cpu_limit_write(layout, pods[UID_BE], cgroups.CpuLimit(None)):
        cgroups.apply(write)
    assert tree.quota(UID_BE) == ("max 100000" if version == 2 else "-1")
    cgroups.apply(cgroups.cpu_weight_write(layout, pods[UID_LS], 2))
    assert tree.weight(UID_LS) == ("1" if version == 2 else "2")


@pytest.mark.parametrize(("version", "driver"), LAYOUTS)
def test_kubepods_under_a_kubelet_cgroup_root_are_found(tmp_path: Path, version: int, driver: str) -> None:
    """A kubelet with ``cgroupRoot: /kubelet`` (every kind node) nests kubepods one level down; systemd names the
    slices after their parents (``kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice``)."""
    tree = FakeCgroupTree(tmp_path, version, driver, kubelet_root="kubelet")  # type: ignore[arg-type]
    tree.add_pod(UID_LS, "guaranteed", cpu_ns=3_000_000_000)
    tree.add_pod(UID_BE, "besteffort", cpu_ns=1_000_000_000)
    layout = cgroups.detect(tmp_path)
    assert layout.kubepods == ("kubelet.slice/kubelet-kubepods.slice" if driver == "systemd" else "kubelet/kubepods")
    pods = cgroups.pod_cgroups(layout)
    assert {uid: pod.tier for uid, pod in pods.items()} == {UID_LS: "guaranteed", UID_BE: "besteffort"}
    assert cgroups.cpu_usage_ns(layout, pods[UID_BE]) == 1_000_000_000
    # two kubelets' trees side by side: which one is this node's is not guessed
    FakeCgroupTree(tmp_path, version, driver, kubelet_root="other")  # type: ignore[arg-type]
    with pytest.raises(cgroups.CgroupError, match="several kubepods cgroups"):
        cgroups.detect(tmp_path)


def test_no_kubepods_hierarchy_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(cgroups.CgroupError, match="no kubepods cgroup under"):
        cgroups.detect(tmp_path)


def test_shares_to_weight_matches_runc() -> None:
    assert [cgroups.shares_to_weight(s) for s in (2, 1024, 262144)] == [1, 39, 10000]


def test_malformed_cgroup_files_name_the_file(tmp_path: Path) -> None:
    tree = FakeCgroupTree(tmp_path, 2)
    tree.add_pod(UID_BE, "besteffort")
    layout = cgroups.detect(tmp_path)
    group = cgroups.pod_cgroups(layout)[UID_BE]
    (tree.dirs[UID_BE] / "cpu.max").write_text("garbage\n")
    with pytest.raises(cgroups.CgroupError, match=r"cpu\.max"):
        cgroups.cpu_limit(layout, group)
    (tree.dirs[UID_BE] / "memory.current").write_text("lots\n")
    with pytest.raises(cgroups.CgroupError, match=r"memory\.current: expected an integer"):
        cgroups.memory_working_set(layout, group)


# --- policy ----------------------------------------------------------------------------------------------------------
CONFIG = build_config({})
QUOTA_POLICY = build_config({"nodeName": "n1", "cpuSuppress": {"policy": "cfsQuota"}})


def pod(uid: str, qos: QoSClass, cpu: int = 0, memory: int = 0, *, peak_cpu: int | None = None,
        priority: int = 0, limit: int | None = None, terminating: bool = False) -> policy.PodSample:
    return policy.PodSample(uid=uid, namespace="default", name=uid, qos=qos, known=True, priority=priority,
                            terminating=terminating, cpu_limit_milli=limit, cpu_milli=cpu,
                            cpu_peak_milli=cpu if peak_cpu is None else peak_cpu, memory_bytes=memory,
                            memory_peak_bytes=memory)


def test_batch_resources_follow_the_formula() -> None:
    node = policy.NodeSample(cpu_capacity_milli=32_000, memory_capacity_bytes=128 * GiB, cpu_reserved_milli=2_000,
                             memory_reserved_bytes=4 * GiB, cpu_used_milli=15_000, memory_used_bytes=60 * GiB,
                             system_cpu_peak_milli=3_000, system_memory_peak_bytes=2 * GiB)
    pods = [pod("ls", QoSClass.LS, 6_000, 40 * GiB, peak_cpu=8_000), pod("be", QoSClass.BE, 4_000, 10 * GiB)]
    batch = policy.batch_resources(node, pods, CONFIG)
    # 32000 x 65% - max(3000 system, 2000 reserved) - 8000 LS peak (BE usage not subtracted)
    assert batch.cpu_milli == 20_800 - 3_000 - 8_000
    # 128Gi x 65% - max(2Gi, 4Gi reserved) - 40Gi
    assert batch.memory_bytes == int(128 * GiB * 0.65) - 4 * GiB - 40 * GiB
    hot = [pod("ls", QoSClass.LS, 30_000, 100 * GiB)]
    assert policy.batch_resources(node, hot, CONFIG).cpu_milli == 0  # never negative
    unknown = policy.PodSample(uid="x", qos=QoSClass.BE, known=False, cpu_milli=8_000, cpu_peak_milli=8_000)
    assert policy.batch_resources(node, [unknown], CONFIG).cpu_milli == 20_800 - 3_000 - 8_000  # unknown → LS
    assert policy.changed_enough(None, 5, 100, 5) and not policy.changed_enough(100, 104, 100, 5)
    assert policy.changed_enough(100, 106, 100, 5)


def test_cpu_suppression_and_restore_with_hysteresis() -> None:
    node = policy.NodeSample(cpu_capacity_milli=10_000, memory_capacity_bytes=GiB, cpu_used_milli=0)

    def step(ls_cpu: int, was: bool) -> policy.SuppressPlan:
        pods = [pod("ls", QoSClass.LS, ls_cpu), pod("be1", QoSClass.BE, 1_000),
                pod("be2", QoSClass.BE, 1_000, limit=500)]
        used = policy.NodeSample(cpu_capacity_milli=node.cpu_capacity_milli, memory_capacity_bytes=GiB,
                                 cpu_used_milli=ls_cpu + 2_000 + 500)  # 500m system
        return policy.cpu_suppress(used, pods, CONFIG, was)

    calm = step(5_000, False)  # 5.5 of 10 cores: below 65%
    assert not calm.active and calm.limits == {"be1": None, "be2": 500}  # their own limits
    hot = step(6_500, False)  # 7.0 > 6.5
    assert hot.active and hot.be_allowed_milli == 100  # 6500 - 7000 < min: the floor
    assert hot.limits == {"be1": 50, "be2": 50}
    warm = step(6_000, True)  # 6.5: above 60% (65 - 5 hysteresis): stays suppressed
    assert warm.active and warm.be_allowed_milli == 100
    easing = step(4_000, True)  # 4.5 < 6.0: lifted
    assert not easing.active and easing.limits["be1"] is None
    assert step(6_000, False).active is False  # the same load without history does not start suppression
    assert policy.quota_us(50, 100_000) == 5_000 and policy.quota_us(0, 100_000) == policy.MIN_QUOTA_US


def test_memory_eviction_order_and_stop_condition() -> None:
    node = policy.NodeSample(cpu_capacity_milli=1_000, memory_capacity_bytes=100 * GiB, memory_used_bytes=90 * GiB)
    pods = [pod("ls-big", QoSClass.LS, memory=40 * GiB),
            pod("be-low-small", QoSClass.BE, memory=3 * GiB, priority=0),
            pod("be-low-big", QoSClass.BE, memory=6 * GiB, priority=0),
            pod("be-high", QoSClass.BE, memory=20 * GiB, priority=100),
            pod("be-going", QoSClass.BE, memory=2 * GiB, terminating=True)]
    chosen = [e.pod.uid for e in policy.memory_evictions(node, pods, CONFIG)]
    # 90 - 2 (already terminating) = 88 → evict lowest priority, largest first, until <= 80
    assert chosen == ["be-low-big", "be-low-small"]  # 88 - 6 - 3 = 79: stop; LS never chosen
    calm = policy.NodeSample(cpu_capacity_milli=1_000, memory_capacity_bytes=100 * GiB, memory_used_bytes=85 * GiB)
    assert policy.memory_evictions(calm, pods, CONFIG) == []  # not above 85%
    desperate = policy.NodeSample(cpu_capacity_milli=1_000, memory_capacity_bytes=100 * GiB,
                                  memory_used_bytes=99 * GiB)
    assert [e.pod.uid for e in policy.memory_evictions(desperate, pods, CONFIG)] == [
        "be-low-big", "be-low-small", "be-high"]  # all BE, still never LS
    assert "above the 85% watermark" in policy.memory_evictions(node, pods, CONFIG)[0].reason


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="memoryEviction"):
        build_config({"memoryEviction": {"highPercent": 50, "lowPercent": 60}})
    with pytest.raises(ConfigError, match="interval"):
        build_config({"interval": "soon"})
    with pytest.raises(ConfigError, match="cpuSupress"):
        build_config({"cpuSupress": {}})


def test_pod_facts_from_the_api_object() -> None:
    raw = {"metadata": {"uid": UID_BE, "name": "train", "namespace": "jobs", "labels": {"volcano.sh/qos": "BE"},
                        "deletionTimestamp": "2026-11-30T00:00:00Z"},
           "spec": {"priority": -10, "containers": [{"resources": {"limits": {"cpu": "1500m"}}},
                                                    {"resources": {"limits": {"cpu": "2"}}}]}}
    uid, facts = pod_facts(raw)  # type: ignore[misc]
    assert uid == UID_BE and facts.qos == QoSClass.BE and facts.priority == -10 and facts.terminating
    assert facts.cpu_limit_milli == 3_500
    raw["spec"]["containers"].append({"resources": {}})
    assert pod_facts(raw)[1].cpu_limit_milli is None  # type: ignore[index]
    assert pod_facts({"metadata": {}}) is None


def test_pod_totals_follow_the_kubelets_rule_for_init_containers_sidecars_and_overhead() -> None:
    """The pod cgroup the kubelet makes: max(app containers + sidecars, each init container + the sidecars started
    before it), plus the RuntimeClass overhead; sidecars run beside the app and get their own cgroups (their ids
    come from initContainerStatuses)."""
    def c(name: str, cpu: str, memory: str, **extra: str) -> dict:  # type: ignore[type-arg]
        return {"name": name, "resources": {"limits": {"cpu": cpu, "memory": memory},
                                            "requests": {"cpu": cpu}}, **extra}

    raw = {"metadata": {"uid": UID_BE, "name": "p", "namespace": "d"},
           "spec": {"initContainers": [c("setup", "4", "8Gi"), c("proxy", "500m", "1Gi", restartPolicy="Always"),
                                       c("late-init", "1", "1Gi")],
                    "containers": [c("main", "1", "1Gi")], "overhead": {"cpu": "250m", "memory": "64Mi"}},
           "status": {"containerStatuses": [{"name": "main", "containerID": "containerd://m"}],
                      "initContainerStatuses": [{"name": "proxy", "containerID": "containerd://p"},
                                                {"name": "setup", "containerID": "containerd://s"}]}}
    _uid, facts = pod_facts(raw)  # type: ignore[misc]
    assert facts.cpu_limit_milli == 4_000 + 250  # the first init container is the peak
    assert facts.memory_limit_bytes == 8 * GiB + 64 * 2**20
    assert facts.cpu_request_milli == 4_250
    assert [(x.name, x.container_id) for x in facts.containers] == [("main", "containerd://m"),
                                                                    ("proxy", "containerd://p")]
    raw["spec"]["initContainers"] = [c("proxy", "500m", "1Gi", restartPolicy="Always"), c("late-init", "1", "1Gi")]
    _uid, facts = pod_facts(raw)  # type: ignore[misc]
    assert facts.cpu_limit_milli == 1_500 + 250  # app + sidecar (1.5) vs late-init + sidecar (1.5)
    raw["spec"]["initContainers"].append({"name": "open", "resources": {}})
    assert pod_facts(raw)[1].cpu_limit_milli is None  # type: ignore[index]  # an init container without limits


# --- a whole cycle ---------------------------------------------------------------------------------------------------
class FakeHost:
    """Host readings advancing by one second per sample, with busy CPU and memory the test sets."""

    def __init__(self) -> None:
        self.at, self.busy, self.memory = 1000.0, 0.0, 10 * GiB
        self.cpu_milli = 0
        self.io = (0, 0, 0, 0)

    def __call__(self) -> HostReading:
        self.at += 1.0
        self.busy += self.cpu_milli / 1000
        self.io = tuple(x + step for x, step in zip(self.io, (100, 200, 300, 400), strict=True))
        return HostReading(at=self.at, cpu_busy_s=self.busy, memory_used_bytes=self.memory,
                           memory_total_bytes=64 * GiB, cpus=8, io_bytes=self.io)


def _state(*pods: dict) -> NodeState:  # type: ignore[type-arg]
    state = NodeState()
    NodeState._Node(state).replace([{"metadata": {"name": "n1"}, "status": {
        "capacity": {"cpu": "8", "memory": "64Gi"}, "allocatable": {"cpu": "7", "memory": "60Gi"}}}])
    NodeState._Pods(state).replace(list(pods))
    return state


def _raw(uid: str, qos: str | None, limit: str | None = None) -> dict:  # type: ignore[type-arg]
    return {"metadata": {"uid": uid, "name": uid[-1], "namespace": "default",
                         "labels": {"volcano.sh/qos": qos} if qos else {}},
            "spec": {"containers": [{"resources": {"limits": {"cpu": limit}} if limit else {}}]}}


class RecordingPublisher:
    def __init__(self) -> None:
        self.batch: list[tuple[int, int]] = []
        self.usages: list[object] = []

    def batch_resources(self, cpu: int, memory: int) -> None:
        self.batch.append((cpu, memory))

    def usage(self, usage: object) -> None:
        self.usages.append(usage)


@pytest.mark.parametrize(("version", "driver"), [(1, "systemd"), (2, "cgroupfs")])
def test_a_cycle_suppresses_be_pods_restores_them_and_publishes(tmp_path: Path, version: int, driver: str) -> None:
    tree = FakeCgroupTree(tmp_path, version, driver)  # type: ignore[arg-type]
    tree.add_pod(UID_LS, "burstable", memory=8 * GiB)
    tree.add_pod(UID_BE, "besteffort", memory=GiB)
    tree.add_pod(UID_BE2, "burstable", memory=GiB, quota_us=100_000)  # a BE pod with its own 1-CPU limit
    host = FakeHost()
    publisher = RecordingPublisher()
    agent = Agent(QUOTA_POLICY, Collector(cgroups.detect(tmp_path), 3, host), AgentMetrics(),
                  _state(_raw(UID_LS, None), _raw(UID_BE, "BE"), _raw(UID_BE2, "BE", "1")), publisher)  # type: ignore[arg-type]
    first = agent.cycle()
    assert first.cgroup_writes == [] and any("first sample" in n for n in first.notes)

    def advance(ls_cores: float, be_cores: float) -> Report:
        for uid, cores in ((UID_LS, ls_cores), (UID_BE, be_cores), (UID_BE2, 0.0)):
            current = cgroups.cpu_usage_ns(agent.collector.layout, cgroups.pod_cgroups(agent.collector.layout)[uid])
            tree.set_usage(uid, cpu_ns=current + int(cores * 1e9))
        host.cpu_milli = int((ls_cores + be_cores) * 1000) + 500
        return agent.cycle()

    calm = advance(2.0, 1.0)
    assert not calm.suppress["active"]
    assert calm.node_io_bytes_per_second == {"disk_read": 100, "disk_write": 200, "net_rx": 300, "net_tx": 400}
    assert {Path(w.path).resolve() for w in calm.cgroup_writes} == {
        (tree.dirs[u] / ("cpu.weight" if version == 2 else "cpu.shares")).resolve() for u in (UID_BE, UID_BE2)}
    assert tree.weight(UID_BE) == ("1" if version == 2 else "2") and tree.weight(UID_LS) != tree.weight(UID_BE)
    # capacity 8 cores x 65% - max(system 0.5, reserved 1) - LS peak 2 = 2.2 cores
    assert calm.batch["kubernetes.io/batch-cpu"] == 5_200 - 1_000 - 2_000
    assert publisher.batch == [(2_200, calm.batch["kubernetes.io/batch-memory"])] and len(publisher.usages) == 1
    hot = advance(5.0, 1.0)  # LS 5 + system 0.5 = 5.5 > 5.2 (65% of 8)
    assert hot.suppress["active"] and hot.suppress["be_cpu_allowed_milli"] == 100
    assert tree.quota(UID_BE) == ("5000 100000" if version == 2 else "5000")  # 50m each
    assert tree.quota(UID_BE2) == ("5000 100000" if version == 2 else "5000")
    assert tree.quota(UID_LS) == ("max 100000" if version == 2 else "-1")  # LS untouched
    calm_again = advance(1.0, 0.1)
    assert not calm_again.suppress["active"]
    assert tree.quota(UID_BE) == ("max 100000" if version == 2 else "-1")  # back to unlimited
    assert tree.quota(UID_BE2) == ("100000 100000" if version == 2 else "100000")  # back to its own limit
    Report.model_validate(calm_again.model_dump())


def test_a_vanished_or_unreadable_cgroup_is_skipped_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = FakeCgroupTree(tmp_path, 2)
    tree.add_pod(UID_LS, "burstable", memory=GiB)
    tree.add_pod(UID_BE, "besteffort", memory=GiB)
    agent = Agent(build_config({}), Collector(cgroups.detect(tmp_path), 3, FakeHost()), AgentMetrics())
    (tree.dirs[UID_BE] / "memory.stat").unlink()
    with caplog.at_level(logging.WARNING):
        report = agent.cycle()
    assert [p.uid for p in report.pods] == [UID_LS]
    assert any("memory.stat" in n for n in report.notes) and "memory.stat" in caplog.text
    assert "no cluster configured" in report.notes[0]
    assert all(p.qos == "LS" for p in report.pods)  # nothing classified: everything counts as LS
    assert agent.metrics.render().count("fuyao_qos_cgroup_read_errors_total 1.0") == 1


# --- per-pod batch limits (issue 22) ---------------------------------------------------------------------------------
CID_A, CID_B = "a" * 64, "b" * 64


def _be_raw(uid: str, with_ids: bool = True) -> dict:  # type: ignore[type-arg]
    """A BE pod as the docs shape it: batch requests and limits only (BestEffort to the kubelet), two containers,
    the second one without a batch limit and the third not started yet."""
    batch = {"kubernetes.io/batch-cpu": "1500", "kubernetes.io/batch-memory": "2Gi"}
    return {"metadata": {"uid": uid, "name": "train", "namespace": "jobs", "labels": {"volcano.sh/qos": "BE"}},
            "spec": {"containers": [
                {"name": "main", "resources": {"requests": dict(batch), "limits": dict(batch)}},
                {"name": "side", "resources": {"limits": {"kubernetes.io/batch-cpu": "500",
                                                          "kubernetes.io/batch-memory": "512Mi"}}},
                {"name": "late", "resources": {"limits": {"kubernetes.io/batch-cpu": "100"}}}]},
            "status": {"containerStatuses": [
                {"name": "main", "containerID": f"containerd://{CID_A}" if with_ids else ""},
                {"name": "side", "containerID": f"containerd://{CID_B}" if with_ids else ""}]}}


def test_batch_resources_become_the_pod_and_container_limits() -> None:
    uid, facts = pod_facts(_be_raw(UID_BE))  # type: ignore[misc]
    assert facts.qos == QoSClass.BE
    assert facts.cpu_limit_milli == 2_100 and facts.cpu_request_milli == 2_100  # requests default to the limits
    assert facts.memory_limit_bytes is None  # "late" has no memory limit: the pod is not capped
    main, side, late = facts.containers
    assert (main.container_id, main.cpu_limit_milli, main.memory_limit_bytes) == (f"containerd://{CID_A}", 1_500,
                                                                                 2 * GiB)
    assert (side.cpu_request_milli, side.memory_limit_bytes, late.container_id) == (500, 512 * 2**20, "")
    sample = policy.PodSample(uid=uid, known=True, qos=QoSClass.BE, cpu_limit_milli=facts.cpu_limit_milli,
                              cpu_request_milli=facts.cpu_request_milli, memory_limit_bytes=2 * GiB,
                              containers=facts.containers)
    free = policy.be_targets(sample, sample.cpu_limit_milli, 2)
    assert free.pod == policy.CgroupTarget(2_100, 2_150, 2 * GiB)  # shares: 2100m x 1024 / 1000
    assert set(free.containers) == {"main", "side"}  # "late" has no cgroup yet
    assert free.containers["main"] == policy.CgroupTarget(1_500, 1_536, 2 * GiB)
    squeezed = policy.be_targets(sample, 300, 2)  # suppressed: no container above the pod
    assert squeezed.pod.cpu_limit_milli == 300 and squeezed.containers["main"].cpu_limit_milli == 300
    assert policy.milli_to_shares(0) == 2 and policy.milli_to_shares(10**9) == 262144


@pytest.mark.parametrize(("version", "driver"), LAYOUTS)
def test_a_cycle_writes_batch_limits_at_pod_and_container_level_and_checks_them(
        tmp_path: Path, version: int, driver: str) -> None:
    tree = FakeCgroupTree(tmp_path, version, driver)  # type: ignore[arg-type]
    tree.add_pod(UID_BE, "besteffort", memory=GiB, shares=2)
    tree.add_container(UID_BE, CID_A)
    tree.add_container(UID_BE, CID_B)
    raw = _be_raw(UID_BE)
    raw["spec"]["containers"][2]["resources"]["limits"]["kubernetes.io/batch-memory"] = "1Gi"
    agent = Agent(QUOTA_POLICY, Collector(cgroups.detect(tmp_path), 3, FakeHost()),
                  AgentMetrics(), _state(raw))  # type: ignore[arg-type]
    agent.cycle()
    report = agent.cycle()
    quota, weight = ("cpu.max", "cpu.weight") if version == 2 else ("cpu.cfs_quota_us", "cpu.shares")
    memory = "memory.max" if version == 2 else "memory.limit_in_bytes"

    def expect_quota(milli: int) -> str:
        return f"{milli * 100} 100000" if version == 2 else str(milli * 100)

    def expect_weight(shares: int, conversion: cgroups.WeightConversion = "linear") -> str:
        """Pods: the kubelet's conversion; containers: the runtime's (no LS container tells here: the default)."""
        return str(cgroups.shares_to_weight(shares, conversion)) if version == 2 else str(shares)

    assert tree.file(UID_BE, quota) == expect_quota(2_100)
    assert tree.file(UID_BE, weight) == expect_weight(2_150)
    assert tree.file(UID_BE, memory) == str(2 * GiB + 512 * 2**20 + GiB)
    assert tree.file(UID_BE, quota, CID_A) == expect_quota(1_500)
    assert tree.file(UID_BE, weight, CID_A) == expect_weight(1_536, DEFAULT_CONVERSION)
    assert tree.file(UID_BE, memory, CID_A) == str(2 * GiB)
    assert tree.file(UID_BE, memory, CID_B) == str(512 * 2**20)
    assert all(not w.error for w in report.cgroup_writes) and len(report.cgroup_writes) == 9
    # the container whose cgroup does not exist yet is named, not guessed
    assert not any("late" in n for n in report.notes)  # it has no container ID: nothing to look for
    assert agent.cycle().cgroup_writes == []  # idempotent
    # the runtime recreates a container (a restart): its fresh cgroup gets the limits again on the next cycle
    for name in (quota, memory):
        path = (tree.dirs[UID_BE] if not name.startswith("memory") else tree.memory_dir(UID_BE)) / \
            tree.container_name(CID_A) / name
        path.write_text("max 100000\n" if name == "cpu.max" else "-1\n" if version == 1 and name == quota else
                        "max\n" if version == 2 else "9223372036854771712\n")
    again = agent.cycle()
    assert len(again.cgroup_writes) == 2 and tree.file(UID_BE, quota, CID_A) == expect_quota(1_500)
    # a container started whose cgroup is missing: reported with what was looked for
    raw["status"]["containerStatuses"].append({"name": "late", "containerID": "containerd://" + "c" * 64})
    NodeState._Pods(agent.state).upsert(raw)  # type: ignore[arg-type]
    missing = agent.cycle()
    assert any("container late: no cgroup for containerd://ccc" in n for n in missing.notes)
    # the pod stops being BE: its spec's values come back (no limits, shares from its requests)
    raw["metadata"]["labels"] = {}
    NodeState._Pods(agent.state).upsert(raw)  # type: ignore[arg-type]
    restored = agent.cycle()
    assert restored.cgroup_writes and tree.file(UID_BE, memory) in ("max", "-1")  # the kernel shows -1 as 2^63-4096
    assert tree.file(UID_BE, quota) in ("max 100000", "-1")


def test_a_pod_turning_ls_gets_its_values_back_after_a_failed_write_and_after_an_agent_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which pods hold BE limits the agent wrote lives in its state file, and a pod is forgotten only once every
    restore write went through: a restore write that fails is tried again next cycle, and an agent restarted
    between the BE limits and the pod's turn to LS still restores them."""
    tree = FakeCgroupTree(tmp_path / "cg", 2, "cgroupfs")
    tree.add_pod(UID_BE, "besteffort", memory=GiB, shares=2)
    tree.add_container(UID_BE, CID_A)
    tree.add_container(UID_BE, CID_B)
    raw = _be_raw(UID_BE)
    config = QUOTA_POLICY.model_copy(update={"state_file": str(tmp_path / "state" / "state.json")})

    def agent() -> Agent:
        return Agent(config, Collector(cgroups.detect(tmp_path / "cg"), 3, FakeHost()), AgentMetrics(),
                     _state(raw))  # type: ignore[arg-type]

    first = agent()
    first.cycle()
    first.cycle()
    assert tree.file(UID_BE, "cpu.max") == "210000 100000"  # BE limits written
    assert tree.file(UID_BE, "memory.max", CID_A) == str(2 * GiB)
    raw["metadata"]["labels"] = {}  # the pod turns LS while the agent is down
    second = agent()  # a restarted agent: it knows the pod's limits are its own from the state file
    real_apply, failed = cgroups.apply, []

    def flaky(write: cgroups.Write, page_size: int | None = None) -> None:
        if write.path.endswith("memory.max") and not failed:
            failed.append(write.path)
            raise cgroups.CgroupError(f"cannot write to {write.path}: Device or resource busy")
        real_apply(write, page_size)

    monkeypatch.setattr(cgroups, "apply", flaky)
    second.cycle()
    once = second.cycle()
    assert failed and any(w.error for w in once.cgroup_writes)
    again = second.cycle()  # the failed write is tried again
    assert any(w.path == failed[0] and not w.error for w in again.cgroup_writes)
    assert tree.file(UID_BE, "memory.max", CID_A) == "max" and tree.file(UID_BE, "cpu.max") == "max 100000"
    assert second.cycle().cgroup_writes == []  # done, and forgotten
    assert '"limited": []' in (tmp_path / "state" / "state.json").read_text()


def test_batch_resources_wait_for_a_full_view_and_come_back_when_the_node_lost_them(tmp_path: Path) -> None:
    """Nothing is published until the node's capacity and its pods are known (values from the host alone would
    hold for the whole publish interval); published values the Node no longer shows are published again."""
    tree = FakeCgroupTree(tmp_path, 2, "cgroupfs")
    tree.add_pod(UID_LS, "burstable", memory=GiB)
    state, publisher = NodeState(), RecordingPublisher()
    agent = Agent(QUOTA_POLICY.model_copy(update={"batch": QUOTA_POLICY.batch.model_copy(
        update={"min_publish_interval": 0.0})}), Collector(cgroups.detect(tmp_path), 3, FakeHost()), AgentMetrics(),
        state, publisher)  # type: ignore[arg-type]
    agent.cycle()
    NodeState._Node(state).replace([{"metadata": {"name": "n1"}, "status": {
        "capacity": {"cpu": "8", "memory": "64Gi"}, "allocatable": {"cpu": "7", "memory": "60Gi"}}}])
    agent.cycle()  # the pods are not listed yet
    assert publisher.batch == []
    NodeState._Pods(state).replace([_raw(UID_LS, None)])
    agent.cycle()
    assert len(publisher.batch) == 1
    cpu, memory = publisher.batch[0]
    NodeState._Node(state).upsert({"metadata": {"name": "n1"}, "status": {
        "capacity": {"cpu": "8", "memory": "64Gi"},
        "allocatable": {"cpu": "7", "memory": "60Gi", "kubernetes.io/batch-cpu": str(cpu),
                        "kubernetes.io/batch-memory": str(memory)}}})
    agent.cycle()
    assert len(publisher.batch) == 1  # the Node shows them: nothing to do
    NodeState._Node(state).upsert({"metadata": {"name": "n1"}, "status": {  # re-registered: they are gone
        "capacity": {"cpu": "8", "memory": "64Gi"}, "allocatable": {"cpu": "7", "memory": "60Gi"}}})
    agent.cycle()
    assert len(publisher.batch) == 2


def test_memory_limits_read_back_to_the_page() -> None:
    assert cgroups.same_memory(999_424, 1_000_000, 4096) and not cgroups.same_memory(995_000, 1_000_000, 4096)
    assert cgroups.same_memory(None, None) and not cgroups.same_memory(None, 1)
    assert cgroups.split_container_id("containerd://" + "f" * 64) == ("containerd", "f" * 64)
    assert cgroups.split_container_id("containerd://../../etc") is None  # never a path
    assert cgroups.split_container_id("") is None


# --- the cpuset policy ------------------------------------------------------------------------------------------------
def test_the_cpuset_budget_grows_past_a_cpu_boundary_only_by_the_hysteresis_and_shrinks_at_once() -> None:
    """LS load near a whole CPU: the budget crosses N x 1000m back and forth every cycle; BE pods must not be moved
    between N and N+1 CPUs each time. Growth waits until the budget passes the boundary by hysteresisPercent of
    capacity; a shrink (LS needs the CPU) is immediate."""
    config = build_config({"nodeName": "n1", "cpuSuppress": {"policy": "cpuset", "thresholdPercent": 65,
                                                              "hysteresisPercent": 5}})
    cpus = frozenset(range(8))

    def plan(ls_cpu: int, was: int | None) -> int:
        used = policy.NodeSample(cpu_capacity_milli=8_000, memory_capacity_bytes=GiB, cpu_used_milli=ls_cpu)
        found = policy.cpu_suppress(used, [pod("ls", QoSClass.LS, ls_cpu), pod("be", QoSClass.BE, 100)], config,
                                    False, cpus, was)
        assert found.cpus is not None
        return len(found.cpus)

    # budget = 8000 x 65% - LS = 5200 - LS; the margin is 5% of 8000 = 400m
    assert plan(3_150, None) == 3  # 2050m: 3 CPUs without history
    assert plan(3_150, 2) == 2  # 2050m is past 2000 by 50m only: stays at 2
    assert plan(2_700, 2) == 3  # 2500m: past it by 500m > 400m: grows
    assert plan(3_300, 3) == 2  # 1900m: shrinks at once
    # a big node: the margin never holds BE more than one CPU below its budget (5% of 128 CPUs is 6.4 CPUs)
    big = policy.NodeSample(cpu_capacity_milli=128_000, memory_capacity_bytes=GiB, cpu_used_milli=75_000)
    found = policy.cpu_suppress(big, [pod("ls", QoSClass.LS, 75_000), pod("be", QoSClass.BE, 100)], config, False,
                                frozenset(range(128)), 2)
    assert found.cpus is not None and len(found.cpus) == 8  # budget 8200m: 8, not stuck at the 2 it had


def test_be_cpus_are_the_budget_rounded_up_from_the_highest_numbered() -> None:
    node = frozenset(range(8))
    assert policy.be_cpus(node, 100) == {7}
    assert policy.be_cpus(node, 2_100) == {5, 6, 7}
    assert policy.be_cpus(node, 50_000) == node
    assert policy.be_cpus(frozenset({0, 2, 4, 6}), 1_500) == {4, 6}
    assert cgroups.parse_cpus("0-3,6\n") == {0, 1, 2, 3, 6}
    assert cgroups.format_cpus(frozenset({0, 1, 2, 3, 6})) == "0-3,6"
    assert cgroups.format_cpus(cgroups.parse_cpus("5,1-2,3")) == "1-3,5"
    with pytest.raises(ValueError):
        cgroups.parse_cpus("3-1")


@pytest.mark.parametrize(("version", "driver"), [(1, "cgroupfs"), (2, "systemd")])
def test_the_cpuset_policy_moves_be_pods_to_the_budgets_cpus_and_back(tmp_path: Path, version: int,
                                                                     driver: str) -> None:
    """BE pods (pod and container cgroups) share the budget's highest-numbered CPUs, always (not only above the
    threshold); their quotas stay what their batch limits say; the set follows the LS load; a pod that stops being
    BE gets the tier's CPUs back. A real cgroup v1 refuses a child's CPUs outside its parent's: the writes widen the
    pod first and narrow it last, which the order of the report's writes shows."""
    tree = FakeCgroupTree(tmp_path, version, driver)  # type: ignore[arg-type]
    tree.add_pod(UID_LS, "burstable", memory=GiB)
    tree.add_pod(UID_BE, "besteffort", memory=GiB, shares=2)
    tree.add_container(UID_BE, CID_A)
    sandbox = "5" * 64
    tree.add_container(UID_BE, sandbox)  # the pause container: a child the pod's status does not list
    host = FakeHost()
    raw = _be_raw(UID_BE)
    agent = Agent(build_config({"nodeName": "n1", "cpuSuppress": {"policy": "cpuset"}, "cpuManagerStateFile": ""}),
                  Collector(cgroups.detect(tmp_path), 3, host), AgentMetrics(),
                  _state(_raw(UID_LS, None), raw))  # type: ignore[arg-type]
    agent.cycle()

    def advance(ls_cores: float) -> Report:
        current = cgroups.cpu_usage_ns(agent.collector.layout, cgroups.pod_cgroups(agent.collector.layout)[UID_LS])
        tree.set_usage(UID_LS, cpu_ns=current + int(ls_cores * 1e9))
        host.cpu_milli = int(ls_cores * 1000) + 500
        return agent.cycle()

    light = advance(1.0)  # budget 8 x 65% - (1 + 0.5 system) = 3.7 cores -> CPUs 4-7
    shown = "" if version == 2 else "0-7"  # what the tier's own file says (v2: inherited)
    assert light.suppress["active"] and light.suppress["be_cpu_allowed_milli"] == 3_700
    assert tree.cpuset(UID_BE) == tree.cpuset(UID_BE, CID_A) == tree.cpuset(UID_BE, sandbox) == "4-7"
    assert tree.cpuset(UID_LS) == shown
    assert tree.file(UID_BE, "cpu.max" if version == 2 else "cpu.cfs_quota_us", CID_A) == (
        "150000 100000" if version == 2 else "150000")  # its own batch limit, not the budget
    busy = advance(4.0)  # budget 5.2 - 4.5 = 0.7 core -> CPU 7
    assert tree.cpuset(UID_BE) == tree.cpuset(UID_BE, CID_A) == "7"
    pod_dir = tree.cpuset_dir(UID_BE)

    def cpuset_writes(report: Report) -> list[tuple[str, str]]:  # (whose, value) in the order written
        return [("pod" if Path(w.path).parent == pod_dir else "container", w.value) for w in report.cgroup_writes
                if w.path.endswith("cpuset.cpus")]

    assert cpuset_writes(busy) == [("container", "7"), ("container", "7"), ("pod", "7")]  # children first
    # less LS load: {7} -> {5, 6, 7}, the pod widens first
    wider = advance(2.0)
    assert cpuset_writes(wider) == [("pod", "5-7"), ("container", "5-7"), ("container", "5-7")]
    assert advance(2.0).cgroup_writes == []  # idempotent
    raw["metadata"]["labels"] = {}
    NodeState._Pods(agent.state).upsert(raw)  # type: ignore[arg-type]
    advance(2.0)
    assert tree.cpuset(UID_BE) == tree.cpuset(UID_BE, CID_A) == tree.cpuset(UID_BE, sandbox) == "0-7"  # the tier's
