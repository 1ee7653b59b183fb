"""Extender plugin decisions, one by one, with the reason every rejection gives."""

from __future__ import annotations

import json

from fuyao.contracts import (
    ANNOTATION_POD_ASSIGNED,
    RESOURCE_BATCH_CPU,
    RESOURCE_BATCH_MEMORY,
    RESOURCE_NPU,
    RESOURCE_NPU_CORE,
    RESOURCE_VNPU,
    BusinessType,
    NumaCpus,
    QoSClass,
)
from fuyao.scheduler_extender import devices
from fuyao.scheduler_extender.features import NodeTable, NodeView, PdIndex
from fuyao.scheduler_extender.framework import Cycle, Framework, Plugin, Rejection, to_extender_score
from fuyao.scheduler_extender.model import NodeInfo, PodInfo, parse_node, parse_pod
from fuyao.scheduler_extender.plugins import (
    BusinessTypeArgs,
    BusinessTypePlugin,
    ColocationPlugin,
    DeviceFitArgs,
    DeviceFitPlugin,
    NumaPlugin,
    PdAffinityArgs,
    PdAffinityPlugin,
    QosColocationArgs,
)
from fuyao.scheduler_extender.plugins.colocation import be_victims
from tests.support.k8s_objects import node, pod, topology, usage


def info(raw_node: dict, *pods: dict) -> NodeInfo:  # type: ignore[type-arg]
    return parse_node(raw_node, [parse_pod(p) for p in pods])


def holding(node_name: str, *dies: int, resource: str = RESOURCE_NPU) -> dict:  # type: ignore[type-arg]
    ids = [f"Ascend910-{d}" for d in dies]
    return pod(f"holder-{node_name}-{'-'.join(map(str, dies))}", node_name=node_name, phase="Running",
               requests={resource: str(len(ids))}, assigned={resource: ids})


def reject(plugin: Plugin, p: PodInfo, n: NodeInfo) -> Rejection | None:
    """The plugin's rejection of one node (through the framework, as the one-node verbs run it)."""
    found = Framework([(plugin, 1.0)]).check(p, n)
    return None if found is None else found[1]


def score(plugin: Plugin, p: PodInfo, n: NodeInfo, cluster: list[NodeInfo] | None = None) -> float:
    """The plugin's score of ``n`` among the nodes of ``cluster`` (the prefill/decode plugin looks at all)."""
    nodes = cluster or [n]
    view, _ = NodeTable.of(nodes, getattr(plugin, "topology_key", "")).view([n.name])
    return float(Framework([(plugin, 1.0)]).score(p, view, Cycle(pd=PdIndex.of(nodes))).totals[0])  # type: ignore[index]


def view_of(nodes: list[NodeInfo]) -> NodeView:
    return NodeTable.of(nodes, "").view_all()


# --- model ----------------------------------------------------------------------------------------------------------
def test_pod_parsing_and_business_inference() -> None:
    p = parse_pod(pod("a", requests={"cpu": "500m", "memory": "1Gi", RESOURCE_NPU: "2"}))
    assert p.cpu_milli == 500 and p.memory_bytes == 2**30 and p.accelerators == {RESOURCE_NPU: 2}
    assert p.business == BusinessType.COMPUTE_INTENSIVE and not p.business_explicit and p.qos == QoSClass.LS
    assert parse_pod(pod("b", requests={"cpu": "1", "memory": "16Gi"})).business == BusinessType.MEMORY_SENSITIVE
    assert parse_pod(pod("c", requests={"cpu": "4", "memory": "4Gi"})).business == BusinessType.IO_INTENSIVE
    bad = parse_pod(pod("d", annotations={"business.workload/type": "gpu-heavy", "volcano.sh/qos-level": "BE"}))
    assert bad.business is None and bad.qos == QoSClass.BE
    assert any("business.workload/type" in problem and "gpu-heavy" in problem for problem in bad.problems)


def test_init_containers_and_limits_as_requests() -> None:
    raw = pod("a", requests={"cpu": "1"})
    raw["spec"]["initContainers"] = [{"name": "init", "resources": {"requests": {"cpu": "3"}}}]
    raw["spec"]["containers"].append({"name": "side", "resources": {"limits": {RESOURCE_NPU: "1", "cpu": "1"}}})
    p = parse_pod(raw)
    assert p.cpu_milli == 3000 and p.request(RESOURCE_NPU) == 1


def test_node_accounting_from_pods_and_assignments() -> None:
    n = info(node("n1", topo=topology()), holding("n1", 0, 1),
             pod("done", node_name="n1", requests={RESOURCE_NPU: "4"}, phase="Succeeded"))
    assert n.free(RESOURCE_NPU) == 6 and n.assigned[RESOURCE_NPU] == {"Ascend910-0", "Ascend910-1"}
    assert devices.free_npus(n) == [f"Ascend910-{i}" for i in range(2, 8)]


def test_admitted_pods_count_by_what_the_kubelet_gave_them_not_by_the_plan() -> None:
    """The kubelet's GetPreferredAllocation does not say which pod it is for: pods admitted together can get each
    other's planned dies. A pod the topology names as holder is accounted by its real dies; a pod not admitted yet
    by its plan. Counting both would lose free dies (a 7-of-8 node looked full)."""
    a, b = (pod(name, node_name="n1", phase="Running", requests={RESOURCE_NPU: "1"},
                assigned={RESOURCE_NPU: [f"Ascend910-{die}"]}) for name, die in (("a", 0), ("b", 1)))
    waiting = pod("c", node_name="n1", phase="Pending", requests={RESOURCE_NPU: "1"},
                  assigned={RESOURCE_NPU: ["Ascend910-3"]})
    swapped = topology(holders={1: "default/a", 2: "default/b"})  # a got die 1 (b's plan), b got die 2
    n = info(node("n1", topo=swapped), a, b, waiting)
    assert n.assigned[RESOURCE_NPU] == {"Ascend910-3"}
    assert devices.free_npus(n) == ["Ascend910-0"] + [f"Ascend910-{i}" for i in range(4, 8)]
    assert len(devices.free_npus(n)) == n.free(RESOURCE_NPU)  # sets and counts agree again
    # before the device plugin published the holders, plans are all there is
    planned = info(node("n1", topo=topology()), a, b, waiting)
    assert planned.assigned[RESOURCE_NPU] == {"Ascend910-0", "Ascend910-1", "Ascend910-3"}


