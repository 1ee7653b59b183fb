"""``fuyao-engine-sim`` as a real process: vLLM's OpenAI response shapes (from vLLM's protocol definitions),
streaming, prefix-cache hits and metrics, KV events over ZMQ decoded with plain msgpack, replay, a prefill/decode
pair, the shared tier through ``fuyao-kvcache``, fault injection, flag errors, SIGTERM."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from fuyao import tokenizer
from tests.support.engines import Daemon, engine, kvcache
from tests.support.polling import wait_for

PROMPT = "The history of computing is long and full of interesting people and machines. " * 8


@pytest.fixture(scope="module")
def sim() -> Iterator[Daemon]:
    daemon = engine("--model", "sim-7b", "--enable-fault-injection", events=True, replay=True).start()
    try:
        yield daemon
    finally:
        daemon.close()


def stream(daemon: Daemon, path: str, body: dict) -> list[object]:  # type: ignore[type-arg]
    request = urllib.request.Request(daemon.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    events: list[object] = []
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response.read().decode().split("\n\n"):
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_shape(sim: Daemon) -> None:
    status, body = sim.post("/v1/completions", {"model": "sim-7b", "prompt": PROMPT, "max_tokens": 7,
                                                "echo": False, "ignore_eos": True, "temperature": 0})
    assert status == 200
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "sim-7b"
    choice = body["choices"][0]
    assert set(choice) >= {"index", "text", "logprobs", "finish_reason", "stop_reason"}
    assert choice["finish_reason"] == "length" and len(tokenizer.encode(choice["text"])) == 7
    usage = body["usage"]
    prompt_tokens = len(tokenizer.encode(PROMPT, add_special_tokens=True))
    assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7,
                     "prompt_tokens_details": None, "completion_tokens_details": None}  # vLLM 0.32's UsageInfo
    again = sim.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 7})[1]
    assert again["choices"][0]["text"] == choice["text"]  # deterministic (seeded)
    batch = sim.post("/v1/completions", {"prompt": ["a b c", "d e f"], "max_tokens": 2})[1]
    assert [c["index"] for c in batch["choices"]] == [0, 1]


def test_chat_shape_and_streams(sim: Daemon) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    status, body = sim.post("/v1/chat/completions", {"model": "sim-7b", "messages": messages, "max_tokens": 4})
    assert status == 200 and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert "tool_calls" not in message  # vLLM 0.32's message leaves an empty tool_calls out
    chunks = stream(sim, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]"
    first, *tokens, usage = chunks[:-1]
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {  # type: ignore[index]
        "role": "assistant", "content": ""}
    assert len(tokens) == 4  # one chunk a token
    assert "".join(c["choices"][0]["delta"]["content"] for c in tokens) == message["content"]  # type: ignore[index]
    # as vLLM: the finish reason comes with the last token, not in a chunk of its own
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, None, "length"]  # type: ignore[index]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4  # type: ignore[index]
    # as vLLM: no "usage": null on the other chunks, no null fields in the usage (its exclude_unset/exclude_none)
    assert all("usage" not in c for c in chunks[:-2]) and None not in usage["usage"].values()  # type: ignore[union-attr,operator]
    continuous = stream(sim, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert [c["usage"]["completion_tokens"] for c in continuous[:3]] == [1, 2, 3]  # type: ignore[index]
    assert continuous[2]["choices"][0]["finish_reason"] == "length" and continuous[3]["choices"] == []  # type: ignore[index]
    status, error = sim.post("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}})
    assert status == 400 and error["error"]["param"] == "stream_options"
    completion = stream(sim, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "stream": True})
    assert completion[-1] == "[DONE]" and len(completion) == 4  # 3 tokens (the last one finishing), [DONE]
    assert [c["choices"][0]["finish_reason"] for c in completion[:-1]] == [None, None, "length"]  # type: ignore[index]
    assert all(c["choices"][0]["text"] for c in completion[:-1])  # type: ignore[index]  # no empty finishing chunk
    assert all("usage" not in c for c in completion[:-1])  # type: ignore[operator]


def test_models_tokenize_render_and_errors(sim: Daemon) -> None:
    models = json.loads(sim.get("/v1/models")[1])
    assert models["object"] == "list" and models["data"][0]["id"] == "sim-7b"
    assert models["data"][0]["max_model_len"] == 32768
    tokens = sim.post("/tokenize", {"model": "sim-7b", "prompt": "Hello world"})[1]
    assert tokens == {"count": 3, "max_model_len": 32768, "token_strs": None,
                      "tokens": tokenizer.encode("Hello world", add_special_tokens=True)}
    assert sim.post("/detokenize", {"tokens": tokens["tokens"]})[1] == {"prompt": "Hello world"}
    messages = [{"role": "user", "content": "Hi"}]
    assert sim.post("/v1/chat/completions/render", {"messages": messages})[1]["token_ids"] == \
        sim.post("/tokenize", {"messages": messages})[1]["tokens"]
    assert sim.post("/v1/completions/render", {"prompt": "Hello world"})[1]["token_ids"] == tokens["tokens"]
    status, error = sim.post("/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert status == 404 and error["error"]["type"] == "NotFoundError" and "gpt-4" in error["error"]["message"]
    status, error = sim.post("/v1/completions", {"prompt": 42})
    assert status == 400 and error["error"]["param"] == "prompt"
    # vLLM 0.32's length rules: max_tokens above the context length is refused; a prompt that leaves no room for one
    # output token is refused (over the context: as too long; filling it exactly: as max_tokens 0, which the
    # context leaves); else max_tokens is cut to what the context has left
    status, error = sim.post("/v1/completions", {"prompt": "x", "max_tokens": 40000})
    assert status == 400 and "max_model_len=32768" in error["error"]["message"]
    status, error = sim.post("/v1/completions", {"prompt": [1] * 32769, "max_tokens": 1})
    assert status == 400 and "maximum context length is 32768" in error["error"]["message"]
    assert error["error"]["param"] == "input_tokens"
    status, error = sim.post("/v1/completions", {"prompt": [1] * 32768, "max_tokens": 1})
    assert status == 400 and error["error"] == {
        "message": "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        "type": "BadRequestError", "param": "max_tokens", "code": 400}
    status, answer = sim.post("/v1/completions", {"prompt": [1] * 32760, "max_tokens": 100, "ignore_eos": True})
    assert status == 200 and answer["usage"]["completion_tokens"] == 8
    status, error = sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1, "min_tokens": 4})
    assert status == 400 and error["error"]["param"] is None  # vLLM names no parameter here
    assert error["error"]["message"] == "min_tokens must be less than or equal to max_tokens=1, got 4."
    status, raw = sim.request("POST", "/v1/completions", None)
    assert status == 400 and b"invalid JSON" in raw
    assert sim.get("/health")[0] == 200 and "fuyao-engine-sim" in sim.get("/version")[1]


def test_prefix_cache_hits_on_repeated_prompts(sim: Daemon) -> None:
    sim.request("POST", "/reset_prefix_cache")
    hits, queries = sim.metric("vllm:prefix_cache_hits_total"), sim.metric("vllm:prefix_cache_queries_total")
    prompt = PROMPT + " A fresh tail."
    sim.post("/v1/completions", {"prompt": prompt, "max_tokens": 2})
    sim.post("/v1/completions", {"prompt": prompt, "max_tokens": 2})
    length = len(tokenizer.encode(prompt, add_special_tokens=True))
    assert sim.metric("vllm:prefix_cache_queries_total") - queries == 2 * length
    assert sim.metric("vllm:prefix_cache_hits_total") - hits == (length - 1) // 16 * 16  # all full blocks, once
    text = sim.get("/metrics")[1]
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total"):
        assert f'{name}{{' in text and 'model_name="sim-7b"' in text
    assert 'vllm:cache_config_info{block_size="16",enable_prefix_caching="True",engine="0",num_gpu_blocks="4096"}' \
        in text


def test_kv_events_on_the_wire_and_replay(sim: Daemon) -> None:
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(sim.events)  # type: ignore[attr-defined]
    try:
        prompt = "Events travel over ZMQ in msgpack batches. " * 6
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        frames = None
        deadline = time.monotonic() + 10
        while frames is None and time.monotonic() < deadline:  # the slow joiner: resend until we see a batch
            sim.request("POST", "/reset_prefix_cache")
            sim.post("/v1/completions", {"prompt": prompt, "max_tokens": 1})
            while sub.poll(200):
                got = sub.recv_multipart()
                body = msgpack.unpackb(got[2], raw=False)
                if any(e.get("type") == "BlockStored" and e["token_ids"][:16] == ids[:16] for e in body[1]):
                    frames = got
                    break
        assert frames is not None
        topic, seq, payload = frames
        assert topic == b"" and len(seq) == 8  # vLLM's default topic
        ts, events, rank = msgpack.unpackb(payload, raw=False)  # vLLM's release envelope
        stored = next(e for e in events if e["type"] == "BlockStored")
        assert set(stored) == {"type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                               "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"}  # vLLM 0.32's
        assert stored["extra_keys"] == [None] * len(stored["block_hashes"]) and stored["group_idx"] == 0
        assert stored["block_size"] == 16 and stored["medium"] == "GPU" and rank == 0 and ts > 0
        assert len(stored["token_ids"]) == 16 * len(stored["block_hashes"])
        assert all(isinstance(h, int) and h >= 0 for h in stored["block_hashes"])
        # the replay socket answers as vLLM 0.32's does: ["", topic, seq, payload]... then ["", "", -1, ""]
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(sim.replay)  # type: ignore[attr-defined]
        dealer.send_multipart([b"", seq])
        replies = []
        while dealer.poll(2000):
            reply = dealer.recv_multipart()
            replies.append(reply)
            if int.from_bytes(reply[2], "big", signed=True) == -1:
                break
        dealer.close(linger=0)
        assert replies[0] == [b"", topic, seq, payload]
        assert replies[-1] == [b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
    finally:
        sub.close(linger=0)


def test_fault_injection(sim: Daemon) -> None:
    try:
        assert sim.post("/fault", {"error_count": 2, "error_status": 503})[0] == 200
        assert sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 503
        assert sim.get("/health")[0] == 503  # health fails too: what a router's checks see
        assert sim.post("/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 200
        sim.post("/fault", {"drop_count": 1})
        with pytest.raises((ConnectionError, urllib.error.URLError, http.client.HTTPException)):  # no answer
            urllib.request.urlopen(urllib.request.Request(sim.url + "/v1/completions", data=b'{"prompt":"x"}'),
                                   timeout=10)
        started = time.monotonic()
        sim.post("/v1/completions", {"prompt": "x", "max_tokens": 5})
        normal = time.monotonic() - started
        sim.post("/fault", {"slowdown": 20})
        started = time.monotonic()
        sim.post("/v1/completions", {"prompt": "x", "max_tokens": 5})
        assert time.monotonic() - started > 3 * normal
        assert sim.post("/fault", {"slowdown": -1})[0] == 400
    finally:
        sim.request("DELETE", "/fault")


def test_prefill_decode_pair() -> None:
    prefill = engine("--role", "prefill").start()
    decode = engine("--role", "decode").start()
    try:
        body = {"prompt": PROMPT, "max_tokens": 1, "kv_transfer_params": {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}}
        status, first = prefill.post("/v1/completions", body)
        params = first["kv_transfer_params"]
        assert status == 200 and first["usage"]["completion_tokens"] == 1
        assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
        assert params["remote_block_ids"] and params["remote_port"] == prefill.port and params["remote_engine_id"]
        status, second = decode.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 6,
                                                         "kv_transfer_params": params})
        assert status == 200 and second["usage"]["completion_tokens"] == 6
        prompt_tokens = second["usage"]["prompt_tokens"]
        # the decode side pulled all but the last prompt token instead of computing them
        assert decode.metric("fuyao_engine_kv_transfer_tokens_total") == prompt_tokens - 1
        assert decode.metric("vllm:prompt_tokens_total") == prompt_tokens
        wrong = decode.post("/v1/completions", body)
        assert wrong[0] == 400 and "--role decode" in wrong[1]["error"]["message"]
    finally:
        prefill.close()
        decode.close()


def test_shared_tier_between_engines() -> None:
    cache = kvcache().start()
    first = engine("--kv-remote", cache.url).start()
    second = engine("--kv-remote", cache.url).start()
    try:
        first.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
        blocks = (len(tokenizer.encode(PROMPT, add_special_tokens=True)) - 1) // 16
        deadline = time.monotonic() + 5
        while cache.metric("fuyao_kvcache_tier_blocks") < blocks and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cache.metric("fuyao_kvcache_tier_blocks") >= blocks
        second.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
        assert second.metric("fuyao_engine_kv_transfer_tokens_total") == blocks * 16  # fetched, not computed
        assert cache.metric('kv_cache_hits{layer="tier"}') == blocks
    finally:
        for daemon in (first, second, cache):
            daemon.close()


def test_engines_share_blocks_on_the_volume_and_the_manager_publishes_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``--kv-volume``: the simulator writes the files of fuyao's vLLM connector (same keys and format), a second
    engine loads a context the first computed instead of computing it (vLLM's external-hit counters and the
    connector's ``fuyao_kv_tier_*`` say so), the tier manager publishes the files to lookups, and a corrupt file
    only stops the load there (the rest is computed; nothing fails)."""
    tier = tmp_path / "tier"
    config = tmp_path / "kv.yaml"
    config.write_text(f"version: v1\nkvCache:\n  volume:\n    path: {tier}\n    interval: 200ms\n")
    cache = kvcache("--config", str(config)).start()
    first = engine("--kv-volume", str(tier)).start()
    second = engine("--kv-volume", str(tier)).start()
    third = engine("--kv-volume", str(tier)).start()
    try:
        ids = tokenizer.encode(PROMPT, add_special_tokens=True)
        blocks = (len(ids) - 1) // 16
        first.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
        wait_for(lambda: first.metric("fuyao_kv_tier_blocks_stored_total") >= blocks, 10, "the blocks stored")
        files = sorted(tier.rglob("*.kv"))
        assert len(files) >= blocks
        assert json.loads(next(tier.rglob("namespace.json")).read_text())["model"] == "fuyao-sim-7b"
        second.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
        assert second.metric("fuyao_kv_tier_blocks_loaded_total") == blocks
        assert second.metric("vllm:external_prefix_cache_hits_total") == blocks * 16
        assert second.metric("vllm:external_prefix_cache_queries_total") == len(ids)
        assert second.metric("fuyao_kv_tier_load_seconds_total") > 0  # the modelled transfer is counted
        assert second.metric("vllm:request_prefill_kv_computed_tokens_sum") == len(ids) - blocks * 16
        # the manager reads the files' headers and answers lookups with the volume's share of a prompt. It answers
        # from its last sweep, which may have run while the first engine's files were still arriving (one answer of
        # 6 of 7 blocks was seen in CI): the answer must come to the whole prompt, not just be non-zero.
        answers: list[int] = []

        def published() -> bool:
            answers.append(cache.post("/v1/lookup", {"prompt": PROMPT, "model": "fuyao-sim-7b"})[1]
                           .get("volume_blocks", 0))
            return answers[-1] == blocks

        wait_for(published, 10, "the volume's blocks published")
        assert answers == sorted(answers)  # a sweep never takes back a block still on the volume
        # a corrupt file in the middle of the chain: the third engine loads up to it and computes the rest
        from fuyao.kvcache.blockstore import BlockStore, Namespace, chain_keys

        ns = Namespace(model="fuyao-sim-7b", dtype="simulated", block_size=16, num_kv_heads=0, head_size=0,
                       num_layers=0, layout="fuyao-engine-sim")
        middle = BlockStore(tier, ns).path(chain_keys(ns, ids, blocks)[blocks // 2])
        middle.write_bytes(middle.read_bytes()[:-7] + b"garbage")
        status, _ = third.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
        assert status == 200
        assert third.metric("fuyao_kv_tier_blocks_loaded_total") == blocks // 2
        assert third.metric("fuyao_kv_tier_blocks_corrupt_total") == 1
        assert third.metric("vllm:external_prefix_cache_hits_total") == (blocks // 2) * 16
    finally:
        for daemon in (first, second, third, cache):
            daemon.close()


def test_flag_errors_and_sigterm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    profile = tmp_path / "profile.yaml"
    profile.write_text("step_base_ms: 5\nprefil_per_token_ms: 1\n")
    result = subprocess.run([sys.executable, "-m", "fuyao.engine_sim.cli", "--latency-profile", str(profile)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "prefil_per_token_ms" in result.stderr
    result = subprocess.run([sys.executable, "-m", "fuyao.engine_sim.cli", "--num-gpu-blocks", "0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--num-gpu-blocks" in result.stderr
    daemon = engine().start()
    code, seconds = daemon.stop()
    assert code == 0 and seconds < 3


def test_histograms_use_vllms_bucket_families_and_every_finish_reason_is_there_from_the_start(sim: Daemon) -> None:
    # a query on an `le` means on the simulator what it means on vLLM 0.32 (vllm/v1/metrics/buckets.py)
    page = sim.get("/metrics")[1]

    def bounds(name: str) -> list[str]:
        return [line.split('le="', 1)[1].split('"', 1)[0] for line in page.splitlines()
                if line.startswith(name + "_bucket{")]

    assert bounds("vllm:e2e_request_latency_seconds")[:3] == ["0.3", "0.5", "0.8"]  # request_latency family
    assert "7680.0" in bounds("vllm:request_prefill_time_seconds")
    assert "2560.0" in bounds("vllm:time_to_first_token_seconds")
    assert bounds("vllm:request_prefill_kv_computed_tokens")[:5] == ["1.0", "2.0", "5.0", "10.0", "20.0"]  # 1-2-5
    for reason in ("stop", "length", "abort", "error", "repetition"):
        assert f'finished_reason="{reason}"' in page
