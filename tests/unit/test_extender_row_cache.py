"""Per-row decisions kept between requests (fuyao.scheduler_extender.row_cache) equal decisions computed afresh, under
any interleaving of watch events (nodes and pods change), requests of several pod shapes, and time passing (a
node's measured usage goes stale)."""

from __future__ import annotations

import time

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fuyao.scheduler_extender import devices, features
from fuyao.scheduler_extender.cluster import ClusterCache
from fuyao.scheduler_extender.config import build_config
from fuyao.scheduler_extender.framework import Cycle, Framework
from fuyao.scheduler_extender.model import USAGE_STALE_S, parse_pod
from fuyao.scheduler_extender.row_cache import pod_shape
from fuyao.scheduler_extender.service import build_framework
from tests.support.k8s_objects import node, usage
from tests.unit.test_extender_table import NODES, _ask, _node, _pod, asks

START = time.time()


def _usage_node(name: str, cpu: float, age_s: float) -> dict:  # type: ignore[type-arg]
    raw = _node(name, 1, 0)
    fresh = node(name, labels=raw["metadata"]["labels"], usage=usage(cpu, 0.3, age_s=age_s))
    raw["metadata"]["annotations"] = fresh["metadata"]["annotations"]
    return raw


steps = st.lists(st.one_of(
    st.tuples(st.just("node"), st.sampled_from(NODES), st.integers(0, 4), st.integers(0, 2)),
    st.tuples(st.just("usage"), st.sampled_from(NODES), st.floats(0.0, 1.0), st.floats(0, USAGE_STALE_S)),
    st.tuples(st.just("delete-node"), st.sampled_from(NODES)),
    st.tuples(st.just("pod"), st.sampled_from([f"p{i}" for i in range(8)]), st.sampled_from([None, *NODES]),
              st.lists(st.integers(0, 7), max_size=4), st.sampled_from([None, "prefill", "decode"]),
              st.integers(0, 1), st.integers(0, 2)),
    st.tuples(st.just("delete-pod"), st.sampled_from([f"p{i}" for i in range(8)])),
    st.tuples(st.just("time"), st.one_of(st.sampled_from([0.0, USAGE_STALE_S + 10, 3 * USAGE_STALE_S]),
                                         st.floats(0, 3 * USAGE_STALE_S)), st.permutations(NODES)),
), max_size=30)


def _decide(framework: Framework, cache: ClusterCache, ask: dict, now: float, names: list[str]):  # type: ignore[no-untyped-def, type-arg]
    p = parse_pod(ask)
    view, _ = cache.table.view([n for n in names if n in cache.table.index])
    cycle = Cycle(pd=cache.pd, domains=cache.table, now=now)
    outcome = framework.filter(p, view, cycle)
    scored = framework.score(p, view, cycle)
    return outcome, scored


@settings(max_examples=200, deadline=None)
@given(st.lists(asks, min_size=3, max_size=3), steps)
def test_kept_decisions_equal_fresh_ones(shapes: list[dict], history: list[tuple]) -> None:  # type: ignore[type-arg]
    _kept_equal_fresh(shapes, history)


@settings(max_examples=100, deadline=None)
@given(st.lists(asks, min_size=3, max_size=3), steps)
def test_kept_decisions_equal_fresh_ones_when_row_classes_are_reused_at_once(
        shapes: list[dict], history: list[tuple]) -> None:  # type: ignore[type-arg]
    """No class that no node holds is kept: its number goes to the next new content, whose results are computed
    afresh (the stamp), never taken from the class's former content."""
    kept = features.UNHELD_CLASSES
    features.UNHELD_CLASSES = 0
    try:
        _kept_equal_fresh(shapes, history)
    finally:
        features.UNHELD_CLASSES = kept


def test_like_rows_share_a_class_and_come_back_to_it() -> None:
    cache = ClusterCache("topology.kubernetes.io/zone")
    cache.replace_nodes([_node("n0", 2, 0), _node("n1", 2, 0), _node("n2", 4, 0), _node("n3", 2, 1)])
    cache.replace_pods([])
    table = cache.table

    def cls(name: str) -> int:
        return int(table.classes[table.index[name]])

    first, other = cls("n0"), cls("n2")
    assert cls("n1") == first != other
    assert cls("n3") not in (first, other)  # another domain (the prefill/decode topology label): another class
    cache.upsert_node(_node("n0", 4, 0))
    assert cls("n0") == other
    cache.upsert_node(_node("n1", 4, 0))  # no node holds the first class now: it is kept, with its stamp
    stamp = int(table.class_stamps[first])
    cache.upsert_node(_node("n1", 2, 0))  # back to that state
    assert cls("n1") == first and table.class_stamps[first] == stamp
    row = table.index["n1"]
    cache.delete_node({"metadata": {"name": "n1"}})
    assert table.classes[row] == -1


