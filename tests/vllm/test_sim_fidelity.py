"""The engine simulator against a real vLLM 0.32 (CPU build, the tiny generated model): the same requests to both,
answered alike in shape — status codes, JSON keys and their types, error types, parameters and messages, usage
counts, the stream's framing, the KV-event replay — never in generated text, ids or timestamps (``ignore_eos``
everywhere, so both generate exactly what they are asked).

What vLLM does, and where its source (``vllm/``, 0.32.0) says so:

- streams (``entrypoints/openai/{completion,chat_completion}/serving.py``): every chunk is dumped with
  ``exclude_unset``, so the fields set to null are there (``prompt_token_ids``/``token_ids`` in completion choices;
  ``token_ids`` in chat choices, ``prompt_token_ids``/``prompt_text`` on chat's first chunk); ``usage`` only with
  ``continuous_usage_stats`` (chat's with ``completion_tokens_details: null``); ``include_usage`` adds a chunk with
  ``choices: []``, the whole usage (``exclude_none``) and the ``system_fingerprint``, which without it rides on the
  finishing chunk; the finish reason comes with the last token; then ``data: [DONE]``
  (``serve/utils/api_utils.py: should_include_usage``);
- ``stream_options`` without ``stream`` (a falsy ``{}`` passes): 400 ``BadRequestError``, param ``stream_options``
  (the request models' ``validate_stream_options``; ``VLLMValidationError`` words it ``msg (parameter=…)``);
- lengths (``renderers/params.py: TokenizeParams``, ``serve/utils/api_utils.py: get_max_tokens``,
  ``sampling_params.py``): ``max_tokens`` above ``max_model_len`` is refused (param ``max_tokens`` or
  ``max_completion_tokens``); a text longer than ``max_model_len`` times the longest vocabulary entry is refused
  unread (``input_text``); more than ``max_model_len`` prompt tokens is refused (``input_tokens``; a text is
  tokenized to ``max_model_len + 1`` tokens, "at least"); otherwise ``max_tokens`` is cut to what the context has
  left, and a prompt that fills it exactly ends as ``max_tokens`` 0 ("must be at least 1", param ``max_tokens``);
  without ``max_tokens`` a completion gets 16 and a chat what the context has left;
- ``min_tokens`` above that ``max_tokens``: 400 ``BadRequestError``, no param (``SamplingParams._verify_args``);
- ``POST /reset_prefix_cache`` (``entrypoints/serve/dev/cache/api_router.py``): only with
  ``VLLM_SERVER_DEV_MODE=1`` (``entrypoints/launchers/api_server/routers.py``; without it 404
  ``{"detail": "Not Found"}``); ``{"success": true}``, ``false`` while requests hold blocks
  (``v1/core/block_pool.py``); its ``AllBlocksCleared`` goes out with the next engine step's events
  (``v1/core/sched/scheduler.py: update_from_output``);
- the replay socket (``distributed/kv_events.py: ZmqEventPublisher._service_replay``): a ROUTER; a DEALER sends
  ``["", start seq]`` and gets ``["", topic, seq, payload]`` for every buffered batch from there, then
  ``["", "", -1, ""]``; a request of another frame count is ignored.

Every case asserts equality: nothing the requests here exercise is pinned as a difference any more. What the
simulator still does differently lies outside them (``docs/engine-sim.md``: ``/reset_prefix_cache`` served without
dev mode, a chat's stand-in EOS without ``ignore_eos``, metrics vLLM has and it has not...). Marker ``vllm``: one real
engine (~4.5 GB, started with ``VLLM_SERVER_DEV_MODE=1``) and one simulator."""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgpack
import pytest
import zmq

from tests.support.engines import Daemon, http_json
from tests.support.engines import engine as sim_engine
from tests.support.vllm import BLOCK_SIZE, MODEL, generated_model, vllm_engine

pytestmark = pytest.mark.vllm

CHAT = [{"role": "user", "content": "Tell me about floods."}]
PROMPT = "Tell me about floods and rivers."
TEXT = "floods and levees rain storm water "  # ~7 tokens
END = (-1).to_bytes(8, "big", signed=True)


