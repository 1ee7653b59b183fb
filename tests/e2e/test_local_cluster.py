"""End to end on a real single-node cluster (``tests.support.cluster``, what ``hack/local-up.sh`` starts): the real
kubelet, kube-scheduler and controller-manager consuming fuyao's device plugin and scheduler extender.

These need root, containerd/runc and the CNI plugins (``hack/test.sh`` installs them); a missing prerequisite is a
failure naming it, never a skip."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuyao.contracts import (
    ANNOTATION_NODE_FAULTS,
    ANNOTATION_NODE_TOPOLOGY,
    NodeFaults,
    NodeTopology,
    parse_annotation,
)
from tests.e2e.checks import explain, planned_and_visible_npus
from tests.support.cluster import QOS_AGENT_CONFIG, LocalCluster
from tests.support.engines import metric_total
from tests.support.polling import wait_for

pytestmark = pytest.mark.e2e

BUSYBOX = "fuyao.local/busybox:1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    from tests.support.cluster import running

    with running(tmp_path_factory.mktemp("cluster", numbered=True)) as local:
        wait_for(lambda: "default" in local.kubectl("get", "sa", "-o", "name"), 60, "the default service account")
        yield local


def test_a_dead_clusters_network_is_swept_and_a_live_ones_is_kept() -> None:
    """A harness run that was killed (or a machine restored from a snapshot) leaves its namespace, veth and host
    routes behind, which blocked every later bring-up (``ip route add`` failed: the route exists). The bring-up
    deletes a ``fuyao-*`` namespace nothing runs in, and only that one. Runs before this module's cluster is up."""
    from tests.support.cluster import _sweep_stale_networks

    ip = lambda *args: subprocess.run(["ip", *args], check=True, capture_output=True)  # noqa: E731
    stale, live = "fuyao-test-stale", "fuyao-test-live"
    ip("netns", "add", stale)
    ip("netns", "add", live)
    holder = subprocess.Popen(["ip", "netns", "exec", live, "sleep", "60"])
    try:
        ip("link", "add", "fyhteststale", "type", "veth", "peer", "name", "fyn0", "netns", stale)
        ip("addr", "add", "10.242.255.1/30", "dev", "fyhteststale")
        ip("link", "set", "fyhteststale", "up")
        ip("route", "add", "10.242.254.0/24", "via", "10.242.255.2", "dev", "fyhteststale")
        wait_for(lambda: subprocess.run(["ip", "netns", "pids", live], capture_output=True, text=True).stdout.strip(),
                 10, "the live namespace's process")
        _sweep_stale_networks("fuyao-test-")
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale not in listing and live in listing
        wait_for(lambda: not subprocess.run(["ip", "route", "show", "10.242.254.0/24"], capture_output=True,
                                            text=True).stdout.strip(), 15, "the stale route to go with its namespace")
    finally:
        holder.kill()
        holder.wait()
        for name in (stale, live):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def pod_manifest(name: str, npus: int = 0, command: str = "sleep 3600", labels: dict | None = None) -> str:  # type: ignore[type-arg]
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                                                "labels": labels or {}},
                "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                         "containers": [{"name": "main", "image": BUSYBOX, "imagePullPolicy": "Never",
                                         "command": ["/bin/sh", "-c", command],
                                         **({"resources": {"limits": {"npu.huawei.com/NPU": str(npus)}}}
                                            if npus else {})}]}}
    return json.dumps(manifest)


def apply(cluster: LocalCluster, manifest: str) -> None:
    cluster.apply(json.loads(manifest), f"manifest-{time.monotonic_ns()}")


def pod(cluster: LocalCluster, name: str) -> dict:  # type: ignore[type-arg]
    return cluster.get_json("pod", name)


def npus(cluster: LocalCluster, field: str = "allocatable") -> int:
    return int(cluster.node_json()["status"].get(field, {}).get("npu.huawei.com/NPU", "0"))


def test_the_real_kubelet_shows_the_node_as_the_device_plugin_publishes_it(cluster: LocalCluster) -> None:
    node = cluster.node_json()
    assert node["status"]["capacity"]["npu.huawei.com/NPU"] == "8"
    labels = node["metadata"]["labels"]
    assert labels["accelerator"] == "huawei-ascend-npu" and labels["npu.openfuyao.com/device-count"] == "8"
    topology = parse_annotation(ANNOTATION_NODE_TOPOLOGY, node["metadata"]["annotations"][ANNOTATION_NODE_TOPOLOGY],
                                NodeTopology)
    assert len(topology.devices) == 8


