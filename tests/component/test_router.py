"""``fuyao-router`` as a real process in front of engine simulators (and scripted backends): streaming relayed
byte for byte, prefix-aware affinity, a backend killed mid-load (circuit opens, recovers), retries that never
duplicate a stream, admission (429), prefill/decode with its fallback, config reload with a bad file, SIGTERM."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.support.apiserver import free_port
from tests.support.engines import Daemon, engine, router
from tests.support.fake_backend import FakeBackend, Script

PREFIX = "You are a careful assistant for the Hydrology Department. Context: " + "rivers and floods " * 60


def raw_post(daemon: Daemon, path: str, body: dict, timeout: float = 30) -> tuple[int, bytes]:  # type: ignore[type-arg]
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        try:
            return response.status, response.read()
        except http.client.IncompleteRead as cut:  # a stream the router cut: what arrived before
            return response.status, cut.partial
    finally:
        conn.close()


def backends(daemon: Daemon) -> dict:  # type: ignore[type-arg]
    return json.loads(daemon.get("/debug/backends")[1])


def test_streams_are_relayed_byte_for_byte_and_never_duplicated() -> None:
    fake = FakeBackend()
    fake.script = Script(chunks=[f"data: {{\"i\": {i}, \"pad\": \"{'x' * i}\"}}\n\n".encode() for i in range(40)]
                         + [b"data: [DONE]\n\n"], delay_s=0.005)
    front = router("--backend", fake.url, "--strategy", "round-robin").start()
    try:
        status, body = raw_post(front, "/v1/completions", {"prompt": "hi", "stream": True})
        assert status == 200 and body == b"".join(fake.script.chunks)  # exactly the backend's bytes
        # a backend that breaks off mid-stream: the client's answer is cut, and the request is not sent again
        fake.script.break_after = 5
        before = len(fake.received)
        try:
            status, body = raw_post(front, "/v1/completions", {"prompt": "hi", "stream": True})
        except (http.client.IncompleteRead, ConnectionError) as exc:
            body = getattr(exc, "partial", b"")
        assert b"[DONE]" not in body and len(fake.received) == before + 1
        assert b'"error"' in body and b"broke off" in body  # said in the stream, as vLLM says an error
    finally:
        front.close()
        fake.close()


def test_a_stream_cut_after_a_keep_alive_comment_is_not_retried_into_the_same_answer() -> None:
    # vLLM's ": keep-alive" comment goes out to the client with the stream's head; an engine that dies after it, before
    # its first token, was retried on another engine, whose head and stream went into the middle of the first answer
    first, second = FakeBackend(), FakeBackend()
    first.script = Script(chunks=[b": keep-alive\n\n", b'data: {"choices": [{"text": "a"}]}\n\n'], break_after=1)
    front = router("--backend", first.url, "--backend", second.url, "--strategy", "round-robin").start()
    try:
        for _ in range(2):  # round-robin: one of the two requests starts on the engine that dies
            try:
                status, body = raw_post(front, "/v1/completions", {"prompt": "hi", "stream": True})
            except (http.client.IncompleteRead, ConnectionError) as exc:
                status, body = 200, getattr(exc, "partial", b"")
            assert status == 200
            assert body.count(b"HTTP/1.1") == 0 and body.count(b": keep-alive") <= 1, body
        assert len(first.received) == 1 and len(second.received) == 1  # each request went to one engine only
    finally:
        front.close()
        first.close()
        second.close()


def test_prefix_aware_keeps_a_prefix_on_one_engine_and_spreads_others() -> None:
    fleet = [engine(events=True).start() for _ in range(3)]
    events = [f"--kv-events={e.events}={e.url}" for e in fleet]  # type: ignore[attr-defined]
    front = router(*[a for e in fleet for a in ("--backend", e.url)], *events, "--strategy", "prefix-aware").start()
    try:
        for question in range(6):
            assert front.post("/v1/completions", {"prompt": PREFIX + f"Question {question}?", "max_tokens": 2})[0] \
                == 200
        served = {e.url: e.metric("vllm:prompt_tokens_total") for e in fleet}
        assert sorted(v > 0 for v in served.values()) == [False, False, True]  # one engine got the whole group
        hits = sum(e.metric("vllm:prefix_cache_hits_total") for e in fleet)
        queries = sum(e.metric("vllm:prefix_cache_queries_total") for e in fleet)
        assert hits / queries > 0.7
        for question in range(6):  # unrelated prompts: spread by load, not stuck on one engine
            front.post("/v1/completions", {"prompt": f"Completely different topic number {question} " * 3,
                                           "max_tokens": 2})
        assert sum(e.metric("vllm:prompt_tokens_total") > 0 for e in fleet) >= 2
        metrics = front.get("/metrics")[1]
        assert "inference_latency_bucket" in metrics and 'inference_requests_total{code="200"} 12.0' in metrics
    finally:
        front.close()
        for e in fleet:
            e.close()


def test_a_killed_backend_opens_its_circuit_and_recovers(tmp_path: Path) -> None:
    good = engine().start()
    doomed = engine("--enable-fault-injection").start()
    config = tmp_path / "router.yaml"
    config.write_text("version: v1\nrouter:\n  strategy: round-robin\n  health_check: {interval: 0.3s, timeout: 1s}\n"
                      "  circuit_breaker: {failure_threshold: 2, timeout: 1s}\n")
    front = router("--config", str(config), "--backend", good.url, "--backend", doomed.url).start()
    try:
        doomed.post("/fault", {"error_count": 1000})  # every request and health check fails
        statuses = [front.post("/v1/completions", {"prompt": "x", "max_tokens": 1})[0] for _ in range(10)]
        assert statuses == [200] * 10  # retried on the good backend before any byte went out
        state = backends(front)[doomed.url]
        assert state["circuit"] == "open" or state["healthy"] is False
        # what the RouterCircuitOpen alert reads: the breaker's state per backend, and health beside it
        circuit = f'inference_backend_circuit_open{{backend="{doomed.url}"}}'
        healthy = f'inference_backend_healthy{{backend="{doomed.url}"}}'
        assert front.metric(circuit) == (0 if state["circuit"] == "closed" else 1)
        assert front.metric(f'inference_backend_circuit_open{{backend="{good.url}"}}') == 0
        assert front.metric(f'inference_backend_healthy{{backend="{good.url}"}}') == 1
        sent = doomed.metric("vllm:e2e_request_latency_seconds_count")
        for _ in range(5):
            front.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert doomed.metric("vllm:e2e_request_latency_seconds_count") == sent  # nothing new went there
        doomed.request("DELETE", "/fault")  # it recovers: health checks pass, the half-open probe succeeds
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and doomed.metric("vllm:e2e_request_latency_seconds_count") == sent:
            front.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
            time.sleep(0.1)
        assert doomed.metric("vllm:e2e_request_latency_seconds_count") > sent
        assert backends(front)[doomed.url]["circuit"] == "closed"
        assert front.metric(circuit) == 0 and front.metric(healthy) == 1
    finally:
        front.close()
        good.close()
        doomed.close()


def test_admission_beyond_max_concurrent_requests_is_429(tmp_path: Path) -> None:
    slow = FakeBackend()
    slow.script = Script(chunks=[b"data: a\n\n"] * 20, delay_s=0.1)
    config = tmp_path / "router.yaml"
    config.write_text("version: v1\nrouter:\n  max_concurrent_requests: 1\n")
    front = router("--config", str(config), "--backend", slow.url).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
        conn.request("POST", "/v1/completions", body=b'{"prompt": "x", "stream": true}')
        time.sleep(0.3)
        status, body = raw_post(front, "/v1/completions", {"prompt": "y"})
        assert status == 429 and json.loads(body)["error"]["type"] == "RateLimitError"
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        front.close()
        slow.close()


def test_prefill_decode_flow_and_fallback(tmp_path: Path) -> None:
    prefill = engine("--role", "prefill", "--enable-fault-injection").start()
    decode = engine("--role", "decode").start()
    front = router("--prefill", prefill.url, "--decode", decode.url).start()
    try:
        status, body = raw_post(front, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": PREFIX}], "max_tokens": 5, "stream": True})
        assert status == 200 and body.endswith(b"data: [DONE]\n\n") and body.count(b'"content"') >= 5
        prompt_tokens = prefill.metric("vllm:prompt_tokens_total")
        assert prompt_tokens > 0 and decode.metric("fuyao_engine_kv_transfer_tokens_total") == prompt_tokens - 1
        # min_tokens stays with the decode: the prefill's 1 token would make the engine refuse min_tokens > 1
        status, body = raw_post(front, "/v1/completions", {"prompt": PREFIX + " again", "max_tokens": 5,
                                                           "min_tokens": 3})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] >= 3
        assert decode.metric("fuyao_engine_kv_transfer_tokens_total") > prompt_tokens - 1  # pulled: prefill worked
        assert front.metric('inference_errors_total{reason="prefill-failed"}') == 0
        prompt_tokens = prefill.metric("vllm:prompt_tokens_total")
        transferred = decode.metric("fuyao_engine_kv_transfer_tokens_total")
        prefill.post("/fault", {"error_count": 100})
        status, body = raw_post(front, "/v1/completions", {"prompt": PREFIX, "max_tokens": 3})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 3  # decode-only fallback
        assert decode.metric("fuyao_engine_kv_transfer_tokens_total") == transferred  # computed, not pulled
    finally:
        front.close()
    config = tmp_path / "pd.yaml"
    config.write_text("version: v1\npd_separation: {fallback: error}\n")
    strict = router("--config", str(config), "--prefill", prefill.url, "--decode", decode.url).start()
    try:
        status, body = raw_post(strict, "/v1/completions", {"prompt": PREFIX, "max_tokens": 3})
        assert status == 502 and b"prefill failed" in body
        assert strict.metric("inference_errors_total") == 1  # counted once, by its reason (not again as http-502)
        assert strict.metric('inference_errors_total{reason="prefill-failed"}') == 1
    finally:
        strict.close()
    prefill.request("DELETE", "/fault")
    strict = router("--config", str(config), "--prefill", prefill.url, "--prefill", decode.url,
                    "--decode", decode.url).start()
    try:
        # a request the prefill engine refuses (4xx): the engine's own answer, and no other prefill engine asked
        status, body = raw_post(strict, "/v1/completions", {"prompt": [4_000_000_000], "max_tokens": 3})
        assert status == 400 and json.loads(body)["error"]["param"] == "prompt", body  # not in the vocabulary
        assert strict.metric('inference_errors_total{reason="prefill-failed"}') == 1
    finally:
        strict.close()
        prefill.close()
        decode.close()


def test_config_reload_and_a_bad_file_keeps_the_old_config(tmp_path: Path) -> None:
    a, b = FakeBackend(), FakeBackend()
    config = tmp_path / "router.yaml"
    config.write_text("version: v1\nrouter:\n  strategy: round-robin\n")
    front = router("--config", str(config), "--backend", a.url, "--backend", b.url).start()
    try:
        for _ in range(4):
            raw_post(front, "/v1/completions", {"prompt": "x"})
        assert len(a.received) == len(b.received) == 2  # round-robin
        time.sleep(0.05)
        config.write_text("version: v1\nrouter:\n  strategy: least-connections\n  retries: nope\n")
        time.sleep(2.5)
        assert front.proc.poll() is None  # type: ignore[union-attr]
        for _ in range(4):
            raw_post(front, "/v1/completions", {"prompt": "x"})
        assert len(a.received) == len(b.received) == 4  # still round-robin
        front.proc.send_signal(15)  # type: ignore[union-attr]
        assert front.proc.wait(5) == 0  # type: ignore[union-attr]
        log = front.log_text()
        assert "invalid, keeping the running config" in log and "router.retries" in log
    finally:
        front.close()
        a.close()
        b.close()


def test_flags_and_sigterm() -> None:
    result = subprocess.run([sys.executable, "-m", "fuyao.inference_router.cli", "--backend", "not-a-url"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "router.backends" in result.stderr
    result = subprocess.run([sys.executable, "-m", "fuyao.inference_router.cli"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "none configured" in result.stderr
    fake = FakeBackend()
    front = router("--backend", fake.url).start()
    try:
        code, seconds = front.stop()
        assert code == 0 and seconds < 3
    finally:
        front.close()
        fake.close()


def test_probes_liveness_and_readiness_do_not_depend_on_engines() -> None:
    """/health reports engines (503 with none healthy); /livez and /readyz (the chart's probes) answer 200 anyway,
    so a router installed before its engines is neither restarted nor kept out of its Service."""
    port = free_port()
    front = Daemon("fuyao.inference_router.cli", ["--listen", f"127.0.0.1:{port}", "--backend",
                                            f"http://127.0.0.1:{free_port()}"], port, "/livez").start()
    try:
        assert front.get("/health")[0] == 503
        assert front.get("/readyz") == (200, "ok")
    finally:
        front.close()


def test_a_backend_process_that_dies_is_routed_around() -> None:
    alive, dying = engine().start(), engine().start()
    front = router("--backend", alive.url, "--backend", dying.url, "--strategy", "round-robin").start()
    try:
        dying.proc.kill()  # type: ignore[union-attr]
        dying.proc.wait()  # type: ignore[union-attr]
        statuses = [front.post("/v1/completions", {"prompt": "x", "max_tokens": 1})[0] for _ in range(10)]
        assert statuses == [200] * 10  # connection refused → retried on the live engine before any byte
        state = backends(front)[dying.url]
        assert state["circuit"] == "open" or state["healthy"] is False
        assert "inference_retries_total" in front.get("/metrics")[1]
    finally:
        front.close()
        alive.close()
        dying.close()


def test_each_request_goes_to_the_engines_serving_its_model() -> None:
    """A fleet of two models: the router learns what each engine serves (its /v1/models), sends each request only
    to an engine serving the request's model, lists both models, and answers 404 itself for a model nobody serves."""
    llama, qwen = engine("--model", "llama"), engine("--model", "qwen")
    front = router("--backend", llama.url, "--backend", qwen.url, "--strategy", "round-robin")
    try:
        for daemon in (llama, qwen, front):
            daemon.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listed = sorted(m["id"] for m in json.loads(front.get("/v1/models")[1])["data"])
            status, _ = raw_post(front, "/v1/completions", {"model": "gemma", "prompt": "x", "max_tokens": 1})
            if listed == ["llama", "qwen"] and status == 404:
                break
            time.sleep(0.2)
        assert listed == ["llama", "qwen"]
        for model, daemon in (("llama", llama), ("qwen", qwen)):
            before = daemon.metric("vllm:request_success_total")
            for _ in range(4):  # round-robin would alternate: the model decides
                status, body = raw_post(front, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1})
                assert status == 200 and json.loads(body)["model"] == model
            assert daemon.metric("vllm:request_success_total") - before == 4
        status, body = raw_post(front, "/v1/completions", {"model": "gemma", "prompt": "x", "max_tokens": 1})
        assert status == 404 and json.loads(body)["error"]["type"] == "NotFoundError"
        status, _ = raw_post(front, "/v1/completions", {"prompt": "no model named", "max_tokens": 1})
        assert status == 200  # no model: any engine
    finally:
        front.close()
        llama.close()
        qwen.close()


