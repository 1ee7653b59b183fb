"""Against real vLLM engines (CPU build) serving the tiny generated model: their tokenizer is the model directory's
(fuyao's HF tokenizer and the simulator with ``--tokenizer`` tokenize as they do, chat template included); the KV
index — keyed by content — finds the blocks they report in their own events (hashes of their own algorithm, above
2^63, with fields our decoder does not list) and drops them when an engine restarts; through the router, a context
that only an engine's events reveal goes back to that engine, and vLLM's own counters prove the hits. Marker
``vllm``: ``hack/test.sh`` builds the cached venv (``hack/build-vllm.sh``) first. Two engines run at once (~9 GB)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from fuyao import tokenization
from fuyao.kv_blocks import BlockStored, decode_batch
from tests.support.engines import Daemon, http_json, kvcache, metric_total, router, start_all
from tests.support.engines import engine as sim_engine
from tests.support.vllm import BLOCK_SIZE, MODEL, generated_model, vllm_engine

pytestmark = pytest.mark.vllm

CONTEXT = "You answer questions about rivers. Context: " + "floods and levees rain storm water " * 40


@pytest.fixture(scope="module")
def pair() -> Iterator[list[Daemon]]:
    """Two engines hashing differently, PYTHONHASHSEED unset: sha256 (vLLM's default, a fixed seed) and xxhash (a
    random seed per process) — the same tokens get unrelated hashes on the two, and again after a restart."""
    engines = [vllm_engine(), vllm_engine(hash_algo="xxhash")]
    try:
        start_all(engines, timeout=360)  # side by side: each takes ~40-100 s, mostly its own start-up
        yield engines
    finally:
        for daemon in engines:
            daemon.close()


@pytest.fixture(scope="module")
def engine(pair: list[Daemon]) -> Daemon:
    return pair[0]


def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(generated_model() / "tokenizer.json"))


def complete(daemon: Daemon, prompt: str, max_tokens: int = 2) -> dict[str, Any]:
    return http_json(daemon.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens},
                     timeout=60)  # type: ignore[no-any-return]


def test_the_engine_tokenizes_as_the_model_directory_does(engine: Daemon) -> None:
    assert [m["id"] for m in http_json(engine.url + "/v1/models")["data"]] == [MODEL]
    for text in (CONTEXT, "Hello, world! 42", "floods"):
        ids = http_json(engine.url + "/tokenize", {"model": MODEL, "prompt": text})["tokens"]
        assert ids == tokenizer().encode(text).ids


def test_its_kv_events_decode_and_carry_the_blocks_tokens(engine: Daemon) -> None:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(engine.events)  # type: ignore[attr-defined]
    try:
        stored: list[BlockStored] = []
        deadline = time.monotonic() + 30
        while not stored and time.monotonic() < deadline:  # the slow joiner: send until an event arrives
            complete(engine, f"{time.monotonic()} {CONTEXT}")
            while sub.poll(500):
                batch = decode_batch(sub.recv_multipart()[2])
                stored += [e for e in batch.events if isinstance(e, BlockStored)]
        assert stored, "no BlockStored event from the engine"
        event = stored[0]
        assert event.block_size == BLOCK_SIZE and len(event.token_ids) == BLOCK_SIZE * len(event.block_hashes)
        assert all(0 <= h < 2**64 for h in event.block_hashes)
    finally:
        sub.close(linger=0)


def _lookup(service: Daemon, ids: list[int]) -> dict[str, int]:
    return http_json(service.url + "/v1/lookup", {"token_ids": ids})["endpoints"]  # type: ignore[no-any-return]


def _metric(daemon: Daemon, name: str) -> float:
    return metric_total(daemon.get("/metrics")[1], name)


def test_chat_and_streaming_against_the_real_server(engine: Daemon) -> None:
    chat = http_json(engine.url + "/v1/chat/completions", {"model": MODEL, "max_tokens": 3, "messages": [
        {"role": "user", "content": "Tell me about floods."}]}, timeout=60)
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] <= 3
    rendered = http_json(engine.url + "/tokenize", {"model": MODEL, "messages": [
        {"role": "user", "content": "Tell me about floods."}]})["tokens"]
    template = tokenizer().encode("<|user|>\nTell me about floods.\n<|assistant|>\n", add_special_tokens=False).ids
    assert rendered == template  # vLLM applies the model's chat template, without BOS for chat


def test_fuyao_and_the_simulator_tokenize_as_the_engine(engine: Daemon) -> None:
    """The router's and the KV index's tokenizer (``--tokenizer`` the model directory), and the simulator started
    with it, give the engine's own ids for completions and chats (its chat template, no BOS for chat)."""
    hf = tokenization.load(str(generated_model()))
    sim = sim_engine("--tokenizer", str(generated_model()), "--model", MODEL).start()
    try:
        chats = [[{"role": "user", "content": "Tell me about floods."}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
                     {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]]
        for messages in chats:
            real = http_json(engine.url + "/tokenize", {"model": MODEL, "messages": messages})["tokens"]
            assert tokenization.chat_ids(hf, messages) == real
            assert http_json(sim.url + "/tokenize", {"model": MODEL, "messages": messages})["tokens"] == real
        real = http_json(engine.url + "/tokenize", {"model": MODEL, "prompt": CONTEXT})["tokens"]
        assert hf.encode(CONTEXT) == real
        assert http_json(sim.url + "/tokenize", {"model": MODEL, "prompt": CONTEXT})["tokens"] == real
    finally:
        sim.close()


@pytest.mark.parametrize("tokenizing", ["engine", "model-dir"])
def test_through_the_router_a_context_returns_to_the_engine_that_holds_it(pair: list[Daemon], tmp_path: Path,
                                                                          tokenizing: str) -> None:
    """Each engine gets a context straight (the router never saw it: only the engines' events reveal where it is);
    then follow-ups through the prefix-aware router land on the engine holding their context, and that engine's
    ``vllm:prefix_cache_hits_total`` grows by the context's blocks. With the router's default tokenizer (the
    engines' own /tokenize, nothing but the engines given) and with the model directory."""
    config = tmp_path / "router.yaml"
    config.write_text(f"version: v1\nkv_cache:\n  block_size: {BLOCK_SIZE}\n")
    local = ["--tokenizer", str(generated_model())] if tokenizing == "model-dir" else []
    front = router("--config", str(config), *local, "--strategy", "prefix-aware",
                   *[a for e in pair for a in ("--backend", e.url, "--kv-events", f"{e.events}={e.url}")])  # type: ignore[attr-defined]
    contexts = [f"Context {name} {tokenizing}: " + f"{name} floods, levees and rain storms by the river. " * 25
                for name in ("north", "south")]
    try:
        front.start()
        time.sleep(1.0)  # the router's subscriptions connect (a ZMQ subscriber misses what comes before)
        for engine, context in zip(pair, contexts, strict=True):
            complete(engine, context)
        time.sleep(1.0)
        for _ in range(2):  # twice each, crossing: a router guessing by load or turn would miss half
            for engine, context in zip(pair, contexts, strict=True):
                before = {e.url: _metric(e, "vllm:prefix_cache_hits_total") for e in pair}
                sent = {e.url: metric_total(front.get("/metrics")[1], "inference_backend_requests_total",
                                            backend=e.url) for e in pair}
                status, body = _post(front, {"model": MODEL, "prompt": context + " What about the dams?",
                                             "max_tokens": 2})
                assert status == 200, body
                after = {e.url: metric_total(front.get("/metrics")[1], "inference_backend_requests_total",
                                             backend=e.url) for e in pair}
                assert {u: after[u] - sent[u] for u in after} == {e.url: float(e is engine) for e in pair}
                full = len(tokenizer().encode(context).ids) // BLOCK_SIZE
                assert _metric(engine, "vllm:prefix_cache_hits_total") - before[engine.url] >= full * BLOCK_SIZE
        page = front.get("/metrics")[1]
        source = "engine" if tokenizing == "engine" else "local"
        # two distinct prompts, each sent twice: tokenized once each, the repeats from the router's cache
        assert metric_total(page, "inference_prompt_tokenizations_total", source=source) == 2
        assert metric_total(page, "inference_prompt_tokenizations_total", source="cache") == 2
    finally:
        front.close()


def test_chats_return_to_the_engine_holding_them_with_the_engines_own_template(pair: list[Daemon],
                                                                                tmp_path: Path) -> None:
    """A conversation started straight on one engine continues through the router (default tokenizer: the engine
    renders the chat template) on that engine, and its cache serves the history."""
    config = tmp_path / "router.yaml"
    config.write_text(f"version: v1\nkv_cache:\n  block_size: {BLOCK_SIZE}\n")
    front = router("--config", str(config), "--strategy", "prefix-aware",
                   *[a for e in pair for a in ("--backend", e.url, "--kv-events", f"{e.events}={e.url}")])  # type: ignore[attr-defined]
    history = [{"role": "system", "content": "You answer about estuaries. " + CONTEXT},
               {"role": "user", "content": "Where does the river meet the sea?"}]
    try:
        front.start()
        time.sleep(1.0)
        for holder in pair:
            chat = [{**history[0], "content": f"{holder.url} " + history[0]["content"]}, history[1]]
            assert http_json(holder.url + "/v1/chat/completions", {"model": MODEL, "messages": chat,
                                                                   "max_tokens": 2}, timeout=60)
        time.sleep(1.0)
        for holder in reversed(pair):
            chat = [{**history[0], "content": f"{holder.url} " + history[0]["content"]}, history[1],
                    {"role": "assistant", "content": "At the estuary."}, {"role": "user", "content": "And then?"}]
            before = {e.url: _metric(e, "vllm:prefix_cache_hits_total") for e in pair}
            status, body = front.post("/v1/chat/completions", {"model": MODEL, "messages": chat, "max_tokens": 2})
            assert status == 200, body
            gained = {e.url: _metric(e, "vllm:prefix_cache_hits_total") - before[e.url] for e in pair}
            assert gained[holder.url] >= 4 * BLOCK_SIZE and not any(v for u, v in gained.items() if u != holder.url)
    finally:
        front.close()


def test_vllm_exact_keys_match_the_engines_hashes_without_token_ids(engine: Daemon) -> None:
    """``block_hashing.mode: vllm`` (sha256, PYTHONHASHSEED unset: vLLM's default seed): the engine's events with
    their token_ids taken away still place its blocks, and a lookup by the prompt's ids — hashed as vLLM hashes
    them — finds every full block."""
    from fuyao.kv_blocks import BlockStored as Stored
    from fuyao.kvcache.index import KvIndex
    from fuyao.kvcache.keys import VllmKeys

    prompt = "Exact keys, no tokens. " + CONTEXT
    raw = _first_stored(engine, engine.events, prompt)  # type: ignore[attr-defined]
    keys = VllmKeys(BLOCK_SIZE, "sha256")
    index = KvIndex(BLOCK_SIZE, keys=keys)
    index.apply(engine.url, [Stored(raw["block_hashes"], raw["parent_block_hash"], [], raw["block_size"])])
    ids = raw["token_ids"]
    assert keys.chain(ids) == raw["block_hashes"]  # vLLM's own hashes, computed by the router
    assert index.lookup(ids) == {engine.url: len(raw["block_hashes"])}


def _post(daemon: Daemon, body: dict[str, Any]) -> tuple[int, Any]:
    return daemon.post("/v1/completions", body)


def _first_stored(daemon: Daemon, events: str, prompt: str) -> dict[str, Any]:
    """The raw map of the first BlockStored the engine publishes for ``prompt``.

    A SUB socket misses what is published before its subscription reaches the engine, and a prompt sent twice
    publishes nothing the second time, so probes (each its own prompt) go first until one is heard; only then is
    ``prompt`` sent, once, and only an event carrying its tokens is taken."""
    import msgpack

    expected = tokenizer().encode(prompt).ids
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(events)

    def stored(timeout_ms: int) -> list[dict[str, Any]]:
        if not sub.poll(timeout_ms):
            return []
        body = msgpack.unpackb(sub.recv_multipart()[2], raw=False, strict_map_key=False)
        return [e for e in body[1] if isinstance(e, dict) and e.get("type") == "BlockStored"]

    try:
        deadline = time.monotonic() + 30
        probe = 0
        while not stored(500):
            if time.monotonic() > deadline:
                raise AssertionError("the engine publishes no BlockStored for probes")
            probe += 1
            complete(daemon, f"Probe {probe} {time.monotonic_ns()}. " + CONTEXT)
        while stored(300):  # the probes' late events
            pass
        complete(daemon, prompt)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for event in stored(500):
                ids = event["token_ids"]
                if ids and ids == expected[:len(ids)]:
                    return event
        raise AssertionError(f"no BlockStored event for {prompt[:40]!r}")
    finally:
        sub.close(linger=0)


def test_the_simulator_is_faithful_to_the_engine(engine: Daemon) -> None:
    """Same model directory, vLLM's hashing (sha256, the default seed): the simulator's tokens, block hashes,
    event fields and metric names are the engine's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    sim = sim_engine("--tokenizer", str(generated_model()), "--model", MODEL, "--block-size", str(BLOCK_SIZE),
                     "--prefix-caching-hash-algo", "sha256", events=True)
    sim.env = env
    sim.start()
    try:
        prompt = "Compare these engines. " + CONTEXT
        real, simulated = _first_stored(engine, engine.events, prompt), _first_stored(sim, sim.events, prompt)  # type: ignore[attr-defined]
        assert set(simulated) == set(real)  # the same fields, vLLM 0.32's
        for key in ("block_hashes", "parent_block_hash", "token_ids", "block_size", "extra_keys", "group_idx",
                    "kv_cache_spec_kind", "medium"):
            assert simulated[key] == real[key], key
        real_names = {f.name for f in text_string_to_metric_families(engine.get("/metrics")[1])}
        sim_names = {f.name for f in text_string_to_metric_families(sim.get("/metrics")[1])}
        assert {n for n in sim_names if n.startswith("vllm:")} <= real_names  # every vllm: metric it has is real
    finally:
        sim.close()


def test_the_two_engines_hash_the_same_tokens_differently(pair: list[Daemon]) -> None:
    """What the routing test relies on being hard: sha256 and xxhash engines report unrelated hashes for the same
    blocks (so only content can match them)."""
    prompt = "Same tokens on both engines. " + CONTEXT
    first, second = (_first_stored(e, e.events, prompt) for e in pair)  # type: ignore[attr-defined]
    assert first["token_ids"] == second["token_ids"] and first["block_size"] == second["block_size"] == BLOCK_SIZE
    assert not set(first["block_hashes"]) & set(second["block_hashes"])


def test_the_router_in_front_of_the_real_server(pair: list[Daemon]) -> None:
    """Models, streaming and errors through the router, as the engine answers them."""
    engine = pair[0]
    front = router("--backend", engine.url, "--tokenizer", str(generated_model()), "--strategy", "least-connections")
    try:
        front.start()
        assert [m["id"] for m in json.loads(front.get("/v1/models")[1])["data"]] == [MODEL]
        status, raw = front.request("POST", "/v1/completions", {"model": MODEL, "prompt": CONTEXT, "max_tokens": 4,
                                                               "stream": True, "ignore_eos": True})
        events = [line for line in raw.decode().split("\n\n") if line.startswith("data: ")]
        assert status == 200 and events[-1] == "data: [DONE]"
        assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])  # text came, chunk by chunk
        status, body = front.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": "Hello"}]})
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
        status, body = front.post("/v1/completions", {"model": "no-such-model", "prompt": "x", "max_tokens": 2})
        assert status == 404 and "no-such-model" in body["error"]["message"]  # the engine's answer, passed on
        status, body = front.post("/v1/completions", {"model": MODEL, "prompt": [5, 99999], "max_tokens": 2})
        assert status == 400 and "99999" in body["error"]["message"]  # out of the model's vocabulary
        status, body = front.post("/v1/completions", {"model": MODEL, "prompt": CONTEXT * 20, "max_tokens": 2})
        assert status == 400  # longer than --max-model-len
        assert json.loads(front.get("/debug/backends")[1])[engine.url]["circuit"] == "closed"
    finally:
        front.close()


def test_the_index_finds_its_blocks_by_content_and_drops_them_when_it_restarts(pair: list[Daemon],
                                                                                 tmp_path: Path) -> None:
    """Last in the module: it restarts the second engine (where it was)."""
    engine = pair[1]
    config = tmp_path / "kvcache.yaml"
    config.write_text(f"version: v1\nkv_cache:\n  block_size: {BLOCK_SIZE}\n")
    index = kvcache("--config", str(config), "--kv-events",
                    f"{engine.url}={engine.events},{engine.replay}")  # type: ignore[attr-defined]
    try:
        index.start()
        ids = tokenizer().encode(CONTEXT).ids
        full = len(ids) // BLOCK_SIZE
        deadline = time.monotonic() + 30
        while _lookup(index, ids).get(engine.url) != full and time.monotonic() < deadline:
            complete(engine, CONTEXT)  # the first may go out before the index's subscription is up
            time.sleep(0.3)
        assert _lookup(index, ids) == {engine.url: full}
        # vLLM's own counters: the blocks are in its prefix cache
        before = _metric(engine, "vllm:prefix_cache_hits_total")
        complete(engine, CONTEXT + " And what about the levees?")
        assert _metric(engine, "vllm:prefix_cache_hits_total") - before >= full * BLOCK_SIZE
        # a prompt the engine never saw: nothing
        assert _lookup(index, tokenizer().encode("Unrelated text " * 40).ids) == {}
        # the engine restarts on the same ports: its blocks leave the index (its cache is empty)
        where = engine.where  # type: ignore[attr-defined]
        engine.close()
        deadline = time.monotonic() + 10
        while _lookup(index, ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _lookup(index, ids) == {}
        engine = pair[1] = vllm_engine(**where).start(timeout=240)
        other = tokenizer().encode("A second context about storms. " * 30).ids
        deadline = time.monotonic() + 30
        while _lookup(index, other).get(engine.url) != len(other) // BLOCK_SIZE and time.monotonic() < deadline:
            complete(engine, "A second context about storms. " * 30)
            time.sleep(0.3)
        assert _lookup(index, other) == {engine.url: len(other) // BLOCK_SIZE}
        assert _lookup(index, ids) == {}  # the old engine's blocks did not come back
        endpoint = http_json(index.url + "/v1/endpoints")[engine.url]
        assert endpoint["disconnects"] >= 1 and endpoint["connected"]
    finally:
        index.close()
