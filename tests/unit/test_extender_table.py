"""The extender's node table: rows kept up to date by watch events equal rows computed from scratch, and a decision
over many nodes at once equals the decisions node by node."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuyao.contracts import RESOURCE_NPU, NumaCpus
from fuyao.http_body import BodyError
from fuyao.scheduler_extender import kube_protocol as kp
from fuyao.scheduler_extender.cluster import ClusterCache
from fuyao.scheduler_extender.config import build_config
from fuyao.scheduler_extender.features import COLUMNS, NodeTable, PdIndex
from fuyao.scheduler_extender.framework import Cycle
from fuyao.scheduler_extender.metrics import ExtenderMetrics
from fuyao.scheduler_extender.model import parse_pod
from fuyao.scheduler_extender.service import ExtenderService, build_framework
from tests.support.k8s_objects import node, pod, topology, usage

NODES = [f"n{i}" for i in range(5)]


def _node(name: str, kind: int, zone: int) -> dict:  # type: ignore[type-arg]
    topo = [None, topology(), topology("a1"), topology(unhealthy=(1,), allocated=(2,), links_down=(5, 6)),
            topology().model_copy(update={"numa_cpus": {n: NumaCpus(allocatable=16, exclusive=4 * n)
                                                        for n in range(4)}})][kind]
    return node(name, topo=topo, labels={"topology.kubernetes.io/zone": f"z{zone}",
                                         **({"volcano.sh/colocation": "true"} if kind == 3 else {})},
                usage=usage(0.5, 0.4) if kind == 1 else None,
                extra={"kubernetes.io/batch-cpu": "4000"} if kind == 3 else None)


def _pod(uid: str, node_name: str | None, dies: list[int], phase: str | None, group: int, business: int) -> dict:  # type: ignore[type-arg]
    labels = {"app": f"g{group}", **({"phase": phase} if phase else {})}
    annotations = {"business.workload/type": ["compute-intensive", "io-intensive", "memory-sensitive"][business]}
    held = [f"Ascend910-{d}" for d in sorted(set(dies))]
    return pod(uid, uid=uid, node_name=node_name, phase="Running" if node_name else "Pending", labels=labels,
               annotations=annotations, requests={"cpu": "1", "memory": "1Gi",
                                                  **({RESOURCE_NPU: str(len(held))} if held else {})},
               assigned={RESOURCE_NPU: held} if held and node_name else None)


events = st.lists(st.one_of(
    st.tuples(st.just("node"), st.sampled_from(NODES), st.integers(0, 4), st.integers(0, 2)),
    st.tuples(st.just("delete-node"), st.sampled_from(NODES)),
    st.tuples(st.just("pod"), st.sampled_from([f"p{i}" for i in range(8)] + ["a0"]), st.sampled_from([None, *NODES]),
              st.lists(st.integers(0, 7), max_size=4), st.sampled_from([None, "prefill", "decode"]),
              st.integers(0, 1), st.integers(0, 2)),
    st.tuples(st.just("delete-pod"), st.sampled_from([f"p{i}" for i in range(8)])),
    st.tuples(st.just("status"), st.sampled_from([f"p{i}" for i in range(3)]),
              st.sampled_from(["Pending", "Running", "Succeeded", "Failed"])),
    st.tuples(st.just("assume"), st.sampled_from([f"a{i}" for i in range(3)]), st.sampled_from(NODES),
              st.lists(st.integers(0, 7), max_size=2), st.sampled_from([None, "prefill", "decode"])),
    st.tuples(st.just("confirm"), st.sampled_from([f"a{i}" for i in range(3)])),  # the watch shows our bind
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(events)
def test_rows_kept_by_watch_events_equal_rows_computed_from_scratch(history: list[tuple]) -> None:  # type: ignore[type-arg]
    cache = ClusterCache("topology.kubernetes.io/zone")
    cache.replace_nodes([])
    cache.replace_pods([])
    last: dict[str, dict] = {}  # type: ignore[type-arg]
    assumed_as: dict[str, tuple] = {}  # type: ignore[type-arg]
    for event in history:
        if event[0] == "node":
            cache.upsert_node(_node(event[1], event[2], event[3]))
        elif event[0] == "delete-node":
            cache.delete_node({"metadata": {"name": event[1]}})
        elif event[0] == "pod":
            last[event[1]] = _pod(*event[1:])
            cache.upsert_pod(last[event[1]])
        elif event[0] == "delete-pod":
            cache.delete_pod({"metadata": {"uid": event[1]}})
            last.pop(event[1], None)
        elif event[0] == "status":  # the same pod, only its status changed (a kubelet's or KWOK's update)
            if event[1] in last:
                raw = last[event[1]]
                raw["metadata"]["resourceVersion"] = str(int(raw["metadata"].get("resourceVersion") or 0) + 1)
                raw["status"] = {**raw.get("status", {}), "phase": event[2], "podIP": "10.0.0.1"}
                cache.upsert_pod(raw)
        elif event[0] == "confirm":  # the watch reports an assumed pod bound as it was assumed
            if event[1] in assumed_as:
                last[event[1]] = _pod(*assumed_as[event[1]])
                cache.upsert_pod(last[event[1]])
        else:
            _, uid, where, dies, phase = event
            assumed_as[uid] = (uid, where, dies, phase, 0, 0)
            cache.assume(parse_pod(_pod(*assumed_as[uid])))
    # from scratch: each node's pods as the cache now holds them, accounted again
    fresh_infos = [dataclasses.replace(info, pods=cache.pods_on(name), memo={}).refresh()
                   for name, info in cache.all_nodes().items()]
    fresh = NodeTable.of(fresh_infos, "topology.kubernetes.io/zone")
    assert set(cache.table.index) == set(fresh.index) == {n.name for n in fresh_infos}
    for name in fresh.index:
        kept, built = cache.table.index[name], fresh.index[name]
        for column in COLUMNS:
            if column == "domain":  # interned ids differ between tables: compare the values
                ids = cache.table.cols[column][kept], fresh.cols[column][built]
                assert (cache.table.domain_names[ids[0]] if ids[0] >= 0 else None) == (
                    fresh.domain_names[ids[1]] if ids[1] >= 0 else None)
                continue
            assert np.array_equal(cache.table.cols[column][kept], fresh.cols[column][built]), (name, column)
    on_known_nodes = {key: {n: c for n, c in counts.items() if n in fresh.index}
                      for key, counts in cache.pd.counts.items()}  # (pods may name a node not listed yet)
    assert {k: v for k, v in on_known_nodes.items() if v} == PdIndex.of(fresh_infos).counts


def _ask(npus: int, policy: str | None, phase: str | None, qos: str | None, pinned: int) -> dict:  # type: ignore[type-arg]
    raw = pod("ask", requests={"cpu": "2", **({RESOURCE_NPU: str(npus)} if npus else {}),
                               **({"kubernetes.io/batch-cpu": "1000"} if qos == "BE" else {})},
              labels={"app": "g0", **({"phase": phase} if phase else {}), **({"volcano.sh/qos": qos} if qos else {})},
              annotations={"volcano.sh/numa-topology-policy": policy} if policy else {})
    if pinned:  # Guaranteed: exclusive CPUs
        raw["spec"]["containers"][0]["resources"] = {"limits": {
            "cpu": str(pinned), "memory": "1Gi", **({RESOURCE_NPU: str(npus)} if npus else {})}}
    return raw


asks = st.builds(_ask, st.integers(0, 9), st.sampled_from([None, "single-numa-node", "restricted", "best-effort"]),
                 st.sampled_from([None, "prefill", "decode"]), st.sampled_from([None, "BE", "LS"]),
                 st.sampled_from([0, 4, 16, 40]))
clusters = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2), st.lists(st.integers(0, 7), max_size=6),
                              st.sampled_from([None, "prefill", "decode"])), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(asks, clusters)
def test_a_decision_over_all_nodes_equals_the_decisions_node_by_node(ask: dict, shape: list[tuple]) -> None:  # type: ignore[type-arg]
    cache = ClusterCache()
    cache.replace_nodes([_node(f"n{i}", kind, zone) for i, (kind, zone, _, _) in enumerate(shape)])
    cache.replace_pods([_pod(f"p{i}", f"n{i}", dies, phase, 0, 0)
                        for i, (kind, _, dies, phase) in enumerate(shape) if kind])
    framework = build_framework(build_config({}))
    p = parse_pod(ask)
    names = list(cache.table.index)
    view, _ = cache.table.view(names)
    cycle = Cycle(pd=cache.pd, domains=cache.table)
    together = framework.filter(p, view, cycle)
    scores = framework.score(p, view, cycle).total_of()
    for name in names:
        alone = framework.check(p, cache.node_info(name))  # type: ignore[arg-type]
        if alone is None:
            assert name in together.passed
        else:
            plugin, rejection = alone
            assert together.explanation.rejected[name] == f"{plugin}: {rejection.reason}"
            assert (name in together.unresolvable) == rejection.unresolvable
        one, _ = cache.table.view([name])
        assert abs(framework.score(p, one, cycle).total_of()[name] - scores[name]) < 1e-9


def test_a_relist_that_shows_an_assumed_pod_bound_counts_it_once() -> None:
    """After a re-list (a watch that expired), a pod we assumed and the list shows bound is counted once: in the
    prefill/decode index and on its node."""
    cache = ClusterCache()
    cache.replace_nodes([_node("n1", 1, 0), _node("n2", 1, 1)])
    cache.replace_pods([])
    cache.assume(parse_pod(_pod("d1", "n1", [0], "decode", 0, 0)))
    cache.assume(parse_pod(_pod("d2", "n2", [1], "decode", 0, 0)))
    assert cache.pd.counts[("g0", "decode")] == {"n1": 1, "n2": 1}
    cache.replace_pods([_pod("d1", "n1", [0], "decode", 0, 0)])  # d1 bound; d2's bind not seen yet
    assert cache.pd.counts[("g0", "decode")] == {"n1": 1, "n2": 1}
    assert "d1" not in cache._assumed and "d2" in cache._assumed
    assert cache.node_info("n1").assigned[RESOURCE_NPU] == {"Ascend910-0"}  # type: ignore[union-attr]


def _filter(service: ExtenderService, body: dict) -> dict:  # type: ignore[type-arg]
    """The filter's answer, decoded; the same from the request's bytes (the server's path) as from decoded JSON."""
    answer = service.filter(body)
    assert service.filter(orjson.dumps(body)) == answer
    if "NodeNames" in body:  # as kube-scheduler's encoder writes it: the Pod's bytes cut out, parsed once per bytes
        go_shaped = orjson.dumps({"Pod": body["Pod"], "Nodes": None, "NodeNames": body["NodeNames"]})
        assert service.filter(go_shaped) == answer
    return orjson.loads(answer)  # type: ignore[no-any-return]


def test_nodes_mode_with_the_cached_versions_answers_like_node_names() -> None:
    raws = [_node(f"n{i}", i % 4, i % 2) for i in range(4)]
    for i, raw in enumerate(raws):
        raw["metadata"]["resourceVersion"] = str(100 + i)
    cache = ClusterCache()
    cache.replace_nodes(raws)
    cache.replace_pods([_pod("p1", "n1", [0, 1], "decode", 0, 0)])
    service = ExtenderService(build_config({}), cache, ExtenderMetrics(), has_cluster=True)
    ask = pod("ask", requests={RESOURCE_NPU: "2"}, labels={"app": "g0", "phase": "prefill"})
    by_names = service.prioritize({"Pod": ask, "NodeNames": [r["metadata"]["name"] for r in raws]})
    by_nodes = service.prioritize({"Pod": ask, "Nodes": {"items": raws}})
    assert by_nodes == by_names and len(by_names) == 4
    stale = [dict(r, metadata={**r["metadata"], "resourceVersion": "1"}) for r in raws]
    assert service.prioritize({"Pod": ask, "Nodes": {"items": stale}}) == by_names  # parsed from the request
    feasible = _filter(service, {"Pod": ask, "NodeNames": [r["metadata"]["name"] for r in raws]})["NodeNames"]
    for nodes in (raws, stale):
        answer = _filter(service, {"Pod": ask, "Nodes": {"items": nodes}})["Nodes"]["items"]
        assert [n["metadata"]["name"] for n in answer] == feasible
        assert answer == [n for n in nodes if n["metadata"]["name"] in feasible]  # the Nodes as they were sent
    # from the request's bytes, each passing Node is answered byte for byte as it came (spacing, key order)
    for nodes in (raws, stale):
        sent = [orjson.dumps(n, option=orjson.OPT_INDENT_2) for n in nodes]
        body = b'{"Pod":' + orjson.dumps(ask) + b',"Nodes":{"metadata":{},"items":[' + b",".join(sent) + b"]}}"
        answer = service.filter(body)
        expected = [raw for raw, n in zip(sent, nodes, strict=True) if n["metadata"]["name"] in feasible]
        assert answer.startswith(b'{"Nodes":{"metadata":{},"items":[' + b",".join(expected) + b"]}")


def test_explanations_are_bounded_by_node_entries() -> None:
    from fuyao.scheduler_extender.framework import Explanation
    from fuyao.scheduler_extender.service import Explanations

    kept = Explanations(limit=100, node_budget=10)
    for i in range(5):
        kept.record(Explanation(f"ns/p{i}", "filter", rejected={f"n{k}": "x" for k in range(4)}))
    assert kept.get("ns/p4") is not None and kept.get("ns/p3") is not None and kept.get("ns/p2") is None
    kept.record(Explanation("ns/huge", "filter", rejected={f"n{k}": "x" for k in range(50)}))
    assert kept.get("ns/huge") is not None and kept.get("ns/p4") is None  # the newest stays, however large


@settings(max_examples=100, deadline=None)
@given(asks, clusters, st.integers(1, 4))
def test_the_shortlist_passes_the_best_scoring_feasible_nodes(ask: dict, shape: list[tuple], keep: int) -> None:  # type: ignore[type-arg]
    """With ``shortlist: k`` the filter passes the k feasible nodes with the highest totals (ties: request order),
    and the prioritize that follows answers exactly the scores a fresh prioritize over them would."""
    cache = ClusterCache()
    cache.replace_nodes([_node(f"n{i}", kind, zone) for i, (kind, zone, _, _) in enumerate(shape)])
    cache.replace_pods([_pod(f"p{i}", f"n{i}", dies, phase, 0, 0)
                        for i, (kind, _, dies, phase) in enumerate(shape) if kind])
    names = list(cache.table.index)
    full = ExtenderService(build_config({"shortlist": 0}), cache, ExtenderMetrics(), has_cluster=True)
    short = ExtenderService(build_config({"shortlist": keep}), cache, ExtenderMetrics(), has_cluster=True)
    feasible = _filter(full, {"Pod": ask, "NodeNames": names})["NodeNames"]
    totals = full.framework.score(parse_pod(ask), cache.table.view(feasible)[0],
                                  Cycle(pd=cache.pd, domains=cache.table)).total_of()
    answer = _filter(short, {"Pod": ask, "NodeNames": names})
    passed = answer["NodeNames"]
    assert set(passed) <= set(feasible) and len(passed) == min(keep, len(feasible))
    assert passed == [n for n in feasible if n in passed]  # request order kept
    left_out = [n for n in feasible if n not in passed]
    assert all(totals[p] >= totals[o] for p in passed for o in left_out)
    for o in left_out:  # a tie went to the earlier node
        assert all(totals[p] > totals[o] or feasible.index(p) < feasible.index(o) for p in passed)
    assert not (set(answer["FailedNodes"]) | set(answer["FailedAndUnresolvableNodes"])) & set(feasible)
    cached = short.prioritize({"Pod": ask, "NodeNames": passed})
    assert cached == full.prioritize({"Pod": ask, "NodeNames": passed})


def test_a_decisive_shortlist_leaves_kube_scheduler_a_choice_only_for_soft_preferences() -> None:
    """``shortlist: 1``: one node passes (kube-scheduler binds it without scoring), unless the pod has preferences
    only kube-scheduler's score plugins honour; then it gets SOFT_SHORTLIST nodes to weigh."""
    from fuyao.scheduler_extender.service import SOFT_SHORTLIST

    cache = ClusterCache()
    cache.replace_nodes([_node(f"n{i}", 1, i % 2) for i in range(20)])
    cache.replace_pods([])
    service = ExtenderService(build_config({"shortlist": 1}), cache, ExtenderMetrics(), has_cluster=True)
    names = list(cache.table.index)
    plain = pod("plain", requests={RESOURCE_NPU: "1"})
    assert len(_filter(service, {"Pod": plain, "NodeNames": names})["NodeNames"]) == 1
    preferred = {"weight": 10, "preference": {"matchExpressions": [
        {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["z1"]}]}}
    spread = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "labelSelector": {}}
    for extra in ({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [preferred]}}},
                  {"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                      {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}},
                  {"topologySpreadConstraints": [{**spread, "whenUnsatisfiable": "ScheduleAnyway"}]}):
        soft = pod("soft", requests={RESOURCE_NPU: "1"})
        soft["spec"].update(extra)
        assert parse_pod(soft).soft_preferences
        assert len(_filter(service, {"Pod": soft, "NodeNames": names})["NodeNames"]) == SOFT_SHORTLIST, extra
    hard = pod("hard", requests={RESOURCE_NPU: "1"})
    hard["spec"]["topologySpreadConstraints"] = [{**spread, "whenUnsatisfiable": "DoNotSchedule"}]
    assert not parse_pod(hard).soft_preferences  # a hard constraint is kube-scheduler's filter, not its score
    assert len(_filter(service, {"Pod": hard, "NodeNames": names})["NodeNames"]) == 1