# --- device fit -----------------------------------------------------------------------------------------------------
def test_device_fit_counts_and_reasons() -> None:
    plugin = DeviceFitPlugin()
    small = info(node("small", npus=2))
    big_ask = parse_pod(pod("p", requests={RESOURCE_NPU: "4"}))
    rejection = reject(plugin, big_ask, small)
    assert rejection and rejection.unresolvable and "has 2 npu.huawei.com/NPU, the pod asks for 4" in rejection.reason
    assert rejection.code == "node-too-small"
    busy = info(node("busy", topo=topology()), holding("busy", 0, 1, 2, 3, 4, 5))
    rejection = reject(plugin, big_ask, busy)
    assert rejection and not rejection.unresolvable and "2 free, 4 requested" in rejection.reason
    sick = info(node("sick", topo=topology(unhealthy=(0, 1, 2, 3, 4))))
    rejection = reject(plugin, big_ask, sick)
    assert rejection and "3 healthy free NPUs by device" in rejection.reason
    assert reject(plugin, big_ask, info(node("free", topo=topology()))) is None
    gpu = parse_pod(pod("g", requests={"nvidia.com/gpu": "1"}))
    assert "nvidia.com/gpu" in reject(plugin, gpu, small).reason  # type: ignore[union-attr]


def test_npus_whose_link_is_down_take_single_npu_pods_only() -> None:
    plugin = DeviceFitPlugin()
    linkless = info(node("linkless", topo=topology(links_down=(0, 1, 2, 3, 4))))
    four = parse_pod(pod("p4", requests={RESOURCE_NPU: "4"}))
    rejection = reject(plugin, four, linkless)
    assert rejection and rejection.code == "links-down"
    assert "3 free NPUs with their RoCE link up, 4 requested" in rejection.reason
    assert reject(plugin, parse_pod(pod("p3", requests={RESOURCE_NPU: "3"})), linkless) is None
    assert reject(plugin, parse_pod(pod("p1", requests={RESOURCE_NPU: "1"})), linkless) is None
    # the dies chosen at bind time: linked ones for a multi-die pod, any for a single one
    assert set(devices.choose_npus(linkless, 3)) == {"Ascend910-5", "Ascend910-6", "Ascend910-7"}
    assert len(devices.choose_npus(linkless, 1)) == 1


def test_a_single_npu_container_takes_the_link_down_die_its_pods_multi_npu_container_cannot() -> None:
    # containers 1 + 7 on an 8-die board whose die 7's link is down: the filter passed it (7 linked dies free for
    # the 7), but the plan gave the 1 a linked die and the 7 came up short, so every bind failed
    plugin = DeviceFitPlugin()
    board = info(node("mesh", topo=topology(links_down=(7,))))
    raw = pod("p", requests={RESOURCE_NPU: "1"})
    raw["spec"]["containers"].append({"name": "c1", "resources": {"limits": {RESOURCE_NPU: "7"}}})
    joint = parse_pod(raw)
    assert reject(plugin, joint, board) is None
    plan = devices.plan_npus(devices.node_dies(board), joint.npu_steps)
    assert plan.problem is None and plan.sets[0] == ("Ascend910-7",) and "Ascend910-7" not in plan.sets[1]
    assert devices.choose_npus(board, 1) == ["Ascend910-7"]  # a lone single-NPU pod too: the linked dies stay free


def test_a1_rings_need_whole_rings_for_four_cards() -> None:
    plugin = DeviceFitPlugin()
    four = parse_pod(pod("p", requests={RESOURCE_NPU: "4"}))
    split = info(node("a1", topo=topology("a1")), holding("a1", 0, 4))  # 3 free in each ring
    rejection = reject(plugin, four, split)
    assert rejection and "one HCCS ring with 4 free" in rejection.reason and "[3, 3]" in rejection.reason
    assert "rule 910-a1-module/ring" in rejection.reason and rejection.code == "product-shape"
    assert reject(plugin, four, info(node("a1", topo=topology("a1")), holding("a1", 0, 1))) is None
    three = parse_pod(pod("q", requests={RESOURCE_NPU: "3"}))
    rejection = reject(plugin, three, info(node("a1", topo=topology("a1"))))
    assert rejection and rejection.unresolvable and "takes 1, 2, 4, 8 NPUs per pod, not 3" in rejection.reason
    assert "rule 910-a1-module/counts" in rejection.reason and rejection.code == "product-count"


def test_product_rules_apply_to_each_containers_npus() -> None:
    # the device plugin gives each container its own set: on an A1 board (1, 2, 4 or 8 per set) containers of 3 + 1
    # can never be placed (the filter passed them on their total of 4 and every bind failed), while 1 + 1 + 1 can
    # (it was refused on its total of 3)
    plugin = DeviceFitPlugin()
    board = info(node("a1", topo=topology("a1")))

    def split(*counts: int) -> PodInfo:
        raw = pod("p", requests={RESOURCE_NPU: str(counts[0])})
        raw["spec"]["containers"] += [{"name": f"c{i}", "resources": {"limits": {RESOURCE_NPU: str(n)}}}
                                      for i, n in enumerate(counts[1:], 1)]
        return parse_pod(raw)

    rejection = reject(plugin, split(3, 1), board)
    assert rejection and rejection.unresolvable and rejection.code == "product-count"
    assert "a container asking for 3 NPUs" in rejection.reason and "not 3" in rejection.reason
    assert reject(plugin, split(1, 1, 1), board) is None
    assert reject(plugin, split(2, 2), board) is None


def _npu_pod(name: str, *counts: int, init: tuple[tuple[int, bool], ...] = ()) -> PodInfo:
    """A pod whose containers c0, c1... ask for ``counts`` NPUs, after init containers i0, i1... of (NPUs, native
    sidecar)."""
    raw = pod(name)
    raw["spec"]["containers"] = [{"name": f"c{i}", "resources": {"limits": {RESOURCE_NPU: str(n)}}}
                                 for i, n in enumerate(counts)]
    raw["spec"]["initContainers"] = [{"name": f"i{i}", "resources": {"limits": {RESOURCE_NPU: str(n)}}}
                                     | ({"restartPolicy": "Always"} if sidecar else {})
                                     for i, (n, sidecar) in enumerate(init)]
    return parse_pod(raw)


def _device_plugin_sets(board: NodeInfo, p: PodInfo) -> list[list[str]]:
    """What the kubelet gets for the pod's running containers asking the device plugin one after another (its
    GetPreferredAllocation: the shared placement function on the dies the containers before left)."""
    from fuyao.placement import preferred_allocation
    from fuyao.products import product_of

    assert board.topology is not None
    available, out = devices.free_npus(board), []
    for _, requests in p.containers:
        want = int(requests.get(RESOURCE_NPU, 0))
        chosen = preferred_allocation(available, [], want, devices.placements(board.topology),
                                      product=product_of(board.topology)) if want else []
        available = [d for d in available if d not in chosen]
        out.append(chosen)
    return out


