"""kube-scheduler's extender protocol (k8s.io/kube-scheduler/extender/v1): the request/response JSON shapes, as
pure functions from decoded JSON to decoded JSON. The types have no JSON tags, so keys are the Go field names
(PascalCase); a field the scheduler leaves nil is ``null``.

- filter: ``ExtenderArgs{Pod, Nodes, NodeNames}`` → ``ExtenderFilterResult{Nodes, NodeNames, FailedNodes,
  FailedAndUnresolvableNodes, Error}``. ``Nodes`` (a NodeList) is sent when ``nodeCacheCapable: false``,
  ``NodeNames`` when true; the answer uses the same form.
- prioritize: ``ExtenderArgs`` → ``HostPriorityList`` (a bare array of ``{Host, Score}``, Score 0..10).
- bind: ``ExtenderBindingArgs{PodName, PodNamespace, PodUID, Node}`` → ``ExtenderBindingResult{Error}``.
- preempt: ``ExtenderPreemptionArgs{Pod, NodeNameToVictims, NodeNameToMetaVictims}`` →
  ``ExtenderPreemptionResult{NodeNameToMetaVictims}`` with ``MetaVictims{Pods: [{UID}], NumPDBViolations}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict, cast

import msgspec
import orjson

from fuyao.http_body import parse_json

from . import partial
from .partial import ProtocolError


def _object(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(body).__name__}")
    return body


def _key(body: Mapping[str, Any], name: str) -> Any:
    """Go's decoder matches keys case-insensitively; accept ``pod`` for ``Pod`` the same way."""
    if name in body:
        return body[name]
    lowered = name.lower()
    for key, value in body.items():
        if isinstance(key, str) and key.lower() == lowered:
            return value
    return None


class NodeRef(NamedTuple):
    """A Node the scheduler sent in full: its name and version (what the cache's rows are checked against), and the
    object as it came: its JSON bytes (the answer repeats them, and they are decoded only when needed) or, when the
    request was decoded whole, the object. (A tuple: thousands are made per request.)"""

    name: str
    version: str
    raw: bytes | memoryview | msgspec.Raw | None = None
    obj: dict[str, Any] | None = None

    def decoded(self) -> dict[str, Any]:
        """What the extender reads of the Node (partial decoding)."""
        if self.obj is not None:
            return self.obj
        if self.raw is None:
            raise ProtocolError(f"ExtenderArgs.Nodes[{self.name}]: neither the object nor its bytes")
        node: dict[str, Any] = partial.decode(partial.NODE, self.raw, f"ExtenderArgs.Nodes[{self.name}]")
        return node

    def json(self) -> bytes:
        return bytes(self.raw) if self.raw is not None else orjson.dumps(self.obj)


@dataclass(frozen=True)
class ExtenderArgs:
    pod: dict[str, Any]
    nodes: list[NodeRef] | None  # full Node objects (nodeCacheCapable: false)
    node_names: list[str] | None  # names only (nodeCacheCapable: true)


def parse_extender_args(body: Any) -> ExtenderArgs:
    """From decoded JSON (Go's decoder matches keys case-insensitively; so does this)."""
    body = _object(body, "ExtenderArgs")
    pod = _key(body, "Pod")
    if not isinstance(pod, dict) or not isinstance(pod.get("metadata"), dict):
        raise ProtocolError("ExtenderArgs.Pod: expected a Pod object with metadata")
    nodes = _key(body, "Nodes")
    names = _key(body, "NodeNames")
    if nodes is None and names is None:
        raise ProtocolError("ExtenderArgs: one of Nodes or NodeNames is required")
    refs = None
    if nodes is not None:
        items = nodes.get("items") if isinstance(nodes, dict) else None
        if not isinstance(items, list) or not all(isinstance(n, dict) and isinstance(n.get("metadata"), dict)
                                                  and isinstance(n["metadata"].get("name"), str) for n in items):
            raise ProtocolError("ExtenderArgs.Nodes: expected a NodeList whose items are Nodes with metadata.name")
        refs = [NodeRef(n["metadata"]["name"], _version(n["metadata"].get("resourceVersion")), obj=n) for n in items]
    node_names = None
    if names is not None:
        if not isinstance(names, list) or not set(map(type, names)) <= {str}:  # (C-level: ~400 names per call)
            raise ProtocolError("ExtenderArgs.NodeNames: expected an array of strings")
        node_names = names
    return ExtenderArgs(pod=pod, nodes=refs, node_names=node_names)


