"""fuyao's KV-index request router and engine replica against Ray 2.60's own types, without a cluster: the router
is driven as Serve's routing loop drives it (a ``PendingRequest`` per request, passes repeated while every replica
is full), in the Ray venv's python (marker ``ray``)."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.ray_local import REPO, ray_python

pytestmark = pytest.mark.ray

CASES = r'''
import asyncio, json, sys, time, types
from aiohttp import web
from ray.serve._private.request_router.common import PendingRequest
from fuyao.ray_serve.child import spawn
from fuyao.ray_serve.engine import EngineReplica
from fuyao.ray_serve.ranking import OpenAiRequest
from fuyao.ray_serve.request_router import KvIndexRequestRouter

out = {}
completion = OpenAiRequest("/v1/completions", {"prompt": "hello"})
chat = OpenAiRequest("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
# Serve's prefix router takes `messages` whenever hasattr finds it: a completion's must not exist
out["completion_attrs"] = [hasattr(completion, "prompt"), hasattr(completion, "messages")]
out["chat_attrs"] = [hasattr(chat, "prompt"), hasattr(chat, "messages")]

class Replica:
    def __init__(self, engine):
        self.replica_metadata = {"engine": engine}

def pending(request, rid):
    return PendingRequest(args=[request], kwargs={}, metadata=types.SimpleNamespace(internal_request_id=rid))

async def main():
    calls = []
    answers = {"value": {"blocks": 4, "endpoints": {"http://b": 4}}}

    async def lookup(request):
        calls.append(await request.json())
        if answers["value"] == "hang":
            await asyncio.sleep(30)
        return web.json_response(answers["value"])

    app = web.Application()
    app.router.add_post("/v1/lookup", lookup)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    router = object.__new__(KvIndexRequestRouter)
    router.initialize_state(kv_index_url=f"http://127.0.0.1:{port}")
    replicas = [Replica("http://a"), Replica("http://b")]
    request = pending(completion, "r1")
    first = await router.choose_replicas(replicas, request)
    again = await router.choose_replicas(replicas, request)  # Serve's next pass: every replica was full
    out["backoff"] = request.routing_context.should_backoff
    out["ranks"] = [[r.replica_metadata["engine"] for r in g] for g in first]
    out["same_again"] = [[r.replica_metadata["engine"] for r in g] for g in again] == out["ranks"]
    out["lookups_for_two_passes"] = len(calls)
    answers["value"] = ["not", "an", "object"]
    out["list_answer"] = len(await router.choose_replicas(replicas, pending(completion, "r2")))
    answers["value"] = {"blocks": 4, "endpoints": ["http://b"]}
    out["bad_endpoints"] = len(await router.choose_replicas(replicas, pending(completion, "r3")))
    out["outcomes"] = dict(router.outcomes)
    # a hung index: three lookups time out, then the router stops asking it and routes on load at once
    answers["value"] = "hang"
    hung = object.__new__(KvIndexRequestRouter)
    hung.initialize_state(kv_index_url=f"http://127.0.0.1:{port}", lookup_timeout=0.2, index_failure_threshold=3)
    started = time.monotonic()
    for i in range(3):
        await hung.choose_replicas(replicas, pending(completion, f"h{i}"))
    out["hung_failing_s"] = time.monotonic() - started
    started = time.monotonic()
    for i in range(20):
        ranks = await hung.choose_replicas(replicas, pending(completion, f"s{i}"))
    out["hung_skipping_s"] = time.monotonic() - started
    out["hung_ranks"] = len(ranks[0])
    out["hung_outcomes"] = hung.outcomes
    await hung._lookup.close()
    await router._lookup.close()
    await runner.cleanup()

asyncio.run(main())

exits = []
replica = object.__new__(EngineReplica)
replica.settings = types.SimpleNamespace(module="engine", stop_timeout=1.0)
replica.process = spawn([sys.executable, "-c", "import sys; sys.exit(3)"], {})
replica._stopping = False
replica._exit_with_engine(exits.append)
replica._stopping = True
replica._exit_with_engine(exits.append)  # stopped by the replica itself: no exit
out["exits"] = exits
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def results() -> dict:  # type: ignore[type-arg]
    import json

    proc = subprocess.run([ray_python(), "-c", CASES], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_serve_prefix_router_sees_only_the_field_a_request_carries(results: dict) -> None:  # type: ignore[type-arg]
    # hasattr(completion, "messages") was True with a None value: Serve's PrefixCacheAffinityRouter raised and the
    # request hung, never routed
    assert results["completion_attrs"] == [True, False] and results["chat_attrs"] == [False, True]


def test_passes_over_a_full_fleet_back_off_and_reuse_one_lookup(results: dict) -> None:  # type: ignore[type-arg]
    # without should_backoff Serve called choose_replicas again at once while every replica was full, and each
    # call asked the index again (counted again)
    assert results["backoff"] is True
    assert results["ranks"] == [["http://b"], ["http://a"]] and results["same_again"]
    assert results["lookups_for_two_passes"] == 1


def test_an_index_answer_of_the_wrong_shape_routes_on_load(results: dict) -> None:  # type: ignore[type-arg]
    # a list, or endpoints that are no object, raised out of choose_replicas: Serve drops such a request
    assert results["list_answer"] == 1 and results["bad_endpoints"] == 1
    assert results["outcomes"]["hit"] == 1 and results["outcomes"]["index_error"] == 1


def test_a_hung_index_stops_being_asked(results: dict) -> None:  # type: ignore[type-arg]
    # every request waited lookup_timeout for a hung index: with Serve's 2 x replicas routing tasks, that capped the
    # deployment's routing rate; after three failures the router routes on load without asking
    assert results["hung_failing_s"] >= 0.5 and results["hung_skipping_s"] < 0.5 and results["hung_ranks"] == 2
    assert results["hung_outcomes"]["index_error"] == 3 and results["hung_outcomes"]["index_skipped"] == 20


def test_the_replica_ends_with_its_engine(results: dict) -> None:  # type: ignore[type-arg]
    # a replica whose engine died answered every request with an error for ~30 s (three failed health checks),
    # looking the least loaded to Serve's routers
    assert results["exits"] == [1]