def test_containers_of_a_pod_are_placed_one_after_another_as_the_kubelet_asks() -> None:
    """Two containers of 2 NPUs on an A1 board whose rings have 1 and 3 free: each alone fits (the filter passed
    the pod, container by container) but the device plugin gives the first 2 of the ring with 3 free (keeping
    whole rings whole), and the second finds 1 free in each ring: every bind failed. The filter now places them in
    turn as the kubelet asks for them, and the binder writes those very sets."""
    from fuyao.scheduler_extender.binder import AssignmentFailed, assignment_for

    plugin = DeviceFitPlugin()
    two_two = _npu_pod("p", 2, 2)
    uneven = info(node("a1", topo=topology("a1")), holding("a1", 0, 1, 2, 4))  # ring 0: 1 free, ring 1: 3 free
    rejection = reject(plugin, two_two, uneven)
    assert rejection and rejection.code == "product-shape" and not rejection.unresolvable
    assert "container c1 asking for 2 NPUs" in rejection.reason and "c0 got Ascend910-5, Ascend910-6" in \
        rejection.reason and "one HCCS ring with 2 free" in rejection.reason and "[1, 1]" in rejection.reason
    try:
        assignment_for(two_two, uneven)
    except AssignmentFailed as exc:
        assert "container c1" in str(exc) and "one HCCS ring with 2 free" in str(exc)
    else:
        raise AssertionError("a pod the device plugin cannot place was given devices")
    assert reject(plugin, _npu_pod("q", 1, 2), uneven) is None  # 1 takes ring 0's lone die, 2 of ring 1's 3
    # where they can be placed, the binder's sets are the device plugin's, container by container
    for board, p in ((uneven, _npu_pod("q", 1, 2)), (info(node("a1", topo=topology("a1")), holding("a1", 4)),
                                                     _npu_pod("r", 4, 2, 1))):
        assert reject(plugin, p, board) is None
        assignment = assignment_for(p, board)
        assert assignment is not None
        assert [list(c.devices) for c in assignment.containers] == _device_plugin_sets(board, p)
    # the order is the kubelet's: 2 first takes half of the whole ring (none has exactly 2 free), and 4 finds none
    assert "container c2 asking for 4 NPUs" in reject(  # type: ignore[union-attr]
        plugin, _npu_pod("s", 2, 1, 4), info(node("a1", topo=topology("a1")), holding("a1", 4))).reason


def test_the_containers_after_a_plain_init_container_get_its_npus_first_as_the_kubelet_gives_them() -> None:
    """The kubelet keeps a plain init container's dies the pod's and hands them to the next containers first
    (1.34 devicesToReuse): asking for fewer, a container gets that many of them, which ones the kubelet's choice;
    asking for more, all of them and what the device plugin adds. The plan picked each container's set afresh: on an
    A1 board an init container of 8 then a container of 2 passed, and 16 of the 28 pairs the kubelet may give the
    container cross the rings (the device plugin refuses them)."""
    from fuyao.scheduler_extender.binder import assignment_for

    plugin = DeviceFitPlugin()
    a1 = info(node("a1", topo=topology("a1")))
    rejection = reject(plugin, _npu_pod("p", 2, init=((8, False),)), a1)
    assert rejection and rejection.code == "product-shape" and "container c0 asking for 2 NPUs" in rejection.reason
    assert "the kubelet gives it 2 of the 8 NPUs" in rejection.reason and "HCCS ring" in rejection.reason
    assert reject(plugin, _npu_pod("q", 2, init=((4, False),)), a1) is None  # any 2 of one ring: allowed
    # a full-mesh board: any subset is allowed; the sets written are the kubelet's
    mesh = info(node("m", topo=topology()))
    fewer = assignment_for(_npu_pod("f", 2, init=((4, False),)), mesh)
    assert fewer is not None
    sets = {c.container: set(c.devices) for c in fewer.containers}
    assert len(sets["i0"]) == 4 and len(sets["c0"]) == 2 and sets["c0"] <= sets["i0"]
    more = assignment_for(_npu_pod("m", 4, init=((2, False),)), mesh)
    assert more is not None
    sets = {c.container: set(c.devices) for c in more.containers}
    assert len(sets["c0"]) == 4 and sets["i0"] <= sets["c0"]  # all of the init container's, and 2 more
    # a sidecar listed after the plain init container takes from its dies too; the container after both gets the rest
    plan = devices.plan_npus(devices.node_dies(mesh), _npu_pod("s", 2, init=((4, False), (1, True))).npu_steps)
    sidecar, container = plan.sets
    assert plan.problem is None and len(set(sidecar) | set(container)) == 3  # one of the 4 stays idle, the pod's
    assert set(sidecar) | set(container) <= set(plan.init_sets[0])


def test_a_plain_init_containers_idle_npus_stay_taken_while_its_pod_runs() -> None:
    """The pod-resources answer the device plugin publishes leaves plain init containers out, yet the kubelet holds
    their dies for the pod's life: the two of an init container of 4 that no container reused looked free, and the
    pod's 4 against 2 published holders made every multi-NPU pod wait for "unplaced" NPUs."""
    mesh = node("m", topo=topology(holders={0: "default/p", 1: "default/p"}))
    raw = pod("p", node_name="m", phase="Running", requests={RESOURCE_NPU: "2"},
              assigned={RESOURCE_NPU: ["Ascend910-0", "Ascend910-1"]})
    raw["spec"]["initContainers"] = [{"name": "i0", "resources": {"limits": {RESOURCE_NPU: "4"}}}]
    assignment = json.loads(raw["metadata"]["annotations"][ANNOTATION_POD_ASSIGNED])
    assignment["containers"].append({"container": "i0", "resource": RESOURCE_NPU,
                                     "devices": [f"Ascend910-{i}" for i in range(4)]})
    raw["metadata"]["annotations"][ANNOTATION_POD_ASSIGNED] = json.dumps(assignment)
    n = info(mesh, raw)
    assert n.free(RESOURCE_NPU) == 4 and sorted(devices.free_npus(n)) == [f"Ascend910-{i}" for i in range(4, 8)]
    assert devices.unplaced_npus(n) == 0