def _version(value: Any) -> str:
    return value if isinstance(value, str) else ""


class _NodeList(TypedDict, total=False):
    items: list[msgspec.Raw] | None


class _Args(TypedDict, total=False):
    Pod: partial.Pod | None
    Nodes: _NodeList | None
    NodeNames: Any


_ARGS = msgspec.json.Decoder(_Args)


def decode_extender_args(raw: bytes) -> ExtenderArgs:
    """From the request's bytes, decoding only what the extender reads: the Pod, and of each Node its name and
    version; each Node's bytes are kept undecoded (decoded later only if the cache does not hold that version, and
    repeated as they are in a filter's answer). kube-scheduler's body is cut by byte search (:func:`_go_shaped`);
    another shape is decoded with msgspec, and a body with other key spellings (``pod``) is decoded whole, after the
    depth check of every other JSON body."""
    shaped = _go_shaped(raw)
    if shaped is not None:
        return shaped
    try:
        body = partial.decode(_ARGS, raw, "ExtenderArgs")
    except ProtocolError:
        body = None  # decoded whole below: the error names what is wrong as for decoded JSON
    if body is None or "Pod" not in body or ("Nodes" not in body and "NodeNames" not in body):
        return parse_extender_args(parse_json(raw))
    nodes = body.get("Nodes")
    refs = None
    if nodes is not None:
        refs = [_ref(item) for item in nodes.get("items") or []]
        body["Nodes"] = {"items": []}  # checked by parse_extender_args below without the items
    args = parse_extender_args(body)
    return ExtenderArgs(pod=args.pod, nodes=refs, node_names=args.node_names)


def _ref(item: bytes | memoryview | msgspec.Raw) -> NodeRef:
    """A Node's name and version, decoded with msgspec (which checks the item is JSON)."""
    meta = partial.decode(partial.NODE_HEAD, item, "ExtenderArgs.Nodes.items").get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise ProtocolError("ExtenderArgs.Nodes: expected a NodeList whose items are Nodes with metadata.name")
    return NodeRef(meta["name"], _version(meta.get("resourceVersion")), raw=item)


_POD = msgspec.json.Decoder(partial.Pod)
_NODES_AT = b',"Nodes":{"metadata":'
_ITEMS = b'"items":['
_ITEM = b'{"metadata":{"name":"'
_NEXT_ITEM = b"}," + _ITEM
_END = b']},"NodeNames":null}'
_HEAD = re.compile(rb'\{"metadata":\{"name":"([^"\\]*)"(?:,"(?:generateName|namespace|selfLink|uid)":"[^"\\]*")*'
                   rb',"resourceVersion":"([^"\\]*)"')
"""A Node as Go's encoder writes it: ``metadata`` first (the TypeMeta of an informer's object is empty), and in it
the fields of ObjectMeta in declaration order: ``name``, then plain strings up to ``resourceVersion``."""


