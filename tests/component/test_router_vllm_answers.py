"""``fuyao-router`` against answers of vLLM 0.32's OpenAI server it must read as vLLM means them: a 404 for a model
one engine does not serve (tried on another), request ids (``X-Request-Id``, as vLLM takes and echoes it), a decode
whose KV load failed (vLLM's 500 under ``kv_load_failure_policy: fail``), and the requests vLLM accepts that the
router refused (an empty ``model``, ``prompt_embeds``)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from fuyao.inference_router.config import build_config
from fuyao.inference_router.fleet import Backend, Fleet
from tests.support.engines import Daemon, router
from tests.support.fake_backend import FakeBackend, Script

NOT_SERVED = Script(chunks=[b'{"error": {"message": "The model `m` does not exist. Valid aliases: other.", '
                            b'"type": "NotFoundError", "param": "model", "code": 404}}'],
                    status=404, content_type="application/json")
OK = Script(chunks=[b'{"choices": [{"text": "ok"}]}'], content_type="application/json")


def post(daemon: Daemon, path: str, body: dict, headers: dict[str, str] | None = None  # type: ignore[type-arg]
         ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json",
                                                                     **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def request_id(fake: FakeBackend) -> str | None:
    """The X-Request-Id of the last generation request ``fake`` received."""
    headers = [h for p, h in zip(fake.paths, fake.headers, strict=True) if p.startswith("/v1/c")][-1]
    return next((v for k, v in headers.items() if k.lower() == "x-request-id"), None)


def wait_for_models(front: Daemon, *fakes: FakeBackend) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        listed = json.loads(front.get("/debug/backends")[1])
        if all(listed[f.url]["models"] for f in fakes):
            return
        time.sleep(0.1)
    raise AssertionError("the router never read the backends' models")


def test_a_404_for_a_model_one_engine_does_not_serve_is_tried_on_another_and_refreshes_the_map() -> None:
    # a mixed fleet whose model map went stale (engine a was re-pointed at another model): vLLM's 404 from a was
    # relayed, though b serves the model
    a, b = FakeBackend(), FakeBackend()
    a.models = b.models = ["m"]
    b.script = OK
    front = router("--backend", a.url, "--backend", b.url, "--strategy", "round-robin").start()
    try:
        wait_for_models(front, a, b)
        a.models, a.script = ["other"], NOT_SERVED
        listed_before = a.paths.count("/v1/models")
        for _ in range(8):  # round-robin: a is asked first about every other request until the map is read again
            status, _, body = post(front, "/v1/completions", {"model": "m", "prompt": "x"})
            assert status == 200 and b"ok" in body
        assert 1 <= a.paths.count("/v1/completions") <= 4
        assert front.metric("inference_backend_circuit_open") == 0  # not a failure of a
        assert a.paths.count("/v1/models") > listed_before  # the router read the models again
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and json.loads(front.get("/debug/backends")[1])[a.url]["models"] != [
                "other"]:
            time.sleep(0.1)
        asked = a.paths.count("/v1/completions")
        for _ in range(4):
            assert post(front, "/v1/completions", {"model": "m", "prompt": "x"})[0] == 200
        assert a.paths.count("/v1/completions") == asked  # a is no longer asked for m
        # another 404 (no model named) is relayed as it is, like any answer about the request
        for fake in (a, b):
            fake.script = Script(chunks=[b'{"error": {"message": "Not Found", "type": "NotFoundError"}}'],
                                 status=404, content_type="application/json")
        before = a.paths.count("/v1/completions") + b.paths.count("/v1/completions")
        status, _, body = post(front, "/v1/completions", {"prompt": "x"})
        assert status == 404 and b"Not Found" in body
        assert a.paths.count("/v1/completions") + b.paths.count("/v1/completions") == before + 1  # one engine, once
    finally:
        front.close()
        a.close()
        b.close()


def test_request_ids_are_the_clients_or_the_routers_and_one_fresh_id_names_both_prefill_decode_legs() -> None:
    fake = FakeBackend()
    fake.script = OK
    front = router("--backend", fake.url).start()
    try:
        status, headers, _ = post(front, "/v1/completions", {"prompt": "x"}, {"X-Request-Id": "client-7"})
        assert status == 200 and headers["x-request-id"] == "client-7"
        assert request_id(fake) == "client-7"  # vLLM names the request after it
        status, headers, _ = post(front, "/v1/completions", {"prompt": "x"})
        made = headers["x-request-id"]
        assert status == 200 and len(made) >= 16 and request_id(fake) == made
        assert post(front, "/v1/completions", {"prompt": "x"})[1]["x-request-id"] != made  # one per request
        # an empty one is none: the engine gets the id the client and the router's logs get (vLLM took "")
        status, headers, _ = post(front, "/v1/completions", {"prompt": "x"}, {"X-Request-Id": ""})
        assert status == 200 and headers["x-request-id"] and request_id(fake) == headers["x-request-id"]
        # the router's own answers carry it too
        status, headers, _ = post(front, "/v1/completions", {"prompt": 5}, {"X-Request-Id": "bad-1"})
        assert status == 400 and headers["x-request-id"] == "bad-1"
    finally:
        front.close()
        fake.close()
    prefill, decode = FakeBackend(), FakeBackend()
    prefill.script = Script(chunks=[b'{"choices": [{"text": "a"}], "kv_transfer_params": {"remote_engine_id": "p", '
                                    b'"remote_block_ids": [1]}}'], content_type="application/json")
    decode.script = OK
    front = router("--prefill", prefill.url, "--decode", decode.url).start()
    try:
        for given in ({"X-Request-Id": "client-8"}, {}):
            status, headers, _ = post(front, "/v1/completions", {"prompt": "x", "max_tokens": 3}, given)
            legs = request_id(prefill), request_id(decode)
            assert status == 200 and legs[0] == legs[1]  # vLLM's P/D proxies send both legs one id
            assert headers["x-request-id"] == given.get("X-Request-Id", legs[0])
            assert legs[0] != "client-8"  # fresh: a connector pairs the legs by it, a client's could collide
    finally:
        front.close()
        prefill.close()
        decode.close()


def test_a_decode_that_fails_is_retried_on_another_decode_engine_as_the_plain_request() -> None:
    # vLLM's kv_load_failure_policy "fail" (its default) answers a decode whose KV load failed with a 500: the
    # retry carried the same kv_transfer_params, naming blocks that may be gone
    prefill, failing, working = FakeBackend(), FakeBackend(), FakeBackend()
    prefill.script = Script(chunks=[b'{"choices": [{"text": "a"}], "kv_transfer_params": {"remote_engine_id": "p", '
                                    b'"remote_block_ids": [1]}}'], content_type="application/json")
    failing.script = Script(chunks=[b'{"error": {"message": "Internal server error", "type": '
                                    b'"InternalServerError", "param": null, "code": 500}}'], status=500,
                            content_type="application/json")
    working.script = OK
    front = router("--prefill", prefill.url, "--decode", failing.url, "--decode", working.url).start()
    try:
        for _ in range(4):  # decode ties go in turn: the failing engine is asked first about every other request
            status, _, body = post(front, "/v1/completions", {"prompt": "x", "max_tokens": 3})
            assert status == 200 and b"ok" in body
        assert failing.received and all("kv_transfer_params" in json.loads(r) for r in failing.received)
        sent = [json.loads(r) for r in working.received]
        plain = [r for r in sent if "kv_transfer_params" not in r]
        assert len(plain) == len(failing.received)  # each retry: the plain request
        assert all(r["prompt"] == "x" and r["max_tokens"] == 3 for r in sent)
    finally:
        front.close()
        prefill.close()
        failing.close()
        working.close()


def test_a_decode_engine_that_breaks_off_before_answering_is_retried_without_the_prefills_kv() -> None:
    # an engine that took the request and then broke off may have read the prefill's blocks already, and the prefill
    # engine frees them once read (NIXL's pull): the retry carried the same kv_transfer_params to another engine,
    # which would read freed blocks without an error
    prefill, breaking, working = FakeBackend(), FakeBackend(), FakeBackend()
    prefill.script = Script(chunks=[b'{"choices": [{"text": "a"}], "kv_transfer_params": {"remote_engine_id": "p", '
                                    b'"remote_block_ids": [1]}}'], content_type="application/json")
    breaking.script = Script(chunks=[b"data: {}\n\n"], break_after=0)
    working.script = OK
    front = router("--prefill", prefill.url, "--decode", breaking.url, "--decode", working.url).start()
    try:
        for _ in range(4):
            assert post(front, "/v1/completions", {"prompt": "x", "max_tokens": 3})[0] == 200
        assert breaking.received and all("kv_transfer_params" in json.loads(r) for r in breaking.received)
        sent = [json.loads(r) for r in working.received]
        assert sum("kv_transfer_params" not in r for r in sent) == len(breaking.received)  # each retry: plain
    finally:
        front.close()
        prefill.close()
        breaking.close()
        working.close()


def test_a_decode_refused_as_busy_is_retried_with_the_prefills_kv() -> None:
    # vLLM's 503 (queue full) comes before the engine touched the KV: the retry keeps kv_transfer_params (the plain
    # request would recompute the whole prompt on a saturated decode pool and waste the prefill)
    prefill, busy, working = FakeBackend(), FakeBackend(), FakeBackend()
    prefill.script = Script(chunks=[b'{"choices": [{"text": "a"}], "kv_transfer_params": {"remote_engine_id": "p", '
                                    b'"remote_block_ids": [1]}}'], content_type="application/json")
    busy.script = Script(chunks=[b'{"error": {"message": "queue full", "type": "Service Unavailable", "param": null, '
                                 b'"code": 503}}'], status=503, content_type="application/json")
    working.script = OK
    front = router("--prefill", prefill.url, "--decode", busy.url, "--decode", working.url).start()
    try:
        for _ in range(4):
            assert post(front, "/v1/completions", {"prompt": "x", "max_tokens": 3})[0] == 200
        assert busy.received
        assert all("kv_transfer_params" in json.loads(r) for r in working.received)
    finally:
        front.close()
        prefill.close()
        busy.close()
        working.close()


def test_an_empty_model_and_prompt_embeds_reach_the_engine_as_vllm_takes_them() -> None:
    # vLLM serves its base model for an empty model (_is_model_supported) and takes prompt_embeds without a prompt;
    # the router answered 404 and 400
    fake = FakeBackend()
    fake.models = ["m"]
    fake.script = OK
    front = router("--backend", fake.url).start()
    try:
        wait_for_models(front, fake)
        assert post(front, "/v1/completions", {"model": "", "prompt": "x"})[0] == 200
        status, _, _ = post(front, "/v1/completions", {"model": "m", "prompt_embeds": "AAAA"})
        assert status == 200 and json.loads(fake.received[-1])["prompt_embeds"] == "AAAA"
        assert post(front, "/v1/completions", {"model": "m", "prompt": "", "prompt_embeds": ["AAAA"]})[0] == 200
        assert post(front, "/v1/completions", {"model": "m"})[0] == 400  # neither: still refused at the door
    finally:
        front.close()
        fake.close()


async def _fleet_of_one(models: Callable[[web.Request], Awaitable[web.Response]]) -> tuple[web.AppRunner, Fleet]:
    """A fleet of one engine whose ``/v1/models`` is ``models`` (an aiohttp stand-in on a loopback port)."""
    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fleet = Fleet(build_config().router)
    fleet.backends[f"http://127.0.0.1:{port}"] = Backend(f"http://127.0.0.1:{port}")
    return runner, fleet


def test_the_fleet_knows_which_models_are_lora_adapters() -> None:
    # vLLM's /v1/models lists an adapter with its base model as parent
    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "base", "object": "model", "root": "/models/base", "parent": None},
            {"id": "tenant-a", "object": "model", "root": "/loras/a", "parent": "base"}]})

    async def scenario() -> frozenset[str]:
        runner, fleet = await _fleet_of_one(models)
        try:
            async with aiohttp.ClientSession() as session:
                await fleet.refresh_models(session)
        finally:
            await runner.cleanup()
        return fleet.adapters

    assert asyncio.run(scenario()) == {"tenant-a"}


def test_closing_stops_a_models_read_still_running() -> None:
    # the requests waiting on a models read wait on it shielded: cancelling them left the read running against a
    # session about to close ("Session is closed", an exception nobody retrieved)
    async def models(_request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({"object": "list", "data": []})

    async def scenario() -> tuple[bool, bool]:
        runner, fleet = await _fleet_of_one(models)
        try:
            async with aiohttp.ClientSession() as session:
                waiting = asyncio.ensure_future(fleet.refresh_models(session))
                await asyncio.sleep(0.2)
                running = fleet._refreshing
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
                still = running is not None and not running.done()  # what close() met before
                await asyncio.wait_for(fleet.stop_refreshing(), 5)
                return still, running is not None and running.done()  # ended now, not in 30 s
        finally:
            await runner.cleanup()

    assert asyncio.run(scenario()) == (True, True)
