"""The Volcano verbs on fixtures shaped as Volcano marshals its types (tests/support/volcano.py): task statuses in
predicate and prioritize (a Releasing victim's NPUs are free), vNPU-only and npu-core-only tasks, jobEnqueueable's
reject-or-abstain, the neutral verbs, and malformed statuses."""

from __future__ import annotations

import pytest

from fuyao.contracts import RESOURCE_NPU, RESOURCE_NPU_CORE, RESOURCE_VNPU
from fuyao.scheduler_extender.cluster import ClusterCache
from fuyao.scheduler_extender.config import build_config
from fuyao.scheduler_extender.metrics import ExtenderMetrics
from fuyao.scheduler_extender.partial import ProtocolError
from fuyao.scheduler_extender.service import ExtenderService
from fuyao.scheduler_extender.volcano_protocol import ABSTAIN, REJECT, TaskStatus
from fuyao.scheduler_extender.volcano_verbs import VolcanoVerbs
from tests.support import volcano as vc
from tests.support.k8s_objects import node, pod, topology

SIX = [f"Ascend910-{i}" for i in range(6)]


def verbs(cache: ClusterCache | None = None) -> VolcanoVerbs:
    cache = cache or ClusterCache()
    return VolcanoVerbs(ExtenderService(build_config({}), cache, ExtenderMetrics(), has_cluster=cache.ready))


def preemptor(npus: str = "4") -> dict:  # type: ignore[type-arg]
    return vc.task(pod("ls-4", labels={"volcano.sh/qos": "LS"}, requests={RESOURCE_NPU: npus}))


def victim(status: TaskStatus, holder: bool) -> tuple[dict, dict]:  # type: ignore[type-arg]
    """A BE pod holding 6 of the node's 8 dies: per the kubelet (topology holder) or per its planned assignment."""
    be = pod("be-big", labels={"volcano.sh/qos": "BE"}, node_name="n1", phase="Running", uid="be-big",
             requests={RESOURCE_NPU: "6"}, assigned=None if holder else {RESOURCE_NPU: SIX})
    topo = topology(holders={i: "default/be-big" for i in range(6)}) if holder else topology()
    return vc.node_info(node("n1", topo=topo), vc.task(be, status, node="n1")), be


@pytest.mark.parametrize("holder", [True, False], ids=["held-per-kubelet", "planned-assignment"])
def test_a_releasing_victims_npus_are_free_for_the_preemptor(holder: bool) -> None:
    v = verbs()
    running, _ = victim(TaskStatus.RUNNING, holder)
    answer = v.predicate({"task": preemptor(), "node": running})
    assert answer["code"] == 2 and "2 free" in answer["status"]  # Unschedulable: preemption may help
    releasing, _ = victim(TaskStatus.RELEASING, holder)
    assert v.predicate({"task": preemptor(), "node": releasing}) == {"status": "", "code": 0}
    scores = v.prioritize({"task": preemptor(), "nodes": [releasing]})["nodeScore"]
    assert set(scores) == {"n1"}


@pytest.mark.parametrize("status", [TaskStatus.SUCCEEDED, TaskStatus.FAILED])
def test_finished_tasks_hold_nothing(status: TaskStatus) -> None:
    node_info, _ = victim(status, holder=True)
    assert verbs().predicate({"task": preemptor(), "node": node_info})["code"] == 0


@pytest.mark.parametrize("status", [TaskStatus.ALLOCATED, TaskStatus.PIPELINED, TaskStatus.BINDING,
                                    TaskStatus.BOUND, TaskStatus.UNKNOWN])
def test_placed_and_pipelined_tasks_hold_their_devices(status: TaskStatus) -> None:
    other = pod("other", requests={RESOURCE_NPU: "6"})  # no devices known yet: counted by its request
    node_info = vc.node_info(node("n1", topo=topology()), vc.task(other, status, node="n1"))
    assert verbs().predicate({"task": preemptor(), "node": node_info})["code"] == 2