def _go_shaped(raw: bytes) -> ExtenderArgs | None:
    """kube-scheduler's ``Nodes`` body as Go's encoder writes it, cut by byte search instead of decoded:
    ``{"Pod":<Pod>,"Nodes":{"metadata":{…},"items":[<Node>,<Node>…]},"NodeNames":null}``. The Pod is the part before
    the first ``,"Nodes":{"metadata":`` when that part decodes as a whole Pod (the key cannot occur inside a Pod with
    an object value and leave its braces balanced); the Nodes are cut before each ``},{"metadata":{"name":"`` (an
    array of objects whose first key is ``metadata`` exists nowhere inside a Node). Each Node's name and version are
    read from its first bytes (``_HEAD``; else decoded). Any other shape: None, and the body is decoded."""
    if not raw.startswith(b'{"Pod":') or not raw.endswith(_END):
        return None
    at = raw.find(_NODES_AT)
    if at < 0:
        return None
    try:
        pod = _POD.decode(memoryview(raw)[7:at])
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(pod, dict) or not isinstance(pod.get("metadata"), dict):
        return None
    start = raw.find(_ITEMS, at + len(_NODES_AT))
    end = len(raw) - len(_END)
    if start < 0:
        return None
    start += len(_ITEMS)
    refs: list[NodeRef] = []
    if start < end:
        if not raw.startswith(_ITEM, start):
            return None
        view, find, match, append = memoryview(raw), raw.find, _HEAD.match, refs.append
        while True:
            cut = find(_NEXT_ITEM, start, end)
            stop = end if cut < 0 else cut + 1
            head = match(raw, start, min(stop, start + 2048))
            if head is not None:
                name, version = head.groups()
                append(NodeRef(name.decode(), version.decode(), view[start:stop]))
            else:
                append(_ref(view[start:stop]))
            if cut < 0:
                break
            start = cut + 2
    elif start != end:
        return None
    return ExtenderArgs(pod=cast(dict[str, Any], pod), nodes=refs, node_names=None)  # a Pod TypedDict is a dict


_NAMES_AT = b',"Nodes":null,"NodeNames":['
_NAMES = msgspec.json.Decoder(list[str])


def split_names_body(raw: bytes) -> tuple[memoryview, list[str]] | None:
    """kube-scheduler's ``NodeNames`` body as Go's encoder writes it, ``{"Pod":<Pod>,"Nodes":null,"NodeNames":[…]}``,
    cut into the Pod's bytes (undecoded) and the decoded names; None for any other shape. The names are the last
    ``,"Nodes":null,"NodeNames":[`` on: an array of strings, checked here. The Pod part is the caller's to decode
    (a part that is not one whole JSON object — say, the key sequence inside one of its strings — fails there,
    and bytes that decoded as a Pod once are that Pod again)."""
    if not raw.startswith(b'{"Pod":{') or not raw.endswith(b"]}"):
        return None
    at = raw.rfind(_NAMES_AT)
    if at < 0:
        return None
    view = memoryview(raw)
    try:
        names = _NAMES.decode(view[at + len(_NAMES_AT) - 1: -1])
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return view[7:at], names


def decode_pod(raw: bytes | memoryview) -> dict[str, Any]:
    """A Pod's bytes (what :func:`split_names_body` cut), decoded as the other paths decode it."""
    pod = partial.decode(_POD, raw, "ExtenderArgs.Pod")
    if not isinstance(pod, dict) or not isinstance(pod.get("metadata"), dict):
        raise ProtocolError("ExtenderArgs.Pod: expected a Pod object with metadata")
    return cast(dict[str, Any], pod)


def filter_result(args: ExtenderArgs, passed: list[str], failed: Mapping[str, str],
                  unresolvable: Mapping[str, str], error: str = "") -> bytes:
    """The encoded ``ExtenderFilterResult``. ``passed``: the feasible node names, in the order of the request. In
    ``Nodes`` form the passing Nodes are the request's own bytes, not encoded again."""
    rest = orjson.dumps({"FailedNodes": dict(failed), "FailedAndUnresolvableNodes": dict(unresolvable),
                         "Error": error})
    if args.nodes is None:
        return b'{"Nodes":null,"NodeNames":' + orjson.dumps(list(passed)) + b"," + rest[1:]
    keep = set(passed)
    items = b",".join([ref.json() for ref in args.nodes if ref.name in keep])
    return b'{"Nodes":{"metadata":{},"items":[' + items + b']},"NodeNames":null,' + rest[1:]