class Pair(NamedTuple):
    real: Daemon
    sim: Daemon
    max_model_len: int


class Answer(NamedTuple):
    status: int
    content_type: str
    body: Any  # JSON, a list of SSE events (JSON or "[DONE]"), or text


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    """One real engine (dev mode: it serves /reset_prefix_cache) and one simulator with the same tokenizer, block
    size, hashing (sha256, PYTHONHASHSEED unset: vLLM's default seed) and context length."""
    real = vllm_engine(env={"VLLM_SERVER_DEV_MODE": "1"})
    sim: Daemon | None = None
    try:
        real.start(timeout=240)
        max_model_len = http_json(real.url + "/v1/models")["data"][0]["max_model_len"]
        sim = sim_engine("--tokenizer", str(generated_model()), "--model", MODEL, "--block-size", str(BLOCK_SIZE),
                         "--prefix-caching-hash-algo", "sha256", "--max-model-len", str(max_model_len),
                         events=True, replay=True)
        sim.env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
        sim.start()
        yield Pair(real, sim, max_model_len)
    finally:
        if sim is not None:
            sim.close()
        real.close()


# Helpers -------------------------------------------------------------------------------------------------------------
def call(daemon: Daemon, path: str, body: Any = None, method: str = "POST") -> Answer:
    """One request; the answer parsed: SSE into its events (each ``data: …`` and a blank line), else JSON."""
    request = urllib.request.Request(daemon.url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, kind, raw = response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        status, kind, raw = exc.code, exc.headers.get("Content-Type", ""), exc.read()
    text = raw.decode()
    if kind.startswith("text/event-stream"):
        assert text.endswith("\n\n"), text[-200:]
        events = text[:-2].split("\n\n")
        assert all(e.startswith("data: ") for e in events), events
        return Answer(status, "text/event-stream", [e[6:] if e == "data: [DONE]" else json.loads(e[6:])
                                                    for e in events])
    try:
        return Answer(status, kind.split(";")[0], json.loads(text))
    except ValueError:
        return Answer(status, kind.split(";")[0], text)


def both(pair: Pair, path: str, body: Any = None, method: str = "POST") -> tuple[Answer, Answer]:
    return call(pair.real, path, body, method), call(pair.sim, path, body, method)


def paths(value: Any, prefix: str = "") -> set[str]:
    """The JSON's shape: every leaf as ``dotted.path:type`` (lists by index; ``{}``/``[]`` leaves as such)."""
    if isinstance(value, dict) and value:
        return set().union(*(paths(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in value.items()))
    if isinstance(value, list) and value:
        return set().union(*(paths(v, f"{prefix}.{i}") for i, v in enumerate(value)))
    kind = "{}" if value == {} else "[]" if value == [] else "null" if value is None else type(value).__name__
    return {f"{prefix}:{kind}"}


def collapsed(items: list[Any]) -> list[Any]:
    """Runs of equal items as one (a stream's token chunks share one shape)."""
    return [item for i, item in enumerate(items) if i == 0 or item != items[i - 1]]


def chunk_shapes(events: list[Any]) -> list[Any]:
    return collapsed([frozenset(paths(e)) if isinstance(e, dict) else e for e in events])


def long_chat(pair: Pair, room: int) -> list[dict[str, str]]:
    """A chat whose prompt leaves about ``room`` tokens of the context."""
    ids = http_json(pair.real.url + "/tokenize", {"model": MODEL, "messages": CHAT})["tokens"]
    return [{"role": "user", "content": TEXT * ((pair.max_model_len - len(ids) - room) // 7)}]


def request_body(pair: Pair, case: str) -> tuple[str, dict[str, Any]]:
    """The length cases (``test_lengths_near_and_over_the_context``): (path, body)."""
    limit, cmpl, chat = pair.max_model_len, "/v1/completions", "/v1/chat/completions"
    ids = {"cut": limit - 8, "one_left": limit - 1, "full": limit, "one_over": limit + 1, "far_over": limit + 52}
    if case in ids:
        return cmpl, {"prompt": [300] * ids[case], "max_tokens": 20, "ignore_eos": True}
    bodies: dict[str, tuple[str, dict[str, Any]]] = {
        "text_over": (cmpl, {"prompt": TEXT * (limit // 4), "max_tokens": 2}),
        "text_huge": (cmpl, {"prompt": "x" * (limit * 20), "max_tokens": 2}),
        "chat_over": (chat, {"messages": [{"role": "user", "content": TEXT * (limit // 4)}], "max_tokens": 2}),
        "chat_huge": (chat, {"messages": [{"role": "user", "content": "x" * (limit * 20)}], "max_tokens": 2}),
        "max_over": (cmpl, {"prompt": PROMPT, "max_tokens": limit + 1}),
        "chat_max_over": (chat, {"messages": CHAT, "max_tokens": limit + 1}),
        "chat_max_completion_over": (chat, {"messages": CHAT, "max_completion_tokens": limit + 1}),
        "max_zero": (cmpl, {"prompt": PROMPT, "max_tokens": 0}),
        "max_negative": (chat, {"messages": CHAT, "max_tokens": -3}),
        "omitted": (cmpl, {"prompt": PROMPT, "ignore_eos": True}),
        "null": (cmpl, {"prompt": PROMPT, "max_tokens": None, "ignore_eos": True}),
        "chat_omitted": (chat, {"messages": long_chat(pair, 40), "ignore_eos": True}),
    }
    return bodies[case]


def assert_same_json_shape(real: Answer, sim: Answer) -> None:
    """A 200's fields: the same (each leaf's path and type; null ones too)."""
    assert (paths(real.body) - paths(sim.body), paths(sim.body) - paths(real.body)) == (set(), set())


# 1. Streams --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [None, {"include_usage": True},
                                     {"include_usage": True, "continuous_usage_stats": True},
                                     {"continuous_usage_stats": True}],
                         ids=["plain", "include_usage", "continuous", "continuous_alone"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streams_frame_usage_and_keys_as_vllm(pair: Pair, endpoint: str, options: dict[str, bool] | None) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 3, "ignore_eos": True, "stream": True,
                            **({"prompt": PROMPT} if endpoint == "completions" else {"messages": CHAT}),
                            **({"stream_options": options} if options is not None else {})}
    real, sim = both(pair, f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", body)
    assert real.status == sim.status == 200
    assert real.content_type == sim.content_type == "text/event-stream"
    assert real.body[-1] == sim.body[-1] == "[DONE]"
    # every chunk's fields, in order (a run of token chunks as one): which carry usage, the usage-only last one
    assert chunk_shapes(sim.body) == chunk_shapes(real.body)
    # one chunk a token on the simulator; vLLM carries several tokens in one chunk when its output loop runs behind
    # the engine (a busy machine), so its token chunks are compared as a run (chunk_shapes) and counted 1 to 3
    for answer, most in ((real, 3), (sim, 3)):  # the finish reason once, on the last token's chunk
        finished = [i for i, e in enumerate(answer.body[:-1]) if e["choices"] and e["choices"][0]["finish_reason"]]
        assert len(finished) == 1 and answer.body[finished[0]]["choices"][0]["finish_reason"] == "length"
        tokens = [e for e in answer.body[:-1] if e["choices"] and "role" not in e["choices"][0].get("delta", {})]
        assert 1 <= len(tokens) <= most and tokens[-1] is answer.body[finished[0]]
        counts = [e["usage"]["completion_tokens"] for e in answer.body[:-1] if e.get("usage")]
        assert counts == sorted(counts) and (not counts or counts[-1] == 3)  # running counts, the same total
    assert len([e for e in sim.body[:-1] if e["choices"] and "role" not in e["choices"][0].get("delta", {})]) == 3
    finals = [[e["usage"] for e in a.body[:-1] if e.get("usage")][-1:] for a in (real, sim)]
    assert finals[1] == finals[0]  # the same counts (the same tokenizer)
    include = bool(options and options.get("include_usage"))
    continuous = include and bool(options and options.get("continuous_usage_stats"))
    chunks = real.body[:-1]
    assert "system_fingerprint" in chunks[-1]  # the last chunk's, either way
    if include:  # the last chunk: the whole usage, no choices
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
            "prompt_tokens": chunks[-1]["usage"]["prompt_tokens"], "completion_tokens": 3,
            "total_tokens": chunks[-1]["usage"]["prompt_tokens"] + 3}
        chunks = chunks[:-1]
    assert all(("usage" in c) is continuous for c in chunks)  # the others: only with continuous_usage_stats


# 2. stream_options without stream ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{"stream_options": {"include_usage": True}},
                                     {"stream": False, "stream_options": {"include_usage": True}},
                                     {"stream_options": {"include_usage": False}},
                                     {"stream_options": {}}],
                         ids=["no_stream", "stream_false", "include_usage_false", "empty_options"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_options_without_stream(pair: Pair, endpoint: str, variant: dict[str, Any]) -> None:
    body = {"model": MODEL, "max_tokens": 2, **variant,
            **({"prompt": PROMPT} if endpoint == "completions" else {"messages": CHAT})}
    real, sim = both(pair, f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", body)
    assert real.status == sim.status
    if variant["stream_options"]:
        assert real.status == 400 and real.content_type == sim.content_type == "application/json"
        assert sim.body == real.body == {"error": {
            "message": "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
            "type": "BadRequestError", "param": "stream_options", "code": 400}}
    else:  # {} is falsy: an ordinary answer
        assert real.status == 200
        assert_same_json_shape(real, sim)


# 3. Lengths ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["cut", "one_left", "full", "one_over", "far_over", "text_over", "text_huge",
                                  "chat_over", "chat_huge", "max_over", "chat_max_over", "chat_max_completion_over",
                                  "max_zero", "max_negative", "omitted", "null", "chat_omitted"])
def test_lengths_near_and_over_the_context(pair: Pair, case: str) -> None:
    path, body = request_body(pair, case)
    real, sim = both(pair, path, {"model": MODEL, **body})
    assert real.status == sim.status, (real, sim)
    if real.status != 200:
        assert real.status == 400 and set(real.body) == set(sim.body) == {"error"}
        error, sim_error = real.body["error"], sim.body["error"]
        assert set(error) == set(sim_error) == {"message", "type", "param", "code"}
        assert error["type"] == sim_error["type"] == "BadRequestError" and error["code"] == sim_error["code"] == 400
        assert sim_error == error  # the param and message too
        if case == "full":  # the prompt fits; the output has no room: refused as max_tokens 0
            assert error["param"] == "max_tokens" and error["message"].startswith("max_tokens must be at least 1")
        return
    usage, sim_usage = real.body["usage"], sim.body["usage"]
    assert {k: sim_usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == \
        {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert real.body["choices"][0]["finish_reason"] == sim.body["choices"][0]["finish_reason"] == "length"
    expected = {"cut": 8, "one_left": 1, "omitted": 16, "null": 16}
    if case in expected:  # max_tokens cut to what the context has left, or vLLM's default
        assert usage["completion_tokens"] == expected[case]
    if case == "chat_omitted":  # a chat without max_tokens: all the context has left
        assert usage["total_tokens"] == pair.max_model_len
    assert_same_json_shape(real, sim)


# 4. min_tokens -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["completions", "chat", "cut", "negative"])
def test_min_tokens_above_max_tokens(pair: Pair, case: str) -> None:
    limit = pair.max_model_len
    path, body = {
        "completions": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "min_tokens": 5}),
        "chat": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "min_tokens": 5}),
        # above the max_tokens the context leaves (8), not the one asked
        "cut": ("/v1/completions", {"prompt": [300] * (limit - 8), "max_tokens": 20, "min_tokens": 10}),
        "negative": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "min_tokens": -1}),
    }[case]
    real, sim = both(pair, path, {"model": MODEL, **body})
    assert real.status == sim.status == 400
    error, sim_error = real.body["error"], sim.body["error"]
    assert set(real.body) == set(sim.body) == {"error"} and set(error) == set(sim_error)
    assert sim_error == error  # message, type, param (none) and code
    assert error["type"] == "BadRequestError" and error["param"] is None
    if case != "negative":
        assert error["message"] == f"min_tokens must be less than or equal to max_tokens={2 if case != 'cut' else 8}" \
                                   f", got {body['min_tokens']}."


# 5. and 6. — the KV events --------------------------------------------------------------------------------------------
class Events:
    """A SUB socket on an engine's KV events: ``ready()`` sends probes until a batch arrives (a subscription misses
    what was published before it reached the engine), then drains; ``batches()`` collects what comes."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(daemon.events)
        self.last = -1

    def batches(self, quiet: float = 0.5, until: Any = None, timeout: float = 30) -> list[list[bytes]]:
        """Frames of every batch until none comes for ``quiet`` seconds (and ``until(frames)`` held for one)."""
        got: list[list[bytes]] = []
        deadline = time.monotonic() + timeout
        seen = until is None
        while time.monotonic() < deadline:
            if not self.sub.poll(int(quiet * 1000)):
                if seen:
                    break
                continue
            frames = self.sub.recv_multipart()
            self.last = int.from_bytes(frames[1], "big")
            got.append(frames)
            seen = seen or until(frames)
        assert seen, f"{self.daemon.url}: no awaited event batch within {timeout}s"
        return got

    def ready(self) -> int:
        """The sequence number of the last batch published."""
        for probe in range(60):
            complete(self.daemon, f"Probe {probe} {time.monotonic_ns()}. " + TEXT * 10)
            if self.sub.poll(500):
                break
        else:
            raise AssertionError(f"{self.daemon.url} publishes no events for probes")
        self.batches(quiet=1.0)
        return self.last

    def close(self) -> None:
        self.sub.close(linger=0)


def complete(daemon: Daemon, prompt: str, max_tokens: int = 1) -> None:
    assert call(daemon, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                            "ignore_eos": True}).status == 200


def events_of(payload: bytes) -> list[dict[str, Any]]:
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)  # [ts, events, data_parallel_rank]
    assert isinstance(batch, list) and len(batch) == 3 and batch[2] == 0, batch
    return batch[1]  # type: ignore[no-any-return]


def replay(socket: zmq.Socket[bytes], start: int, timeout: float = 10) -> list[list[bytes]]:
    """Every message a DEALER gets for a replay from ``start``, through the end marker."""
    socket.send_multipart([b"", start.to_bytes(8, "big")])
    messages: list[list[bytes]] = []
    while socket.poll(int(timeout * 1000)):
        messages.append(socket.recv_multipart())
        if messages[-1][1:3] == [b"", END]:
            return messages
    raise AssertionError(f"no end of replay after {len(messages)} messages")


def replay_session(daemon: Daemon, prompt: str) -> dict[str, Any]:
    """A new prompt's batch as published, then replays of it: from its sequence number, from the next one, from 0;
    over a REQ (one reply) and as a malformed request (no empty delimiter)."""
    events = Events(daemon)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.connect(daemon.replay)  # type: ignore[attr-defined]
    try:
        last = events.ready()
        complete(daemon, prompt)
        published = events.batches(until=lambda frames: int.from_bytes(frames[1], "big") == last + 1)
        answers: dict[str, Any] = {"last": last, "published": published,
                                   **{name: replay(dealer, start) for name, start in
                                      (("from_new", last + 1), ("from_next", last + 2), ("from_zero", 0))}}
        req = context.socket(zmq.REQ)
        req.connect(daemon.replay)  # type: ignore[attr-defined]
        req.send((last + 1).to_bytes(8, "big"))
        answers["req"] = req.recv_multipart() if req.poll(10_000) else None
        req.close(linger=0)
        bad = context.socket(zmq.DEALER)
        bad.connect(daemon.replay)  # type: ignore[attr-defined]
        bad.send_multipart([(last + 1).to_bytes(8, "big")])
        answers["malformed"] = bool(bad.poll(1500))
        bad.close(linger=0)
        return answers
    finally:
        dealer.close(linger=0)
        events.close()


def test_kv_events_replay_frames_as_vllm(pair: Pair) -> None:
    prompt = f"Replay {time.time_ns()}: " + TEXT * 12  # new to both: its blocks are stored, in one batch
    real, sim = replay_session(pair.real, prompt), replay_session(pair.sim, prompt)
    topics = []
    for answers in (real, sim):
        last = answers["last"]
        assert len(answers["published"]) == 1  # one batch for the prompt, as PUB [topic, seq, payload]
        topic, seq, payload = answers["published"][0]
        topics.append(topic)
        # from its seq: ["", topic, seq, payload] (the very bytes published), then the end marker
        assert answers["from_new"] == [[b"", topic, seq, payload], [b"", b"", END, b""]]
        assert answers["from_next"] == [[b"", b"", END, b""]]  # nothing newer: the marker alone
        everything = answers["from_zero"]  # the whole buffer (10,000 batches), in order
        assert [int.from_bytes(m[2], "big") for m in everything[:-1]] == list(range(last + 2))
        assert all(len(m) == 4 and m[:2] == [b"", topic] for m in everything[:-1]) and everything[-1][2] == END
        assert answers["req"] == [topic, seq, payload]  # a REQ takes the first reply (its envelope stripped)
        assert answers["malformed"] is False  # [start] alone: ignored, no answer
    assert tuple(topics) == (b"", b"")  # vLLM's default topic
    real_events, sim_events = (events_of(a["published"][0][2]) for a in (real, sim))
    assert [e["type"] for e in real_events] == ["BlockStored"] and sim_events == real_events  # hashes included


def test_reset_prefix_cache_as_vllm_in_dev_mode(pair: Pair) -> None:
    """Last: it empties both caches. Idle: ``{"success": true}``; while a request holds blocks: ``false``."""
    watched = [Events(pair.real), Events(pair.sim)]
    prompt = f"Reset {time.time_ns()}: " + TEXT * 12

    def published(events: Events, **wait: Any) -> list[dict[str, Any]]:
        return [e for frames in events.batches(**wait) for e in events_of(frames[2])]

    def stored(frames: list[bytes]) -> bool:
        return b"BlockStored" in frames[2]

    try:
        for events in watched:
            events.ready()
            complete(events.daemon, prompt)  # cached
            assert [e["type"] for e in published(events, until=stored)] == ["BlockStored"]
        real, sim = both(pair, "/reset_prefix_cache")
        assert real == sim == Answer(200, "application/json", {"success": True})
        # the AllBlocksCleared goes out with the next engine step's events: none while idle
        assert [[e["type"] for e in published(events, quiet=1.5)] for events in watched] == [[], []]
        for events in watched:
            complete(events.daemon, prompt)  # no longer cached: computed and stored again
        again = [published(events, until=stored) for events in watched]
        assert [e["type"] for e in again[0]] == ["AllBlocksCleared", "BlockStored"]
        assert again[1] == again[0] and again[1][1]["parent_block_hash"] is None
    finally:
        for events in watched:
            events.close()
    for daemon in (pair.real, pair.sim):
        holding = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
        try:
            holding.request("POST", "/v1/completions", json.dumps({
                "model": MODEL, "prompt": PROMPT, "max_tokens": pair.max_model_len - 64, "ignore_eos": True,
                "stream": True}), {"Content-Type": "application/json"})
            response = holding.getresponse()
            assert response.status == 200 and response.readline().startswith(b"data: ")  # it runs
            assert call(daemon, "/reset_prefix_cache").body == {"success": False}
        finally:
            holding.close()  # the request is aborted, its blocks freed
        deadline = time.monotonic() + 30
        while call(daemon, "/reset_prefix_cache").body != {"success": True}:
            assert time.monotonic() < deadline, f"{daemon.url}: the reset never succeeds after the abort"
            time.sleep(0.2)