def test_prompts_are_tokenized_by_an_engine_once_and_an_engine_without_tokenize_is_routed_on_load() -> None:
    """The default tokenizer is the engines' own /tokenize: asked once per distinct prompt (repeats come from the
    cache, so no round trip), and the router's hashes then match the engine's events. A backend with no /tokenize
    (404) still serves: routed on load alone, and not asked again for a while."""
    sim = engine(events=True).start()
    fake = FakeBackend()
    front = router("--backend", sim.url, f"--kv-events={sim.events}={sim.url}").start()  # type: ignore[attr-defined]
    plain = router("--backend", fake.url).start()
    try:
        chat = {"messages": [{"role": "user", "content": PREFIX}], "max_tokens": 2}
        for _ in range(3):
            assert front.post("/v1/chat/completions", chat)[0] == 200
        assert front.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1})[0] == 200
        assert front.metric('inference_prompt_tokenizations_total{source="engine"}') == 1
        assert front.metric('inference_prompt_tokenizations_total{source="cache"}') == 2
        assert front.metric('inference_prompt_tokenizations_total{source="ids"}') == 1
        # the repeats were served from the engine's prefix cache
        assert sim.metric("vllm:prefix_cache_hits_total") > 0
        for question in range(3):
            assert raw_post(plain, "/v1/completions", {"prompt": f"q{question}", "max_tokens": 1})[0] == 200
        assert plain.metric('inference_prompt_tokenizations_total{source="failed"}') == 3
        assert fake.paths.count("/tokenize") == 1  # asked once, then left alone
    finally:
        front.close()
        plain.close()
        sim.close()
        fake.close()


