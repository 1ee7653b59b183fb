"""A request's prompt as the engines will cache it: its token ids, from the served model's own tokenizer, then its
blocks' keys (``fuyao.kvcache.keys``). A bounded cache keyed by what decides the tokens (the model, the prompt or the
messages and the flags that change their rendering) makes a prompt seen before cost one dictionary lookup, with
no tokenizing and no round trip.

Where the token ids come from (``kv_cache.tokenizer``):

- ``engine`` (the default): an engine's own ``POST /tokenize``, with ``prompt`` for completions and ``messages``
  (plus the request's template flags) for chat, so the tokenizer and chat template are exactly the engine's,
  whatever the model, with no files in the router. A prompt not seen before costs one round trip to a healthy
  engine serving the request's model (the least busy one; about a millisecond on a LAN); if no engine answers in
  ``tokenize_timeout``, the request is routed on load alone and nothing is cached.
- a model directory or ``tokenizer.json``: tokenized in the router (``fuyao.tokenization``; a long prompt off the
  event loop), no round trip ever;
- ``builtin``: fuyao's builtin tokenizer (the engine simulator's default).

Prompts given as token ids are used as they are.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import xxhash

from fuyao import tokenization
from fuyao.kv_blocks import in_space, key_space
from fuyao.kvcache.keys import BlockKeys

Source = Literal["ids", "cache", "local", "engine", "failed"]
"""How a prompt's ids were found: given as ids, cached, tokenized in the router, asked of an engine, or not at all."""

CHAT_FIELDS = ("messages", "add_generation_prompt", "continue_final_message", "add_special_tokens", "chat_template",
               "chat_template_kwargs", "tools")
"""The chat request fields that decide its prompt tokens (vLLM's ``TokenizeChatRequest`` takes the same)."""
OFF_LOOP_CHARS = 64 * 1024
"""Longer texts are tokenized in a worker thread (the event loop keeps serving other requests)."""

EngineTokenize = Callable[[str, dict[str, Any], "str | None"], Awaitable["list[int] | None"]]
"""``(kind, payload, model)`` → the engine's token ids, or None (no engine answered); ``kind``: chat or completion."""


def prompt_keys(hashes: list[int], body: Mapping[str, Any], adapters: Collection[str]) -> list[int]:
    """The keys of a request's prompt blocks as the engines keep them apart: vLLM's block hash covers more than the
    tokens (0.32 ``generate_block_hash_extra_keys``: the LoRA adapter on every block, the request's ``cache_salt``
    on the first one and so on the whole chain, prompt embeddings), so the same tokens under another adapter or
    salt never share blocks there and must not in the router's record either. ``hashes`` (the plain chain) is
    returned as it is for a plain request; moved into a space of its own (each key xor a hash of the adapter and
    the salt, which keeps the chain's prefixes) for an adapter's (``model`` in ``adapters``) or a salted one; and
    dropped for ``prompt_embeds`` (the tokens do not name those blocks)."""
    salt = body.get("cache_salt")
    model = body.get("model")
    adapter = model if model in adapters else None
    if not hashes or (not salt and adapter is None and "prompt_embeds" not in body):
        return hashes
    if "prompt_embeds" in body:
        return []
    return in_space(hashes, key_space(adapter, salt if salt is None or isinstance(salt, str) else str(salt)))


@dataclass(frozen=True)
class Prompt:
    tokens: int
    hashes: list[int]
    source: Source


class Prompts:
    def __init__(self, tokenizer: str | None, keys: BlockKeys, block_size: int, cache_entries: int = 8192):
        self.mode = "engine" if tokenizer in (None, "engine") else "local"
        self.local = tokenization.load(tokenizer) if self.mode == "local" else None
        self.keys = keys
        self.block_size = block_size
        self.cache_entries = cache_entries
        self._cache: OrderedDict[bytes, Prompt] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    async def resolve(self, path: str, body: Mapping[str, Any], engine: EngineTokenize | None = None) -> Prompt | None:
        """The prompt's tokens and block keys; None when the body has no prompt this can read (the engine will
        answer it as it sees fit)."""
        request = _tokenize_request(path, body)
        if request is None:
            return None
        kind, payload = request
        if kind == "ids":
            return self._prompt(payload["prompt"], "ids")
        model = body.get("model") if isinstance(body.get("model"), str) else None
        key = xxhash.xxh3_128_digest(orjson.dumps([kind, model, payload], option=orjson.OPT_SORT_KEYS))
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return Prompt(found.tokens, found.hashes, "cache")
        if self.local is not None:
            ids = await self._local(kind, payload)
            source: Source = "local"
        elif engine is not None:
            ids = await engine(kind, payload, model)
            source = "engine"
        else:
            ids = None
        if ids is None:
            return Prompt(0, [], "failed")
        prompt = self._prompt(ids, source)
        self._cache[key] = prompt
        if len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)
        return prompt

    def _prompt(self, ids: Sequence[int], source: Source) -> Prompt:
        # the last token is always computed (vLLM never serves a whole prompt from cache), so its block never counts
        return Prompt(len(ids), self.keys.chain(ids, limit=(len(ids) - 1) // self.block_size), source)

    async def _local(self, kind: str, payload: dict[str, Any]) -> list[int] | None:
        tokenizer = self.local
        assert tokenizer is not None
        if kind == "chat":
            def work() -> list[int]:
                return tokenization.chat_ids(tokenizer, payload["messages"],
                                             payload.get("add_generation_prompt", True) is not False,
                                             payload.get("add_special_tokens", False) is True)
            size = sum(len(str(m.get("content"))) for m in payload["messages"])
        else:
            def work() -> list[int]:
                return tokenizer.encode(payload["prompt"], payload.get("add_special_tokens", True) is not False)
            size = len(payload["prompt"])
        try:
            if size > OFF_LOOP_CHARS:
                return await asyncio.get_running_loop().run_in_executor(None, work)
            return work()
        except (tokenization.TokenizerError, ValueError):
            return None  # a chat the template refuses: the engine will refuse it too, with its own message


def _tokenize_request(path: str, body: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """What decides the request's prompt tokens, as a ``/tokenize`` body: ``("chat", {...})``,
    ``("completion", {...})``, or ``("ids", {"prompt": [...]})`` when the client sent token ids."""
    if path.endswith("chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return None
        return "chat", {k: body[k] for k in CHAT_FIELDS if k in body}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch: the first prompt decides where it goes
    if isinstance(prompt, str):
        payload: dict[str, Any] = {"prompt": prompt}
        if "add_special_tokens" in body:
            payload["add_special_tokens"] = body["add_special_tokens"]
        return "completion", payload
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return "ids", {"prompt": prompt}
    return None
