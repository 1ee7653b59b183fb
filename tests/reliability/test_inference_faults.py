"""The inference layer under faults, over real sockets to real processes (engine simulators and ``fuyao-router``):
issue 17's defects 1 to 4 as regressions, hypothesis fuzzing of the router's and the engine's HTTP surfaces, the
router killed and restarted under load, and slow peers (slowloris, slow body, a client that never reads, an engine
that stalls mid-stream) with bounded memory.

Figures the tests measure are printed with ``FIGURE`` (``pytest -s`` shows them; docs/reliability.md quotes them).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.engines import Daemon, engine, metric_total, router
from tests.support.hostile_json import Deep, encode

pytestmark = pytest.mark.reliability

PROMPT = "You answer questions about rivers. Context: " + "floods and levees " * 40


def figure(name: str, value: object) -> None:
    print(f"FIGURE {name}: {value}")


def nested(depth: int, leaf: Any = "x") -> Deep:
    return Deep(depth, leaf)


def send(daemon: Daemon, path: str, body: Any, timeout: float = 30) -> tuple[int, bytes]:
    """POST ``body`` (bytes as they are, anything else as JSON); (status, answer)."""
    data = body if isinstance(body, bytes) else encode(body)
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=timeout)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def metric(daemon: Daemon, name: str, **labels: str) -> float:
    return metric_total(daemon.get("/metrics")[1], name, **labels)


def circuits(front: Daemon) -> dict[str, str]:
    return {url: b["circuit"] for url, b in json.loads(front.get("/debug/backends")[1]).items()}


def rss_mb(daemon: Daemon) -> float:
    assert daemon.proc is not None
    return psutil.Process(daemon.proc.pid).memory_info().rss / 2**20


def ok_completion(daemon: Daemon, prompt: str = PROMPT) -> dict[str, Any]:
    status, body = send(daemon, "/v1/completions", {"prompt": prompt, "max_tokens": 4})
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


def config(tmp_path: Path, **inference: str) -> str:
    path = tmp_path / "router.yaml"
    lines = ["version: v1", "inference:"] + [f"  {k}: {v}" for k, v in inference.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@contextlib.contextmanager
def running(*daemons: Daemon) -> Iterator[None]:
    try:
        for daemon in daemons:
            daemon.start()
        yield
    finally:
        for daemon in reversed(daemons):
            daemon.close()


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Daemon, Daemon, Daemon, Daemon]]:
    """Two engines (KV events, fault injection) behind a prefix-aware router and a least-connections router."""
    engines = [engine("--enable-fault-injection", "--max-model-len", "4096", events=True, replay=True,
                      time_scale=50) for _ in range(2)]
    events = [arg for e in engines for arg in ("--kv-events", f"{e.events}={e.url}")]  # type: ignore[attr-defined]
    backends = [arg for e in engines for arg in ("--backend", e.url)]
    prefix = router(*backends, *events, "--strategy", "prefix-aware")
    least = router(*backends, "--strategy", "least-connections")
    with running(*engines, prefix, least):
        yield engines[0], engines[1], prefix, least


# Defect 1: out-of-range token ids wedged the engine ------------------------------------------------------------------
BAD_IDS = {
    "negative": [7] * 100 + [-1] + [7] * 300,
    "2^32": [7] * 100 + [2**32] + [7] * 300,
    "vocabulary": [7] * 100 + [32000] + [7] * 300,
    "nested": [[7] * 100 + [-5] + [7] * 300],
}


def test_out_of_range_token_ids_are_refused_by_the_engine_which_keeps_serving(fleet: tuple[Daemon, ...]) -> None:
    first = fleet[0]
    for name, prompt in BAD_IDS.items():
        status, body = send(first, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
        assert status == 400, (name, body)
        assert "out of vocabulary" in json.loads(body)["error"]["message"], (name, body)
    assert ok_completion(first)["choices"][0]["finish_reason"] == "length"
    assert first.get("/health")[0] == 200
    assert metric(first, "vllm:num_requests_running") == 0 and metric(first, "vllm:num_requests_waiting") == 0


def test_a_request_that_fails_inside_the_engine_loop_fails_alone(fleet: tuple[Daemon, ...]) -> None:
    first = fleet[0]
    errors_before = metric(first, "fuyao_engine_request_errors_total")
    assert send(first, "/fault", {"request_errors": 2})[0] == 200
    results: list[tuple[int, bytes]] = []
    threads = [threading.Thread(target=lambda i=i: results.append(send(first, "/v1/completions", {
        "prompt": f"{i} {PROMPT}", "max_tokens": 8}))) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    failed = [body for status, body in results if status == 500]
    assert len(results) == 6 and len(failed) == 2, results
    assert all(b"injected fault" in body for body in failed)
    assert sum(status == 200 for status, _ in results) == 4
    # streamed: the failure arrives as vLLM's error event, then [DONE]
    assert send(first, "/fault", {"request_errors": 1})[0] == 200
    status, body = send(first, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "stream": True})
    assert status == 200 and b'"error"' in body and body.endswith(b"data: [DONE]\n\n")
    assert metric(first, "fuyao_engine_request_errors_total") - errors_before == 3
    assert first.get("/health")[0] == 200
    assert ok_completion(first)["usage"]["completion_tokens"] == 4
    assert metric(first, "vllm:kv_cache_usage_perc") == 0  # the failed requests' blocks were given back


def test_an_engine_loop_that_dies_shows_in_health_and_fails_requests_at_once() -> None:
    with running(doomed := engine("--enable-fault-injection", time_scale=2)):
        streamed: list[bytes] = []
        reader = threading.Thread(target=lambda: streamed.append(send(doomed, "/v1/completions", {
            "prompt": PROMPT, "max_tokens": 2000, "stream": True})[1]))
        reader.start()
        time.sleep(0.5)
        assert send(doomed, "/fault", {"loop_failure": True})[0] == 200
        reader.join(10)
        assert not reader.is_alive() and b"injected fault: the engine loop fails" in streamed[0]
        assert streamed[0].endswith(b"data: [DONE]\n\n")
        status, text = doomed.get("/health")
        assert status == 503 and "injected fault" in text  # vLLM's /health on EngineDeadError
        started = time.monotonic()
        status, body = send(doomed, "/v1/completions", {"prompt": "hi", "max_tokens": 2}, timeout=5)
        assert status == 500 and b"the engine loop stopped" in body and time.monotonic() - started < 2


# Defect 2: the router answered 500 on the same ids and did not count them ------------------------------------------
def test_the_router_refuses_out_of_range_token_ids_counts_them_and_asks_no_engine(fleet: tuple[Daemon, ...]) -> None:
    *_, prefix, least = fleet
    for front in (prefix, least):
        bad_before = metric(front, "inference_requests_total", code="400")
        sent_before = metric(front, "inference_backend_requests_total")
        for name, prompt in BAD_IDS.items():
            if name == "vocabulary":
                continue  # a valid uint32: the router cannot know the served model's vocabulary; the engine says 400
            status, body = send(front, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
            assert status == 400 and "out of vocabulary" in json.loads(body)["error"]["message"], (name, body)
        assert metric(front, "inference_requests_total", code="400") - bad_before == 3
        assert metric(front, "inference_backend_requests_total") == sent_before
        status, body = send(front, "/v1/completions", {"prompt": BAD_IDS["vocabulary"], "max_tokens": 2})
        assert status == 400 and b"out of vocabulary" in body  # the engine's answer, passed through
        assert set(circuits(front).values()) == {"closed"}


# Defect 3: deep nesting gave 500s and, through least-connections, opened every circuit ----------------------------
@pytest.mark.parametrize("field", ["role", "content", "prompt"])
def test_deeply_nested_fields_are_400_and_open_no_circuit(fleet: tuple[Daemon, ...], field: str) -> None:
    *_, prefix, least = fleet
    for front in (prefix, least):
        for depth in (30, 1000):
            if field == "prompt":
                path, body = "/v1/completions", {"prompt": nested(depth, 5), "max_tokens": 2}
            else:
                message = {"role": "user", "content": "hi", field: nested(depth)}
                path, body = "/v1/chat/completions", {"messages": [message], "max_tokens": 2}
            for _ in range(6):  # more than the circuit breaker's failure threshold (5)
                status, answer = send(front, path, body)
                assert status == 400, (front.port, field, depth, answer)
        assert set(circuits(front).values()) == {"closed"}
        assert ok_completion(front)["choices"]


def test_the_engine_refuses_deep_nesting_too(fleet: tuple[Daemon, ...]) -> None:
    first = fleet[0]
    status, body = send(first, "/v1/chat/completions", {"messages": [{"role": nested(1000), "content": "x"}]})
    assert status == 400 and b"levels deep" in body
    status, body = send(first, "/v1/chat/completions", {"messages": [{"role": nested(3), "content": "x"}]})
    assert status == 400 and b"role must be a string" in body


# Defect 4: a client that hangs up was counted against the backend -----------------------------------------------------
def _hang_up_after_first_chunk(port: int, prompt: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": prompt, "max_tokens": 3000, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    response.read1(64)  # the stream has started
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()


def test_clients_that_hang_up_mid_stream_are_not_backend_failures() -> None:
    slow = [engine(time_scale=2) for _ in range(2)]
    front = router(*[a for e in slow for a in ("--backend", e.url)], "--strategy", "least-connections")
    with running(*slow, front):
        clients = [threading.Thread(target=_hang_up_after_first_chunk, args=(front.port, f"{i} {PROMPT}"))
                   for i in range(16)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and metric(front, "inference_client_disconnects_total") < 16:
            time.sleep(0.1)
        assert metric(front, "inference_client_disconnects_total") == 16
        assert set(circuits(front).values()) == {"closed"}
        assert metric(front, "inference_errors_total", reason="broken-stream") == 0
        # the engines saw the disconnects and aborted the generations (their blocks are free again)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(metric(e, "vllm:num_requests_running") for e in slow):
            time.sleep(0.1)
        assert [metric(e, "vllm:num_requests_running") for e in slow] == [0, 0]
        assert ok_completion(front)["choices"]


# Bodies: size caps (413), a body that never finishes (408) -----------------------------------------------------------
def _raw_exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b'"error"' in answer:
                    break
        return answer


def test_oversized_bodies_are_413_before_they_are_read(fleet: tuple[Daemon, ...], tmp_path: Path) -> None:
    first, _, prefix, _ = fleet
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200000000\r\n\r\n")
    for daemon in (first, prefix):
        started = time.monotonic()
        answer = _raw_exchange(daemon.port, head, b'{"prompt": "')  # claims 200 MB, sends 12 bytes
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert time.monotonic() - started < 2
    capped = router("--backend", first.url, "--config", config(tmp_path, max_body_bytes="100000"))
    with running(capped):
        status, body = send(capped, "/v1/completions", {"prompt": "x" * 200_000})
        assert status == 413 and b"100000" in body
        assert metric(capped, "inference_requests_total", code="413") == 1
        assert ok_completion(capped)["choices"]


def test_a_body_that_trickles_in_gets_408_and_holds_nothing(fleet: tuple[Daemon, ...], tmp_path: Path) -> None:
    first = fleet[0]
    front = router("--backend", first.url, "--config", config(tmp_path, request_body_timeout="1s"))
    with running(front):
        sock = socket.create_connection(("127.0.0.1", front.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        started = time.monotonic()
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            for _ in range(40):
                sock.sendall(b" ")
                sock.settimeout(0.1)
                with contextlib.suppress(TimeoutError):
                    answer += sock.recv(65536)
                if answer:
                    break
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 0.9 < time.monotonic() - started < 3
        assert ok_completion(front)["choices"]


# Slow peers -------------------------------------------------------------------------------------------------------
def test_slowloris_does_not_starve_the_router_or_grow_it(fleet: tuple[Daemon, ...]) -> None:
    *_, least = fleet
    ok_completion(least)
    before_rss, before_fds = rss_mb(least), psutil.Process(least.proc.pid).num_fds()  # type: ignore[union-attr]
    slow = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", least.port), timeout=5)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    latencies = []
    try:
        for round_ in range(10):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.sendall(f"X-Slow-{round_}: a\r\n".encode())
            started = time.monotonic()
            ok_completion(least, f"{round_} {PROMPT}")
            latencies.append(time.monotonic() - started)
            time.sleep(0.1)
        grown = rss_mb(least) - before_rss
    finally:
        for sock in slow:
            sock.close()
    figure("slowloris connections", len(slow))
    figure("slowloris valid-request latency max (s)", round(max(latencies), 3))
    figure("slowloris router RSS growth (MB)", round(grown, 1))
    assert max(latencies) < 1.0
    assert grown < 40
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and psutil.Process(least.proc.pid).num_fds() > before_fds + 5:  # type: ignore[union-attr]
        time.sleep(0.1)
    assert psutil.Process(least.proc.pid).num_fds() <= before_fds + 5  # type: ignore[union-attr]


def test_clients_that_never_read_their_streams_do_not_grow_the_router() -> None:
    fast = [engine("--max-model-len", "20000", time_scale=200) for _ in range(2)]
    front = router(*[a for e in fast for a in ("--backend", e.url)], "--strategy", "least-connections")
    with running(*fast, front):
        ok_completion(front)
        before = rss_mb(front)
        readers = []
        for i in range(30):
            sock = socket.create_connection(("127.0.0.1", front.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # 3,000 tokens (~450 kB of SSE) each: together less than the engines' KV cache holds (no preemption storm)
            body = json.dumps({"prompt": f"{i} {PROMPT}", "max_tokens": 3000, "stream": True}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            readers.append(sock)  # and never read
        time.sleep(3)  # the engines could have produced every token of every stream by now
        grown = rss_mb(front) - before
        started = time.monotonic()
        ok_completion(front)
        latency = time.monotonic() - started
        for sock in readers:
            sock.close()
        figure("never-reading clients", len(readers))
        figure("never-reading router RSS growth (MB)", round(grown, 1))
        assert grown < 25, grown  # the streams add up to ~13 MB: nothing of them is held in the router
        assert latency < 2


def test_an_engine_that_stalls_mid_stream_is_cut_off_after_the_idle_timeout(tmp_path: Path) -> None:
    stalling = engine("--enable-fault-injection", time_scale=5)
    front = router("--backend", stalling.url, "--config", config(tmp_path, stream_idle_timeout="1s"))
    with running(stalling, front):
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"prompt": PROMPT, "max_tokens": 3000, "stream": True}))
        response = conn.getresponse()
        got = response.read1(256)
        assert got.startswith(b"data: ")
        assert send(stalling, "/fault", {"slowdown": 1e6})[0] == 200
        stalled_at = time.monotonic()
        rest = b""
        with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
            while chunk := response.read1(65536):
                rest += chunk
        cut_after = time.monotonic() - stalled_at
        conn.close()
        figure("stalled stream cut after (s)", round(cut_after, 2))
        assert b"[DONE]" not in rest and 0.9 < cut_after < 4
        assert metric(front, "inference_errors_total", reason="broken-stream") == 1
        assert send(stalling, "/fault", {"slowdown": 1})[0] == 200
        assert ok_completion(front)["choices"]  # one failure: the circuit (threshold 5) stays closed


# The router killed and restarted under load ---------------------------------------------------------------------------
def test_a_router_killed_under_load_loses_only_the_requests_in_flight(fleet: tuple[Daemon, ...]) -> None:
    first, second, *_ = fleet
    front = router("--backend", first.url, "--backend", second.url, "--strategy", "least-connections")
    outcomes: dict[str, int] = {"ok": 0, "lost": 0, "refused": 0, "bad": 0}
    lost: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(number: int) -> None:
        while not stop.is_set():
            try:
                status, _ = send(front, "/v1/completions", {"prompt": f"{number} {PROMPT}", "max_tokens": 20},
                                 timeout=10)
                kind = "ok" if status == 200 else "bad"
            except ConnectionRefusedError:
                kind = "refused"  # nothing listens: never accepted, nothing lost
                time.sleep(0.02)
            except (ConnectionError, http.client.HTTPException, TimeoutError) as exc:
                kind = "lost"  # sent, then the router died under it
                lost.append(type(exc).__name__)
                time.sleep(0.05)  # a client backs off before it tries again
            with lock:
                outcomes[kind] += 1

    with running(front):
        clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in clients:
            thread.start()
        try:
            time.sleep(1.5)
            served_before = outcomes["ok"]
            assert front.proc is not None
            front.proc.kill()
            front.proc.wait()
            killed_at = time.monotonic()
            front.start()
            back_after = time.monotonic() - killed_at
            time.sleep(1.5)
        finally:
            stop.set()
            for thread in clients:
                thread.join(15)
    figure("router kill: served before / lost / refused while down / served in all", (
        served_before, outcomes["lost"], outcomes["refused"], outcomes["ok"]))
    figure("router kill: restart to serving (s)", round(back_after, 2))
    assert served_before > 10 and outcomes["ok"] > served_before + 10
    assert outcomes["bad"] == 0
    assert outcomes["lost"] <= 4, lost  # at most the one request each client had in flight


# Fuzzing ----------------------------------------------------------------------------------------------------------
_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
_JUNK = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
_KEYS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "n",
         "seed", "kv_transfer_params", "add_special_tokens", "temperature", "add_generation_prompt"]
_BASES = [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 4}),
    ("/v1/completions", {"prompt": [11, 12, 13] * 50, "max_tokens": 4, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                              "max_completion_tokens": 4, "stream": True}),
]


@st.composite
def _bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    path, base = draw(st.sampled_from(_BASES))
    body: Any = json.loads(json.dumps(base))  # a copy
    kind = draw(st.sampled_from(["set", "set", "delete", "message", "deep", "whole", "bytes"]))
    if kind == "set":
        body[draw(st.sampled_from(_KEYS))] = draw(_JUNK)
    elif kind == "delete":
        body.pop(draw(st.sampled_from(sorted(body))), None)
    elif kind == "message" and "messages" in body:
        body["messages"][0][draw(st.sampled_from(["role", "content", "name", "tool_calls"]))] = draw(_JUNK)
    elif kind == "deep":
        body[draw(st.sampled_from(_KEYS))] = nested(draw(st.integers(min_value=60, max_value=1100)))
    elif kind == "whole":
        body = draw(_JUNK)
    else:
        return path, draw(st.binary(max_size=200))
    return path, encode(body)


def _fuzz(daemon: Daemon, label: str) -> None:
    seen: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_bodies())
    def check(case: tuple[str, bytes]) -> None:
        path, raw = case
        status, answer = send(daemon, path, raw)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (path, raw[:300], answer[:300])

    check()
    figure(f"fuzz {label}: answers by status", dict(sorted(seen.items())))


def test_fuzzing_the_engine_gets_no_5xx_and_it_keeps_answering(fleet: tuple[Daemon, ...]) -> None:
    first = fleet[0]
    _fuzz(first, "engine")
    assert first.get("/health")[0] == 200
    assert ok_completion(first)["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("which", ["prefix-aware", "least-connections"])
def test_fuzzing_the_router_gets_no_5xx_and_it_keeps_answering(fleet: tuple[Daemon, ...], which: str) -> None:
    front = fleet[2] if which == "prefix-aware" else fleet[3]
    _fuzz(front, f"router {which}")
    assert set(circuits(front).values()) == {"closed"}
    assert ok_completion(front)["usage"]["completion_tokens"] == 4