def test_a_status_update_keeps_the_row_and_a_finished_pod_frees_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Most pod events after binding only change the status (Running, conditions, IPs: a kubelet's or KWOK's
    update): the node's row is kept as it is (not computed again). A pod that finishes gives its NPUs back."""
    cache = ClusterCache()
    cache.replace_nodes([_node("n0", 1, 0)])
    cache.replace_pods([])
    raw = _pod("p0", "n0", [1, 2], None, 0, 0)
    cache.upsert_pod(raw)
    puts: list[str] = []
    original = cache.table.put
    monkeypatch.setattr(cache.table, "put", lambda info: (puts.append(info.name), original(info))[1])
    row = cache.table.index["n0"]
    held, free = cache.table.classes[row], cache.all_nodes()["n0"].free(RESOURCE_NPU)
    raw["metadata"]["resourceVersion"] = "7"
    raw["status"] = {**raw["status"], "phase": "Running", "podIP": "10.0.0.9"}
    cache.upsert_pod(raw)
    assert puts == [] and cache.all_nodes()["n0"].free(RESOURCE_NPU) == free
    assert cache.pod_by_uid("p0").resource_version == "7"  # type: ignore[union-attr]
    assert [p.resource_version for p in cache.all_nodes()["n0"].pods] == ["7"]
    raw["status"] = {**raw["status"], "phase": "Succeeded"}
    cache.upsert_pod(raw)
    assert puts == ["n0"] and cache.all_nodes()["n0"].free(RESOURCE_NPU) == free + 2
    assert cache.table.classes[row] != held  # two NPUs more free: another class of rows


