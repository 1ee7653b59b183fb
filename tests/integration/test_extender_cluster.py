"""The scheduler extender against a real kube-apiserver: watches (NodeNames mode), binding with device choice,
two binds racing for the same devices, re-list after the watch expires, and Warning events — as a user with only
the RBAC the chart grants."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest

from fuyao.contracts import ANNOTATION_POD_ASSIGNED, RESOURCE_NPU, PodAssignment, parse_annotation
from fuyao.kube_client import rest_endpoint
from fuyao.scheduler_extender.cluster import ClusterCache, Watcher
from tests.component.test_extender_http import Extender
from tests.support.apiserver import LocalApiServer, least_privilege
from tests.support.k8s_objects import node, pod, topology

pytestmark = pytest.mark.integration

USER = "fuyao-scheduler-extender"
# What the chart must grant the extender, and nothing more.
EXTENDER_RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/binding"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalApiServer]:
    # compaction every second, so an old resourceVersion is really gone (410) for the re-list test
    server = LocalApiServer(users={USER: []}, extra_args=("--etcd-compaction-interval=1s", "--watch-cache=false"))
    server.start()
    try:
        server.create([
            *least_privilege(USER, EXTENDER_RULES),
        ])
        admin = server.client()
        for name, raw in (("npu-a", node("npu-a", topo=topology())), ("npu-b", node("npu-b", topo=topology("a1"))),
                          ("plain", node("plain", npus=0))):
            raw = {k: v for k, v in raw.items() if k != "status"}
            admin.create_node(raw)
            status = node(name, topo=topology() if name == "npu-a" else topology("a1"),
                          npus=0 if name == "plain" else 8)["status"]
            admin.patch_node_status(name, {"status": status})
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def extender(cluster: LocalApiServer) -> Iterator[Extender]:
    e = Extender("--kubeconfig", cluster.kubeconfig_for(USER))
    deadline = time.monotonic() + 30
    while e.get("/readyz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert e.get("/readyz")[0] == 200
    yield e
    e.stop()


def create_pod(cluster: LocalApiServer, name: str, npus: int, **kw) -> dict:  # type: ignore[no-untyped-def, type-arg]
    raw = pod(name, requests={RESOURCE_NPU: str(npus)} if npus else {"cpu": "1"}, **kw)
    raw["metadata"].pop("uid")
    raw["metadata"].pop("creationTimestamp")
    raw.pop("status")
    created = cluster.client().create_namespaced_pod("default", raw)
    return cluster.client().api_client.sanitize_for_serialization(created)


def assigned(cluster: LocalApiServer, name: str) -> PodAssignment | None:
    p = cluster.client().read_namespaced_pod(name, "default")
    raw = (p.metadata.annotations or {}).get(ANNOTATION_POD_ASSIGNED)
    return parse_annotation(ANNOTATION_POD_ASSIGNED, raw, PodAssignment) if raw else None


def test_filter_by_node_names_uses_the_watch_cache(cluster: LocalApiServer, extender: Extender) -> None:
    p = create_pod(cluster, "names-4", 4)
    status, result = extender.post("/filter", {"Pod": p, "Nodes": None, "NodeNames": ["npu-a", "npu-b", "plain"]})
    assert status == 200 and result["Error"] == "" and result["Nodes"] is None
    assert result["NodeNames"] == ["npu-a", "npu-b"]
    assert result["FailedAndUnresolvableNodes"] == {"plain": "device-fit: node has 0 npu.huawei.com/NPU, the pod "
                                                             "asks for 4"}
    _, scores = extender.post("/prioritize", {"Pod": p, "NodeNames": ["npu-a", "npu-b"]})
    assert {s["Host"] for s in scores} == {"npu-a", "npu-b"}


def test_bind_chooses_devices_annotates_and_binds(cluster: LocalApiServer, extender: Extender) -> None:
    p = create_pod(cluster, "bind-2", 2)
    status, result = extender.post("/bind", {"PodName": "bind-2", "PodNamespace": "default",
                                             "PodUID": p["metadata"]["uid"], "Node": "npu-b"})
    assert (status, result) == (200, {"Error": ""})
    bound = cluster.client().read_namespaced_pod("bind-2", "default")
    assert bound.spec.node_name == "npu-b"
    assignment = assigned(cluster, "bind-2")
    assert assignment is not None and assignment.node == "npu-b"
    devices = assignment.containers[0].devices
    assert len(devices) == 2 and len({int(d.rsplit("-", 1)[1]) // 4 for d in devices}) == 1  # one A1 ring
    # a retried bind (the first answer was lost) changes nothing
    assert extender.post("/bind", {"PodName": "bind-2", "PodNamespace": "default", "PodUID": p["metadata"]["uid"],
                                   "Node": "npu-b"})[1] == {"Error": ""}
    assert assigned(cluster, "bind-2").containers[0].devices == devices  # type: ignore[union-attr]
    retry_elsewhere = extender.post("/bind", {"PodName": "bind-2", "PodNamespace": "default",
                                              "PodUID": p["metadata"]["uid"], "Node": "npu-a"})[1]
    assert "already bound to npu-b" in retry_elsewhere["Error"]  # type: ignore[index]
    # the next 4-card pod on that board must get the other, whole ring
    p4 = create_pod(cluster, "bind-4", 4)
    assert extender.post("/bind", {"PodName": "bind-4", "PodNamespace": "default", "PodUID": p4["metadata"]["uid"],
                                   "Node": "npu-b"})[1] == {"Error": ""}
    ring = {int(d.rsplit("-", 1)[1]) // 4 for d in assigned(cluster, "bind-4").containers[0].devices}  # type: ignore[union-attr]
    assert len(ring) == 1 and ring != {int(devices[0].rsplit("-", 1)[1]) // 4}


def test_bind_reads_a_pod_bigger_than_the_clients_back_pressure_mark(cluster: LocalApiServer,
                                                                     extender: Extender) -> None:
    """A pod the extender never saw (no filter before the bind: a restart, another replica's filter) is read with
    one GET; a big one (here ~600 kB of environment) must be read whole, not stall at the HTTP client's 256 kB
    back-pressure mark until the bind's timeout."""
    raw = pod("big-env", requests={RESOURCE_NPU: "1"})
    raw["metadata"].pop("uid")
    raw["metadata"].pop("creationTimestamp")
    raw.pop("status")
    raw["spec"]["containers"][0]["env"] = [{"name": f"BLOB_{i}", "value": "x" * 100_000} for i in range(6)]
    created = cluster.client().api_client.sanitize_for_serialization(
        cluster.client().create_namespaced_pod("default", raw))
    started = time.monotonic()
    status, result = extender.post("/bind", {"PodName": "big-env", "PodNamespace": "default",
                                             "PodUID": created["metadata"]["uid"], "Node": "npu-a"})
    assert (status, result) == (200, {"Error": ""})
    assert time.monotonic() - started < 4  # not the 5 s API timeout
    assert cluster.client().read_namespaced_pod("big-env", "default").spec.node_name == "npu-a"
    assert assigned(cluster, "big-env") is not None


def test_two_binds_racing_for_the_same_devices(cluster: LocalApiServer, extender: Extender) -> None:
    first = create_pod(cluster, "race-1", 6)
    second = create_pod(cluster, "race-2", 6)  # npu-a has 8: both cannot have 6
    results: dict[str, dict] = {}  # type: ignore[type-arg]

    def bind(p: dict) -> None:  # type: ignore[type-arg]
        name = p["metadata"]["name"]
        results[name] = extender.post("/bind", {"PodName": name, "PodNamespace": "default",
                                                "PodUID": p["metadata"]["uid"], "Node": "npu-a"})[1]  # type: ignore[assignment]

    threads = [threading.Thread(target=bind, args=(p,)) for p in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    errors = [r["Error"] for r in results.values()]
    assert sorted(bool(e) for e in errors) == [False, True], results
    assert "no allowed set of 6 free NPUs" in next(e for e in errors if e)
    winner = next(n for n, r in results.items() if not r["Error"])
    loser = next(n for n in results if n != winner)
    assert cluster.client().read_namespaced_pod(loser, "default").spec.node_name is None
    taken = set(assigned(cluster, winner).containers[0].devices)  # type: ignore[union-attr]
    assert len(taken) == 6


def test_invalid_annotation_gets_a_warning_event(cluster: LocalApiServer, extender: Extender) -> None:
    p = create_pod(cluster, "bad-type", 0, annotations={"business.workload/type": "quantum"})
    status, result = extender.post("/filter", {"Pod": p, "NodeNames": ["plain"]})
    assert status == 200 and result["NodeNames"] == ["plain"]  # scored neutrally, not rejected
    deadline = time.monotonic() + 15
    events = []
    while time.monotonic() < deadline and not events:
        events = [e for e in cluster.client().list_namespaced_event("default").items
                  if e.involved_object.name == "bad-type" and e.reason == "InvalidAnnotation"]
        time.sleep(0.2)
    assert events and "quantum" in events[0].message and events[0].type == "Warning"


def test_watch_relists_after_410_gone(cluster: LocalApiServer) -> None:
    async def scenario() -> None:
        cache = ClusterCache()
        watcher = Watcher(rest_endpoint(cluster.client(USER)), cache, watch_timeout_s=5)
        pods = watcher.watches["pods"]
        async with aiohttp.ClientSession() as session:
            version = await pods._list(session)
            assert cache.synced["pods"] and version
            create_pod(cluster, "moves-the-revision", 0)
            await asyncio.sleep(3)  # etcd compacts the old revisions
            # a compacted resourceVersion answers 410 Gone: the watcher asks to re-list
            assert await pods._watch(session, version, asyncio.Event()) is None
        await watcher.start()
        try:
            uid = create_pod(cluster, "seen-by-watch", 0)["metadata"]["uid"]
            deadline = time.monotonic() + 15
            while cache.pod_by_uid(uid) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert cache.pod_by_uid(uid) is not None
            assert cache.relists["pods"] >= 2
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def test_an_extender_that_does_not_bind_watches_only_bound_pods(cluster: LocalApiServer) -> None:
    """Without the bind verb nothing reads pending pods: the watch asks the API server for bound ones only, and a
    pod appears in the cache when it is bound (with its node), and leaves it when deleted."""
    async def scenario() -> None:
        cache = ClusterCache()
        watcher = Watcher(rest_endpoint(cluster.client(USER)), cache, watch_timeout_s=5, bound_pods_only=True)
        await watcher.start()
        try:
            deadline = time.monotonic() + 15
            while not cache.ready and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            pending = create_pod(cluster, "pending-unwatched", 1)
            bound = create_pod(cluster, "bound-watched", 1)
            cluster.client().create_namespaced_binding("default", {
                "apiVersion": "v1", "kind": "Binding", "metadata": {"name": "bound-watched"},
                "target": {"apiVersion": "v1", "kind": "Node", "name": "npu-a"}}, _preload_content=False)
            deadline = time.monotonic() + 15
            while cache.pod_by_uid(bound["metadata"]["uid"]) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            seen = cache.pod_by_uid(bound["metadata"]["uid"])
            assert seen is not None and seen.node_name == "npu-a"
            assert cache.pod_by_uid(pending["metadata"]["uid"]) is None  # pending: never sent to this watch
            assert any(p.uid == seen.uid for p in cache.pods_on("npu-a"))
            cluster.client().delete_namespaced_pod("bound-watched", "default", grace_period_seconds=0)
            deadline = time.monotonic() + 15
            while cache.pod_by_uid(seen.uid) is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert cache.pod_by_uid(seen.uid) is None
            assert all(p.uid != seen.uid for p in cache.pods_on("npu-a"))  # its devices are free again
        finally:
            await watcher.stop()
            cluster.client().delete_namespaced_pod("pending-unwatched", "default", grace_period_seconds=0)

    asyncio.run(scenario())


def test_the_extender_user_cannot_do_more_than_its_rules(cluster: LocalApiServer) -> None:
    from kubernetes.client.exceptions import ApiException

    api = cluster.client(USER)
    with pytest.raises(ApiException) as err:
        api.delete_node("plain")
    assert err.value.status == 403
    with pytest.raises(ApiException) as err:
        api.list_secret_for_all_namespaces()
    assert err.value.status == 403 and json.loads(err.value.body)["reason"] == "Forbidden"