def _kept_equal_fresh(shapes: list[dict], history: list[tuple]) -> None:  # type: ignore[type-arg]
    cache = ClusterCache("topology.kubernetes.io/zone")
    cache.replace_nodes([])
    cache.replace_pods([])
    kept, fresh = build_framework(build_config({})), build_framework(build_config({}))
    now, names = START, list(NODES)
    for step in history:
        if step[0] == "node":
            cache.upsert_node(_node(step[1], step[2], step[3]))
        elif step[0] == "usage":
            cache.upsert_node(_usage_node(step[1], step[2], step[3]))
        elif step[0] == "delete-node":
            cache.delete_node({"metadata": {"name": step[1]}})
        elif step[0] == "pod":
            cache.upsert_pod(_pod(*step[1:]))
        elif step[0] == "delete-pod":
            cache.delete_pod({"metadata": {"uid": step[1]}})
        else:
            _, later, order = step
            now, names = START + later, list(order)
        for ask in shapes:  # after every change, every shape is decided both ways
            got, got_scores = _decide(kept, cache, ask, now, names)
            cache.table.long_lived = False  # the same decision without kept rows
            want, want_scores = _decide(fresh, cache, ask, now, names)
            cache.table.long_lived = True
            assert got.passed == want.passed
            assert got.failed == want.failed and got.unresolvable == want.unresolvable
            assert got.explanation.rejected == want.explanation.rejected and got.rejections == want.rejections
            assert list(got_scores.names) == list(want_scores.names)
            assert np.array_equal(got_scores.totals, want_scores.totals)  # type: ignore[arg-type]
            assert got_scores.parts.keys() == want_scores.parts.keys()
            for part, values in want_scores.parts.items():
                assert np.array_equal(got_scores.parts[part], values), part


def test_pods_of_one_workload_share_a_shape_and_other_requests_do_not() -> None:
    a = parse_pod(_ask(2, None, None, None, 0))
    raw = _ask(2, None, None, None, 0)
    b = parse_pod({**raw, "metadata": {**raw["metadata"], "name": "other", "namespace": "x", "uid": "u2"}})
    assert pod_shape(a) == pod_shape(b)  # who the pod is does not matter
    replica = {"statefulset.kubernetes.io/pod-name": "web-3", "apps.kubernetes.io/pod-index": "3"}
    indexed = {**raw, "metadata": {**raw["metadata"], "labels": {**raw["metadata"]["labels"], **replica}}}
    assert pod_shape(parse_pod(indexed)) == pod_shape(a)  # nor which replica of a StatefulSet it is
    for different in (_ask(1, None, None, None, 0), _ask(2, "single-numa-node", None, None, 0),
                      _ask(2, None, "prefill", None, 0), _ask(2, None, None, "BE", 0), _ask(2, None, None, None, 4)):
        assert pod_shape(parse_pod(different)) != pod_shape(a)


def test_a_prefill_decode_pod_in_a_group_is_decided_afresh() -> None:
    """Its score reads where the group's other pods are, cluster-wide: nothing is kept for it."""
    cache = ClusterCache()
    cache.replace_nodes([_node("n0", 1, 0)])
    cache.replace_pods([])
    framework = build_framework(build_config({}))
    _decide(framework, cache, _ask(1, None, "prefill", None, 0), START, ["n0"])
    assert not cache.table.decisions.get(framework)
    _decide(framework, cache, _ask(1, None, None, None, 0), START, ["n0"])
    assert len(cache.table.decisions[framework]) == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(NODES), st.lists(st.integers(0, 7), max_size=4), st.integers(0, 2)),
                max_size=12),
       st.lists(st.tuples(st.sampled_from(NODES), st.integers(1, 4)), min_size=1, max_size=len(NODES)))
def test_topology_columns_kept_across_like_nodes_equal_computed_ones(
        held: list[tuple[str, list[int], int]], kinds: list[tuple[str, int]]) -> None:
    """The topology part of a row, and the dies chosen for a pod, are kept per (topology, free dies, ...) and shared
    by like nodes: every node's equal what is computed with nothing kept."""
    cache = ClusterCache()
    cache.replace_nodes([_node(name, kind, 0) for name, kind in dict(kinds).items()])
    cache.replace_pods([_pod(f"p{i}", name, dies, None, 0, business) for i, (name, dies, business) in enumerate(held)
                        if name in dict(kinds)])
    for info in cache.all_nodes().values():
        kept = features._node_row(info)
        features._topology_rows.clear()  # nothing kept: computed afresh
        assert features._node_row(info) == kept, info.name
        if info.topology is not None:
            chosen = [devices.choose_npus(info, k) for k in (1, 2, 4)]
            devices._chosen.clear()
            assert [devices.choose_npus(info, k) for k in (1, 2, 4)] == chosen, info.name
