"""The KV index under faults, with real processes on loopback: an engine restarted on the same ports (its old blocks
leave the index, its new ones are indexed, the restart is counted — issue 17 defect 5), fuzzed HTTP bodies (never a
5xx, the service still answers right), and the index itself SIGKILLed and restarted under load (it rebuilds from
the engine's replay socket)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuyao import tokenizer
from fuyao.kv_blocks import block_hashes
from tests.support.engines import Daemon, engine, kvcache
from tests.support.polling import wait_for

pytestmark = pytest.mark.reliability

SHARED = "You are a helpful assistant. Answer in one short paragraph, citing sources. " * 3


def _prompt(tag: str) -> str:
    """A prompt whose blocks are its own from the first one on (the tag comes first)."""
    return f"{tag} " + SHARED


def _lookup(cache: Daemon, prompt: str) -> dict[str, Any]:
    status, body = cache.post("/v1/lookup", {"prompt": prompt})
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def _held(cache: Daemon, prompt: str, url: str) -> bool:
    """``url`` holds every full block of ``prompt`` according to the index."""
    found = _lookup(cache, prompt)
    return found["blocks"] > 0 and found["endpoints"].get(url) == found["blocks"]


def _stats(cache: Daemon) -> dict[str, Any]:
    status, text = cache.get("/v1/endpoints")
    assert status == 200
    return json.loads(text)  # type: ignore[no-any-return]


def _complete(daemon: Daemon, prompt: str) -> None:
    status, body = daemon.post("/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert status == 200, body


def _prompt_until_indexed(sim: Daemon, cache: Daemon, tag: str, limit: int) -> list[str]:
    """Send ``sim`` a new prompt (a new batch of events) every 0.1 s until the index holds the latest: the
    subscription is live then (batches published before it are replayed on joining). The prompts sent."""
    sent: list[str] = []

    def latest_indexed() -> bool:
        assert len(sent) < limit, f"{limit} prompts and the index does not follow {sim.url}"
        sent.append(_prompt(f"{tag}{len(sent)}"))
        _complete(sim, sent[-1])
        return _held(cache, sent[-1], sim.url)

    wait_for(latest_indexed, 10, f"the index to follow {sim.url}")
    return sent


def test_an_engine_restarted_on_the_same_ports_leaves_no_stale_hits() -> None:
    """Defect 5: the index took the restarted engine's batches for duplicates (its sequence numbers started over)
    and kept the old engine's blocks as hits."""
    sim = engine(events=True, replay=True).start()
    cache = kvcache("--kv-events", f"{sim.url}={sim.events},{sim.replay}").start()  # type: ignore[attr-defined]
    try:
        old = _prompt_until_indexed(sim, cache, "old", 20)
        while len(old) < 20:  # 20 batches at least: more than the new engine will send
            old.append(_prompt(f"old{len(old)}"))
            _complete(sim, old[-1])
        wait_for(lambda: all(_held(cache, p, sim.url) for p in old), 10, "the old engine's blocks")
        before = _stats(cache)[sim.url]
        assert before["last_seq"] >= len(old) - 1 and before["restarts"] == 0

        sim.proc.kill()  # type: ignore[union-attr]
        sim.proc.wait()  # type: ignore[union-attr]
        killed = time.monotonic()
        wait_for(lambda: not any(_lookup(cache, p)["endpoints"] for p in old), 5, "the old blocks to go")
        old_gone_s = time.monotonic() - killed

        sim.start()  # a new engine on the same HTTP port and ZMQ endpoints, its cache empty, its sequence from 0
        started = time.monotonic()
        new = _prompt_until_indexed(sim, cache, "new", 15)  # fewer batches than the old engine published
        wait_for(lambda: all(_held(cache, p, sim.url) for p in new), 5, "the new engine's blocks")
        new_indexed_s = time.monotonic() - started
        assert not any(_lookup(cache, p)["endpoints"] for p in old), "an old block is a hit again"
        after = _stats(cache)[sim.url]
        assert after["restarts"] == 1 and after["disconnects"] == 1 and after["connected"]
        assert after["entries"] == sum(_lookup(cache, p)["blocks"] for p in new)  # the new blocks, nothing else
        assert cache.metric("fuyao_kvcache_event_restarts_total") == 1
        print(f"old blocks gone {old_gone_s:.3f}s after the kill; new blocks indexed {new_indexed_s:.3f}s after "
              f"the new engine answered; old last_seq {before['last_seq']}, new {after['last_seq']}")
    finally:
        cache.close()
        sim.close()


# --- fuzzing the HTTP API ------------------------------------------------------------------------------------------
_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**70)
            | st.integers(max_value=-1) | st.floats() | st.text(max_size=20))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_FIELDS = ("model", "prompt", "messages", "token_ids", "hashes", "add_special_tokens")
_MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "name"]),
                           _JSON | st.lists(st.dictionaries(st.sampled_from(["type", "text"]), _JSON), max_size=3),
                           max_size=3)