def test_the_router_measures_each_engines_tier_load_cost(tmp_path: Path) -> None:
    """``learnTierLoadCost``: engines sharing the KV volume (simulators with ``--kv-volume``) report their load time
    and prefill time; the router turns each engine's counters into its load cost per token as a share of computing
    one, and shows it as ``fuyao_router_tier_load_cost``. An engine whose loads are slow (1 ms a token, against about
    0.4 ms to compute one with its step's fixed cost) measures above 1; one whose loads are fast measures far
    below."""
    from tests.support.polling import wait_for

    tier = tmp_path / "tier"
    profiles = {}
    for name, per_token in (("fast", 0.01), ("slow", 1.0)):
        profiles[name] = tmp_path / f"{name}.yaml"
        profiles[name].write_text(f"kv_transfer_per_token_ms: {per_token}\n")
    writer = engine("--kv-volume", str(tier)).start()
    fast = engine("--kv-volume", str(tier), "--latency-profile", str(profiles["fast"]), time_scale=1).start()
    slow = engine("--kv-volume", str(tier), "--latency-profile", str(profiles["slow"]), time_scale=1).start()
    config = tmp_path / "router.yaml"
    config.write_text(f"version: v1\nrouter:\n  metricsInterval: 200ms\n  backends: [{fast.url}, {slow.url}]\n")
    front = router("--config", str(config)).start()
    try:
        time.sleep(0.5)  # the router's first scrape: what later intervals are measured against
        for topic in range(4):
            context = f"Topic {topic}: " + "the water cycle and its seasons " * 30
            writer.post("/v1/completions", {"prompt": context + "First question?", "max_tokens": 1})
            wait_for(lambda n=8 * (topic + 1): writer.metric("fuyao_kv_tier_blocks_stored_total") >= n, 10, "stored")
            for engine_, words in ((fast, "quick rivers "), (slow, "slow glaciers ")):  # each computes its question
                engine_.post("/v1/completions", {"prompt": context + "Tell me about " + words * 30 + "?",
                                                 "max_tokens": 1})
        assert fast.metric("fuyao_kv_tier_blocks_loaded_total") >= 4 * 8
        assert slow.metric("fuyao_kv_tier_blocks_loaded_total") >= 4 * 8

        def costs() -> dict[str, float] | None:
            from tests.support.engines import metric_total

            page = front.get("/metrics")[1]
            found = {e.url: metric_total(page, "fuyao_router_tier_load_cost", backend=e.url) for e in (fast, slow)}
            return found if all(found.values()) else None

        measured = wait_for(costs, 10, "both engines' load cost measured")
        assert measured[fast.url] < 0.2 < 1.0 < measured[slow.url], measured
    finally:
        for daemon in (front, writer, fast, slow):
            daemon.close()


