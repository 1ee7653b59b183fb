"""The router's reading of vLLM 0.32's API, as pure functions: what an engine's answer means (``retry.verdict``),
which prompt blocks vLLM keeps apart (``prompts.prompt_keys``: LoRA adapters, ``cache_salt``), and what vLLM accepts
at its door (``admission``: ``prompt_embeds``)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from fuyao.inference_router import admission
from fuyao.inference_router.config import build_config
from fuyao.inference_router.fleet import PrefixSource
from fuyao.inference_router.prompts import prompt_keys
from fuyao.inference_router.retry import Verdict, verdict
from fuyao.kv_blocks import block_hashes


def error(message: str, kind: str, code: int) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


@pytest.mark.parametrize(("status", "body", "expected"), [
    # vLLM's _check_model: another engine may serve it
    (404, error("The model `m` does not exist. Valid aliases: base.", "NotFoundError", 404), Verdict.NOT_SERVED),
    (404, error("The model `lora-x` does not exist.", "NotFoundError", 404), Verdict.NOT_SERVED),
    (404, error("Not Found", "NotFoundError", 404), Verdict.OTHER),  # no model named: relayed
    (404, b"<html>not found</html>", Verdict.OTHER),
    (503, error("queue full", "Service Unavailable", 503), Verdict.BUSY),  # GracefulHTTPError
    (503, error("engine dead", "ServiceUnavailableError", 503), Verdict.FAILED),
    (500, error("Internal server error", "InternalServerError", 500), Verdict.FAILED),  # GenerationError
    (502, b"", Verdict.FAILED),
    (501, error("no Completions API", "NotImplementedError", 501), Verdict.REFUSED),
    (400, error("bad", "BadRequestError", 400), Verdict.REFUSED),
    (422, b"", Verdict.REFUSED),
    (401, error("Unauthorized", "AuthenticationError", 401), Verdict.OTHER),
    (429, b"", Verdict.OTHER),
])
def test_what_an_engines_answer_means(status: int, body: bytes, expected: Verdict) -> None:
    found = verdict(status, body)
    assert found is expected
    assert found.retried == (expected in (Verdict.FAILED, Verdict.BUSY, Verdict.NOT_SERVED))
    assert found.blames == (expected is Verdict.FAILED)  # only a failure counts against the engine's circuit


def test_adapters_and_cache_salts_keep_their_blocks_apart_as_vllm_does() -> None:
    tokens = list(range(64))
    plain = block_hashes(tokens, 16, 0)
    longer = block_hashes(tokens + list(range(100, 116)), 16, 0)
    adapters = frozenset({"tenant-a", "tenant-b"})
    assert prompt_keys(plain, {"model": "base", "prompt": "x"}, adapters) is plain  # a plain request: as it is
    spaces = [prompt_keys(plain, body, adapters) for body in (
        {"model": "base"}, {"model": "tenant-a"}, {"model": "tenant-b"}, {"cache_salt": "s1"}, {"cache_salt": "s2"},
        {"model": "tenant-a", "cache_salt": "s1"})]
    for i, keys in enumerate(spaces):  # no key shared between two spaces
        assert len(keys) == len(plain)
        for other in spaces[i + 1:]:
            assert not set(keys) & set(other)
    # a space keeps the chain's prefixes: a longer prompt of the same tenant shares the shorter one's blocks
    salted = prompt_keys(longer, {"cache_salt": "s1"}, adapters)
    assert salted[:len(plain)] == spaces[3]
    assert prompt_keys(plain, {"prompt_embeds": "AAAA"}, adapters) == []  # the tokens do not name those blocks

    # the router's record: one tenant's prefix is not another's
    source = PrefixSource(build_config().kv_cache)
    source.routed("http://a", spaces[3])
    assert asyncio.run(source.matches(spaces[4])) == {}
    assert asyncio.run(source.matches(plain)) == {}
    assert asyncio.run(source.matches(salted)) == {"http://a": len(plain)}


def test_prompt_embeds_stand_for_a_prompt_and_several_are_several_sequences() -> None:
    admission.check("/v1/completions", {"prompt_embeds": "AAAA"})
    admission.check("/v1/completions", {"prompt": "", "prompt_embeds": ["AAAA"]})
    with pytest.raises(admission.BadRequest):
        admission.check("/v1/completions", {"prompt_embeds": []})  # neither: vLLM refuses it too
    with pytest.raises(admission.BadRequest):
        admission.check("/v1/completions", {"prompt": 5, "prompt_embeds": "AAAA"})
    assert admission.one_sequence({"prompt_embeds": ["AAAA"]})
    assert not admission.one_sequence({"prompt_embeds": ["AAAA", "BBBB"]})  # P/D carries one prompt's KV only
    assert not admission.one_sequence({"prompt": "", "prompt_embeds": "AAAA"})  # vLLM runs both: two sequences