def test_vnpu_only_and_npu_core_only_tasks_are_decided() -> None:
    v = verbs()
    with_slices = vc.node_info(node("n1", topo=topology(vnpus={0: 2, 1: 2}), extra={RESOURCE_VNPU: "4"}))
    vnpu = vc.task(pod("slice", requests={RESOURCE_VNPU: "2"}))
    assert v.predicate({"task": vnpu, "node": with_slices})["code"] == 0
    too_many = vc.task(pod("slices", requests={RESOURCE_VNPU: "5"}))
    assert v.predicate({"task": too_many, "node": with_slices})["code"] == 3  # the node never has 5
    cores = vc.task(pod("cores", requests={RESOURCE_NPU_CORE: "8"}))
    plain = vc.node_info(node("n2", topo=topology(), extra={RESOURCE_NPU_CORE: "160"}))
    assert v.predicate({"task": cores, "node": plain})["code"] == 0
    assert v.predicate({"task": vc.task(pod("cores-40", requests={RESOURCE_NPU_CORE: "40"})),
                        "node": plain})["code"] in (2, 3)  # 20 AI cores per die: never on one die


@pytest.mark.parametrize("bad", ["Running", 3.5, True, [64]])
def test_a_status_that_is_not_volcanos_number_is_a_protocol_error(bad: object) -> None:
    node_info, _ = victim(TaskStatus.RUNNING, holder=True)
    next(iter(node_info["Tasks"].values()))["Status"] = bad
    with pytest.raises(ProtocolError, match=r"Status: expected Volcano's numeric TaskStatus"):
        verbs().predicate({"task": preemptor(), "node": node_info})


def cluster(*nodes: dict) -> ClusterCache:  # type: ignore[type-arg]
    cache = ClusterCache()
    cache.replace_nodes(list(nodes))
    cache.replace_pods([])
    return cache


def gang(npus: str, count: int, min_available: int) -> dict:  # type: ignore[type-arg]
    tasks = [vc.task(pod(f"w-{i}", requests={RESOURCE_NPU: npus})) for i in range(count)]
    return vc.job_info("train", tasks, min_available)


def test_job_enqueueable_rejects_only_gangs_that_could_never_fit() -> None:
    v = verbs(cluster(node("n1", topo=topology()), node("n2", topo=topology())))  # 2 x 8 dies
    assert v.job_enqueueable({"job": gang("8", 2, 2)}) == {"status": ABSTAIN}  # fits: the queue plugins decide
    assert v.job_enqueueable({"job": gang("16", 2, 2)}) == {"status": REJECT}  # no node has 16 dies
    assert v.job_enqueueable({"job": gang("8", 3, 3)}) == {"status": REJECT}  # 24 dies > 16 in the cluster
    assert v.job_enqueueable({"job": gang("8", 3, 2)}) == {"status": ABSTAIN}  # only 2 of 3 needed
    assert v.job_enqueueable({"job": gang("8", 1, 2)}) == {"status": ABSTAIN}  # its 2nd task is not created yet
    assert v.job_enqueueable({"job": gang("16", 1, 2)}) == {"status": REJECT}  # but the one there never fits
    mixed = vc.job_info("mixed", [vc.task(pod("big", requests={RESOURCE_NPU: "16"})),
                                  vc.task(pod("ok", requests={RESOURCE_NPU: "8"}))], min_available=1)
    assert v.job_enqueueable({"job": mixed}) == {"status": ABSTAIN}  # one task that can fit is enough
    # a vcjob before enqueueing has no pods yet: the PodGroup's minResources is what there is to judge
    pending = vc.job_info("later", [], min_available=4, min_resources={RESOURCE_NPU: "32", "cpu": "64"})
    assert v.job_enqueueable({"job": pending}) == {"status": REJECT}
    pending = vc.job_info("later", [], min_available=2, min_resources={RESOURCE_NPU: "16"})
    assert v.job_enqueueable({"job": pending}) == {"status": ABSTAIN}
    cpu_only = vc.job_info("web", [vc.task(pod("web-0", requests={"cpu": "4"}))], 1)
    assert v.job_enqueueable({"job": cpu_only}) == {"status": ABSTAIN}  # not ours to judge
    metrics = v.metrics.render().decode()
    assert 'fuyao_extender_decisions_total{result="reject",verb="volcano-jobEnqueueable"} 4.0' in metrics


def test_job_enqueueable_abstains_without_cluster_state() -> None:
    assert verbs().job_enqueueable({"job": gang("16", 2, 2)}) == {"status": ABSTAIN}


