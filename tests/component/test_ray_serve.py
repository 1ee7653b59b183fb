"""fuyao's Ray Serve application on a local Ray (``ray start --head --resources '{"NPU": 2}'``, from the venv
hack/build-ray.sh makes): two engine replicas, each on its own NPU slot with its own engine simulator; fuyao's KV
index fed by the engines' KV events; the ``kv-index`` request router sending a prompt to the replica whose engine
holds its prefix; the OpenAI API through Serve's HTTP proxy; routing that survives the index going away."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.apiserver import free_port
from tests.support.engines import Daemon, kvcache, scrape
from tests.support.polling import wait_for
from tests.support.ray_local import LocalRay

pytestmark = pytest.mark.ray

MODEL = "fuyao-sim"
WORDS = ("river", "flood", "basin", "rainfall", "gauge", "levee", "delta", "channel", "sediment", "estuary", "aquifer",
         "runoff")


@pytest.fixture(scope="module")
def ports() -> tuple[int, int]:
    return free_port(2), free_port(2)


@pytest.fixture(scope="module")
def index(ports: tuple[int, int]) -> Iterator[Daemon]:
    http, events = ports
    follow = [a for slot in range(2)
              for a in ("--kv-events", f"http://127.0.0.1:{http + slot}=tcp://127.0.0.1:{events + slot}")]
    daemon = kvcache(*follow).start()
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture(scope="module")
def serve_app(ports: tuple[int, int], index: Daemon) -> Iterator[LocalRay]:
    http, events = ports
    ray = LocalRay(npus=2).start()
    try:
        ray.deploy({
            "replicas": 2, "npusPerReplica": 1,
            "engine": {"host": "127.0.0.1", "port": http, "kv_events_port": events, "model": MODEL,
                       "args": ["--host", "{host}", "--port", "{port}", "--model", "{model}",
                                "--kv-events-endpoint", "tcp://*:{kv_events_port}", "--time-scale", "20",
                                "--num-gpu-blocks", "4000"]},
            "router": {"policy": "kv-index", "kvIndexUrl": index.url}})
        yield ray
    finally:
        ray.stop()


def post(url: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def requests_per_engine(ports: tuple[int, int]) -> list[float]:
    return [scrape(f"http://127.0.0.1:{ports[0] + slot}", "vllm:request_success_total") for slot in range(2)]


def context(seed: int, words: int = 600) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] + str(i % 13) for i in range(words))


def test_each_replica_runs_one_engine_on_its_own_npu_slot(serve_app: LocalRay, ports: tuple[int, int]) -> None:
    # Ray gave the replicas NPU slots 0 and 1: their engines listen on port + slot
    for slot in range(2):
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0] + slot}/health", timeout=10) as response:
            assert response.status == 200
    out = serve_app.run(
        "import json, ray\nfrom ray import serve\nray.init(address='auto', logging_level='WARNING')\n"
        "h = serve.get_deployment_handle('engine', app_name='llm')\n"
        "print(json.dumps(sorted(h.engine_url.remote().result() for _ in range(12))))\n")
    urls = set(json.loads(out.strip().splitlines()[-1]))
    assert urls <= {f"http://127.0.0.1:{ports[0] + s}" for s in range(2)}


def test_the_openai_api_answers_through_serve(serve_app: LocalRay) -> None:
    status, body = post(f"{serve_app.http_url}/v1/completions",
                        {"model": MODEL, "prompt": "hello there", "max_tokens": 4})
    assert status == 200 and body["choices"][0]["text"]
    status, body = post(f"{serve_app.http_url}/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert status == 200 and body["choices"][0]["message"]["content"]
    with urllib.request.urlopen(f"{serve_app.http_url}/v1/models", timeout=10) as response:
        assert json.loads(response.read())["data"][0]["id"] == MODEL
    # streamed: server-sent events ending with [DONE]
    request = urllib.request.Request(f"{serve_app.http_url}/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "stream me", "max_tokens": 5, "stream": True}).encode(),
        {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    assert text.count("data: ") >= 5 and text.rstrip().endswith("data: [DONE]")
    # a streamed request the engine refuses: the engine's status and error answer, not a 200 stream
    status, body = post(f"{serve_app.http_url}/v1/completions",
                        {"model": "no-such-model", "prompt": "x", "max_tokens": 2, "stream": True})
    assert status == 404 and "no-such-model" in body["error"]["message"]
    # a client's mistake is a 4xx naming it
    request = urllib.request.Request(f"{serve_app.http_url}/v1/completions", b"{not json",
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400 and b"not JSON" in err.value.read()


def test_a_shared_prefix_follows_the_replica_that_holds_it(serve_app: LocalRay, ports: tuple[int, int],
                                                           index: Daemon) -> None:
    for group in range(3):
        prefix = context(group)
        before = requests_per_engine(ports)
        status, _ = post(f"{serve_app.http_url}/v1/completions",
                         {"model": MODEL, "prompt": prefix + " first question", "max_tokens": 2})
        assert status == 200
        after = requests_per_engine(ports)
        holder = next(i for i in range(2) if after[i] > before[i])
        # the holder's KV events reach the index: it now names that engine for this prefix
        name = f"http://127.0.0.1:{ports[0] + holder}"
        wait_for(lambda p=prefix, n=name: (index.post("/v1/lookup", {"prompt": p, "model": MODEL})[1]["endpoints"]
                                           .get(n, 0) > 10), 20,
                 "the index to learn the holder's blocks")
        before = requests_per_engine(ports)
        for question in range(6):
            status, _ = post(f"{serve_app.http_url}/v1/completions",
                             {"model": MODEL, "prompt": f"{prefix} question {question}", "max_tokens": 2})
            assert status == 200
        after = requests_per_engine(ports)
        # every follow-up went to the engine holding the prefix (Serve's default would spread them)
        assert after[holder] - before[holder] == 6 and after[1 - holder] == before[1 - holder]


def test_requests_still_route_when_the_index_is_gone(serve_app: LocalRay, index: Daemon) -> None:
    index.close()
    for i in range(4):
        status, body = post(f"{serve_app.http_url}/v1/completions",
                            {"model": MODEL, "prompt": context(9) + f" q{i}", "max_tokens": 2})
        assert status == 200 and body["choices"][0]["text"]