def test_plain_init_containers_need_a_set_of_their_own_beside_the_sidecars_before_them() -> None:
    """A plain init container runs alone (beside the sidecars started before it) before the containers, and gets
    its own set from the device plugin: the product's rules apply to it too. With two containers asking for NPUs
    only theirs were checked: an init container of 3 (a count A1 never takes) or of 4 (no ring with 4 free)
    passed, and the kubelet refused the pod."""
    from fuyao.scheduler_extender.binder import AssignmentFailed, assignment_for

    plugin = DeviceFitPlugin()
    board = info(node("a1", topo=topology("a1")))
    rejection = reject(plugin, _npu_pod("p", 1, 1, init=((3, False),)), board)
    assert rejection and rejection.unresolvable and rejection.code == "product-count" and "not 3" in rejection.reason
    split = info(node("a1", topo=topology("a1")), holding("a1", 0, 4))  # 3 free in each ring
    warm = _npu_pod("w", 1, 1, init=((4, False),))
    assert warm.request(RESOURCE_NPU) == 4  # what kube-scheduler counts: 6 free are enough
    rejection = reject(plugin, warm, split)
    assert rejection and rejection.code == "product-shape" and "init container i0 asking for 4 NPUs" in \
        rejection.reason and "one HCCS ring with 4 free" in rejection.reason
    try:
        assignment_for(warm, split)
    except AssignmentFailed as exc:
        assert "init container i0" in str(exc)
    else:
        raise AssertionError("a pod whose init container cannot be placed was given devices")
    assert reject(plugin, warm, board) is None  # a whole ring is free
    # beside a sidecar started before it: the sidecar's 2 come out of the whole ring (none has exactly 2 free)
    three_four = info(node("a1", topo=topology("a1")), holding("a1", 4))  # ring 0: 4 free, ring 1: 3 free
    rejection = reject(plugin, _npu_pod("s", 0, init=((2, True), (4, False))), three_four)
    assert rejection and "init container i1 asking for 4 NPUs" in rejection.reason and "i0 got" in rejection.reason
    # started after it, the sidecar is not there yet: the init container takes the whole ring alone
    assert reject(plugin, _npu_pod("t", 0, init=((4, False), (2, True))), three_four) is None
    # its 4 NPUs need their RoCE links up as much as a container's (3 are)
    down = info(node("m", topo=topology("mesh", links_down=(0, 1, 2, 3, 4))))
    rejection = reject(plugin, warm, down)
    assert rejection and rejection.code == "links-down" and "4 requested by multi-NPU containers" in rejection.reason
    assert reject(plugin, _npu_pod("v", 1, 1, init=((2, False),)), down) is None


def test_native_sidecars_count_beside_the_containers() -> None:
    # an init container with restartPolicy Always runs for the pod's life (kube-scheduler's PodRequests adds it to
    # the containers' sum); a plain init container runs beside the sidecars started before it
    raw = pod("a", requests={RESOURCE_NPU: "1", "cpu": "1"})
    raw["spec"]["initContainers"] = [
        {"name": "proxy", "restartPolicy": "Always", "resources": {"requests": {RESOURCE_NPU: "1", "cpu": "1"}}},
        {"name": "warm", "resources": {"requests": {"cpu": "3"}}}]
    p = parse_pod(raw)
    assert p.request(RESOURCE_NPU) == 2 and p.cpu_milli == 4000  # cpu: max(1 + 1, 1 + 3)
    assert [name for name, _ in p.containers] == ["proxy", raw["spec"]["containers"][0]["name"]]
    assert p.npu_counts == (1, 1)
    raw["spec"]["initContainers"][0].pop("restartPolicy")  # a plain init container: max, not sum
    assert parse_pod(raw).request(RESOURCE_NPU) == 1


def test_a_binding_extender_refuses_nodes_without_a_usable_topology() -> None:
    # the binder cannot choose dies there: the node passed filter and prioritize (scoring like a good one) and every
    # bind to it failed, the pod looping on bind errors
    from fuyao.contracts import ANNOTATION_NODE_TOPOLOGY
    from fuyao.scheduler_extender.config import build_config
    from fuyao.scheduler_extender.service import build_framework

    ask = parse_pod(pod("p", requests={RESOURCE_NPU: "1"}))
    bare = info(node("n"))  # NPUs, no annotation yet
    garbled = node("g")
    garbled["metadata"]["annotations"][ANNOTATION_NODE_TOPOLOGY] = "{not json"
    requiring = DeviceFitPlugin(DeviceFitArgs(require_topology=True))
    rejection = reject(requiring, ask, bare)
    assert rejection and rejection.code == "no-topology" and rejection.unresolvable
    assert "publishes no usable npu.openfuyao.com/topology annotation: " in rejection.reason
    rejection = reject(requiring, ask, info(garbled))
    assert rejection and "npu.openfuyao.com/topology annotation (" in rejection.reason  # the parse error, named
    assert reject(requiring, parse_pod(pod("cpu-only")), bare) is None
    assert reject(DeviceFitPlugin(), ask, bare) is None  # not required: the device plugin picks the dies
    # null follows bind
    for bind in (True, False):
        framework = build_framework(build_config({"bind": bind}))
        fit = next(p for p, _ in framework.plugins if isinstance(p, DeviceFitPlugin))
        assert fit.require_topology is bind


def test_npu_core_requests_must_fit_one_die() -> None:
    plugin = DeviceFitPlugin()
    raw = node("d", npus=0, topo=topology(aicore=20), extra={RESOURCE_NPU_CORE: "160"})
    held = [f"Ascend910-{d}-c{k}" for d in range(8) for k in range(15)]  # 5 free cores per die
    holder = pod("h", node_name="d", phase="Running", requests={RESOURCE_NPU_CORE: str(len(held))},
                 assigned={RESOURCE_NPU_CORE: held})
    ask = parse_pod(pod("p", requests={RESOURCE_NPU_CORE: "10"}))
    rejection = reject(plugin, ask, info(raw, holder))
    assert rejection and "no die has 10 free AI cores" in rejection.reason and "most free on one die: 5" in \
        rejection.reason
    assert devices.choose_cores(info(raw, holder), 5) == [f"Ascend910-0-c{k}" for k in range(15, 20)]


def test_vnpu_slices() -> None:
    raw = node("v", npus=6, topo=topology(vnpus={0: 4, 1: 2}), extra={RESOURCE_VNPU: "6"})
    n = info(raw, holding("v", 2))
    assert devices.free_npus(n) == [f"Ascend910-{i}" for i in range(3, 8)]  # carved dies are not whole NPUs
    assert devices.choose_vnpus(n, 2) == ["Ascend910-1-v116", "Ascend910-1-v117"]  # packs the fuller die
    rejection = reject(DeviceFitPlugin(), parse_pod(pod("p", requests={RESOURCE_VNPU: "7"})), n)
    assert rejection and "node has 6 npu.huawei.com/vNPU" in rejection.reason


def test_binpack_and_spread() -> None:
    ask = parse_pod(pod("p", requests={RESOURCE_NPU: "2"}))
    empty = info(node("empty", topo=topology()))
    half = info(node("half", topo=topology()), holding("half", 0, 1, 2, 3))
    binpack = DeviceFitPlugin(DeviceFitArgs(strategy="binpack"))
    spread = DeviceFitPlugin(DeviceFitArgs(strategy="spread"))
    assert score(binpack, ask, half) > score(binpack, ask, empty)
    assert score(spread, ask, empty) > score(spread, ask, half)
    # a 4-card job on an A1 board: the board that keeps it inside one ring wins
    four = parse_pod(pod("q", requests={RESOURCE_NPU: "4"}))
    ring_free = info(node("r1", topo=topology("a1")), holding("r1", 0))
    rings_split = info(node("r2", topo=topology("a1")), holding("r2", 0, 1, 4))
    assert score(DeviceFitPlugin(), four, ring_free) > score(DeviceFitPlugin(), four, rings_split)