def test_the_watch_reporting_our_own_bind_costs_no_recomputation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod the binder assumed (with the node and assignment annotation it wrote) and the watch then reports as
    such leaves its node's row as it is: the row already counted it. Reported differently, the row is recomputed."""
    cache = ClusterCache()
    cache.replace_nodes([_node("n1", 1, 0)])
    cache.replace_pods([])
    puts: list[str] = []
    original = cache.table.put
    monkeypatch.setattr(cache.table, "put", lambda info: (puts.append(info.name), original(info))[1])
    cache.assume(parse_pod(_pod("d1", "n1", [0, 1], "decode", 0, 0)))
    assert puts == ["n1"]
    cache.upsert_pod(_pod("d1", "n1", [0, 1], "decode", 0, 0))
    assert puts == ["n1"] and "d1" not in cache._assumed
    assert cache.node_info("n1").assigned[RESOURCE_NPU] == {"Ascend910-0", "Ascend910-1"}  # type: ignore[union-attr]
    assert [p.phase_status for p in cache.pods_on("n1")] == ["Running"]  # the watched copy replaced the assumed one
    cache.assume(parse_pod(_pod("d2", "n1", [2], "decode", 0, 0)))
    cache.upsert_pod(_pod("d2", "n1", [3], "decode", 0, 0))  # bound with other devices than we assumed
    assert puts == ["n1", "n1", "n1"]
    assert cache.node_info("n1").assigned[RESOURCE_NPU] == {"Ascend910-0", "Ascend910-1", "Ascend910-3"}  # type: ignore[union-attr]