def test_a_non_streamed_answer_longer_than_the_prefill_timeout_is_not_a_failure(tmp_path: Path) -> None:
    """vLLM sends a non-streamed answer's headers only when generation ends: ``prefillTimeout`` bounds a stream's
    first byte, not that. A long non-streamed generation answers 200, is neither retried nor counted against the
    engine, while a stream still meets the first-byte bound."""
    profile = tmp_path / "slow.yaml"
    profile.write_text("step_base_ms: 100\nprefill_per_token_ms: 0\ndecode_per_seq_ms: 0\n")
    slow = engine("--latency-profile", str(profile), time_scale=1.0).start()
    config = tmp_path / "router.yaml"
    config.write_text("version: v1\ninference: {prefillTimeout: 500ms}\n")
    front = router("--config", str(config), "--backend", slow.url, "--strategy", "round-robin").start()
    try:
        started = time.monotonic()
        status, body = raw_post(front, "/v1/completions", {"prompt": "hello", "max_tokens": 12})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 12, body
        assert time.monotonic() - started > 0.5  # it did outlast the prefill timeout
        assert slow.metric("vllm:request_success_total") == 1  # sent once, not retried
        assert front.metric("inference_errors_total") == 0
        assert backends(front)[slow.url]["circuit"] == "closed"
        status, body = raw_post(front, "/v1/completions", {"prompt": "hello", "max_tokens": 3, "stream": True})
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")  # its first token came in time
    finally:
        front.close()
        slow.close()


