"""The QoS agent against a real kube-apiserver (and etcd), under least-privilege RBAC: it follows its node and the
pods bound to it (field-selected watches), publishes batch resources in the Node status and usage as an annotation,
and evicts BE pods through the Eviction API — as a real process, and cycle by cycle in the test's process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuyao.contracts import (
    ANNOTATION_NODE_USAGE,
    RESOURCE_BATCH_CPU,
    RESOURCE_BATCH_MEMORY,
    NodeUsage,
    parse_annotation,
)
from fuyao.qos import cgroups
from fuyao.qos.agent import Agent
from fuyao.qos.collect import Collector
from fuyao.qos.config import build_config
from fuyao.qos.kube import Evictor, NodeState, Publisher
from fuyao.qos.metrics import AgentMetrics
from tests.support.apiserver import LocalApiServer, least_privilege
from tests.support.cgroups import FakeCgroupTree
from tests.support.polling import wait_for
from tests.unit.test_qos import FakeHost

pytestmark = pytest.mark.integration

USER = "fuyao-qos-agent"
# What the chart must grant the QoS agent, and nothing more.
QOS_AGENT_RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
]
GiB = 2**30


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalApiServer]:
    server = LocalApiServer(users={USER: []}).start()
    try:
        server.create([
            *least_privilege(USER, QOS_AGENT_RULES),
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "colo-1"}},
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "other"}},
        ])
        api = server.client()
        api.patch_node_status("colo-1", {"status": {"capacity": {"cpu": "8", "memory": "64Gi", "pods": "110"},
                                                    "allocatable": {"cpu": "7", "memory": "60Gi", "pods": "110"}}})
        yield server
    finally:
        server.stop()


def make_pod(cluster: LocalApiServer, name: str, node: str, qos: str | None, priority: int = 0) -> str:
    from kubernetes import client

    body = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"volcano.sh/qos": qos} if qos else {}),
        spec=client.V1PodSpec(node_name=node, priority=priority, containers=[
            client.V1Container(name="main", image="registry.invalid/app:1")]))
    return cluster.client().create_namespaced_pod("default", body).metadata.uid  # type: ignore[no-any-return]


def test_cycles_publish_batch_resources_and_evict_be_pods_under_memory_pressure(
        cluster: LocalApiServer, tmp_path: Path) -> None:
    ls = make_pod(cluster, "online", "colo-1", None)
    be_small = make_pod(cluster, "batch-small", "colo-1", "BE")
    be_big = make_pod(cluster, "batch-big", "colo-1", "BE")
    elsewhere = make_pod(cluster, "elsewhere", "other", "BE")
    tree = FakeCgroupTree(tmp_path, 2, "systemd")
    tree.add_pod(ls, "burstable", memory=20 * GiB)
    tree.add_pod(be_small, "besteffort", memory=2 * GiB)
    tree.add_pod(be_big, "besteffort", memory=10 * GiB)
    api = cluster.client(USER)
    state = NodeState()
    watches = state.follow(api, "colo-1")
    host = FakeHost()
    agent = Agent(build_config({"nodeName": "colo-1"}), Collector(cgroups.detect(tmp_path), 3, host), AgentMetrics(),
                  state, Publisher(api, "colo-1"), Evictor(api))
    try:
        wait_for(lambda: state.ready and len(state.facts()) == 3, what="the node's pods")
        assert elsewhere not in state.facts()  # field-selected: only this node's pods
        agent.cycle()
        host.memory = 40 * GiB
        report = agent.cycle()
        assert report.evictions == [] and report.batch_published
        status = cluster.client().read_node_status("colo-1").status
        assert int(status.allocatable[RESOURCE_BATCH_CPU]) == report.batch["kubernetes.io/batch-cpu"]
        # 64Gi x 65% - max(system 8Gi, reserved 4Gi) - LS 20Gi
        assert int(status.capacity[RESOURCE_BATCH_MEMORY]) == int(64 * GiB * 0.65) - 8 * GiB - 20 * GiB
        usage = parse_annotation(ANNOTATION_NODE_USAGE, cluster.client().read_node("colo-1").metadata.annotations[
            ANNOTATION_NODE_USAGE], NodeUsage)
        assert usage.memory_used_bytes == 40 * GiB and usage.be_memory_used_bytes == 12 * GiB

        host.memory = 58 * GiB  # 90.6% of 64Gi: above 85%, evict BE pods down to 80% (51.2Gi)
        report = agent.cycle()
        assert [e.pod for e in report.evictions] == ["default/batch-big"] and report.evictions[0].error == ""
        gone = wait_for(lambda: _deleting_or_gone(cluster, "batch-big"), what="the evicted pod")
        assert gone and not _deleting_or_gone(cluster, "batch-small") and not _deleting_or_gone(cluster, "online")
        again = agent.cycle()  # the pod is on its way out: not evicted twice, and nothing else is needed
        assert again.evictions == []
    finally:
        for watch in watches:
            watch.stop()


def _deleting_or_gone(cluster: LocalApiServer, name: str) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        pod = cluster.client().read_namespaced_pod(name, "default")
    except ApiException as exc:
        return exc.status == 404
    return pod.metadata.deletion_timestamp is not None


def test_the_agent_process_publishes_its_node(cluster: LocalApiServer, tmp_path: Path) -> None:
    tree = FakeCgroupTree(tmp_path / "cg", 1, "cgroupfs")
    tree.add_pod(make_pod(cluster, "proc-ls", "colo-1", None), "burstable", memory=GiB)
    env = {**os.environ, "NODE_NAME": "colo-1"}
    proc = subprocess.Popen([sys.executable, "-m", "fuyao.qos.cli", "--kubeconfig", cluster.kubeconfig_for(USER),
                             "--cgroup-root", str(tmp_path / "cg"), "--interval", "0.5s", "--metrics-address", ""],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        api = cluster.client()
        before = (api.read_node("colo-1").metadata.annotations or {}).get(ANNOTATION_NODE_USAGE)
        usage = wait_for(lambda: (a := (api.read_node("colo-1").metadata.annotations or {}).get(
            ANNOTATION_NODE_USAGE)) != before and a, what="the usage annotation")
        assert json.loads(usage)["cpu_capacity_milli"] == 8000  # the Node's capacity, not the host's
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_the_agent_user_cannot_do_more_than_its_rules(cluster: LocalApiServer) -> None:
    from kubernetes.client.exceptions import ApiException

    api = cluster.client(USER)
    with pytest.raises(ApiException) as err:
        api.delete_namespaced_pod("online", "default")
    assert err.value.status == 403
    with pytest.raises(ApiException) as err:
        api.list_secret_for_all_namespaces()
    assert err.value.status == 403