# --- NUMA -----------------------------------------------------------------------------------------------------------
def test_single_numa_node_policy_and_scores() -> None:
    plugin = NumaPlugin()
    ask = parse_pod(pod("p", requests={RESOURCE_NPU: "2"},
                        annotations={"volcano.sh/numa-topology-policy": "single-numa-node"}))
    scattered = info(node("s", topo=topology()), holding("s", 0, 2, 4, 6))  # one free die per NUMA node
    rejection = reject(plugin, ask, scattered)
    assert rejection and "need 2 NUMA nodes" in rejection.reason and not rejection.unresolvable
    packed = info(node("p", topo=topology()), holding("p", 0, 1, 2))
    assert reject(plugin, ask, packed) is None
    assert score(plugin, ask, packed) == 1.0 and score(plugin, ask, scattered) == 0.5
    restricted = parse_pod(pod("r", requests={RESOURCE_NPU: "2"},
                               annotations={"volcano.sh/numa-topology-policy": "restricted"}))
    assert "restricted" in reject(plugin, restricted, scattered).reason  # type: ignore[union-attr]
    best_effort = parse_pod(pod("b", requests={RESOURCE_NPU: "2"},
                                annotations={"volcano.sh/numa-topology-policy": "best-effort"}))
    assert reject(plugin, best_effort, scattered) is None


def test_exclusive_cpus_of_guaranteed_pods() -> None:
    def with_resources(requests: dict[str, str], limits: dict[str, str]) -> dict:  # type: ignore[type-arg]
        raw = pod("g")
        raw["spec"]["containers"][0]["resources"] = {"requests": requests, "limits": limits}
        return raw

    assert parse_pod(with_resources({}, {"cpu": "16", "memory": "64Gi"})).exclusive_cpus == 16  # requests = limits
    assert parse_pod(with_resources({"cpu": "8"}, {"cpu": "16", "memory": "64Gi"})).exclusive_cpus == 0  # burstable
    assert parse_pod(with_resources({}, {"cpu": "1500m", "memory": "1Gi"})).exclusive_cpus == 0  # not an integer
    assert parse_pod(with_resources({}, {"cpu": "4"})).exclusive_cpus == 0  # no memory limit: not Guaranteed
    assert parse_pod(with_resources({}, {"cpu": "4", "memory": "garbage"})).exclusive_cpus == 0


def test_numa_counts_exclusive_cpus_where_the_node_publishes_them() -> None:
    # NUMA nodes 0..3 with two dies each; dies 2, 4-7 held: NUMA 0 has both dies free, NUMA 1 one
    base = topology()
    cpus = {0: NumaCpus(allocatable=48, exclusive=40), 1: NumaCpus(allocatable=48, exclusive=0),
            2: NumaCpus(allocatable=48, exclusive=48), 3: NumaCpus(allocatable=48, exclusive=48)}
    with_cpus = base.model_copy(update={"numa_cpus": cpus})
    held = (2, 4, 5, 6, 7)
    published = info(node("c", topo=with_cpus), holding("c", *held))
    silent = info(node("s", topo=base), holding("s", *held))

    def guaranteed(npus: int, cpu: int, policy: str = "single-numa-node") -> PodInfo:
        raw = pod("g", annotations={"volcano.sh/numa-topology-policy": policy})
        raw["spec"]["containers"][0]["resources"] = {"limits": {
            "cpu": str(cpu), "memory": "8Gi", **({RESOURCE_NPU: str(npus)} if npus else {})}}
        return parse_pod(raw)

    plugin = NumaPlugin()
    ask = guaranteed(2, 16)  # NUMA 0 has the dies but only 8 free CPUs; NUMA 1 the CPUs but one die
    rejection = reject(plugin, ask, published)
    assert rejection and not rejection.unresolvable and rejection.code == "numa-single-node"
    assert "2 NPUs + 16 exclusive CPUs need 2 NUMA nodes" in rejection.reason
    assert "free exclusive CPUs per NUMA node: {0: 8, 1: 48, 2: 0, 3: 0}" in rejection.reason
    assert reject(plugin, ask, silent) is None  # CPUs unknown there: the NPUs alone fit NUMA node 0
    assert reject(plugin, guaranteed(2, 8), published) is None
    assert score(plugin, guaranteed(2, 8), published) == 1.0 and score(plugin, guaranteed(2, 16), published) == 0.5
    # CPUs only: 40 fit NUMA node 1 alone; 50 need two (48 + 8); 60 fit nowhere (the scheduler reports that)
    assert reject(plugin, guaranteed(0, 40), published) is None and score(plugin, guaranteed(0, 40), published) == 1
    assert "50 exclusive CPUs need 2 NUMA nodes" in reject(plugin, guaranteed(0, 50), published).reason  # type: ignore[union-attr]
    assert reject(plugin, guaranteed(0, 60), published) is None
    assert reject(plugin, guaranteed(0, 50), silent) is None  # a CPU-only pod where CPUs are unknown: not ours
    assert "restricted" in reject(plugin, guaranteed(2, 16, "restricted"), published).reason  # type: ignore[union-attr]
    # even the empty node cannot give 2 dies + 50 CPUs on one NUMA node (48 each): unresolvable
    assert reject(plugin, guaranteed(2, 50), published).unresolvable  # type: ignore[union-attr]


def test_joint_table_matches_brute_force() -> None:
    import itertools
    import random

    from fuyao.scheduler_extender.features import MAX_COVER, joint_table

    rng = random.Random(7)
    for _ in range(200):
        per = tuple((rng.randint(0, 4), rng.randint(0, 64)) for _ in range(rng.randint(1, 6)))
        table = joint_table(per)
        for k in range(len(per) + 1):
            for d in range(0, 10):
                best = max((sum(c for _, c in s) for r in range(k + 1) for s in itertools.combinations(per, r)
                            if sum(x for x, _ in s) >= d), default=-1)
                assert table[k][min(d, MAX_COVER)] == best, (per, k, d)


# --- business type --------------------------------------------------------------------------------------------------
def test_business_type_prefers_free_dominant_resource_and_penalises_stacking() -> None:
    plugin = BusinessTypePlugin(BusinessTypeArgs(stacking_penalty=0.5))
    mem = parse_pod(pod("m", annotations={"business.workload/type": "memory-sensitive"},
                        requests={"cpu": "1", "memory": "8Gi"}))
    light = info(node("light", npus=0))
    heavy = info(node("heavy", npus=0), pod("x", node_name="heavy", phase="Running",
                                            requests={"cpu": "1", "memory": "200Gi"}))
    assert score(plugin, mem, light) > score(plugin, mem, heavy)
    # measured usage wins over requests
    measured = info(node("measured", npus=0, usage=usage(0.1, 0.9)))
    assert score(plugin, mem, measured) < 0.2
    stacked = info(node("stacked", npus=0), *[pod(f"s{i}", node_name="stacked", phase="Running",
                                                  annotations={"business.workload/type": "memory-sensitive"},
                                                  requests={"memory": "1Gi"}) for i in range(4)])
    assert score(plugin, mem, stacked) < score(plugin, mem, light) / 2
    unknown = parse_pod(pod("u", annotations={"business.workload/type": "quantum"}))
    assert score(plugin, unknown, light) == 0.5