def test_kube_schedulers_pod_is_parsed_once_for_its_filter_and_prioritize(monkeypatch: pytest.MonkeyPatch) -> None:
    """kube-scheduler's prioritize carries the filter's Pod byte for byte: it is not parsed again. A Pod whose
    strings hold the body's own keys is still cut where it ends."""
    cache = ClusterCache()
    cache.replace_nodes([_node(f"n{i}", 2, 0) for i in range(3)])
    cache.replace_pods([])
    service = ExtenderService(build_config({}), cache, ExtenderMetrics(), has_cluster=True)
    parsed: list[str] = []
    original = service.pod
    monkeypatch.setattr(service, "pod", lambda raw: (parsed.append(raw["metadata"]["name"]), original(raw))[1])
    tricky = pod("tricky", uid="t1", requests={RESOURCE_NPU: "1"},
                 annotations={"note": '{"Pod":{},"Nodes":null,"NodeNames":["n0"]}'})
    body = orjson.dumps({"Pod": tricky, "Nodes": None, "NodeNames": ["n0", "n1", "n2"]})
    assert kp.split_names_body(body) is not None
    passed = orjson.loads(service.filter(body))["NodeNames"]
    assert passed == ["n0", "n1", "n2"]
    scores = orjson.loads(orjson.dumps(service.prioritize(
        orjson.dumps({"Pod": tricky, "Nodes": None, "NodeNames": passed}))))
    assert [s["Host"] for s in scores] == passed
    assert parsed == ["tricky"]  # once, for both verbs
    assert kp.split_names_body(b'{"Pod":{},"NodeNames":["n0"]}') is None  # another shape: decoded whole
    with pytest.raises(BodyError, match="invalid JSON"):  # a broken Pod: decoded whole, the 400 names it
        service.filter(b'{"Pod":{"metadata":{"name":"x"}],"Nodes":null,"NodeNames":["n0"]}')