def test_an_npu_pod_goes_through_the_extender_and_the_device_plugin(cluster: LocalCluster) -> None:
    apply(cluster, pod_manifest("two-npus", 2, "echo ASCEND_VISIBLE_DEVICES=$ASCEND_VISIBLE_DEVICES; ls /dev; "
                                               "sleep 3600"))
    running = wait_for(lambda: (p := pod(cluster, "two-npus"))["status"].get("phase") == "Running" and p, 60,
                       "the 2-NPU pod Running")
    assignment, visible, log = planned_and_visible_npus(cluster, running)
    devices = assignment.containers[0].devices
    assert assignment.node == cluster.node and len(devices) == 2
    # the kubelet called Allocate with the extender's choice (the plugin's preferred allocation honours it)
    assert sorted(visible) == sorted(d.rsplit("-", 1)[1] for d in devices)
    for physical in visible:
        assert f"davinci{physical}" in log  # the device node is in the container
    assert npus(cluster) == 8  # allocatable stays; the kubelet accounts the 2 as allocated


def test_what_cannot_be_placed_stays_pending_with_a_reason(cluster: LocalCluster) -> None:
    apply(cluster, pod_manifest("nine-npus", 9))
    apply(cluster, pod_manifest("be-npu", 1, labels={"volcano.sh/qos": "BE"}))

    def reasons(name: str) -> str:
        events = cluster.get_json("events", "--field-selector", f"involvedObject.name={name}")["items"]
        return " ".join(e.get("message", "") for e in events if e.get("reason") == "FailedScheduling")

    assert "Insufficient npu.huawei.com/NPU" in wait_for(lambda: reasons("nine-npus"), 60, "nine-npus event")
    # the scheduler's own filters pass this one; fuyao's extender refuses it, and its reason reaches the pod
    assert "BE pods need a colocation node" in wait_for(lambda: reasons("be-npu"), 60, "be-npu event")
    assert pod(cluster, "be-npu")["status"]["phase"] == "Pending"
    cluster.kubectl("delete", "pod", "nine-npus", "be-npu", "--wait=false")


def test_a_critical_chip_leaves_allocatable_and_comes_back(cluster: LocalCluster) -> None:
    cluster.fake_npu_smi("fake", "set-health", "-i", "7", "Critical", "--code", "80E01801")
    wait_for(lambda: npus(cluster) == 7, 60, "allocatable 7 after a Critical chip")
    cluster.fake_npu_smi("fake", "set-health", "-i", "7", "OK")
    wait_for(lambda: npus(cluster) == 8, 60, "allocatable 8 after recovery")


def node_faults(cluster: LocalCluster) -> NodeFaults:
    raw = cluster.node_json()["metadata"].get("annotations", {}).get(ANNOTATION_NODE_FAULTS, "{}")
    return parse_annotation(ANNOTATION_NODE_FAULTS, raw, NodeFaults)


def node_events(cluster: LocalCluster, reason: str) -> list[str]:
    events = cluster.get_json("events", "--field-selector", f"involvedObject.name={cluster.node},reason={reason}")
    return [e.get("message", "") for e in events["items"]]


def chip_resets(cluster: LocalCluster, npu: int) -> int:
    return int(json.loads(cluster.fake_npu_smi("fake", "show"))["chips"].get(f"{npu}-0", {}).get("resets", 0))


def test_a_reset_level_fault_on_a_free_chip_is_reset_and_comes_back(cluster: LocalCluster) -> None:
    before = chip_resets(cluster, 6)
    cluster.fake_npu_smi("fake", "set-health", "-i", "6", "Critical", "--code", "8C03A000")  # RestartNPU
    wait_for(lambda: chip_resets(cluster, 6) == before + 1, 60, "the device plugin resets NPU 6")
    wait_for(lambda: npus(cluster) == 8 and "Ascend910-6" not in node_faults(cluster).devices, 60,
             "NPU 6 back in allocatable, its fault gone from the annotation")
    # events of other chips (earlier tests on this node) may come first: wait for this chip's own
    wait_for(lambda: any("Ascend910-6" in m for m in node_events(cluster, "NpuReset")), 30, "NpuReset of NPU 6")
    wait_for(lambda: any("8C03A000" in m for m in node_events(cluster, "NpuRecovered")), 30,
             "NpuRecovered from 8C03A000")
    assert chip_resets(cluster, 6) == before + 1  # once