_OBJECTS = st.fixed_dictionaries({}, optional={
    "model": _JSON, "prompt": _JSON | st.text(max_size=200), "messages": _JSON | st.lists(_MESSAGE, max_size=3),
    "token_ids": _JSON | st.lists(st.integers(), max_size=20), "hashes": _JSON | st.lists(st.integers(), max_size=20),
    "add_special_tokens": _JSON}) | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8), _JSON)


def _encoded(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity come out as the invalid JSON they are


@st.composite
def _nested(draw: st.DrawFn) -> bytes:
    """A field (or the body) nested up to 1000 deep: arrays, objects, or messages inside messages."""
    depth = draw(st.integers(1, 1000))
    field = draw(st.sampled_from(_FIELDS))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"role":', "}]")]))
    return f'{{"{field}": {opening * depth}1{closing * depth}}}'.encode()


_BODIES = (_OBJECTS.map(_encoded) | _JSON.map(_encoded) | st.binary(max_size=64) | _nested()
           | st.lists(_MESSAGE, max_size=3).map(lambda m: _encoded({"messages": m})))


def _request(port: int, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_fuzzed_bodies_never_get_a_5xx_and_the_service_still_answers() -> None:
    cache = kvcache().start()
    statuses: dict[int, int] = {}
    try:
        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(path=st.sampled_from(["/v1/lookup", "/v1/blocks/lookup", "/v1/blocks", "/v1/endpoints"]),
               body=_BODIES)
        def fuzz(path: str, body: bytes) -> None:
            status, answer = _request(cache.port, "GET" if path == "/v1/endpoints" else "POST", path, body)
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (path, body[:300], answer[:300])
            assert status in (200, 400, 413), (path, body[:300], status, answer[:300])
            if status == 400:
                assert "error" in json.loads(answer)

        fuzz()
        assert cache.proc is not None and cache.proc.poll() is None
        # the size cap: refused before it is read
        status, answer = _request(cache.port, "POST", "/v1/lookup", b'{"prompt": "' + b"x" * (9 << 20) + b'"}')
        assert status == 413 and b"at most" in answer
        # and the service still answers right: blocks stored in the tier are found, by prompt and by hashes
        prompt = _prompt("fuzzed")
        hashes = block_hashes(tokenizer.encode(prompt, add_special_tokens=True), 16)
        assert len(hashes) >= 3
        assert cache.post("/v1/blocks", {"hashes": hashes})[1] == {"stored": len(hashes)}
        assert cache.post("/v1/blocks/lookup", {"hashes": hashes})[1] == {"found": len(hashes)}
        assert _lookup(cache, prompt) == {"block_size": 16, "blocks": len(hashes), "endpoints": {},
                                          "tier_blocks": len(hashes), "cached_blocks": {}}
        assert cache.post("/v1/lookup", {"prompt": prompt, "model": 7})[0] == 400
        assert cache.post("/v1/lookup", {"hashes": [2**64]})[0] == 400
        assert sum(statuses.values()) == 150 and statuses.get(400, 0) > 0 and statuses.get(200, 0) > 0
        print(f"fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    finally:
        cache.close()


# --- the index killed and restarted under load ---------------------------------------------------------------------
def test_the_index_killed_under_load_rebuilds_from_the_replay_socket() -> None:
    sim = engine(events=True, replay=True).start()
    cache = kvcache("--kv-events", f"{sim.url}={sim.events},{sim.replay}").start()  # type: ignore[attr-defined]
    sent: list[str] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def load() -> None:  # a steady stream of distinct prompts, ~30 a second
        try:
            while not stop.is_set():
                prompt = _prompt(f"load{len(sent)}")
                _complete(sim, prompt)
                sent.append(prompt)
                time.sleep(0.03)
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        wait_for(lambda: len(sent) > 5 and _held(cache, sent[5], sim.url), 10, "the index following the load")
        cache.proc.kill()  # type: ignore[union-attr]
        cache.proc.wait()  # type: ignore[union-attr]
        before_kill = len(sent)
        time.sleep(1.0)  # the engine goes on publishing while the index is down
        down = len(sent) - before_kill
        cache.start()
        restarted = time.monotonic()
        while_down = list(sent)
        assert down > 5, "the load did not go on while the index was down"
        wait_for(lambda: all(_held(cache, p, sim.url) for p in while_down), 10,
                 "the blocks published before and during the outage")
        rebuilt_s = time.monotonic() - restarted
        stats = _stats(cache)[sim.url]
        assert stats["replays"] >= 1 and stats["gaps"] == 0 and stats["drops"] == 0
        assert stats["entries"] >= sum(_lookup(cache, p)["blocks"] for p in while_down)
        assert not failures, failures
        print(f"index restart: {len(while_down)} prompts ({down} sent while it was down) found again "
              f"{rebuilt_s:.3f}s after it answered; {stats['entries']} blocks indexed, {stats['replays']} replays")
    finally:
        stop.set()
        loader.join(5)
        cache.close()
        sim.close()
