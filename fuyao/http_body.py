"""JSON request bodies read the same safe way at every HTTP surface (extender, router, KV index, engine simulator):

- **size**: a body over ``max_bytes`` is refused with 413, before it is read when ``Content-Length`` says so, and
  as soon as the running count passes the cap for a chunked one (memory stays bounded by the cap);
- **depth**: a document nested deeper than ``max_depth`` arrays and objects is refused with 400 *before* it is
  parsed (a bytes scan in numpy, strings excluded), so no later recursion (``repr``, ``str``, a template) can hit
  Python's recursion limit on a hostile body;
- **event loop**: a body over ``offload_above`` bytes is scanned and parsed in a worker thread, so one big request
  does not hold up the small ones being served beside it.

- **time**: optionally, the whole body must arrive within a deadline (408), so a slow sender cannot hold a slot.

Errors are :class:`BodyError` with the HTTP status and a message naming what is wrong; each server renders it in its
own protocol's error shape.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import orjson
from aiohttp import web

MAX_DEPTH = 64
"""Kubernetes objects and OpenAI requests nest about a dozen levels; 64 leaves room for tool schemas."""
OFFLOAD_ABOVE = 256 * 1024

_QUOTE, _BACKSLASH = 0x22, 0x5C
_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[0x5B, 0x7B]] = 1  # [ {
_BRACKET_STEP[[0x5D, 0x7D]] = -1  # ] }


class BodyError(Exception):
    """A request body refused before any work: ``status`` is 400 or 413; the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``raw`` (0 for a scalar). Brackets inside strings
    do not count (a quote is escaped when an odd run of backslashes precedes it). Linear in ``len(raw)``; an
    invalid document gets some number the parser then rejects anyway."""
    if not (b"[" in raw or b"{" in raw):
        return 0
    data = np.frombuffer(raw, dtype=np.uint8)
    quotes = np.flatnonzero(data == _QUOTE)
    brackets = np.flatnonzero(_BRACKET_STEP[data])
    if len(quotes) and b"\\" in raw:
        # a quote is escaped when an odd run of backslashes ends just before it
        slashes = np.flatnonzero(data == _BACKSLASH)
        run_start = np.ones(len(slashes), dtype=bool)
        run_start[1:] = np.diff(slashes) != 1
        first = np.maximum.accumulate(np.where(run_start, np.arange(len(slashes)), 0))
        after = quotes[(quotes > 0) & (data[np.maximum(quotes - 1, 0)] == _BACKSLASH)]
        last = np.searchsorted(slashes, after - 1)
        escaped = after[(last - first[last] + 1) % 2 == 1]
        quotes = np.setdiff1d(quotes, escaped, assume_unique=True)
    if len(quotes):
        # a bracket is inside a string when an odd number of real quotes precede it
        brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]
    if not len(brackets):
        return 0
    step = _BRACKET_STEP[data[brackets]].astype(np.int64)
    return int(np.cumsum(step).max())


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``raw`` decoded, or :class:`BodyError` (400) naming what is wrong: not JSON, or nested too deep."""
    if raw.count(b"[") + raw.count(b"{") > max_depth and (depth := json_depth(raw)) > max_depth:
        raise BodyError(400, f"the JSON body nests {depth} levels deep; at most {max_depth} are accepted")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BodyError(400, f"invalid JSON body: {exc}") from None


async def read_body(request: web.Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The request's body, at most ``max_bytes`` long (else :class:`BodyError` 413, without reading the rest), all
    of it within ``timeout_s`` when given (else 408: a client trickling its body cannot hold the server)."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise BodyError(413, f"the request body is {length} bytes; at most {max_bytes} are accepted")
    if length is not None and request.content.is_eof():
        return await request.read()  # all of it (within the cap) is here already: the common small request
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > max_bytes:
                    raise BodyError(413, f"the request body is over {max_bytes} bytes; at most {max_bytes} are "
                                         "accepted")
                chunks.append(chunk)
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, f"the request body is over {max_bytes} bytes") from None
    except TimeoutError:
        raise BodyError(408, f"the request body did not arrive within {timeout_s:g} s ({size} bytes came)") from None
    return b"".join(chunks)


async def read_json(request: web.Request, max_bytes: int, max_depth: int = MAX_DEPTH,
                    offload_above: int = OFFLOAD_ABOVE, timeout_s: float | None = None) -> tuple[bytes, Any]:
    """``(raw body, decoded body)``, refusing oversized (413), too deep or invalid (400), or too slow (408) bodies
    before any work; bodies over ``offload_above`` bytes are checked and parsed in a worker thread."""
    raw = await read_body(request, max_bytes, timeout_s)
    return raw, await decode_json(raw, max_depth, offload_above)


async def decode_json(raw: bytes, max_depth: int = MAX_DEPTH, offload_above: int = OFFLOAD_ABOVE) -> Any:
    """:func:`parse_json`, in a worker thread for bodies over ``offload_above`` bytes."""
    if len(raw) > offload_above:
        return await asyncio.get_running_loop().run_in_executor(None, parse_json, raw, max_depth)
    return parse_json(raw, max_depth)
