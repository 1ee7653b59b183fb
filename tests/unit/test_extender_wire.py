"""kube-scheduler's full-Node requests decoded partially (fuyao.scheduler_extender.kube_protocol): the byte-cut path for
Go's encoding and the msgspec path agree with decoding the whole body, on every shape."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuyao.scheduler_extender import kube_protocol as kp
from fuyao.scheduler_extender.partial import ProtocolError
from tests.support.k8s_objects import go_extender_args, go_ordered_node, node, pod, topology

ASK = pod("ask", requests={"npu.huawei.com/NPU": "2"}, labels={"app": "a"})
names = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True)
tricky = st.sampled_from(['},{"metadata":{"name":"x', '"', "\\", "é", "{[", '"items":[', '"Nodes":{"metadata":'])


def _nodes(specs: list[tuple[str, str, str]]) -> list[dict]:  # type: ignore[type-arg]
    out = []
    for name, version, label in specs:
        raw = node(name, topo=topology(), labels={"note": label})
        raw["metadata"]["resourceVersion"] = version
        raw["metadata"]["uid"] = f"uid-{name}"
        out.append(raw)
    return out


def _expected(body: bytes) -> list[tuple[str, str, dict]]:  # type: ignore[type-arg]
    whole = orjson.loads(body)
    return [(n["metadata"]["name"], n["metadata"].get("resourceVersion", ""), n) for n in whole["Nodes"]["items"]]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(names, st.from_regex(r"[0-9]{0,6}", fullmatch=True), st.one_of(names, tricky)),
                max_size=8, unique_by=lambda t: t[0]))
def test_the_byte_cut_and_msgspec_paths_agree_with_decoding_the_whole_body(specs: list[tuple[str, str, str]]) -> None:
    nodes = _nodes(specs)
    go = go_extender_args(ASK, nodes)
    other = orjson.dumps({"Pod": ASK, "Nodes": {"items": nodes}, "NodeNames": None})  # TypeMeta first: msgspec path
    for body in (go, other):
        args = kp.decode_extender_args(body)
        assert args.node_names is None and args.pod["metadata"]["name"] == "ask"
        assert args.nodes is not None
        got = [(r.name, r.version, orjson.loads(r.json())) for r in args.nodes]
        assert got == _expected(body)
        assert [r.decoded()["metadata"]["name"] for r in args.nodes] == [n for n, _, _ in specs]
    # the byte-cut path keeps each Node's own bytes: the answer repeats them
    args = kp.decode_extender_args(go)
    answer = kp.filter_result(args, [r.name for r in args.nodes or []], {}, {})
    assert answer.startswith(b'{"Nodes":{"metadata":{},"items":[' + b",".join(
        orjson.dumps(go_ordered_node(n)) for n in nodes) + b"]}")


def test_shapes_the_cut_does_not_take_are_decoded_and_bad_ones_named() -> None:
    nodes = _nodes([("n1", "5", "x"), ("n2", "6", "y")])
    go = go_extender_args(ASK, nodes)
    # an escaped name is read by decoding that Node
    escaped = go.replace(b'"name":"n2"', b'"name":"n\\u0032"')
    assert [r.name for r in kp.decode_extender_args(escaped).nodes or []] == ["n1", "n2"]
    # spaces, another key order, NodeNames, lower-case keys: decoded, same answer
    spaced = orjson.dumps(orjson.loads(go), option=orjson.OPT_INDENT_2)
    assert [r.name for r in kp.decode_extender_args(spaced).nodes or []] == ["n1", "n2"]
    assert kp.decode_extender_args(orjson.dumps({"pod": ASK, "nodenames": ["a"]})).node_names == ["a"]
    empty = go_extender_args(ASK, [])
    assert kp.decode_extender_args(empty).nodes == []
    not_a_pod = b'{"Pod":"x",' + go[go.index(b'"Nodes"'):]
    for broken, fragment in ((go[:-3], "invalid JSON"), (not_a_pod, "expected a Pod object"),
                             (go_extender_args(ASK, [{"metadata": {"uid": "x"}}]), "metadata.name")):
        with pytest.raises((ProtocolError, Exception), match=fragment):
            kp.decode_extender_args(broken)


def test_a_bug_in_a_plugin_is_a_500_not_the_clients_malformed_request() -> None:
    # any TypeError / KeyError / ValueError... raised while deciding was answered 400 "malformed object in the
    # request" and counted as a bad request: a plugin bug never reached the SchedulerExtenderErrors alert
    from fuyao.scheduler_extender import server
    from fuyao.scheduler_extender.model import parse_pod
    from fuyao.scheduler_extender.partial import ProtocolError
    from fuyao.scheduler_extender.plugins.device_fit import DeviceFitPlugin

    def plugin_bug(_body: object) -> object:
        return DeviceFitPlugin().filter(None, None, None)  # type: ignore[arg-type]  # AttributeError inside

    with pytest.raises(AttributeError):
        server._decide(plugin_bug, b"{}")
    with pytest.raises(ProtocolError, match="malformed object in the request"):
        server._decide(lambda body: parse_pod(body), {"metadata": "not a map"})


def test_out_of_range_annotation_numbers_and_non_string_labels_are_the_requests_fault() -> None:
    # a topology annotation with an AI-core or CPU count past int32 passed validation and overflowed the int32
    # columns while deciding: a 500 (the whole filter failed, even for CPU-only pods); now the annotation is a
    # problem of the node (treated as absent), and a label that is no string is a malformed request
    from fuyao.contracts import ANNOTATION_NODE_TOPOLOGY, NumaCpus
    from fuyao.scheduler_extender.features import node_row
    from fuyao.scheduler_extender.model import parse_node
    from tests.support.k8s_objects import node, topology

    raw = node("n", topo=None)
    annotation = topology(aicore=20).model_dump_json()
    assert '"aicore":20' in annotation
    raw["metadata"]["annotations"][ANNOTATION_NODE_TOPOLOGY] = annotation.replace('"aicore":20', f'"aicore":{2**40}')
    info = parse_node(raw)
    assert info.topology is None and any(ANNOTATION_NODE_TOPOLOGY in p for p in info.problems)
    node_row(info)  # decided without error
    with pytest.raises(ValueError):
        NumaCpus(allocatable=2**40, exclusive=0)
    bad = node("m")
    bad["metadata"]["labels"]["topology.kubernetes.io/zone"] = ["a", "b"]  # type: ignore[assignment]
    with pytest.raises(TypeError, match="label values must be strings"):
        parse_node(bad)