def priority_list(hosts: Sequence[str], scores: Sequence[int]) -> list[dict[str, Any]]:
    return [{"Host": host, "Score": score} for host, score in zip(hosts, scores, strict=True)]


@dataclass(frozen=True)
class BindingArgs:
    pod_name: str
    pod_namespace: str
    pod_uid: str
    node: str


def parse_binding_args(body: Any) -> BindingArgs:
    body = _object(body, "ExtenderBindingArgs")
    values = {k: _key(body, k) for k in ("PodName", "PodNamespace", "PodUID", "Node")}
    missing = [k for k, v in values.items() if not isinstance(v, str) or (k != "PodUID" and not v)]
    if missing:
        raise ProtocolError(f"ExtenderBindingArgs: missing or not a string: {missing}")
    return BindingArgs(values["PodName"], values["PodNamespace"], values["PodUID"], values["Node"])


@dataclass(frozen=True)
class PreemptionArgs:
    pod: dict[str, Any]
    victims: dict[str, list[dict[str, Any]]] | None  # node → victim Pods (nodeCacheCapable: false)
    meta_victims: dict[str, list[str]] | None  # node → victim UIDs (nodeCacheCapable: true)
    pdb_violations: dict[str, int]


def parse_preemption_args(body: Any) -> PreemptionArgs:
    body = _object(body, "ExtenderPreemptionArgs")
    pod = _key(body, "Pod")
    if not isinstance(pod, dict) or not isinstance(pod.get("metadata"), dict):
        raise ProtocolError("ExtenderPreemptionArgs.Pod: expected a Pod object with metadata")
    victims_raw, meta_raw = _key(body, "NodeNameToVictims"), _key(body, "NodeNameToMetaVictims")
    violations: dict[str, int] = {}
    victims = meta = None
    if victims_raw is not None:
        if not isinstance(victims_raw, dict):
            raise ProtocolError("ExtenderPreemptionArgs.NodeNameToVictims: expected an object")
        victims = {}
        for node, v in victims_raw.items():
            pods = _key(v, "Pods") if isinstance(v, dict) else None
            if not isinstance(pods, list) or not all(isinstance(p, dict) for p in pods):
                raise ProtocolError(f"NodeNameToVictims[{node!r}].Pods: expected an array of Pods")
            victims[node] = pods
            violations[node] = int(_key(v, "NumPDBViolations") or 0)
    if meta_raw is not None:
        if not isinstance(meta_raw, dict):
            raise ProtocolError("ExtenderPreemptionArgs.NodeNameToMetaVictims: expected an object")
        meta = {}
        for node, v in meta_raw.items():
            pods = _key(v, "Pods") if isinstance(v, dict) else None
            if not isinstance(pods, list) or not all(isinstance(p, dict) and isinstance(_key(p, "UID"), str)
                                                     for p in pods):
                raise ProtocolError(f"NodeNameToMetaVictims[{node!r}].Pods: expected an array of {{UID}}")
            meta[node] = [_key(p, "UID") for p in pods]
            violations[node] = int(_key(v, "NumPDBViolations") or 0)
    if victims is None and meta is None:
        raise ProtocolError("ExtenderPreemptionArgs: one of NodeNameToVictims or NodeNameToMetaVictims is required")
    return PreemptionArgs(pod=pod, victims=victims, meta_victims=meta, pdb_violations=violations)


def preemption_result(kept: Mapping[str, list[str]], violations: Mapping[str, int]) -> dict[str, Any]:
    return {"NodeNameToMetaVictims": {node: {"Pods": [{"UID": uid} for uid in uids],
                                             "NumPDBViolations": violations.get(node, 0)}
                                      for node, uids in kept.items()}}
