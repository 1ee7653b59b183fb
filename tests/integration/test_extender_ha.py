"""Two extender replicas against a real kube-apiserver, as the chart runs them (leaderElection): one binder elected
with a Lease, binds sent to either replica, no device handed out twice, and the follower taking over when the leader
dies (after the lease expires) or stops (at once: it releases the lease). Each replica has only the RBAC the chart
grants."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fuyao.contracts import (
    ANNOTATION_LEADER_URL,
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_NPU,
    PodAssignment,
    parse_annotation,
)
from tests.component.test_extender_http import Extender
from tests.integration.test_extender_cluster import EXTENDER_RULES
from tests.support.apiserver import LocalApiServer, free_port, least_privilege
from tests.support.engines import metric_total
from tests.support.k8s_objects import node, pod, topology
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

USER = "fuyao-scheduler-extender"
LEASE = "fuyao-scheduler-extender"
TIMING = {"leaseDuration": "3s", "renewDeadline": "2s", "retryPeriod": "0.5s"}


def leader_rules(lease: str) -> list[dict]:  # type: ignore[type-arg]
    """The chart's Role for the binder Lease (in the release namespace), and nothing more."""
    return [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease],
         "verbs": ["get", "update"]},
    ]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalApiServer]:
    server = LocalApiServer(users={USER: []})
    server.start()
    try:
        server.create([
            *least_privilege(USER, EXTENDER_RULES),
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "extender-leader", "namespace": "default"}, "rules": leader_rules(LEASE)},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "extender-leader", "namespace": "default"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "extender-leader"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]},
        ])
        admin = server.client()
        for name in ("npu-a", "npu-b"):
            raw = node(name, topo=topology())
            admin.create_node({k: v for k, v in raw.items() if k != "status"})
            admin.patch_node_status(name, {"status": raw["status"]})
        yield server
    finally:
        server.stop()


def replica(cluster: LocalApiServer, tmp: Path, identity: str) -> Extender:
    port = free_port()
    config = tmp / f"{identity}.yaml"
    config.write_text(yaml.safe_dump({"version": "v1", "leaderElection": {
        "enabled": True, "namespace": "default", "leaseName": LEASE, "identity": identity,
        "advertiseUrl": f"http://127.0.0.1:{port}", **TIMING}}))
    e = Extender("--config", str(config), "--kubeconfig", cluster.kubeconfig_for(USER), port=port)
    wait_for(lambda: e.get("/readyz")[0] == 200, 30, f"{identity} ready")
    return e


def leading(e: Extender) -> bool:
    status, text = e.get("/metrics")
    return status == 200 and metric_total(text, "fuyao_extender_leader") == 1


def lease(cluster: LocalApiServer) -> dict:  # type: ignore[type-arg]
    from kubernetes import client

    raw = client.CoordinationV1Api(cluster.client().api_client).read_namespaced_lease(LEASE, "default")
    return cluster.client().api_client.sanitize_for_serialization(raw)  # type: ignore[no-any-return]


def create_pod(cluster: LocalApiServer, name: str) -> str:
    raw = pod(name, requests={RESOURCE_NPU: "1"})
    for key in ("uid", "creationTimestamp"):
        raw["metadata"].pop(key)
    raw.pop("status")
    return str(cluster.client().create_namespaced_pod("default", raw).metadata.uid)


def bind(e: Extender, name: str, uid: str, node_name: str) -> str:
    status, answer = e.post("/bind", {"PodName": name, "PodNamespace": "default", "PodUID": uid, "Node": node_name})
    assert status == 200, answer
    return str(answer["Error"])  # type: ignore[index]


def devices_on(cluster: LocalApiServer, node_name: str) -> list[str]:
    """Every NPU the pods bound to ``node_name`` were given (duplicates kept: a device twice is a double booking)."""
    found = []
    for p in cluster.client().list_namespaced_pod("default").items:
        raw = (p.metadata.annotations or {}).get(ANNOTATION_POD_ASSIGNED)
        if p.spec.node_name == node_name and raw:
            found += [d for c in parse_annotation(ANNOTATION_POD_ASSIGNED, raw, PodAssignment).containers
                      for d in c.devices]
    return found


