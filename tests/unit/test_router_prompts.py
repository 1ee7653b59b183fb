"""fuyao.inference_router.prompts: a prompt's tokens come from the router's tokenizer, or from an engine's /tokenize
asked once per distinct prompt (the cache answers repeats without a round trip, keyed by everything that changes the
tokens); token-id prompts need neither; a failed tokenization routes on load alone and is not cached; block keys
follow kv_cache.block_hashing (vLLM's own hashes in vllm mode)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fuyao import tokenizer
from fuyao.config_files import ConfigError
from fuyao.inference_router.config import build_config
from fuyao.inference_router.prompts import Prompts
from fuyao.kvcache.keys import BlockHashing, ContentKeys, VllmKeys, block_keys
from fuyao.vllm_hashing import DEFAULT_SEED, VllmHasher, external


class FakeEngine:
    def __init__(self, answer: list[int] | None = None):
        self.calls: list[tuple[str, dict[str, Any], str | None]] = []
        self.answer = answer

    async def __call__(self, kind: str, payload: dict[str, Any], model: str | None) -> list[int] | None:
        self.calls.append((kind, payload, model))
        if self.answer is not None:
            return self.answer
        if kind == "chat":
            return tokenizer.encode(tokenizer.render_chat(payload["messages"]), add_special_tokens=False)
        return tokenizer.encode(payload["prompt"], payload.get("add_special_tokens", True))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_engine_tokenization_is_asked_once_per_distinct_prompt() -> None:
    prompts = Prompts("engine", ContentKeys(16), 16)
    engine = FakeEngine()
    body = {"model": "m", "prompt": "river " * 100, "max_tokens": 5}
    first = run(prompts.resolve("/v1/completions", body, engine))
    assert first.source == "engine" and engine.calls == [("completion", {"prompt": "river " * 100}, "m")]
    ids = tokenizer.encode("river " * 100, add_special_tokens=True)
    assert first.tokens == len(ids) and first.hashes == ContentKeys(16).chain(ids, limit=(len(ids) - 1) // 16)
    again = run(prompts.resolve("/v1/completions", {**body, "max_tokens": 99, "temperature": 0.5}, engine))
    assert again.source == "cache" and again.hashes == first.hashes and len(engine.calls) == 1
    # what changes the tokens changes the key: the flag, the model, the text
    run(prompts.resolve("/v1/completions", {**body, "add_special_tokens": False}, engine))
    run(prompts.resolve("/v1/completions", {**body, "model": "other"}, engine))
    run(prompts.resolve("/v1/completions", {**body, "prompt": "delta " * 100}, engine))
    assert len(engine.calls) == 4 and engine.calls[1][1] == {"prompt": "river " * 100, "add_special_tokens": False}

    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    got = run(prompts.resolve("/v1/chat/completions", chat, engine))
    assert engine.calls[-1] == ("chat", {"messages": chat["messages"]}, None) and got.source == "engine"
    assert run(prompts.resolve("/v1/chat/completions", chat, engine)).source == "cache"
    run(prompts.resolve("/v1/chat/completions", {**chat, "add_generation_prompt": False}, engine))
    assert engine.calls[-1][1] == {"messages": chat["messages"], "add_generation_prompt": False}


def test_failures_ids_and_unreadable_prompts() -> None:
    prompts = Prompts(None, ContentKeys(16), 16)
    refusing = FakeEngine()
    refusing.answer = None

    async def down(kind: str, payload: dict[str, Any], model: str | None) -> None:
        return None

    body = {"prompt": "flood " * 50}
    assert run(prompts.resolve("/v1/completions", body, down)).source == "failed"
    assert len(prompts) == 0  # a failure is not cached: the next request asks again
    assert run(prompts.resolve("/v1/completions", body, refusing)).source == "engine"
    ids = list(range(3, 70))
    got = run(prompts.resolve("/v1/completions", {"prompt": ids}, down))
    assert got.source == "ids" and got.tokens == 67 and got.hashes == ContentKeys(16).chain(ids, limit=4)
    assert run(prompts.resolve("/v1/completions", {"prompt": 5}, down)) is None
    assert run(prompts.resolve("/v1/chat/completions", {"messages": "hi"}, down)) is None
    assert run(prompts.resolve("/v1/completions", {"prompt": ["a b c", "d"]}, refusing)).tokens == \
        len(tokenizer.encode("a b c", add_special_tokens=True))


def test_local_tokenizer_needs_no_engine_and_long_prompts_leave_the_loop() -> None:
    prompts = Prompts("builtin", ContentKeys(16), 16)
    text = "estuary " * 20_000  # longer than OFF_LOOP_CHARS: tokenized in a worker thread
    got = run(prompts.resolve("/v1/completions", {"prompt": text}, None))
    assert got.source == "local" and got.tokens == len(tokenizer.encode(text, add_special_tokens=True))
    chat = run(prompts.resolve("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, None))
    assert chat.tokens == len(tokenizer.encode("<|user|>\nHi\n<|assistant|>\n", add_special_tokens=False))
    refused = run(prompts.resolve("/v1/chat/completions", {"messages": [{"role": "nobody", "content": 3}]}, None))
    assert refused.source == "failed"


def test_vllm_keys_are_vllms_own_hashes() -> None:
    ids = list(range(1000, 1100))
    keys = block_keys(32, 0, BlockHashing(mode="vllm", algo="sha256"))
    assert isinstance(keys, VllmKeys) and keys.exact
    expected = [external(h) for h in VllmHasher("sha256", DEFAULT_SEED).block_hashes(ids, 32)]
    assert keys.chain(ids) == expected and len(expected) == 3
    salted = block_keys(32, 0, BlockHashing(mode="vllm", algo="xxhash_cbor", seed="42"))
    assert salted.chain(ids) == [external(h) for h in VllmHasher("xxhash_cbor", "42").block_hashes(ids, 32)]
    assert isinstance(block_keys(32, 5), ContentKeys) and not block_keys(32).exact
    with pytest.raises(ValueError, match="random seed per process"):
        BlockHashing(mode="vllm", algo="xxhash")
    with pytest.raises(ConfigError, match=r"kvCache\.blockHashing\.algo"):
        build_config({"kvCache": {"blockHashing": {"mode": "vllm", "algo": "md5"}}})
    config = build_config({"kvCache": {"blockHashing": {"mode": "vllm", "algo": "sha256_cbor"}}})
    assert config.kv_cache.block_hashing.algo == "sha256_cbor" and config.kv_cache.tokenizer == "engine"