# --- QoS colocation -------------------------------------------------------------------------------------------------
def test_be_pods_need_colocation_nodes_with_batch_capacity() -> None:
    plugin = ColocationPlugin()
    be = parse_pod(pod("be", labels={"volcano.sh/qos": "BE"},
                       requests={RESOURCE_BATCH_CPU: "4000", RESOURCE_BATCH_MEMORY: str(8 * 2**30)}))
    plain = info(node("plain", npus=0))
    rejection = reject(plugin, be, plain)
    assert rejection and rejection.unresolvable and "volcano.sh/colocation=true" in rejection.reason
    batch = {RESOURCE_BATCH_CPU: "6000", RESOURCE_BATCH_MEMORY: str(16 * 2**30)}
    colo = info(node("colo", npus=0, labels={"volcano.sh/colocation": "true"}, extra=batch))
    assert reject(plugin, be, colo) is None
    full = info(node("full", npus=0, labels={"volcano.sh/colocation": "true"}, extra=batch),
                pod("other-be", node_name="full", phase="Running", labels={"volcano.sh/qos": "BE"},
                    requests={RESOURCE_BATCH_CPU: "3000"}))
    rejection = reject(plugin, be, full)
    assert rejection and "insufficient batch resources: cpu 3000m free / 4000m asked" in rejection.reason
    assert score(plugin, be, colo) > score(plugin, be, full)
    # the node's QoS agent stopped reporting (crash loop, uninstalled): the batch resources it published stay, but
    # nothing limits BE pods there; a node whose batch resources come from elsewhere (no usage report) still takes them
    silent = info(node("silent", npus=0, labels={"volcano.sh/colocation": "true"}, extra=batch,
                       usage=usage(0.3, 0.3, age_s=600)))
    rejection = reject(plugin, be, silent)
    assert rejection and rejection.code == "qos-agent-stale" and "last reported 600 s ago" in rejection.reason
    live = info(node("live", npus=0, labels={"volcano.sh/colocation": "true"}, extra=batch, usage=usage(0.3, 0.3)))
    assert reject(plugin, be, live) is None


def test_ls_pods_avoid_hot_nodes() -> None:
    plugin = ColocationPlugin(QosColocationArgs(ls_usage_watermark=0.7, ls_max_usage=0.95))
    ls = parse_pod(pod("ls", requests={"cpu": "1"}))
    cool = info(node("cool", npus=0, usage=usage(0.3, 0.3)))
    warm = info(node("warm", npus=0, usage=usage(0.85, 0.3)))
    hot = info(node("hot", npus=0, usage=usage(0.97, 0.3)))
    pressured = info(node("pressured", npus=0, usage=usage(0.3, 0.3, be=0.6)))
    stale = info(node("stale", npus=0, usage=usage(0.99, 0.99, age_s=600)))
    reason = reject(plugin, ls, hot).reason  # type: ignore[union-attr]
    assert "is above 0.95 for LS pods" in reason and "%" not in reason  # kube-scheduler formats reasons: no '%'
    assert reject(plugin, ls, stale) is None  # a stale measurement is ignored
    assert score(plugin, ls, cool) == 1.0 > score(plugin, ls, warm) > 0
    assert score(plugin, ls, pressured) == 0.5


def test_preemption_victims() -> None:
    ls = parse_pod(pod("ls", labels={"volcano.sh/qos": "LS"}))
    be1, be2 = (parse_pod(pod(n, labels={"volcano.sh/qos": "BE"})) for n in ("be1", "be2"))
    marked_ls = parse_pod(pod("ls2", annotations={"volcano.sh/qos-level": "LC"}))
    unmarked = parse_pod(pod("plain"))
    assert be_victims(ls, [be1, be2]) == [be1, be2]
    assert be_victims(ls, [be1, marked_ls]) is None  # a pod marked LS is never a victim
    assert be_victims(unmarked, [unmarked]) == [unmarked]  # no QoS keys: ordinary priority preemption
    assert be_victims(be1, [be2]) is None


# --- prefill/decode -------------------------------------------------------------------------------------------------
def test_prefill_decode_affinity_spread_and_ratio() -> None:
    plugin = PdAffinityPlugin(PdAffinityArgs(topology_key="zone", ratio="1:2"))
    decode = pod("d1", node_name="n1", phase="Running", labels={"app": "llama", "phase": "decode"})
    n1 = info(node("n1", labels={"zone": "a"}), decode)
    n2 = info(node("n2", labels={"zone": "a"}))
    n3 = info(node("n3", labels={"zone": "b"}))
    cycle = [n1, n2, n3]
    prefill = parse_pod(pod("p1", labels={"app": "llama", "phase": "prefill"}))
    assert score(plugin, prefill, n1, cycle) > score(plugin, prefill, n2, cycle) > score(plugin, prefill, n3, cycle)
    # another decode replica: spread away from the node that already has one
    decode2 = parse_pod(pod("d2", labels={"app": "llama", "phase": "decode"}))
    assert score(plugin, decode2, n2, cycle) > score(plugin, decode2, n1, cycle)
    # other groups and non-PD pods are neutral
    assert score(plugin, parse_pod(pod("x", labels={"app": "other", "phase": "prefill"})), n1, cycle) == 0.5
    assert score(plugin, parse_pod(pod("y")), n1, cycle) == 0.5


# --- framework ------------------------------------------------------------------------------------------------------
def test_framework_collects_reasons_and_weights_scores() -> None:
    framework = Framework([(DeviceFitPlugin(), 3.0), (NumaPlugin(), 1.0)])
    ask = parse_pod(pod("p", requests={RESOURCE_NPU: "4"}))
    nodes = [info(node("ok", topo=topology())), info(node("short", npus=2)),
             info(node("busy", topo=topology()), holding("busy", 0, 1, 2, 3, 4, 5))]
    outcome = framework.filter(ask, view_of(nodes))
    assert outcome.passed == ["ok"]
    assert outcome.unresolvable["short"].startswith("device-fit: node has 2")
    assert outcome.failed["busy"].startswith("device-fit: insufficient")
    explanation = framework.score(ask, view_of([nodes[0]]))
    assert set(explanation.scores_of()["ok"]) == {"device-fit", "numa"}
    assert 0 <= to_extender_score(explanation.total_of()["ok"]) <= 10
    assert to_extender_score(1.0) == 10 and to_extender_score(float("nan")) == 0


