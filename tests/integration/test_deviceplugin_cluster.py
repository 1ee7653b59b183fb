"""The device plugin against a real kube-apiserver (and etcd): node labels and the topology annotation, patched
only on change, and the scheduler's device choice read from pending pods — under least-privilege RBAC."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from fuyao.contracts import (
    ANNOTATION_NODE_FAULTS,
    ANNOTATION_NODE_TOPOLOGY,
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_NPU,
    ContainerAssignment,
    DeviceHealth,
    FaultAction,
    NodeFaults,
    NodeTopology,
    PodAssignment,
    dump_annotation,
    parse_annotation,
)
from tests.support.apiserver import LocalApiServer, least_privilege
from tests.support.deviceplugin import PluginUnderTest
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

USER = "fuyao-device-plugin"
# What the chart must grant the device plugin, and nothing more.
DEVICE_PLUGIN_RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalApiServer]:
    server = LocalApiServer(users={USER: []}).start()
    try:
        server.create([
            *least_privilege(USER, DEVICE_PLUGIN_RULES),
        ])
        yield server
    finally:
        server.stop()


@pytest.fixture
def node(cluster: LocalApiServer) -> Iterator[str]:
    from kubernetes import client

    api = cluster.client()
    name = f"node-{int(time.time() * 1000) % 10**8}"
    api.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=name, labels={"keep": "me"})))
    yield name
    api.delete_node(name)


@pytest.fixture
def plugin(cluster: LocalApiServer, node: str) -> Iterator[PluginUnderTest]:
    p = PluginUnderTest("910b4-8", extra_args=("--kubeconfig", cluster.kubeconfig_for(USER), "--node-name", node,
                                               "--server-usage", "infer", "--link-interval", "0.5s"))
    try:
        p.start()
        p.wait_ready()
        yield p
    finally:
        p.close()


def topology_of(api, node: str) -> NodeTopology | None:  # type: ignore[no-untyped-def]
    raw = (api.read_node(node).metadata.annotations or {}).get(ANNOTATION_NODE_TOPOLOGY)
    return parse_annotation(ANNOTATION_NODE_TOPOLOGY, raw, NodeTopology) if raw else None


def test_labels_and_topology_are_published_and_patched_only_on_change(
        cluster: LocalApiServer, node: str, plugin: PluginUnderTest) -> None:
    api = cluster.client()
    topo = wait_for(lambda: topology_of(api, node), what="the topology annotation")
    labels = api.read_node(node).metadata.labels
    assert labels["accelerator"] == "huawei-ascend-npu" and labels["accelerate-type"] == "910B4"
    assert labels["npu.openfuyao.com/device-count"] == "8" and labels["server-usage"] == "infer"
    assert labels["node.kubernetes.io/npu-driver"] and labels["keep"] == "me"  # others' labels untouched
    assert len(topo.devices) == 8 and {d.health for d in topo.devices.values()} == {DeviceHealth.HEALTHY}
    assert {d.numa_node for d in topo.devices.values()} == {0, 1, 2, 3}

    version = api.read_node(node).metadata.resource_version
    time.sleep(2.5)  # about five health polls (every 0.5 s) with nothing changing
    assert api.read_node(node).metadata.resource_version == version

    # a container gets two dies: the annotation says which (the extender then knows, whoever bound the pod)
    plugin.kubelet.admit("holder", RESOURCE_NPU, 2)
    held = set(plugin.kubelet.pods["holder"][RESOURCE_NPU])
    wait_for(lambda: {i for i, d in topology_of(api, node).devices.items() if d.allocated} == held,
             what="allocated dies in the annotation")
    plugin.kubelet.delete_pod("holder")
    wait_for(lambda: not any(d.allocated for d in topology_of(api, node).devices.values()),
             what="released dies in the annotation")

    plugin.fake("fake", "set-health", "-i", "4", "Critical")
    wait_for(lambda: topology_of(api, node).devices["Ascend910-4"].health == DeviceHealth.UNHEALTHY,
             what="Ascend910-4 Unhealthy in the annotation")
    plugin.fake("fake", "set-health", "-i", "4", "OK")
    wait_for(lambda: topology_of(api, node).devices["Ascend910-4"].health == DeviceHealth.HEALTHY,
             what="Ascend910-4 Healthy again")


def faults_of(api, node: str) -> NodeFaults | None:  # type: ignore[no-untyped-def]
    raw = (api.read_node(node).metadata.annotations or {}).get(ANNOTATION_NODE_FAULTS)
    return parse_annotation(ANNOTATION_NODE_FAULTS, raw, NodeFaults) if raw else None


def node_events(api, node: str) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    out: dict[str, list[str]] = {}
    for e in api.list_namespaced_event("default", field_selector=f"involvedObject.name={node}").items:
        out.setdefault(e.reason, []).append(e.message)
    return out


def test_faults_reach_the_node_annotation_and_events(cluster: LocalApiServer, node: str,
                                                     plugin: PluginUnderTest) -> None:
    api = cluster.client()
    with plugin.kubelet._cond:
        plugin.kubelet.pods["llm-0"] = {RESOURCE_NPU: ["Ascend910-2"]}
    plugin.fake("fake", "set-health", "-i", "2", "Alarm", "--code", "8C03A000")  # RestartNPU, on a held chip
    plugin.fake("fake", "set-link", "-i", "6", "DOWN")
    faults = wait_for(lambda: (f := faults_of(api, node)) and "Ascend910-2" in f.devices and f, 30,
                      "the fault in the node annotation")
    fault = faults.devices["Ascend910-2"]
    assert fault.codes == ("8C03A000",) and fault.level == "RestartNPU" and fault.action == FaultAction.RESET
    assert fault.holder == "default/llm-0" and "held by pod default/llm-0" in fault.state and fault.since
    assert topology_of(api, node).devices["Ascend910-2"].health == DeviceHealth.UNHEALTHY
    events = wait_for(lambda: (e := node_events(api, node)) and "NpuFault" in e and e, 30, "an NpuFault event")
    assert any("8C03A000" in m and "RestartNPU" in m for m in events["NpuFault"])
    # the pod ends: the chip is reset, comes back, and the annotation and events say so
    plugin.kubelet.delete_pod("llm-0")
    wait_for(lambda: "Ascend910-2" not in faults_of(api, node).devices, 30, "the fault gone from the annotation")
    events = wait_for(lambda: (e := node_events(api, node)) and "NpuRecovered" in e and e, 30, "NpuRecovered")
    assert any("Ascend910-2" in m for m in events["NpuReset"])
    assert topology_of(api, node).devices["Ascend910-2"].health == DeviceHealth.HEALTHY
    # a link down: published, and the die stays Healthy (single-NPU pods may use it)
    wait_for(lambda: topology_of(api, node).devices["Ascend910-6"].link_up is False, 30, "link down in the topology")
    assert faults_of(api, node).devices["Ascend910-6"].link_up is False
    assert topology_of(api, node).devices["Ascend910-6"].health == DeviceHealth.HEALTHY
    assert any("Ascend910-6" in m for m in wait_for(lambda: node_events(api, node).get("NpuLinkDown"), 30,
                                                     "an NpuLinkDown event"))


def test_scheduler_choice_in_a_pending_pod_wins_preferred_allocation(
        cluster: LocalApiServer, node: str, plugin: PluginUnderTest) -> None:
    from kubernetes import client

    api = cluster.client()
    chosen = ("Ascend910-3", "Ascend910-6")  # not what topology alone would pick
    assignment = PodAssignment(node=node, containers=(ContainerAssignment(container="c", resource=RESOURCE_NPU,
                                                                          devices=chosen),))

    def pod(name: str, annotation: str) -> client.V1Pod:
        return client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, annotations={ANNOTATION_POD_ASSIGNED: annotation}),
            spec=client.V1PodSpec(node_name=node, containers=[client.V1Container(
                name="c", image="busybox", resources=client.V1ResourceRequirements(
                    limits={RESOURCE_NPU: "2"}))]))

    api.create_namespaced_pod("default", pod(f"bad-{node}", "{not json"))
    api.create_namespaced_pod("default", pod(f"good-{node}", dump_annotation(assignment)))
    try:
        available = [f"Ascend910-{i}" for i in range(8)]
        assert plugin.kubelet.preferred(RESOURCE_NPU, available, 2) == list(chosen)
        # without a fitting choice, topology decides (size 4 ≠ the pod's 2)
        assert len(plugin.kubelet.preferred(RESOURCE_NPU, available, 4)) == 4
        entry = plugin.wait_log("ignoring pod default/bad-")
        assert "not valid JSON" in str(entry["msg"])
    finally:
        api.delete_namespaced_pod(f"good-{node}", "default", grace_period_seconds=0)
        api.delete_namespaced_pod(f"bad-{node}", "default", grace_period_seconds=0)


def test_the_plugin_user_cannot_do_more_than_its_rules(cluster: LocalApiServer, node: str) -> None:
    from kubernetes.client.exceptions import ApiException

    api = cluster.client(USER)
    api.read_node(node)
    with pytest.raises(ApiException) as err:
        api.delete_node(node)
    assert err.value.status == 403
    with pytest.raises(ApiException) as err:
        api.list_secret_for_all_namespaces()
    assert err.value.status == 403
    assert json.loads(err.value.body)["reason"] == "Forbidden"


def test_static_vnpus_appear_in_the_topology_annotation(cluster: LocalApiServer, node: str) -> None:
    import json as jsonlib

    api = cluster.client()
    p = PluginUnderTest("910b4-8")
    config = p.root / "vnpu-config.json"
    config.write_text(jsonlib.dumps({"devices": [{"device_id": "3", "vnpu_count": 2, "vnpu_memory": "16GB"}]}))
    p.extra_args = ("--kubeconfig", cluster.kubeconfig_for(USER), "--node-name", node, "--vnpu-config", str(config))
    try:
        p.start()
        topo = wait_for(lambda: (t := topology_of(api, node)) and t.devices["Ascend910-3"].vnpus and t,
                        what="vNPU slices in the annotation")
        slices = topo.devices["Ascend910-3"].vnpus
        assert [(s.id, s.template, s.aicore, s.memory_mb) for s in slices] == [
            ("Ascend910-3-v148", "vir10_3c_16g", 10, 16384), ("Ascend910-3-v149", "vir10_3c_16g", 10, 16384)]
        assert all(not d.vnpus for i, d in topo.devices.items() if i != "Ascend910-3")
    finally:
        p.close()


def test_dynamic_vnpu_uses_the_template_the_scheduler_chose(cluster: LocalApiServer, node: str) -> None:
    from kubernetes import client

    from fuyao.contracts import RESOURCE_NPU_CORE

    api = cluster.client()
    p = PluginUnderTest("910b4-8")
    settings = p.root / "plugin.yaml"
    settings.write_text("version: v1\nvnpu: {mode: dynamic, reconcileInterval: 0.3s, collectGrace: 0.5s}\n")
    p.extra_args = ("--kubeconfig", cluster.kubeconfig_for(USER), "--node-name", node, "--config", str(settings))
    cores = tuple(f"Ascend910-6-c{i}" for i in range(4))
    assignment = PodAssignment(node=node, containers=(ContainerAssignment(
        container="c", resource=RESOURCE_NPU_CORE, devices=cores, vnpu_template="vir10_3c_16g"),))
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name=f"dyn-{node}", annotations={ANNOTATION_POD_ASSIGNED:
                                                                       dump_annotation(assignment)}),
        spec=client.V1PodSpec(node_name=node, containers=[client.V1Container(
            name="c", image="busybox", resources=client.V1ResourceRequirements(limits={RESOURCE_NPU_CORE: "4"}))]))
    api.create_namespaced_pod("default", pod)
    try:
        p.start()
        p.kubelet.wait_registered(RESOURCE_NPU_CORE, timeout=30)
        p.kubelet.wait_devices(RESOURCE_NPU_CORE)
        response = p.kubelet.admit("dyn", RESOURCE_NPU_CORE, 4)
        # the scheduler's chip and template, not the smallest covering one (vir05_1c_8g)
        assert response.annotations["npu.openfuyao.com/vnpu-templates"] == "vir10_3c_16g"
        assert "ASCEND_VNPU_SPECS" not in response.envs
        assert p.kubelet.pods["dyn"][RESOURCE_NPU_CORE] == list(cores)
        assert 'fuyao_vnpu_operations_total{action="create",result="ok"} 1.0' in p.metrics()
    finally:
        api.delete_namespaced_pod(f"dyn-{node}", "default", grace_period_seconds=0)
        p.close()


def test_exclusive_cpus_per_numa_node_are_published(cluster: LocalApiServer, node: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a host with four NUMA nodes of 48 CPUs (the fake's NPU CPU affinities fall inside them), under the static CPU
    # manager policy with CPUs 0-1 reserved
    for n in range(4):
        (tmp_path / f"devices/system/node/node{n}").mkdir(parents=True)
        (tmp_path / f"devices/system/node/node{n}/cpulist").write_text(f"{n * 48}-{n * 48 + 47}\n")
    p = PluginUnderTest("910b4-8", extra_args=("--kubeconfig", cluster.kubeconfig_for(USER), "--node-name", node,
                                               "--sysfs-root", str(tmp_path)))
    p.kubelet.allocatable_cpus = list(range(2, 192))
    api = cluster.client()
    try:
        p.start()
        p.wait_ready()
        topo = wait_for(lambda: (t := topology_of(api, node)) and t.numa_cpus and t, what="NUMA CPUs")
        assert {i: (c.allocatable, c.exclusive) for i, c in topo.numa_cpus.items()} == {
            0: (46, 0), 1: (48, 0), 2: (48, 0), 3: (48, 0)}
        assert {d.numa_node for d in topo.devices.values()} == {0, 1, 2, 3}  # from sysfs, same numbering
        p.kubelet.pin_cpus("guaranteed", list(range(50, 58)))
        wait_for(lambda: topology_of(api, node).numa_cpus[1].exclusive == 8, what="exclusive CPUs on NUMA node 1")
        p.kubelet.delete_pod("guaranteed")
        wait_for(lambda: topology_of(api, node).numa_cpus[1].exclusive == 0, what="released CPUs")
    finally:
        p.close()