@pytest.fixture
def replicas(cluster: LocalApiServer, tmp_path: Path) -> Iterator[dict[str, Extender]]:
    pair = {name: replica(cluster, tmp_path, name) for name in ("replica-a", "replica-b")}
    yield pair
    for e in pair.values():
        if e.proc.poll() is None:
            e.stop()


def test_one_replica_binds_the_other_forwards_and_no_npu_is_given_twice(cluster: LocalApiServer,
                                                                        replicas: dict[str, Extender]) -> None:
    wait_for(lambda: sum(leading(e) for e in replicas.values()) == 1, 15, "exactly one leader")
    leader = next(n for n, e in replicas.items() if leading(e))
    follower = next(n for n in replicas if n != leader)
    record = lease(cluster)
    assert record["spec"]["holderIdentity"] == leader and record["spec"]["leaseDurationSeconds"] == 3
    assert record["metadata"]["annotations"][ANNOTATION_LEADER_URL] == replicas[leader].url
    # 8 one-NPU pods for one 8-NPU node, bound at once, half through each replica
    pods = {f"ha-{i}": create_pod(cluster, f"ha-{i}") for i in range(8)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(lambda item: bind(replicas[(leader, follower)[int(item[0][3:]) % 2]], *item, "npu-a"),
                               pods.items()))
    assert errors == [""] * 8
    given = devices_on(cluster, "npu-a")
    assert len(given) == 8 and len(set(given)) == 8, given  # every NPU once
    assert metric_total(replicas[follower].get("/metrics")[1], "fuyao_extender_forwarded_binds_total",
                        result="ok") == 4
    # a ninth finds the node full, whichever replica it reaches
    uid = create_pod(cluster, "ha-8")
    assert "no allowed set of 1 free NPUs" in bind(replicas[follower], "ha-8", uid, "npu-a")


def test_the_follower_takes_over_when_the_leader_dies_and_at_once_when_it_stops(
        cluster: LocalApiServer, replicas: dict[str, Extender], tmp_path: Path) -> None:
    wait_for(lambda: sum(leading(e) for e in replicas.values()) == 1, 15, "exactly one leader")
    leader = next(n for n, e in replicas.items() if leading(e))
    follower = next(n for n in replicas if n != leader)
    replicas[leader].proc.kill()  # dies without releasing the lease
    replicas[leader].proc.wait(10)
    killed = time.monotonic()
    uid = create_pod(cluster, "after-kill")
    errors = []
    while (error := bind(replicas[follower], "after-kill", uid, "npu-b")) and time.monotonic() - killed < 10:
        errors.append(error)
        time.sleep(0.2)
    took = time.monotonic() - killed
    assert error == "", errors[-3:]
    assert any("cannot forward" in e or "binder lease" in e for e in errors), errors[:3]  # clear, while it waited
    assert 2.0 <= took <= 3.0 + 2 * 0.6 + 1.5, took  # not before the lease expired; soon after
    assert lease(cluster)["spec"]["holderIdentity"] == follower and leading(replicas[follower])
    # the new leader hands the lease over at once when it stops cleanly
    fresh = replica(cluster, tmp_path, "replica-c")
    replicas["replica-c"] = fresh
    code, _ = replicas[follower].stop()
    assert code == 0
    stopped = time.monotonic()
    wait_for(lambda: leading(fresh), 5, "replica-c leading")
    assert time.monotonic() - stopped < 2.0  # released: no lease expiry to wait out
    uid = create_pod(cluster, "after-stop")
    assert bind(fresh, "after-stop", uid, "npu-b") == ""
    assert len(set(devices_on(cluster, "npu-b"))) == len(devices_on(cluster, "npu-b")) == 2