def test_npus_held_without_an_assignment_make_topology_decisions_conservative() -> None:
    # 4 of 8 dies held by a pod bound by someone else (no npu.openfuyao.com/assigned): which ones is unknown
    foreign = pod("foreign", node_name="a1", phase="Running", requests={RESOURCE_NPU: "4"})
    board = info(node("a1", topo=topology("a1")), foreign)
    assert devices.unplaced_npus(board) == 4
    four = parse_pod(pod("p", requests={RESOURCE_NPU: "4"}))
    rejection = reject(DeviceFitPlugin(), four, board)
    assert rejection and not rejection.unresolvable
    assert "dies its product lets go together are free is unknown" in rejection.reason
    assert reject(DeviceFitPlugin(), parse_pod(pod("one", requests={RESOURCE_NPU: "1"})), board) is None
    strict = parse_pod(pod("s", requests={RESOURCE_NPU: "2"},
                           annotations={"volcano.sh/numa-topology-policy": "single-numa-node"}))
    mesh = info(node("m", topo=topology()), pod("f2", node_name="m", phase="Running", requests={RESOURCE_NPU: "2"}))
    assert "which NUMA nodes are free is unknown" in reject(NumaPlugin(), strict, mesh).reason  # type: ignore[union-attr]
    one = parse_pod(pod("s1", requests={RESOURCE_NPU: "1"},
                        annotations={"volcano.sh/numa-topology-policy": "single-numa-node"}))
    assert reject(NumaPlugin(), one, mesh) is None  # one die sits on one NUMA node, whichever it is


def test_dies_the_device_plugin_reports_allocated_are_taken() -> None:
    # the same foreign pod, but the device plugin published which dies the kubelet gave it: decisions are exact
    foreign = pod("foreign", node_name="a1", phase="Running", requests={RESOURCE_NPU: "4"})
    board = info(node("a1", topo=topology("a1", allocated=(0, 1, 2, 3))), foreign)
    assert devices.unplaced_npus(board) == 0
    assert devices.free_npus(board) == [f"Ascend910-{i}" for i in range(4, 8)]
    four = parse_pod(pod("p", requests={RESOURCE_NPU: "4"}))
    assert reject(DeviceFitPlugin(), four, board) is None  # the other ring is whole
    split = info(node("a1", topo=topology("a1", allocated=(0, 1, 4, 5))), foreign)
    assert "one HCCS ring with 4 free" in reject(DeviceFitPlugin(), four, split).reason  # type: ignore[union-attr]


def test_preempt_keeps_a_node_only_when_evicting_the_victims_makes_room() -> None:
    from fuyao.scheduler_extender.cluster import ClusterCache
    from fuyao.scheduler_extender.config import build_config
    from fuyao.scheduler_extender.metrics import ExtenderMetrics
    from fuyao.scheduler_extender.service import ExtenderService

    be_big = pod("be-big", node_name="n1", phase="Running", labels={"volcano.sh/qos": "BE"}, uid="be-big",
                 requests={RESOURCE_NPU: "6"}, assigned={RESOURCE_NPU: [f"Ascend910-{i}" for i in range(6)]})
    be_small = pod("be-small", node_name="n2", phase="Running", labels={"volcano.sh/qos": "BE"}, uid="be-small",
                   requests={RESOURCE_NPU: "1"}, assigned={RESOURCE_NPU: ["Ascend910-0"]})
    ls_rest = pod("ls-rest", node_name="n2", phase="Running", labels={"volcano.sh/qos": "LS"}, uid="ls-rest",
                  requests={RESOURCE_NPU: "5"}, assigned={RESOURCE_NPU: [f"Ascend910-{i}" for i in range(1, 6)]})
    cache = ClusterCache()
    cache.replace_nodes([node("n1", topo=topology()), node("n2", topo=topology())])
    cache.replace_pods([be_big, be_small, ls_rest])
    service = ExtenderService(build_config({}), cache, ExtenderMetrics(), has_cluster=True)
    preemptor = pod("ls-4", labels={"volcano.sh/qos": "LS"}, requests={RESOURCE_NPU: "4"})
    result = service.preempt({"Pod": preemptor, "NodeNameToMetaVictims": {
        "n1": {"Pods": [{"UID": "be-big"}], "NumPDBViolations": 0},
        "n2": {"Pods": [{"UID": "be-small"}], "NumPDBViolations": 0},  # 3 free after: evicting it does not help
        "n3": {"Pods": [{"UID": "stranger"}], "NumPDBViolations": 0}}})  # unknown victim: never evicted
    assert result == {"NodeNameToMetaVictims": {"n1": {"Pods": [{"UID": "be-big"}], "NumPDBViolations": 0}}}


def test_preempt_frees_the_devices_the_kubelet_gave_the_victims() -> None:
    """Victims the kubelet admitted hold their dies per the topology annotation (``holder``): evicting them frees
    those dies, so the node helps the preemptor."""
    from fuyao.scheduler_extender.cluster import ClusterCache
    from fuyao.scheduler_extender.config import build_config
    from fuyao.scheduler_extender.metrics import ExtenderMetrics
    from fuyao.scheduler_extender.service import ExtenderService

    victim = pod("be-all", node_name="n1", phase="Running", labels={"volcano.sh/qos": "BE"}, uid="be-all",
                 requests={RESOURCE_NPU: "8"})
    cache = ClusterCache()
    cache.replace_nodes([node("n1", topo=topology(holders=dict.fromkeys(range(8), "default/be-all")))])
    cache.replace_pods([victim])
    service = ExtenderService(build_config({}), cache, ExtenderMetrics(), has_cluster=True)
    preemptor = pod("ls-8", labels={"volcano.sh/qos": "LS"}, requests={RESOURCE_NPU: "8"})
    result = service.preempt({"Pod": preemptor, "NodeNameToMetaVictims": {
        "n1": {"Pods": [{"UID": "be-all"}], "NumPDBViolations": 0}}})
    assert result == {"NodeNameToMetaVictims": {"n1": {"Pods": [{"UID": "be-all"}], "NumPDBViolations": 0}}}


def test_a_recreated_namesake_keeps_its_planned_dies_while_the_annotation_names_the_old_pod() -> None:
    """A StatefulSet pod recreated under its name: until the device plugin publishes again, the topology still says
    the old pod holds die 0. The new pod's planned die 1 stays taken (a die held under its name counts for it only
    once the kubelet took it in, or when it is one it was planned)."""
    base = parse_node(node("n1", topo=topology(holders={0: "default/web-0"})))
    new = pod("web-0", node_name="n1", uid="new", requests={RESOURCE_NPU: "1"},
              assigned={RESOURCE_NPU: ["Ascend910-1"]})
    info = NodeInfo(**{**base.__dict__, "pods": [parse_pod(new)], "memo": {}}).refresh()
    assert "Ascend910-1" in info.assigned[RESOURCE_NPU]
    started = {**new, "status": {"phase": "Pending", "startTime": "2026-12-07T00:00:00Z"}}
    info = NodeInfo(**{**base.__dict__, "pods": [parse_pod(started)], "memo": {}}).refresh()
    assert RESOURCE_NPU not in info.assigned  # taken in: what it holds is what the annotation says
    same = pod("web-0", node_name="n1", uid="new", requests={RESOURCE_NPU: "1"},
               assigned={RESOURCE_NPU: ["Ascend910-0"]})
    info = NodeInfo(**{**base.__dict__, "pods": [parse_pod(same)], "memo": {}}).refresh()
    assert RESOURCE_NPU not in info.assigned  # it got the die it was planned: counted once


