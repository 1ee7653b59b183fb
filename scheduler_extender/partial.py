"""What the extender reads of the Kubernetes objects schedulers send, decoded with msgspec, and what it parsed before.

Both schedulers send big bodies: kube-scheduler a full NodeList when ``nodeCacheCapable`` is false (3.8 MB for 500
nodes), Volcano every node with all its pods. The extender reads a few fields of each object. msgspec decodes into
the partial types below and skips every other field (managedFields, images, conditions, env, volumes...) without
building it: several times faster than decoding it all. The types are exactly the fields ``model.parse_pod`` and
``model.parse_node`` read (a test decodes full objects both ways); leaves stay ``Any`` so that those functions report
malformed values as before.

Parsed objects are kept by what identifies them exactly (:class:`Kept`): a version of an object never changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypedDict, TypeVar

import msgspec


class ProtocolError(ValueError):
    """The request does not have the shape of the verb's arguments; the message says what is wrong."""


class Meta(TypedDict, total=False):
    name: Any
    namespace: Any
    uid: Any
    resourceVersion: Any
    creationTimestamp: Any
    labels: dict[str, str] | None
    annotations: dict[str, str] | None


class Container(TypedDict, total=False):
    name: Any
    resources: Any
    restartPolicy: Any  # an init container's: Always makes it a native sidecar


class PodSpec(TypedDict, total=False):
    nodeName: Any
    containers: list[Container] | None
    initContainers: list[Container] | None
    overhead: Any
    affinity: Any
    topologySpreadConstraints: Any


class PodStatus(TypedDict, total=False):
    phase: Any
    startTime: Any


class Pod(TypedDict, total=False):
    metadata: Meta | None
    spec: PodSpec | None
    status: PodStatus | None


class NodeStatus(TypedDict, total=False):
    allocatable: Any
    capacity: Any


class Node(TypedDict, total=False):
    metadata: Meta | None
    status: NodeStatus | None


class _Identity(TypedDict, total=False):
    name: Any
    resourceVersion: Any


class NodeHead(TypedDict, total=False):
    """A Node's name and version, and nothing else."""

    metadata: _Identity | None


NODE = msgspec.json.Decoder(Node)
NODE_HEAD = msgspec.json.Decoder(NodeHead)


def decode(decoder: msgspec.json.Decoder[Any], raw: bytes | memoryview | msgspec.Raw, what: str) -> Any:
    """Decode with msgspec; malformed input is a :class:`ProtocolError` naming where. Nesting deeper than Python's
    recursion limit is refused the same way (msgspec checks it, in skipped fields too), so these bodies need no
    separate depth scan."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"{what}: invalid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"{what}: nested too deep") from None


K = TypeVar("K")
V = TypeVar("V")


class Kept(dict[K, V]):
    """Parsed objects by what identifies them exactly; emptied when full (never grows without bound). Plain dicts:
    the GIL makes each get and set atomic between the event loop and the big-request workers."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def get_or(self, key: K, compute: Callable[[], V]) -> V:
        value = self.get(key)
        if value is None:
            value = compute()
            if len(self) >= self.limit:
                self.clear()
            self[key] = value
        return value


def identity(raw: Mapping[str, Any], name: str) -> tuple[str, str] | None:
    """(metadata[name], metadata.resourceVersion) when both are non-empty strings: a version of an object never
    changes, so what was parsed from it holds; None otherwise (parsed every time)."""
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        return None
    first, version = meta.get(name), meta.get("resourceVersion")
    return (first, version) if isinstance(first, str) and first and isinstance(version, str) and version else None
