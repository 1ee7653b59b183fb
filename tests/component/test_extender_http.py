"""fuyao-scheduler-extender as a process over real HTTP, without a cluster: the exact kube-scheduler and Volcano
JSON shapes, explanations, health, metrics, malformed bodies, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuyao.contracts import RESOURCE_NPU
from tests.conftest import REPO
from tests.support import volcano as vc
from tests.support.apiserver import free_port
from tests.support.hostile_json import json_paths
from tests.support.k8s_objects import node, pod, topology


class Extender:
    def __init__(self, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        self.log = tempfile.NamedTemporaryFile(prefix="extender-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "fuyao.scheduler_extender.cli", "--listen",
                                      f"127.0.0.1:{self.port}", *args], cwd=REPO, env=env,
                                     stdout=self.log, stderr=self.log)  # a file: a full pipe would block it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(Path(self.log.name).read_text()) from None
                time.sleep(0.1)
        raise AssertionError("extender did not start")

    def post(self, path: str, body: object, raw: bytes | None = None) -> tuple[int, object]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stop(self) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(10)
        return code, time.monotonic() - started


@pytest.fixture(scope="module")
def extender() -> Iterator[Extender]:
    e = Extender()
    yield e
    if e.proc.poll() is None:
        e.stop()


NODES = [node("mesh", topo=topology()), node("small", npus=2), node("a1", topo=topology("a1")),
         node("cpu-only", npus=0)]
FOUR = pod("train-0", requests={RESOURCE_NPU: "4", "cpu": "8", "memory": "32Gi"})


def test_filter_with_full_nodes_returns_the_kept_node_objects(extender: Extender) -> None:
    status, result = extender.post("/filter", {"Pod": FOUR, "Nodes": {"metadata": {}, "items": NODES},
                                               "NodeNames": None})
    assert status == 200
    assert set(result) == {"Nodes", "NodeNames", "FailedNodes", "FailedAndUnresolvableNodes", "Error"}
    assert [n["metadata"]["name"] for n in result["Nodes"]["items"]] == ["mesh", "a1"]
    assert result["Nodes"]["items"][0] == NODES[0]  # echoed as received
    assert result["NodeNames"] is None and result["Error"] == ""
    assert result["FailedAndUnresolvableNodes"] == {
        "small": "device-fit: node has 2 npu.huawei.com/NPU, the pod asks for 4",
        "cpu-only": "device-fit: node has 0 npu.huawei.com/NPU, the pod asks for 4"}


def test_filter_by_names_without_a_cluster_is_an_error_not_a_silent_reject(extender: Extender) -> None:
    status, result = extender.post("/filter", {"Pod": FOUR, "Nodes": None, "NodeNames": ["mesh", "a1"]})
    assert status == 200 and "no cluster state" in result["Error"] and result["NodeNames"] == []


def test_prioritize_returns_a_bare_array_of_integer_scores(extender: Extender) -> None:
    status, result = extender.post("/prioritize", {"Pod": FOUR, "Nodes": {"items": NODES[:1] + NODES[2:3]},
                                                   "NodeNames": None})
    assert status == 200 and isinstance(result, list)
    assert [r["Host"] for r in result] == ["mesh", "a1"]
    assert all(set(r) == {"Host", "Score"} and isinstance(r["Score"], int) and 0 <= r["Score"] <= 10
               for r in result)


def test_go_style_lowercase_keys_are_accepted(extender: Extender) -> None:
    status, result = extender.post("/filter", {"pod": FOUR, "nodes": {"items": NODES[:2]}})
    assert status == 200 and [n["metadata"]["name"] for n in result["Nodes"]["items"]] == ["mesh"]


def test_preempt_keeps_only_nodes_whose_victims_are_all_best_effort(extender: Extender) -> None:
    be = pod("batch", labels={"volcano.sh/qos": "BE"}, node_name="n1", phase="Running", uid="be-uid")
    ls = pod("web", node_name="n2", phase="Running", uid="ls-uid", labels={"volcano.sh/qos": "LS"})
    status, result = extender.post("/preempt", {"Pod": FOUR, "NodeNameToMetaVictims": None, "NodeNameToVictims": {
        "n1": {"Pods": [be], "NumPDBViolations": 0}, "n2": {"Pods": [ls, be], "NumPDBViolations": 1}}})
    assert status == 200
    assert result == {"NodeNameToMetaVictims": {"n1": {"Pods": [{"UID": "be-uid"}], "NumPDBViolations": 0}}}
    be_preemptor = pod("other-batch", labels={"volcano.sh/qos": "BE"})
    _, result = extender.post("/preempt", {"Pod": be_preemptor, "NodeNameToVictims": {
        "n1": {"Pods": [be], "NumPDBViolations": 0}}})
    assert result == {"NodeNameToMetaVictims": {}}


def test_bind_without_a_cluster_answers_an_error(extender: Extender) -> None:
    status, result = extender.post("/bind", {"PodName": "train-0", "PodNamespace": "default", "PodUID": "u",
                                             "Node": "mesh"})
    assert status == 200 and "not configured to bind" in result["Error"]


def volcano_task(raw_pod: dict) -> dict:  # type: ignore[type-arg]
    return {"UID": raw_pod["metadata"]["uid"], "Name": raw_pod["metadata"]["name"], "Namespace": "default",
            "Resreq": {"MilliCPU": 8000, "Memory": 34359738368, "ScalarResources": {RESOURCE_NPU: 4000}},
            "Status": 1, "Pod": raw_pod}


def volcano_node(raw_node: dict, *pods: dict) -> dict:  # type: ignore[type-arg]
    return {"Name": raw_node["metadata"]["name"], "Node": raw_node, "State": {"Phase": 1, "Reason": ""},
            "Tasks": {f"default/{p['metadata']['name']}": volcano_task(p) for p in pods}}


def test_volcano_predicate_codes(extender: Extender) -> None:
    status, result = extender.post("/volcano/predicate", {"task": volcano_task(FOUR), "node": volcano_node(NODES[0])})
    assert status == 200 and result == {"status": "", "code": 0}
    _, result = extender.post("/volcano/predicate", {"task": volcano_task(FOUR), "node": volcano_node(NODES[1])})
    assert result["code"] == 3 and "node has 2" in result["status"]
    busy = volcano_node(NODES[0], pod("holder", node_name="mesh", phase="Running", requests={RESOURCE_NPU: "6"},
                                      assigned={RESOURCE_NPU: [f"Ascend910-{i}" for i in range(6)]}))
    _, result = extender.post("/volcano/predicate", {"task": volcano_task(FOUR), "node": busy})
    assert result["code"] == 2 and "insufficient npu.huawei.com/NPU: 2 free" in result["status"]


def test_volcano_prioritize_and_victims(extender: Extender) -> None:
    status, result = extender.post("/volcano/prioritize", {"task": volcano_task(FOUR), "nodes": [
        volcano_node(NODES[0]), volcano_node(NODES[2])]})
    assert status == 200 and result["errorMessage"] == "" and set(result["nodeScore"]) == {"mesh", "a1"}
    assert all(0 <= v <= 100 for v in result["nodeScore"].values())
    be_task = volcano_task(pod("batch", labels={"volcano.sh/qos": "BE"}))
    ls_task = volcano_task(pod("web", labels={"volcano.sh/qos": "LS"}))
    plain_task = volcano_task(pod("plain"))  # no QoS key: ordinary priority preemption may take it
    _, result = extender.post("/volcano/preemptable", {"evictor": volcano_task(FOUR),
                                                       "evictees": [be_task, ls_task, plain_task]})
    assert result == {"status": 1, "victims": [be_task, plain_task]}  # returned verbatim, never the LS one
    _, result = extender.post("/volcano/reclaimable", {"evictor": be_task, "evictees": [ls_task]})
    assert result == {"status": 1, "victims": []}
    assert extender.post("/volcano/onSessionOpen", {"Jobs": {}, "Nodes": {}})[0] == 200
    assert extender.post("/volcano/onSessionClose", {})[0] == 200


def test_volcano_session_verbs_keep_the_connection(extender: Extender) -> None:
    # they answered before reading the body, and the server then closes the connection: Volcano's client opened
    # a new one for its next call every session
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", extender.port, timeout=10)
    try:
        body = json.dumps({"Jobs": {f"j{i}": {"Name": "x" * 200} for i in range(2000)}, "Nodes": {}})
        for verb in ("onSessionOpen", "onSessionClose", "onSessionOpen"):
            conn.request("POST", f"/volcano/{verb}", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read()) == {}
            assert response.getheader("Connection", "").lower() != "close"
            sock = conn.sock
            assert sock is not None  # the same connection serves the next call
    finally:
        conn.close()


def test_every_volcano_verb_is_served_with_its_shape(extender: Extender) -> None:
    """Each verb Volcano's extender plugin can be configured with answers 200 and the fields its response struct
    decodes (a 404 would be an error for Volcano)."""
    task = vc.task(FOUR)
    job = vc.job_info("train", [task], 1)
    expected = {
        "predicate": ({"task": task, "node": vc.node_info(NODES[0])}, {"status": "", "code": 0}),
        "jobEnqueueable": ({"job": job}, {"status": 0}),  # abstain: no cluster state here
        "jobEnqueued": ({"job": job}, {}),
        "jobReady": ({"job": job}, {"status": True}),
        "queueOverused": ({"queue": vc.queue_info()}, {"overused": False}),
        "allocateFunc": ({"task": task}, {"errorMessage": ""}),
        "deallocateFunc": ({"task": task}, {"errorMessage": ""}),
    }
    for verb, (body, answer) in expected.items():
        assert extender.post(f"/volcano/{verb}", body) == (200, answer), verb
    status, result = extender.post("/volcano/jobReady", {"job": {"Tasks": "w-0"}})
    assert status == 400 and "JobInfo.Tasks" in result["error"]  # type: ignore[index]


def test_explain_health_and_metrics(extender: Extender) -> None:
    extender.post("/filter", {"Pod": FOUR, "Nodes": {"items": NODES}})
    status, text = extender.get("/explain/default/train-0")
    explanation = json.loads(text)
    assert status == 200 and explanation["filter"]["rejected"]["small"].startswith("device-fit:")
    assert extender.get("/explain/default/nobody")[0] == 404
    assert extender.get("/healthz") == (200, "ok")
    status, text = extender.get("/readyz")
    assert status == 200 and "without cluster state" in text
    status, text = extender.get("/metrics")
    assert 'fuyao_extender_request_duration_seconds_count{verb="filter"}' in text
    assert 'fuyao_extender_rejections_total{plugin="device-fit",reason="node-too-small"}' in text


@pytest.mark.parametrize(("path", "body", "fragment"), [
    ("/filter", b"{not json", "invalid JSON"),
    ("/filter", b"[1, 2]", "expected a JSON object"),
    ("/filter", json.dumps({"Pod": FOUR}).encode(), "one of Nodes or NodeNames"),
    ("/filter", json.dumps({"Pod": FOUR, "NodeNames": "mesh"}).encode(), "NodeNames: expected an array"),
    ("/filter", json.dumps({"Pod": {"spec": {}}, "NodeNames": []}).encode(), "Pod: expected a Pod"),
    ("/bind", json.dumps({"PodName": "x"}).encode(), "missing or not a string"),
    ("/preempt", json.dumps({"Pod": FOUR}).encode(), "NodeNameToVictims or NodeNameToMetaVictims"),
    ("/volcano/predicate", json.dumps({"task": {}, "node": {}}).encode(), "TaskInfo"),
])
def test_malformed_bodies_are_400_naming_the_problem(extender: Extender, path: str, body: bytes,
                                                      fragment: str) -> None:
    status, result = extender.post(path, None, raw=body)
    assert status == 400 and fragment in result["error"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["Pod", "Nodes", "NodeNames", "items", "metadata", "name", "spec", "task", "node",
                         "Node", "Tasks", "Pods", "UID", "PodName", "evictor", "evictees", "x"]), children,
        max_size=5),
    max_leaves=20)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/filter", "/prioritize", "/bind", "/preempt", "/volcano/predicate",
                             "/volcano/prioritize", "/volcano/preemptable"]),
       body=json_values | st.binary(max_size=64).map(lambda b: ("raw", b)))
def test_fuzzed_bodies_never_crash_the_server(extender: Extender, path: str, body: object) -> None:
    raw = body[1] if isinstance(body, tuple) and body[:1] == ("raw",) else json.dumps(body).encode()
    status, _ = extender.post(path, None, raw=raw)  # type: ignore[arg-type]
    assert status in (200, 400), f"{path} answered {status} for {raw[:200]!r}"


def _replace(value: object, path: tuple, new: object) -> object:  # type: ignore[type-arg]
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return copy


VALID = {
    "/filter": {"Pod": FOUR, "Nodes": {"metadata": {}, "items": NODES[:2]}, "NodeNames": None},
    "/prioritize": {"Pod": FOUR, "Nodes": {"items": NODES[:2]}, "NodeNames": None},
    "/preempt": {"Pod": FOUR, "NodeNameToVictims": {"n1": {"Pods": [pod("v", labels={"volcano.sh/qos": "BE"})],
                                                            "NumPDBViolations": 0}}},
    "/volcano/predicate": {"task": {"Pod": FOUR}, "node": {"Node": NODES[0], "Tasks": {}}},
}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), path=st.sampled_from(sorted(VALID)),
       junk=st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.just([1]) | st.just({"x": 1})
       | st.just("NaN") | st.just("-1Gi"))
def test_valid_requests_with_one_value_broken_never_crash(extender: Extender, data: st.DataObject, path: str,
                                                          junk: object) -> None:
    where = data.draw(st.sampled_from(json_paths(VALID[path])))
    body = _replace(VALID[path], where, junk)
    status, _ = extender.post(path, body)
    assert status in (200, 400), f"{path} answered {status} with {where} = {junk!r}"


def test_fuzzing_left_the_server_healthy(extender: Extender) -> None:
    assert extender.get("/healthz") == (200, "ok")
    assert extender.post("/filter", {"Pod": FOUR, "Nodes": {"items": NODES[:1]}})[0] == 200


def test_bad_config_exits_2_and_sigterm_exits_quickly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "c.yaml"
    bad.write_text("version: v1\nplugins: {pdAffinity: {ratio: '1:x'}}\n")
    proc = subprocess.run([sys.executable, "-m", "fuyao.scheduler_extender.cli", "--config", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "'plugins.pdAffinity.ratio'" in proc.stderr
    e = Extender()
    code, seconds = e.stop()
    assert code == 0 and seconds < 3.0


def test_several_processes_share_the_port_only_without_the_binder() -> None:
    refused = subprocess.run([sys.executable, "-m", "fuyao.scheduler_extender.cli", "--reuse-port"], cwd=REPO,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "reuse_port needs bind: false" in refused.stderr
    first = Extender("--reuse-port", "--no-bind")
    second = Extender("--reuse-port", "--no-bind", port=first.port)  # a second process on the same port
    try:
        deadline = time.monotonic() + 30  # /healthz was answered by the first: wait for the second's own start
        while "listening on" not in Path(second.log.name).read_text():
            assert time.monotonic() < deadline and second.proc.poll() is None, Path(second.log.name).read_text()
            time.sleep(0.1)
        shared = pod("shared-port", requests={RESOURCE_NPU: "1"})
        assert first.post("/volcano/predicate", {"task": vc.task(shared), "node": vc.node_info(NODES[0])}) == (
            200, {"status": "", "code": 0})
        # each process keeps its own /explain: over new connections, one of them knows the decision, one does not
        seen = {first.get("/explain/default/shared-port")[0] for _ in range(40)}
        assert seen == {200, 404}
    finally:
        assert second.stop()[0] == 0
        assert first.stop()[0] == 0