def test_a_fault_on_a_held_chip_marks_it_and_leaves_the_pod_running(cluster: LocalCluster) -> None:
    apply(cluster, pod_manifest("held", 1))
    wait_for(lambda: pod(cluster, "held")["status"].get("phase") == "Running", 60, "held Running")
    started = pod(cluster, "held")["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]

    def holder_die() -> str | None:
        raw = cluster.node_json()["metadata"]["annotations"][ANNOTATION_NODE_TOPOLOGY]
        topo = parse_annotation(ANNOTATION_NODE_TOPOLOGY, raw, NodeTopology)
        return next((i for i, d in topo.devices.items() if d.holder == "default/held"), None)

    die = wait_for(holder_die, 30, "the held die in the topology annotation")
    npu = int(die.rsplit("-", 1)[1])
    before = chip_resets(cluster, npu)
    cluster.fake_npu_smi("fake", "set-health", "-i", str(npu), "Alarm", "--code", "8C0E4E00")  # FreeRestartNPU
    fault = wait_for(lambda: node_faults(cluster).devices.get(die), 60, "the fault in the node annotation")
    assert fault.level == "FreeRestartNPU" and fault.holder == "default/held"
    assert "reset pending: held by pod default/held" in fault.state  # the annotation tells the operator
    wait_for(lambda: npus(cluster) == 7, 60, "the held chip out of allocatable")
    time.sleep(3)  # several health polls: still no reset under the pod, and the pod is untouched
    assert chip_resets(cluster, npu) == before
    status = pod(cluster, "held")["status"]
    assert status["phase"] == "Running"
    assert status["containerStatuses"][0]["state"]["running"]["startedAt"] == started
    assert any(die in m for m in node_events(cluster, "NpuFault"))
    cluster.kubectl("delete", "pod", "held", "--wait=true", "--timeout=60s")
    wait_for(lambda: chip_resets(cluster, npu) == before + 1, 60, "the chip reset once the pod is gone")
    wait_for(lambda: npus(cluster) == 8 and die not in node_faults(cluster).devices, 60, "the chip back")


def test_device_plugin_and_kubelet_restarts(cluster: LocalCluster) -> None:
    apply(cluster, pod_manifest("survivor", 1))
    wait_for(lambda: pod(cluster, "survivor")["status"].get("phase") == "Running", 60, "survivor Running")
    started = pod(cluster, "survivor")["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    cluster.stop("fuyao-device-plugin", signal.SIGKILL)  # a crash: no clean shutdown
    wait_for(lambda: npus(cluster) == 0, 90, "allocatable 0 without the device plugin")
    cluster.start("fuyao-device-plugin")
    wait_for(lambda: npus(cluster) == 8, 60, "allocatable back after the plugin restarts")
    cluster.stop("kubelet")
    cluster.start("kubelet")  # the kubelet removes the plugin sockets at start: the plugin must re-register
    wait_for(lambda: npus(cluster) == 8 and npus(cluster, "capacity") == 8, 90, "capacity after a kubelet restart")
    survivor = pod(cluster, "survivor")
    assert survivor["status"]["phase"] == "Running"
    assert survivor["status"]["containerStatuses"][0]["state"]["running"]["startedAt"] == started  # not disturbed


def test_the_qos_agent_publishes_batch_resources_that_be_pods_use(cluster: LocalCluster) -> None:
    from fuyao.contracts import ANNOTATION_NODE_USAGE, NodeUsage

    node = wait_for(lambda: (n := cluster.node_json())["status"]["capacity"].get("kubernetes.io/batch-cpu") and n, 60,
                    "kubernetes.io/batch-cpu on the node")
    assert int(node["status"]["allocatable"]["kubernetes.io/batch-memory"]) > 0
    usage = wait_for(lambda: cluster.node_json()["metadata"].get("annotations", {}).get(ANNOTATION_NODE_USAGE), 60,
                     "the usage annotation")
    assert parse_annotation(ANNOTATION_NODE_USAGE, usage, NodeUsage).memory_capacity_bytes > 0
    manifest = json.loads(pod_manifest("batch-job", labels={"volcano.sh/qos": "BE"}))
    manifest["spec"]["containers"][0]["resources"] = {"limits": {"kubernetes.io/batch-cpu": "100",
                                                                 "kubernetes.io/batch-memory": str(64 * 2**20)}}
    apply(cluster, json.dumps(manifest))
    try:
        wait_for(lambda: pod(cluster, "batch-job")["status"].get("phase") == "Running", 60, "the BE pod Running")
    finally:
        cluster.kubectl("delete", "pod", "batch-job", "--ignore-not-found", "--wait=false")


def _pod_cgroup(cluster: LocalCluster, name: str) -> tuple[Path, Path, str]:
    """(cpu dir, memory dir, container id) of a running BestEffort pod on the real node (cgroup v1, cgroupfs)."""
    got = pod(cluster, name)
    assert got["status"]["qosClass"] == "BestEffort"
    uid, cid = got["metadata"]["uid"], got["status"]["containerStatuses"][0]["containerID"].split("://")[1]
    base = Path("/sys/fs/cgroup")
    return base / "cpu" / "kubepods" / "besteffort" / f"pod{uid}", \
        base / "memory" / "kubepods" / "besteffort" / f"pod{uid}", cid


def test_a_be_pods_batch_limits_are_its_real_cgroup_limits_and_go_back(cluster: LocalCluster) -> None:
    """The kubelet gives a BE pod (batch resources only) no limits; the agent writes them from its batch requests
    and limits, at pod and container level, in the real cgroup files, and restores them when it stops being BE."""
    manifest = json.loads(pod_manifest("be-limited", labels={"volcano.sh/qos": "BE"}))
    manifest["spec"]["containers"][0]["resources"] = {"limits": {"kubernetes.io/batch-cpu": "300",
                                                                 "kubernetes.io/batch-memory": str(96 * 2**20)}}
    apply(cluster, json.dumps(manifest))
    wait_for(lambda: pod(cluster, "be-limited")["status"].get("phase") == "Running", 60, "the BE pod Running")
    cpu, memory, cid = _pod_cgroup(cluster, "be-limited")

    def reads(directory: Path, name: str) -> str:
        return (directory / name).read_text().strip()

    # the pod's limits can land a cycle before its container's (the agent learns the container ID from the status)
    wait_for(lambda: reads(cpu, "cpu.cfs_quota_us") == reads(cpu / cid, "cpu.cfs_quota_us") == "30000", 30,
             "the pod's and the container's CFS quota from batch-cpu 300")
    assert reads(cpu, "cpu.cfs_period_us") == "100000"
    wait_for(lambda: reads(memory / cid, "memory.limit_in_bytes") == str(96 * 2**20), 30, "the container's memory")
    assert reads(cpu, "cpu.shares") == reads(cpu / cid, "cpu.shares") == "307"  # 300m x 1024 / 1000
    assert reads(memory, "memory.limit_in_bytes") == str(96 * 2**20)
    # the same pod, no longer BE: what the kubelet set comes back (BestEffort: no quota, 2 shares, no memory limit)
    cluster.kubectl("label", "pod", "be-limited", "volcano.sh/qos=LS", "--overwrite")
    wait_for(lambda: reads(cpu, "cpu.cfs_quota_us") == reads(cpu / cid, "cpu.cfs_quota_us") == "-1", 30,
             "the quota lifted")
    assert reads(cpu, "cpu.shares") == "2"
    assert int(reads(memory, "memory.limit_in_bytes")) > 2**62
    cluster.kubectl("delete", "pod", "be-limited", "--wait=true", "--timeout=60s")
    wait_for(lambda: not cpu.exists() and not memory.exists(), 60, "the pod's cgroups removed with it")


@contextlib.contextmanager
def _agent_config(cluster: LocalCluster, config: Path) -> Iterator[None]:
    """The QoS agent restarted with ``config`` (the cluster's settings, then the test's), then as it was."""
    record = next(p for p in cluster.procs if p["name"] == "fuyao-qos-agent")
    command = list(record["command"])
    settings = config.read_text()
    assert settings.startswith("version: v1\n")
    config.write_text(QOS_AGENT_CONFIG + settings.removeprefix("version: v1\n"))
    cluster.stop("fuyao-qos-agent")
    try:
        cluster.start("fuyao-qos-agent", ("--config", str(config)))  # the later --config is the one read
        yield
    finally:
        cluster.stop("fuyao-qos-agent")
        record = next(p for p in cluster.procs if p["name"] == "fuyao-qos-agent")
        record["command"] = command
        cluster.start("fuyao-qos-agent")


def test_the_cpuset_policy_puts_a_be_pod_on_the_highest_cpus_and_back(cluster: LocalCluster, tmp_path: Path) -> None:
    """``cpuSuppress.policy: cpuset``: a BE pod, its container and its sandbox (a cgroup the pod's status does not
    list, which cgroup v1 makes the pod wait for: EBUSY) go to the budget's highest-numbered CPUs in the real cpuset
    files, and back to every CPU of the BestEffort tier when the pod stops being BE."""
    from fuyao.qos.cgroups import parse_cpus

    config = tmp_path / "qos.yaml"
    # a 40 % threshold leaves BE at most 0.8 of the 2 CPUs' budget: one CPU, the highest
    # the cluster kubelet's CPU manager checkpoint (under its --root-dir): its exclusive CPUs are never BE's
    config.write_text("version: v1\ninterval: 1s\ncpuSuppress: {policy: cpuset, thresholdPercent: 40}\n"
                      f"cpuManagerStateFile: {cluster.dir / 'kubelet' / 'cpu_manager_state'}\n")
    manifest = json.loads(pod_manifest("be-cpuset", labels={"volcano.sh/qos": "BE"}))
    manifest["spec"]["containers"][0]["resources"] = {"limits": {"kubernetes.io/batch-cpu": "300"}}
    apply(cluster, json.dumps(manifest))
    wait_for(lambda: pod(cluster, "be-cpuset")["status"].get("phase") == "Running", 60, "the BE pod Running")
    cpu, _, cid = _pod_cgroup(cluster, "be-cpuset")
    cpuset = Path("/sys/fs/cgroup/cpuset") / cpu.relative_to("/sys/fs/cgroup/cpu")

    def cpus(directory: Path) -> frozenset[int]:
        return parse_cpus((directory / "cpuset.cpus").read_text())

    tier = cpus(cpuset.parent)
    children = [d for d in cpuset.iterdir() if d.is_dir()]
    assert len(children) == 2 and cpuset / cid in children  # the container and the sandbox
    with _agent_config(cluster, config):
        wait_for(lambda: all(cpus(d) == {max(tier)} for d in [cpuset, *children]), 30,
                 "the BE pod, its container and its sandbox on the highest CPU")
        cluster.kubectl("label", "pod", "be-cpuset", "volcano.sh/qos=LS", "--overwrite")
        wait_for(lambda: all(cpus(d) == tier for d in [cpuset, *children]), 30, "every CPU of the tier back")
    cluster.kubectl("delete", "pod", "be-cpuset", "--wait=false")


def test_memory_pressure_evicts_be_pods_lowest_priority_first_and_never_ls(cluster: LocalCluster,
                                                                           tmp_path: Path) -> None:
    """The agent restarted with watermarks set around the node's memory use now: two BE pods and an LS pod each
    hold 600 MiB (a memory-backed emptyDir, which counts in the pod's working set); the lower-priority BE pod is
    evicted, which brings the node below the low watermark, so the other BE pod stays, and the LS pod is never
    touched."""
    import psutil

    size = 600 * 2**20
    memory = psutil.virtual_memory()
    used = (memory.total - memory.available) / memory.total * 100
    step = size / memory.total * 100  # one pod's share of the node
    config = tmp_path / "qos.yaml"  # 3 pods on top: above high; minus the evicted one: below low
    config.write_text(f"version: v1\ninterval: 1s\nwindow: 2\nmemoryEviction: {{enabled: true, highPercent: "
                      f"{used + 2.6 * step:.2f}, lowPercent: {used + 2.4 * step:.2f}}}\n")
    for value in (0, -10):
        apply(cluster, json.dumps({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                                   "metadata": {"name": f"e2e-be-{-value}"}, "value": value}))
    for name, qos, priority in (("ls-mem", "LS", 0), ("be-mem-high", "BE", 0), ("be-mem-low", "BE", -10)):
        manifest = json.loads(pod_manifest(name, labels={"volcano.sh/qos": qos}, command=(
            f"dd if=/dev/zero of=/mem/fill bs=1048576 count={size // 2**20} 2>/dev/null; sleep 3600")))
        spec = manifest["spec"]
        spec["volumes"] = [{"name": "mem", "emptyDir": {"medium": "Memory"}}]
        spec["containers"][0]["volumeMounts"] = [{"name": "mem", "mountPath": "/mem"}]
        if qos == "BE":
            spec["containers"][0]["resources"] = {"limits": {"kubernetes.io/batch-cpu": "100"}}
            spec["priorityClassName"] = f"e2e-be-{-priority}"
        apply(cluster, json.dumps(manifest))
    for name in ("ls-mem", "be-mem-high", "be-mem-low"):
        wait_for(lambda n=name: pod(cluster, n)["status"].get("phase") == "Running", 60, f"{name} Running")
    time.sleep(3)  # the fills are written
    try:
        with _agent_config(cluster, config):
            def evicted(name: str) -> bool:
                found = cluster.kubectl("get", "pod", name, "--ignore-not-found", "-o", "json", check=False)
                return not found.strip() or bool(json.loads(found)["metadata"].get("deletionTimestamp"))

            wait_for(lambda: evicted("be-mem-low"), 90, "be-mem-low evicted")
            time.sleep(5)  # the agent keeps cycling: the node is below the low watermark now
            assert not pod(cluster, "ls-mem")["metadata"].get("deletionTimestamp")
            assert pod(cluster, "ls-mem")["status"]["phase"] == "Running"
            assert not evicted("be-mem-high")
    finally:
        for name in ("ls-mem", "be-mem-high", "be-mem-low"):
            cluster.kubectl("delete", "pod", name, "--ignore-not-found", "--wait=false")
        cluster.kubectl("delete", "priorityclass", "e2e-be-0", "e2e-be-10", "--ignore-not-found")


def test_static_vnpus_from_a_config_are_advertised_and_used(cluster: LocalCluster) -> None:
    # a die no pod holds (earlier tests' pods still run): a held one is carved only once released
    topo = parse_annotation(ANNOTATION_NODE_TOPOLOGY,
                            cluster.node_json()["metadata"]["annotations"][ANNOTATION_NODE_TOPOLOGY], NodeTopology)
    die = max((d for d in topo.devices.values() if not d.holder), key=lambda d: d.physical_id)
    config = cluster.dir / "vnpu-config.json"
    config.write_text(json.dumps({"devices": [{"device_id": str(die.physical_id), "vnpu_count": 4,
                                               "vnpu_memory": "8GB"}]}))
    cluster.stop("fuyao-device-plugin")
    cluster.start("fuyao-device-plugin", ("--vnpu-config", str(config)))
    wait_for(lambda: int(cluster.node_json()["status"]["allocatable"].get("npu.huawei.com/vNPU", "0")) == 4, 90,
             "4 vNPU slices on the node")
    assert npus(cluster) == 7  # the carved die is no longer a whole NPU
    manifest = json.loads(pod_manifest("vnpu-pod", command="echo ASCEND_VNPU_SPECS=$ASCEND_VNPU_SPECS. "
                                                          "ASCEND_RUNTIME_OPTIONS=$ASCEND_RUNTIME_OPTIONS "
                                                          "ASCEND_VISIBLE_DEVICES=$ASCEND_VISIBLE_DEVICES; sleep 3600"))
    manifest["spec"]["containers"][0]["resources"] = {"limits": {"npu.huawei.com/vNPU": "1"}}
    apply(cluster, json.dumps(manifest))
    wait_for(lambda: pod(cluster, "vnpu-pod")["status"].get("phase") == "Running", 60, "the vNPU pod Running")
    log = wait_for(lambda: "ASCEND_VNPU_SPECS=" in (text := cluster.pod_log("default", "vnpu-pod")) and text, 30,
                   "the vNPU pod's log")
    # a vNPU is visible by its vNPU id (physical id x 16 + 100 + k: 100..103 on die 0), Ascend's convention
    # an existing vNPU, as Ascend's runtime mounts one: VIRTUAL, and no ASCEND_VNPU_SPECS (which would ask it to
    # create another vNPU on a "physical chip" with the vNPU's id)
    assert "ASCEND_VNPU_SPECS=." in log and "ASCEND_RUNTIME_OPTIONS=VIRTUAL" in log
    first = die.physical_id * 16 + 100
    assert log.split("ASCEND_VISIBLE_DEVICES=", 1)[1].split()[0] in {str(first + k) for k in range(4)}


# Placement across several nodes: KWOK nodes (fake kubelets) with the real node's NPU capacity, labels and topology,
# in two zones. The real kube-scheduler and fuyao's extender decide; KWOK only marks the pods Running.
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def kwok_nodes(cluster: LocalCluster) -> list[str]:
    return cluster.add_kwok_nodes(4)  # kwok-0000 and -0002 in zone-0, -0001 and -0003 in zone-1


def kwok_pod(name: str, npus: int, labels: dict[str, str], limits: dict[str, str] | None = None) -> str:
    manifest = json.loads(pod_manifest(name, npus, labels=labels))
    manifest["spec"]["nodeSelector"] = {"type": "kwok"}
    manifest["spec"]["tolerations"] = [KWOK_TOLERATION]
    manifest["spec"]["containers"][0]["resources"]["limits"].update(limits or {})
    return json.dumps(manifest)


def placed(cluster: LocalCluster, name: str) -> str:
    """The node of a pod once it is bound (and KWOK says Running)."""
    return wait_for(lambda: (p := pod(cluster, name))["status"].get("phase") == "Running" and p["spec"]["nodeName"],
                    60, f"{name} Running")


def zone_of(cluster: LocalCluster, node: str) -> str:
    return cluster.get_json("node", node)["metadata"]["labels"]["topology.kubernetes.io/zone"]  # type: ignore[no-any-return]


def test_decode_pods_join_their_prefill_pod(cluster: LocalCluster, kwok_nodes: list[str]) -> None:
    group = {"inference.openfuyao.com/pd-group": "chat"}
    apply(cluster, kwok_pod("chat-prefill-0", 2, {**group, "phase": "prefill"}))
    prefill_node = placed(cluster, "chat-prefill-0")
    assert prefill_node in kwok_nodes
    for i in range(2):  # one at a time: each decision sees the pods before it
        apply(cluster, kwok_pod(f"chat-decode-{i}", 2, {**group, "phase": "decode"}))
        node = placed(cluster, f"chat-decode-{i}")
        assert zone_of(cluster, node) == zone_of(cluster, prefill_node), (i, node, prefill_node)
    first = placed(cluster, "chat-decode-0")
    assert first == prefill_node  # the node of the other phase scores highest
    scores = explain(cluster, "chat-decode-1")["prioritize"]["scores"]
    pd = {node: parts["pd-affinity"] for node, parts in scores.items()}
    assert pd[prefill_node] == max(pd.values())
    other_zone = [n for n in kwok_nodes if zone_of(cluster, n) != zone_of(cluster, prefill_node)]
    assert all(pd[n] < pd[prefill_node] for n in other_zone if n in pd)
    # give the NPUs back for the next placement test (KWOK removes deleted pods)
    cluster.kubectl("delete", "pod", "chat-prefill-0", "chat-decode-0", "chat-decode-1", "--timeout=60s")


def test_ls_pods_avoid_a_busy_node_and_be_pods_go_to_the_colocation_node(cluster: LocalCluster,
                                                                           kwok_nodes: list[str]) -> None:
    from fuyao.contracts import ANNOTATION_NODE_USAGE, NodeUsage, dump_annotation

    busy, colocation = kwok_nodes[1], kwok_nodes[3]
    now = time.time()
    for node in kwok_nodes:  # what QoS agents would publish: one node at 97 % CPU, the others quiet
        used = 0.97 if node == busy else 0.1
        usage = NodeUsage(updated_at=now, cpu_capacity_milli=64000, cpu_used_milli=int(64000 * used),
                          memory_capacity_bytes=256 * 2**30, memory_used_bytes=32 * 2**30)
        cluster.kubectl("annotate", "node", node, "--overwrite", f"{ANNOTATION_NODE_USAGE}={dump_annotation(usage)}")
    cluster.kubectl("label", "node", colocation, "volcano.sh/colocation=true")
    cluster.kubectl("patch", "node", colocation, "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"capacity": {"kubernetes.io/batch-cpu": "8000", "kubernetes.io/batch-memory": str(16 * 2**30)},
                    "allocatable": {"kubernetes.io/batch-cpu": "8000",
                                    "kubernetes.io/batch-memory": str(16 * 2**30)}}}))

    apply(cluster, kwok_pod("ls-server", 1, {"volcano.sh/qos": "LS"}))
    assert placed(cluster, "ls-server") != busy
    rejected = explain(cluster, "ls-server")["filter"]["rejected"]
    assert rejected.get(busy, "").startswith("qos-colocation: node usage (share of capacity) cpu 0.97")

    for i in range(2):
        apply(cluster, kwok_pod(f"be-batch-{i}", 1, {"volcano.sh/qos": "BE"},
                                {"kubernetes.io/batch-cpu": "1000", "kubernetes.io/batch-memory": str(2**30)}))
        assert placed(cluster, f"be-batch-{i}") == colocation