def test_neutral_verbs_answer_volcanos_shapes() -> None:
    v = verbs()
    job = gang("1", 1, 1)
    assert v.job_ready({"job": job}) == {"status": True}
    assert v.job_enqueued({"job": job}) == {}
    assert v.queue_overused({"queue": vc.queue_info()}) == {"overused": False}
    task = preemptor()
    assert v.event({"task": task}, "allocateFunc") == {"errorMessage": ""}
    assert v.event({"task": task}, "deallocateFunc") == {"errorMessage": ""}
    with pytest.raises(ProtocolError, match="TaskInfo"):
        v.event({"task": {"Name": "no pod"}}, "allocateFunc")
    with pytest.raises(ProtocolError, match="MinAvailable"):
        v.job_enqueueable({"job": {**job, "MinAvailable": "two"}})


def test_raw_bodies_decode_to_the_same_decisions_as_full_json() -> None:
    """The server's path (bytes, only the read fields decoded, parsed objects reused) against decoded JSON."""
    import orjson

    v = verbs()
    for status in (TaskStatus.RUNNING, TaskStatus.RELEASING):
        node_info, _ = victim(status, holder=True)
        body = {"task": preemptor(), "node": node_info}
        go_shaped = orjson.dumps(body)  # {"task":...,"node":{...}}: the node is looked up by its bytes
        reordered = orjson.dumps({"node": node_info, "task": preemptor()})  # decoded whole instead
        assert v.predicate(go_shaped) == v.predicate(reordered) == v.predicate(body)
        assert v.predicate(go_shaped) == v.predicate(go_shaped)  # from the kept NodeInfo
    prioritize = {"task": preemptor(), "nodes": [victim(TaskStatus.RELEASING, holder=False)[0],
                                                  vc.node_info(node("n2", topo=topology()))]}
    assert v.prioritize(orjson.dumps(prioritize)) == v.prioritize(prioritize)
    # preempt asks with no candidates at all: nodeScore must still be an object
    assert v.prioritize(b'{"task":' + orjson.dumps(preemptor()) + b',"nodes":null}') == {
        "nodeScore": {}, "errorMessage": ""}
    with pytest.raises(ProtocolError, match=r"NodeInfo: .*\$\.Tasks"):
        v.predicate(b'{"node":{"Tasks":[1]},"task":' + orjson.dumps(preemptor()) + b"}")
    with pytest.raises(ProtocolError, match="nested too deep"):
        v.predicate(b'{"task":' + orjson.dumps(preemptor()) + b',"node":{"x":' + b"[" * 5000 + b"]" * 5000 + b"}}")
    with pytest.raises(ProtocolError, match="invalid JSON"):
        v.predicate(b'{"task":{"Pod":')


def test_kept_tasks_and_verdicts_answer_as_a_fresh_extender_would() -> None:
    """One extender keeps, across calls, the task's pod by the digest of its bytes and each NodeInfo's verdicts per
    pod shape: random (task, node) sequences, with tasks that differ by one field and the same node bytes
    asked about by every task, answer what a fresh extender answers for each call on decoded JSON."""
    import random

    import orjson

    tasks = [preemptor("2"), preemptor("4"), preemptor("8"), preemptor("9"),
             vc.task(pod("be-2", labels={"volcano.sh/qos": "BE"}, requests={RESOURCE_NPU: "2"})),
             vc.task(pod("slice", requests={RESOURCE_VNPU: "2"}))]
    nodes = [victim(TaskStatus.RUNNING, holder=True)[0], victim(TaskStatus.RELEASING, holder=True)[0],
             victim(TaskStatus.RUNNING, holder=False)[0], vc.node_info(node("n2", topo=topology())),
             vc.node_info(node("n3", topo=topology(vnpus={0: 2}), extra={RESOURCE_VNPU: "2"}))]
    kept = verbs()
    rng = random.Random(5)
    answers = set()
    for _ in range(300):
        task, info = rng.choice(tasks), rng.choice(nodes)
        got = kept.predicate(b'{"task":' + orjson.dumps(task) + b',"node":' + orjson.dumps(info) + b"}")
        assert got == verbs().predicate({"task": task, "node": info}), (task["Pod"]["metadata"]["name"],
                                                                        info["Name"])
        answers.add(got["code"])
    assert answers >= {0, 2, 3}  # the sequence met passing, preemptible and hopeless verdicts