def test_engines_with_an_api_key_the_router_uses_the_clients_and_its_own(tmp_path: Path) -> None:
    """Engines started with vLLM's ``--api-key`` check it on every /v1 call: the router asks /v1/models with
    ``FUYAO_ENGINE_API_KEY`` (so requests still go by model), lists models with the client's own Authorization, and
    passes that on with every request; a router without the key says so in its log."""
    import os

    first, second = FakeBackend(), FakeBackend()
    for fake, model in ((first, "A"), (second, "B")):
        fake.api_key, fake.models = "k", [model]
        fake.script = Script(chunks=[b'{"model": "%s"}' % model.encode()], content_type="application/json")
    keyed = router("--backend", first.url, "--backend", second.url, "--strategy", "round-robin")
    keyed.env = {**os.environ, "FUYAO_ENGINE_API_KEY": "k"}
    keyless = router("--backend", first.url, "--strategy", "round-robin")
    try:
        keyed.start()
        keyless.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(b.get("models") for b in backends(keyed).values()):
            time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", keyed.port, timeout=10)
        for _ in range(4):  # round-robin would alternate: the model decides
            conn.request("POST", "/v1/completions", body=json.dumps({"model": "A", "prompt": "x", "max_tokens": 1}),
                         headers={"Content-Type": "application/json", "Authorization": "Bearer k",
                                  "Connection": "keep-alive, X-Hop", "X-Hop": "not for the engine"})
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["model"] == "A"
            assert len(response.headers.get_all("Date") or []) == 1  # the router's, not the engine's as well
        conn.request("GET", "/v1/models", headers={"Authorization": "Bearer k"})
        response = conn.getresponse()
        assert sorted(m["id"] for m in json.loads(response.read())["data"]) == ["A", "B"]
        # a client without the key, or with a wrong one, is refused as the engines refuse it (the router's own
        # key is never lent to it; a wrong key answered 503 "no healthy backend")
        for client_headers in ({}, {"Authorization": "Bearer wrong"}):
            conn.request("GET", "/v1/models", headers=client_headers)
            response = conn.getresponse()
            assert response.status == 401 and "Unauthorized" in response.read().decode()
        conn.close()
        completions = [h for p, h in zip(first.paths, first.headers, strict=True) if p == "/v1/completions"]
        assert len(completions) == 4 and all(h.get("Authorization") == "Bearer k" for h in completions)
        assert all("X-Hop" not in h for h in completions)  # named in Connection: hop-by-hop (RFC 9110 §7.6.1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "FUYAO_ENGINE_API_KEY" not in keyless.log_text():
            time.sleep(0.2)
        assert "refuses the router's /v1/models (HTTP 401)" in keyless.log_text()
        assert "Bearer k" not in keyed.log_text()  # the key is never logged
    finally:
        keyed.close()
        keyless.close()
        first.close()
        second.close()