def test_the_router_discovers_an_annotated_service_of_engine_pods_and_serves_through_it(
        cluster: LocalCluster) -> None:
    """fuyao's runtime image (built here: debootstrap + pip, cached) runs two engine-simulator pods behind a Service
    annotated for routing; a router with discovery finds them through the real EndpointSlices and serves a chat
    completion from one of them (the host reaches pod IPs over the harness's link)."""
    import subprocess
    import sys
    import urllib.request

    from tests.support.apiserver import free_port
    from tests.support.runtime_image import build

    archive, image = build()
    cluster.import_image(archive)
    labels = {"app": "chat-sim"}
    container = {"name": "engine", "image": image, "imagePullPolicy": "Never",
                 "command": ["python3", "-m", "fuyao.engine_sim.cli", "--host", "0.0.0.0", "--port", "8000",
                             "--model", "sim-chat", "--time-scale", "20"],
                 "ports": [{"name": "http", "containerPort": 8000}],
                 "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}, "periodSeconds": 1}}
    manifests = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat-sim", "namespace": "default"},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
             "metadata": {"labels": labels},
             "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                      "containers": [container]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {
            "name": "chat-sim", "namespace": "default",
            "annotations": {"inference.openfuyao.com/enable-router": "true",
                            "inference.openfuyao.com/health-check-path": "/health"}},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 8000, "targetPort": 8000}]}}]
    apply(cluster, json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}))

    def ready_ips() -> list[str]:
        listed = cluster.get_json("pods", "-l", "app=chat-sim")["items"]
        return [p["status"]["podIP"] for p in listed
                if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]

    ips = wait_for(lambda: len(ips := ready_ips()) == 2 and ips, 120, "two engine-simulator pods Ready")
    config = cluster.dir / "router.yaml"
    config.write_text(json.dumps({"version": "v1", "router": {
        "strategy": "round-robin", "discovery": {"enabled": True, "namespace": "default"},
        "health_check": {"path": "/health", "interval": "1s", "timeout": "2s"}}}))
    port = free_port()
    log = open(cluster.dir / "logs" / "router.log", "ab")  # noqa: SIM115
    router = subprocess.Popen([sys.executable, "-m", "fuyao.inference_router.cli", "--config", str(config),
                               "--listen", f"127.0.0.1:{port}", "--kubeconfig",
                               str(cluster.dir / "admin.kubeconfig")], stdout=log, stderr=log)
    try:
        def ask() -> dict | None:  # type: ignore[type-arg]
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                headers={"Content-Type": "application/json"},
                data=json.dumps({"model": "sim-chat", "max_tokens": 8,
                                 "messages": [{"role": "user", "content": "hello from the e2e test"}]}).encode())
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return json.loads(response.read())  # type: ignore[no-any-return]
            except OSError:
                return None

        answer = wait_for(ask, 60, "a chat completion through the router")
        assert answer["object"] == "chat.completion" and answer["model"] == "sim-chat"
        assert answer["choices"][0]["message"]["content"]

        def healthy() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/backends", timeout=10) as response:
                return sum(1 for b in json.loads(response.read()).values() if b["healthy"])

        wait_for(lambda: healthy() == 2, 30, "both engines healthy in the router")  # each after its health check
        for _ in range(5):
            assert ask() is not None
        # both pods served (round-robin over what discovery found): their own counters say so
        served = []
        for ip in ips:
            with urllib.request.urlopen(f"http://{ip}:8000/metrics", timeout=10) as response:
                text = response.read().decode()
            served.append(metric_total(text, "vllm:request_success_total"))
        assert all(n >= 1 for n in served), served
    finally:
        router.terminate()
        router.wait(30)
        cluster.kubectl("delete", "deployment,service", "chat-sim", "--wait=false")