def test_pods_are_reused_by_uid_and_resource_version() -> None:
    import orjson

    v = verbs()
    holder = pod("be-big", labels={"volcano.sh/qos": "BE"}, node_name="n1", phase="Running", uid="be-big",
                 requests={RESOURCE_NPU: "6"}, assigned={RESOURCE_NPU: SIX})
    holder["metadata"]["resourceVersion"] = "7"
    info = vc.node_info(node("n1", topo=topology()), vc.task(holder, TaskStatus.RUNNING, node="n1"))
    assert v.predicate(orjson.dumps({"task": preemptor(), "node": info}))["code"] == 2
    # the pod changes (a new version: it gave its dies back); the same uid at another version is parsed anew
    holder["metadata"]["resourceVersion"] = "8"
    holder["spec"]["containers"][0]["resources"]["requests"][RESOURCE_NPU] = "2"
    holder["metadata"]["annotations"].clear()
    assert v.predicate(orjson.dumps({"task": preemptor(), "node": info}))["code"] == 0


def test_the_partial_decoding_keeps_every_field_the_model_reads() -> None:
    """A pod and a node using every field parse_pod / parse_node read, decoded in full and by the predicate
    request's partial schema: the same PodInfo and NodeInfo."""
    import orjson

    from fuyao.scheduler_extender.model import parse_node, parse_pod
    from fuyao.scheduler_extender.volcano_protocol import is_task, split_predicate, try_task

    rich = pod("rich", requests={RESOURCE_NPU: "2", "cpu": "4", "memory": "16Gi"}, node_name="n1", phase="Running",
               labels={"volcano.sh/qos": "BE", "inference.openfuyao.com/phase": "decode"},
               annotations={"business.workload/type": "memory-sensitive",
                            "npu.openfuyao.com/numa-policy": "single-numa-node"},
               assigned={RESOURCE_NPU: ["Ascend910-0", "Ascend910-1"]}, uid="rich-uid")
    rich["metadata"].update({"resourceVersion": "42", "creationTimestamp": "2026-12-05T00:00:00Z",
                             "managedFields": [{"manager": "x", "fieldsV1": {"f:spec": {}}}]})
    rich["spec"].update({
        "initContainers": [{"name": "init", "resources": {"requests": {"cpu": "8"}, "limits": {"cpu": "8"}}}],
        "overhead": {"cpu": "250m"},
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1}]}},
        "topologySpreadConstraints": [{"whenUnsatisfiable": "ScheduleAnyway", "maxSkew": 1}],
        "volumes": [{"name": "v", "emptyDir": {}}]})
    rich["spec"]["containers"][0]["resources"]["limits"].update({"cpu": "4", "memory": "16Gi"})
    the_node = node("n1", topo=topology(holders={0: "default/rich"}), labels={"zone": "a"})
    the_node["metadata"]["resourceVersion"] = "9"
    info = vc.node_info(the_node, vc.task(rich, TaskStatus.RUNNING, node="n1"))
    cut = split_predicate(orjson.dumps({"task": vc.task(rich), "node": info}))  # the server's path: cut by bytes
    assert cut is not None
    task, node_bytes = try_task(cut[0]), cut[1]
    assert is_task(task)
    assert parse_pod(task["Pod"]) == parse_pod(rich)
    from fuyao.scheduler_extender.volcano_protocol import decode_node_info

    partial = decode_node_info(node_bytes)  # type: ignore[arg-type]
    assert parse_pod(partial["Tasks"]["default/rich"]["Pod"]) == parse_pod(rich)
    full, cut = parse_node(the_node, [parse_pod(rich)]), parse_node(partial["Node"], [parse_pod(rich)])
    assert (full.labels, full.annotations, full.allocatable, full.topology, full.used, full.assigned) == (
        cut.labels, cut.annotations, cut.allocatable, cut.topology, cut.used, cut.assigned)


def test_prioritize_cut_by_bytes_falls_back_when_a_node_holds_the_separator() -> None:
    import orjson

    v = verbs()
    tricky = vc.node_info(node("n1", topo=topology()))
    tricky["Others"] = {"x": [{"a": 1}, {"Name": "not a node"}]}  # '},{"Name":"' inside a NodeInfo
    body = {"task": preemptor(), "nodes": [tricky, vc.node_info(node("n2", topo=topology()))]}
    assert b'},{"Name":"not' in orjson.dumps(body)
    assert v.prioritize(orjson.dumps(body)) == v.prioritize(body)
    assert set(v.prioritize(orjson.dumps(body))["nodeScore"]) == {"n1", "n2"}
    broken = orjson.dumps(body).replace(b'"Node":{', b'"Node":[', 1)
    with pytest.raises(ProtocolError):
        v.prioritize(broken)
