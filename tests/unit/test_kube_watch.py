"""The watch stream's framing and event handling (fuyao.kube_watch), independent of the transport: events split
across chunks, many per chunk, a last one without its newline; ERROR and BOOKMARK events."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuyao.kube_watch import LineSplitter, apply_event

EVENTS = st.lists(st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=40), max_size=4), max_size=12)


@given(EVENTS, st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=40), st.booleans())
def test_any_chunking_gives_back_the_same_lines(objects: list[dict[str, str]], cuts: list[int],
                                                last_newline: bool) -> None:
    lines = [orjson.dumps(o) for o in objects]
    stream = b"\n".join(lines) + (b"\n" if last_newline or not lines else b"")
    splitter = LineSplitter()
    got: list[bytes] = []
    at, i = 0, 0
    while at < len(stream):
        size = cuts[i % len(cuts)]
        got.extend(splitter.feed(stream[at:at + size]))
        at, i = at + size, i + 1
    got.extend(splitter.rest())
    assert [orjson.loads(x) for x in got if x.strip()] == objects


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def replace(self, items: list[dict[str, Any]]) -> None:
        self.calls.append(("replace", str(len(items))))

    def upsert(self, obj: dict[str, Any]) -> None:
        self.calls.append(("upsert", obj["metadata"]["name"]))

    def delete(self, obj: dict[str, Any]) -> None:
        self.calls.append(("delete", obj["metadata"]["name"]))


def event(kind: str, name: str, version: str) -> bytes:
    return orjson.dumps({"type": kind, "object": {"metadata": {"name": name, "resourceVersion": version}}})


def test_events_reach_the_sink_and_move_the_resume_version() -> None:
    sink = Recorder()
    version = "1"
    for line in (event("ADDED", "a", "5"), b"", event("MODIFIED", "a", "6"), event("BOOKMARK", "", "9"),
                 event("DELETED", "a", "10")):
        found = apply_event("pods", sink, line, version)
        assert found is not None
        version = found
    assert sink.calls == [("upsert", "a"), ("upsert", "a"), ("delete", "a")]
    assert version == "10"  # a bookmark moves the version without touching the sink


def test_an_expired_watch_asks_for_a_relist_and_other_errors_raise() -> None:
    gone = orjson.dumps({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}})
    assert apply_event("pods", Recorder(), gone, "3") is None
    other = orjson.dumps({"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "etcd down"}})
    with pytest.raises(RuntimeError, match="etcd down"):
        apply_event("pods", Recorder(), other, "3")