def test_the_binder_never_writes_a_set_the_products_rules_refuse() -> None:
    """kube-scheduler binds after its filter: a bind racing another can find only a set outside the product's rules
    (a 910 A1 module with two dies free in each ring, a pod of 4). The placement function falls back to any set;
    the binder refuses it (the pod is scheduled again) instead of writing what the device plugin would refuse."""
    from fuyao.scheduler_extender.binder import AssignmentFailed, assignment_for

    split = info(node("a1", topo=topology("a1", allocated=(0, 1, 4, 5))))
    four = parse_pod(pod("p", requests={RESOURCE_NPU: "4"}))
    try:
        assignment_for(four, split)
    except AssignmentFailed as exc:
        assert "one HCCS ring" in str(exc)
    else:
        raise AssertionError("a set across rings was assigned")
    two = assignment_for(parse_pod(pod("q", requests={RESOURCE_NPU: "2"})), split)
    assert two is not None and {d for c in two.containers for d in c.devices} in (
        {"Ascend910-2", "Ascend910-3"}, {"Ascend910-6", "Ascend910-7"})


def test_one_bad_node_or_pod_in_a_list_leaves_out_only_itself() -> None:
    """A Node with an absurd allocatable (100Ei) is clamped into the table's integer columns; a Node or Pod whose
    name is not a string is left out; every other object of the list is kept."""
    from fuyao.scheduler_extender.cluster import ClusterCache

    big = node("big", memory="100Ei")
    odd = node("odd")
    odd["metadata"]["name"] = ["not", "a", "name"]
    bad_pod = pod("p1", node_name="a")
    bad_pod["metadata"]["name"] = 7
    cache = ClusterCache()
    cache.replace_nodes([node("a"), big, odd, node("z")])
    cache.replace_pods([bad_pod, pod("p2", node_name="z", phase="Running", requests={RESOURCE_NPU: "1"})])
    assert cache.ready and sorted(cache.node_names()) == ["a", "big", "z"] and len(cache.table) == 3
    assert cache.node_info("z").free(RESOURCE_NPU) == 7  # type: ignore[union-attr]


def test_readiness_follows_the_watch() -> None:
    from fuyao.scheduler_extender.cluster import ClusterCache
    from fuyao.scheduler_extender.config import build_config
    from fuyao.scheduler_extender.metrics import ExtenderMetrics
    from fuyao.scheduler_extender.service import ExtenderService

    cache = ClusterCache()
    service = ExtenderService(build_config({}), cache, ExtenderMetrics(), has_cluster=True)
    assert service.readiness()[0] is False and "waiting for the first list" in service.readiness()[1]
    cache.replace_nodes([node("n1")])
    cache.replace_pods([])
    assert service.readiness() == (True, "cluster state synced (1 nodes)")
    cache.failing["pods"] = "connection refused"
    ready, why = service.readiness()
    assert not ready and "stale" in why and "connection refused" in why
    assert ExtenderService(build_config({}), ClusterCache(), ExtenderMetrics()).readiness()[0] is True  # no cluster


def test_product_rules_in_the_extender_agree_with_the_device_plugin() -> None:
    from tests.unit.test_products import topology as preset_topology

    plugin = DeviceFitPlugin()
    a3 = preset_topology("910c-8")
    dies = list(a3.devices)
    # one die of each of chips 0-3 held: 8 dies free but only 4 whole chips
    held = {f"Ascend910-{2 * c}": "default/x" for c in range(4)}
    a3_node = info(node("a3", npus=16, topo=a3.model_copy(update={"devices": {
        i: d.model_copy(update={"allocated": i in held, "holder": held.get(i)}) for i, d in a3.devices.items()}})))
    ten = parse_pod(pod("ten", requests={RESOURCE_NPU: "10"}))
    rejection = reject(plugin, ten, a3_node)
    assert rejection and rejection.code == "product-shape" and "rule 910c-a3/die-pairs" in rejection.reason
    assert reject(plugin, parse_pod(pod("eight", requests={RESOURCE_NPU: "8"})), a3_node) is None
    odd = reject(plugin, parse_pod(pod("three", requests={RESOURCE_NPU: "3"})), a3_node)
    assert odd and odd.unresolvable and odd.code == "product-count" and "rule 910c-a3/counts" in odd.reason
    chosen = devices.choose_npus(a3_node, 8)
    assert len(chosen) == 8 and all(int(d.rsplit("-", 1)[1]) >= 8 for d in chosen)  # the four whole chips
    assert devices.choose_npus(a3_node, 1)[0] in {dies[2 * c + 1] for c in range(4)}  # a lone die first
    x16 = info(node("x16", npus=16, topo=preset_topology("910b3-16")))
    nine = reject(plugin, parse_pod(pod("nine", requests={RESOURCE_NPU: "9"})), x16)
    assert nine and nine.unresolvable and "rule 910b-x16/counts" in nine.reason
    assert reject(plugin, parse_pod(pod("twelve", requests={RESOURCE_NPU: "12"})), x16) is None
    twelve = devices.choose_npus(x16, 12)
    numbers = [int(d.rsplit("-", 1)[1]) for d in twelve]
    low, high = {i for i in numbers if i < 8}, {i - 8 for i in numbers if i >= 8}
    assert low == high and len(low) == 6  # matched pairs i, i+8


def test_config_refuses_infinite_numbers_and_a_watermark_above_the_maximum() -> None:
    # an infinite weight made every kube-scheduler score NaN (clamped to 0) and Volcano's null; an infinite
    # volcanoScoreScale the same; a watermark above the maximum inverted the LS score ramp
    import pytest

    from fuyao.config_files import ConfigError
    from fuyao.scheduler_extender.config import build_config

    for values, field in (({"plugins": {"deviceFit": {"weight": float("inf")}}}, "plugins.deviceFit.weight"),
                          ({"plugins": {"numa": {"weight": float("nan")}}}, "plugins.numa.weight"),
                          ({"volcanoScoreScale": float("inf")}, "volcanoScoreScale"),
                          ({"plugins": {"qosColocation": {"lsUsageWatermark": 0.9, "lsMaxUsage": 0.8}}},
                           "lsUsageWatermark (0.9) is above lsMaxUsage (0.8)")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
            build_config(values)
