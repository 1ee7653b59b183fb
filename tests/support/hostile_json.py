"""Hostile JSON for fuzzing and the fault suite: every path inside a document (to mutate one value at a time), and
documents nested deeper than Python's json module (or orjson) will write."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


def json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON document (the root is ``()``)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += json_paths(v, (*prefix, i))
    return out


@dataclass(frozen=True)
class Deep:
    """``leaf`` inside ``depth`` arrays, written by :func:`encode`."""

    depth: int
    leaf: Any = "x"


def encode(value: Any) -> bytes:
    """``value`` as JSON, with every :class:`Deep` inside written out at its full depth."""

    def text(v: Any) -> str:
        if isinstance(v, Deep):
            return "[" * v.depth + json.dumps(v.leaf) + "]" * v.depth
        if isinstance(v, dict):
            return "{" + ",".join(f"{json.dumps(str(k))}:{text(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ",".join(map(text, v)) + "]"
        return json.dumps(v)

    return text(value).encode()
