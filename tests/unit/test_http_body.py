"""fuyao.http_body: the depth scan equals the parsed document's depth (strings, escapes and all), and the size and
depth caps answer 413 / 400 before any work."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from fuyao.http_body import BodyError, json_depth, parse_json, read_json

_TEXT = st.text(alphabet='ab[]{}"\\\n\u00e9', max_size=8)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | _TEXT,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
                     max_leaves=30)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


@settings(max_examples=400, deadline=None)
@given(_JSON, st.booleans())
def test_depth_scan_equals_the_documents_depth(value: Any, ascii_only: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(raw) == _depth(value)


def test_too_deep_is_400_before_parsing_and_names_the_depth() -> None:
    deep = b'{"a":' * 500 + b"1" + b"}" * 500
    with pytest.raises(BodyError) as caught:
        parse_json(deep, max_depth=64)
    assert caught.value.status == 400 and "500 levels" in caught.value.message
    brackets_in_a_string = b'[[["' + b"[" * 100 + b'"]]]'
    assert parse_json(brackets_in_a_string, max_depth=3) == [[["[" * 100]]]


def test_invalid_json_is_400() -> None:
    with pytest.raises(BodyError) as caught:
        parse_json(b'{"a": ')
    assert caught.value.status == 400 and "invalid JSON" in caught.value.message


def _request(body: bytes, length: bool = True) -> web.Request:
    headers = {"Content-Length": str(len(body))} if length else {}

    class Payload:
        def __init__(self) -> None:
            self.sent = 0

        async def iter_any_gen(self):  # type: ignore[no-untyped-def]
            for start in range(0, len(body), 1000):
                self.sent += 1
                yield body[start:start + 1000]

    payload = Payload()
    request = make_mocked_request("POST", "/x", headers=headers)

    class Content:
        def iter_any(self):  # type: ignore[no-untyped-def]
            return payload.iter_any_gen()

        def is_eof(self) -> bool:
            return False  # still arriving: read chunk by chunk

    request._payload = Content()  # type: ignore[attr-defined]
    request.payload_chunks = payload  # type: ignore[attr-defined]
    return request


def test_oversized_is_413_from_content_length_without_reading() -> None:
    request = _request(b"[" + b"1," * 5000 + b"1]")
    with pytest.raises(BodyError) as caught:
        asyncio.run(read_json(request, max_bytes=1000))
    assert caught.value.status == 413 and request.payload_chunks.sent == 0  # type: ignore[attr-defined]


def test_chunked_oversized_is_413_as_soon_as_the_cap_is_passed() -> None:
    request = _request(b"[" + b"1," * 5000 + b"1]", length=False)
    with pytest.raises(BodyError) as caught:
        asyncio.run(read_json(request, max_bytes=2500))
    assert caught.value.status == 413 and request.payload_chunks.sent == 3  # type: ignore[attr-defined]


def test_big_bodies_parse_off_the_loop_to_the_same_value() -> None:
    value = {"items": [{"name": f"n{i}", "labels": {"a": "[x]"}} for i in range(20000)]}
    raw = json.dumps(value).encode()
    got_raw, got = asyncio.run(read_json(_request(raw), max_bytes=len(raw), offload_above=1024))
    assert got_raw == raw and got == value