def test_a_client_that_leaves_while_the_engine_works_frees_the_engine_and_the_routers_counts(tmp_path: Path) -> None:
    """A non-streamed request (no byte goes to the client until the engine is done) whose client hangs up: the
    router drops the engine's request at once (its connection closes, as vLLM needs to abort the generation), its
    in-flight counts go back to zero and the disconnect is counted, not a success."""
    import socket

    profile = tmp_path / "slow.yaml"
    profile.write_text("step_base_ms: 100\nprefill_per_token_ms: 0\ndecode_per_seq_ms: 0\n")
    slow = engine("--latency-profile", str(profile), time_scale=1.0).start()
    front = router("--backend", slow.url, "--strategy", "round-robin").start()
    try:
        client = socket.create_connection(("127.0.0.1", front.port))
        body = json.dumps({"prompt": "hello", "max_tokens": 100}).encode()  # ~10 s of decoding
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 5
        while backends(front)[slow.url]["in_flight"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backends(front)[slow.url]["in_flight"] == 1
        client.close()
        left = time.monotonic()
        while backends(front)[slow.url]["in_flight"] != 0 and time.monotonic() < left + 12:
            time.sleep(0.05)
        assert time.monotonic() - left < 5  # not when the engine would have answered (~10 s)
        assert front.metric("inference_client_disconnects_total") == 1
        assert front.metric('inference_requests_total{code="200"}') == 0
        assert backends(front)[slow.url]["circuit"] == "closed"  # not the engine's fault
    finally:
        front.close()
        slow.close()


def test_embeddings_are_routed_and_refusals_name_their_field_in_the_openai_shape() -> None:
    """``/v1/embeddings`` goes to an engine (on load: no prompt prefix to keep); a bad field is refused naming it in
    ``param``; a path the router does not serve gets an OpenAI error object, not text."""
    fake = FakeBackend()
    fake.script = Script(chunks=[b'{"object": "list", "data": [{"embedding": [0.5]}]}'],
                         content_type="application/json")
    front = router("--backend", fake.url).start()
    try:
        status, body = raw_post(front, "/v1/embeddings", {"input": ["a", "b"], "model": "m"})
        assert status == 200 and json.loads(body)["data"][0]["embedding"] == [0.5]
        assert json.loads(fake.received[-1]) == {"input": ["a", "b"], "model": "m"}
        for path, bad, param in (("/v1/embeddings", {"input": 7}, "input"),
                                 ("/v1/completions", {"prompt": {}}, "prompt"),
                                 ("/v1/completions", {"prompt": "x", "model": 3}, "model")):
            status, body = raw_post(front, path, bad)
            assert status == 400 and json.loads(body)["error"]["param"] == param, body
        status, body = raw_post(front, "/v1/nothing-here", {})
        assert status == 404 and json.loads(body)["error"]["type"] == "NotFoundError"
    finally:
        front.close()
        fake.close()


def test_when_every_engine_fails_the_last_ones_own_error_answer_reaches_the_client() -> None:
    # vLLM's 503 ServiceUnavailableError (or 500 EngineDeadError) says more than a generic 502
    a, b = FakeBackend(), FakeBackend()
    for fake in (a, b):
        fake.script = Script(chunks=[b'{"error": {"message": "engine overloaded: 512 waiting", "type": '
                                     b'"ServiceUnavailableError", "code": 503}}'], status=503,
                             content_type="application/json")
    front = router("--backend", a.url, "--backend", b.url).start()
    try:
        status, body = raw_post(front, "/v1/completions", {"prompt": "x"})
        assert status == 503 and "engine overloaded" in json.loads(body)["error"]["message"]
        assert len(a.received) + len(b.received) == 2  # retried on the other first
    finally:
        front.close()
        a.close()
        b.close()


def test_timeouts_bound_the_first_token_and_the_whole_answer_without_blaming_a_working_engine(
        tmp_path: Path) -> None:
    # prefillTimeout bounds a stream's first token (vLLM sends its headers at once, its first chunk after the
    # prefill: the bound used to stop at the headers); decodeTimeout running out is a 504 (or, once bytes went out, a
    # cut stream) and never retried on another engine; a stream that was flowing is not counted against its engine
    a, b = FakeBackend(), FakeBackend()
    config = tmp_path / "router.yaml"
    config.write_text("version: v1\ninference: {prefillTimeout: 600ms, decodeTimeout: 1500ms}\n")
    front = router("--config", str(config), "--backend", a.url, "--backend", b.url, "--strategy",
                   "round-robin").start()
    try:
        for fake in (a, b):
            fake.script = Script(first_delay_s=3.0)
        started = time.monotonic()
        status, _ = raw_post(front, "/v1/completions", {"prompt": "x", "stream": True})
        assert status == 502 and time.monotonic() - started < 2.8  # both tried, each cut at 600 ms
        a.received.clear()
        b.received.clear()
        for fake in (a, b):  # a long generation: its headers come when it ends (non-streamed)
            fake.script = Script(chunks=[b'{"ok": true}'], content_type="application/json", head_delay_s=3.0)
        status, body = raw_post(front, "/v1/completions", {"prompt": "y"})
        assert status == 504 and json.loads(body)["error"]["code"] == 504
        assert len(a.received) + len(b.received) == 1  # not retried: another engine would take as long
        for fake in (a, b):  # a long stream: cut at the deadline, after what it sent
            fake.script = Script(chunks=[b"data: {}\n\n"] * 30, delay_s=0.1)
        status, body = raw_post(front, "/v1/completions", {"prompt": "z", "stream": True})
        assert status == 200 and 3 <= body.count(b"data: ") < 30  # ~14 chunks in 1.5 s
        assert front.metric('inference_errors_total{reason="deadline"}') == 2
        assert all(v["circuit"] == "closed" for v in backends(front).values())
    finally:
        front.close()
        a.close()
        b.close()


def test_embeddings_on_a_disaggregated_router_skip_the_prefill_decode_path() -> None:
    # an embedding has no decode: through P/D it was sent as a 1-token prefill, failed for want of
    # kv_transfer_params, counted prefill-failed and was then computed again
    prefill, decode = FakeBackend(), FakeBackend()
    for fake in (prefill, decode):
        fake.script = Script(chunks=[b'{"object": "list", "data": [{"embedding": [0.1]}]}'],
                             content_type="application/json")
    front = router("--prefill", prefill.url, "--decode", decode.url).start()
    try:
        status, body = raw_post(front, "/v1/embeddings", {"input": "hello"})
        assert status == 200 and json.loads(body)["data"][0]["embedding"] == [0.1]
        sent = prefill.received + decode.received
        assert len(sent) == 1 and b"kv_transfer_params" not in sent[0]
        assert front.metric("inference_errors_total") == 0
    finally:
        front.close()
        prefill.close()
        decode.close()


def test_a_model_an_engine_starts_serving_is_routed_at_once() -> None:
    # a LoRA adapter loaded on the engines (/v1/load_lora_adapter): the router answered 404 until its next read of
    # the models, up to 30 s later
    fake = FakeBackend()
    fake.models = ["base"]
    fake.script = Script(chunks=[b'{"ok": true}'], content_type="application/json")
    front = router("--backend", fake.url).start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not backends(front)[fake.url].get("models"):
            time.sleep(0.1)
        assert raw_post(front, "/v1/completions", {"model": "nope", "prompt": "x"})[0] == 404
        fake.models = ["base", "lora-1"]
        time.sleep(2.1)  # past the refresh's rate limit
        status, _ = raw_post(front, "/v1/completions", {"model": "lora-1", "prompt": "x"})
        assert status == 200
    finally:
        front.close()
        fake.close()


def test_busy_engines_keep_their_circuits_and_unsupported_requests_are_not_retried() -> None:
    # vLLM's 503 (queue full) asks to be retried elsewhere: a burst opened every circuit for 30 s after 5 of them;
    # its 501 (not implemented here) is the same on every engine: it was retried and counted as a failure
    a, b = FakeBackend(), FakeBackend()
    busy = Script(chunks=[b'{"error": {"message": "queue full", "type": "Service Unavailable", "code": 503}}'],
                  status=503, content_type="application/json")
    for fake in (a, b):
        fake.script = busy
    front = router("--backend", a.url, "--backend", b.url).start()
    try:
        for _ in range(8):
            assert raw_post(front, "/v1/completions", {"prompt": "x"})[0] == 503
        assert front.metric("inference_backend_circuit_open") == 0  # every series 0
        for fake in (a, b):
            fake.received.clear()
            fake.script = Script(chunks=[b'{"error": {"message": "The model does not support Completions API", '
                                         b'"type": "NotImplementedError", "code": 501}}'], status=501,
                                 content_type="application/json")
        status, body = raw_post(front, "/v1/completions", {"prompt": "x"})
        assert status == 501 and b"does not support" in body
        assert len(a.received) + len(b.received) == 1  # relayed, not retried
    finally:
        front.close()
        a.close()
        b.close()


def test_a_clients_kv_transfer_params_never_reach_an_engine() -> None:
    # they pin the prompt's blocks on the engine for the lease time (do_remote_decode) or make it read KV from an
    # address the client chose (do_remote_prefill): only the router sets them
    fake = FakeBackend()
    front = router("--backend", fake.url).start()
    try:
        status, _ = raw_post(front, "/v1/completions", {"prompt": "x", "max_tokens": 2, "kv_transfer_params": {
            "do_remote_prefill": True, "remote_host": "10.0.0.66", "remote_port": 5600}, "ec_transfer_params": {}})
        assert status == 200
        sent = json.loads(fake.received[-1])
        assert "kv_transfer_params" not in sent and "ec_transfer_params" not in sent and sent["prompt"] == "x"
    finally:
        front.close()
        fake.close()


def test_prefill_decode_through_a_storage_connector_and_batches_that_skip_it() -> None:
    # a prefill engine whose connector moves KV through storage (fuyao's shared tier, vLLM's ExampleConnector)
    # answers kv_transfer_params null: that is a prefill done, not a failure (every request was prefilled on every
    # prefill engine, their circuits opened, and fallback: error answered 502); a batch of prompts or n > 1 does not
    # go through P/D (vLLM answers the first prompt's params only: the others would decode with its KV)
    prefill, decode = FakeBackend(), FakeBackend()
    prefill.script = Script(chunks=[b'{"choices": [{"text": "a"}], "kv_transfer_params": null}'],
                            content_type="application/json")
    front = router("--prefill", prefill.url, "--decode", decode.url).start()
    try:
        for _ in range(6):
            assert raw_post(front, "/v1/completions", {"prompt": "one prompt", "max_tokens": 4})[0] == 200
        def completions(fake: FakeBackend) -> int:
            return fake.paths.count("/v1/completions")

        assert completions(prefill) == 6 and completions(decode) == 6
        assert "kv_transfer_params" not in json.loads(decode.received[-1])  # the plain request
        assert front.metric('inference_errors_total{reason="prefill-failed"}') == 0
        assert front.metric("inference_backend_circuit_open") == 0
        for batch in ({"prompt": ["first", "second"], "max_tokens": 4}, {"prompt": "x", "n": 2, "max_tokens": 4}):
            assert raw_post(front, "/v1/completions", batch)[0] == 200
        assert completions(prefill) == 6 and completions(decode) == 8  # straight to the decode engine
    finally:
        front.close()
        prefill.close()
        decode.close()


def test_an_error_event_in_a_stream_counts_against_the_engine_and_keep_alives_are_no_first_token() -> None:
    # vLLM reports a failure during generation as an error event in its 200 stream: it was counted a success;
    # vLLM's ": keep-alive" comments (--sse-keep-alive-interval) were taken for the first token (TTFT too early)
    fake = FakeBackend()
    fake.script = Script(chunks=[b": keep-alive\n\n", b'data: {"choices": [{"text": "a"}]}\n\n',
                                 b'data: {"error": {"message": "Internal server error", "type": '
                                 b'"InternalServerError", "param": null, "code": 500}}\n\n', b"data: [DONE]\n\n"],
                         first_delay_s=0.0, delay_s=0.3)
    front = router("--backend", fake.url).start()
    try:
        status, body = raw_post(front, "/v1/completions", {"prompt": "x", "stream": True})
        assert status == 200 and b"Internal server error" in body  # relayed as vLLM sent it
        assert front.metric('inference_errors_total{reason="engine-stream-error"}') == 1
        # the first token came after the keep-alive (0.3 s later), not with it
        assert front.metric("inference_ttft_seconds_sum") >= 0.25
    finally:
        front.close()
        fake.close()
