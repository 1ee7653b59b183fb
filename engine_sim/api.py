"""The simulated engine's HTTP surface, shaped like vLLM's OpenAI-compatible server: ``/v1/completions`` and
``/v1/chat/completions`` (JSON or SSE streams with vLLM's chunk shapes and ``data: [DONE]``), ``/v1/models``,
``/health``, ``/metrics``, ``/version``, ``/tokenize``, ``/detokenize``, ``/v1/completions/render``,
``/v1/chat/completions/render``, ``/reset_prefix_cache``; and, with ``--enable-fault-injection``, ``/fault``.

Unknown request fields are ignored (routers add ``echo``, ``ignore_eos``…); an unknown model is 404; errors use
vLLM's ``{"error": {"message", "type", "param", "code"}}``. ``tests/vllm/test_sim_fidelity.py`` compares the shapes
with a real vLLM 0.32 (what still differs: ``docs/engine-sim.md``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash
from aiohttp import web

from fuyao import tokenization, tokenizer
from fuyao.http_body import BodyError, read_json

from .engine import Engine, EngineDead, Request

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 64 * 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
    return web.Response(body=orjson.dumps({"error": {"message": message, "type": kind, "param": param,
                                                     "code": status}}),
                        status=status, content_type="application/json")


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def invalid(message: str, param: str | None = None, value: Any = None) -> ApiError:
    """A 400 worded as vLLM's ``VLLMValidationError`` prints: the parameter and the refused value after the message
    (``message (parameter=max_tokens, value=0)``)."""
    extras = [f"{name}={v}" for name, v in (("parameter", param), ("value", value)) if v is not None]
    return ApiError(400, f"{message} ({', '.join(extras)})" if extras else message, param=param)


def check_text_length(text: str, limit: int, chars_per_token: int | None) -> None:
    """vLLM 0.32's check before tokenizing (``TokenizeParams._text_len_check``): a prompt text longer than
    ``max_model_len`` times the vocabulary's longest token is refused unread."""
    if chars_per_token is not None and len(text) > limit * chars_per_token:
        raise invalid(f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                      f"{len(text)} characters (more than {limit * chars_per_token} characters, which is the upper "
                      f"bound for {limit} input tokens). Please reduce the length of the input prompt.",
                      "input_text", len(text))


def check_prompt_length(length: int, limit: int, from_text: bool) -> None:
    """vLLM 0.32's check after tokenizing (``TokenizeParams._token_len_check``): more than ``limit`` prompt tokens; a
    text is tokenized to at most ``limit + 1`` tokens ("at least"), ids are counted as given. A prompt of exactly
    ``limit`` tokens passes, to be refused by :func:`output_budget` as ``max_tokens`` 0, as vLLM refuses it."""
    if length <= limit:
        return
    count = min(length, limit + 1) if from_text else length
    qualifier = "at least " if count == limit + 1 else ""
    raise invalid(f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                  f"{qualifier}{count} input tokens, which exceeds this limit even without any output tokens. Please "
                  "reduce the length of the input prompt.", "input_tokens", count)


def output_budget(length: int, limit: int, requested: int | None, min_tokens: int) -> int:
    """A prompt's ``max_tokens`` as vLLM 0.32 sets it (``get_max_tokens``): the request's, cut to what the context
    has left (all of it when none was asked), then ``SamplingParams``' checks."""
    left = limit - length
    budget = left if requested is None else min(requested, left)
    if budget < 1:
        raise invalid(f"max_tokens must be at least 1, got {budget}.", "max_tokens", budget)
    if min_tokens < 0:
        raise invalid(f"min_tokens must be greater than or equal to 0, got {min_tokens}.")
    if min_tokens > budget:  # vLLM names no parameter here (a plain ValueError)
        raise ApiError(400, f"min_tokens must be less than or equal to max_tokens={budget}, got {min_tokens}.")
    return budget


def max_chars_per_token(tokenizer: tokenization.Tokenizer) -> int | None:
    """The longest entry of the model's vocabulary (vLLM's ``max_chars_per_token``); None for the builtin tokenizer,
    which has no vocabulary file (no text-length check then)."""
    if not isinstance(tokenizer, tokenization.HfTokenizer):
        return None
    return max(map(len, tokenizer.vocabulary()), default=None)


@dataclass
class Faults:
    """What ``POST /fault`` injected: the next ``error_count`` requests answer ``error_status``; the next
    ``drop_count`` lose their connection without an answer."""

    error_status: int = 503
    error_count: int = 0
    drop_count: int = 0


class EngineApi:
    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, publisher: Any = None,
                 fault_injection: bool = False, tokenizer: tokenization.Tokenizer | None = None):
        self.engine = engine
        self.tokenizer = tokenizer or tokenization.BuiltinTokenizer()
        self.model = engine.settings.model
        self.host, self.port = host, port
        self.publisher = publisher
        self.fault_injection = fault_injection
        self.faults = Faults()
        self.started = int(time.time())
        self.chars_per_token = max_chars_per_token(self.tokenizer)
        settings = engine.settings
        from fuyao import __version__

        config = repr((settings.model, settings.block_size, settings.num_gpu_blocks, settings.max_model_len,
                       settings.hash_algo, settings.seed, settings.role, self.tokenizer.name))
        # as vLLM's system_fingerprint ("vllm-<version>-<hash of the config>")
        self.fingerprint = f"fuyao-engine-sim-{__version__}-{xxhash.xxh64_hexdigest(config.encode())[:8]}"

    # Parsing -----------------------------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            _, body = await read_json(request, MAX_BODY)
        except BodyError as exc:
            raise ApiError(exc.status, exc.message) from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return body

    @staticmethod
    def _int(body: dict[str, Any], key: str, default: int | None, minimum: int | None = 1) -> int | None:
        value = body.get(key)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
            raise ApiError(400, f"{key} must be an integer" + (f" >= {minimum}" if minimum is not None else ""),
                           param=key)
        return value

    def _prompts(self, body: dict[str, Any]) -> list[list[int]]:
        """The prompt(s) as token ids; ids given by the client must be in the vocabulary (vLLM's check)."""
        prompt = body.get("prompt")
        add_special = body.get("add_special_tokens", True) is not False
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt, add_special)]
        prompts: list[list[int]] | None = None
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [self.tokenizer.encode(p, add_special) for p in prompt]
            if all(isinstance(p, list) and p for p in prompt):
                prompts = [list(p) for p in prompt]
            elif not any(isinstance(p, list | str) for p in prompt):
                prompts = [list(prompt)]
        if prompts is None:
            raise ApiError(400, "prompt must be a string, an array of strings, an array of token ids or an array "
                                "of token-id arrays", param="prompt")
        for ids in prompts:
            try:
                tokenizer.check_token_ids(ids, self.tokenizer.vocab_size)
            except tokenizer.TokenIdError as exc:
                raise ApiError(400, str(exc), param="prompt") from None
        return prompts

    def _chat_text(self, body: dict[str, Any]) -> str:
        """The chat rendered by the model's template (what is then tokenized, without special tokens by default)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "messages must be a non-empty array of message objects", param="messages")
        try:
            return self.tokenizer.render_chat(messages, body.get("add_generation_prompt", True) is not False)
        except tokenizer.ChatFormatError as exc:
            raise ApiError(400, str(exc), param="messages") from None

    def _chat_ids(self, body: dict[str, Any]) -> list[int]:
        return self.tokenizer.encode(self._chat_text(body), body.get("add_special_tokens", False) is True)

    def _transfer(self, body: dict[str, Any]) -> tuple[bool, bool]:
        params = body.get("kv_transfer_params")
        if params is None:
            return False, False
        if not isinstance(params, dict):
            raise ApiError(400, "kv_transfer_params must be an object", param="kv_transfer_params")
        remote_decode, remote_prefill = bool(params.get("do_remote_decode")), bool(params.get("do_remote_prefill"))
        role = self.engine.settings.role
        if remote_decode and role == "decode":
            raise ApiError(400, "this engine runs --role decode: it does not prefill for a remote decoder",
                           param="kv_transfer_params")
        if remote_prefill and role == "prefill":
            raise ApiError(400, "this engine runs --role prefill: it does not decode remotely prefilled requests",
                           param="kv_transfer_params")
        return remote_prefill, remote_decode

    def _transfer_result(self, request: Request) -> dict[str, Any] | None:
        if not request.remote_decode:
            return None
        return {"do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": request.block_ids,
                "remote_engine_id": self.engine.settings.engine_id, "remote_host": self.host,
                "remote_port": self.port, "tp_size": 1}

    # Generation --------------------------------------------------------------------------------------------------
    async def completions(self, http: web.Request) -> web.StreamResponse:
        body = await self._body(http)
        self._check_request(body, chat=False)
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else \
            [p for p in prompt if isinstance(p, str)] if isinstance(prompt, list) else []
        for text in texts:
            check_text_length(text, self.engine.settings.max_model_len, self.chars_per_token)
        return await self._generate(http, body, self._prompts(body), chat=False, from_text=bool(texts))

    async def chat(self, http: web.Request) -> web.StreamResponse:
        body = await self._body(http)
        self._check_request(body, chat=True)
        text = self._chat_text(body)
        check_text_length(text, self.engine.settings.max_model_len, self.chars_per_token)
        ids = self.tokenizer.encode(text, body.get("add_special_tokens", False) is True)
        return await self._generate(http, body, [ids], chat=True, from_text=True)

    def _check_request(self, body: dict[str, Any], chat: bool) -> None:
        """What vLLM 0.32 refuses before it renders or tokenizes, in its order: ``stream_options`` without
        ``stream`` (its request model), then ``max_tokens`` above the context length."""
        if body.get("stream_options") and not body.get("stream"):
            raise invalid("Stream options can only be defined when `stream=True`.", "stream_options")
        key = self._max_tokens_key(body, chat)
        requested = self._int(body, key, None, minimum=None)
        limit = self.engine.settings.max_model_len
        if requested is not None and requested > limit:
            raise invalid(f"{key}={requested} cannot be greater than max_model_len={limit}. Please request fewer "
                          "output tokens.", key, requested)

    @staticmethod
    def _max_tokens_key(body: dict[str, Any], chat: bool) -> str:
        return "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"

    async def _generate(self, http: web.Request, body: dict[str, Any], prompts: list[list[int]],
                        chat: bool, from_text: bool = False) -> web.StreamResponse:
        if self._int(body, "n", 1) != 1:
            raise ApiError(400, "n > 1 is not supported by the simulator", param="n")
        # completions default to 16 tokens (vLLM's request model); vLLM lets a chat run to what the context has
        # left: the simulator too with ignore_eos, else it stops at --default-max-tokens (the EOS it never samples)
        default = 16 if not chat else None if body.get("ignore_eos") is True else \
            self.engine.settings.default_max_tokens
        requested = self._int(body, self._max_tokens_key(body, chat), default, minimum=None)
        seed = body.get("seed") if isinstance(body.get("seed"), int) else None
        remote_prefill, remote_decode = self._transfer(body)
        limit = self.engine.settings.max_model_len
        for ids in prompts:
            check_prompt_length(len(ids), limit, from_text)
        min_tokens = self._int(body, "min_tokens", 0, minimum=None) or 0
        lengths = [output_budget(len(ids), limit, requested, min_tokens) for ids in prompts]
        external = [await self._from_tier(ids) if not remote_prefill else 0 for ids in prompts]
        try:
            requests = [self.engine.submit(ids, n, request_seed=seed, remote_prefill=remote_prefill,
                                           remote_decode=remote_decode, external_tokens=ext)
                        for ids, n, ext in zip(prompts, lengths, external, strict=True)]
        except EngineDead as exc:
            raise ApiError(500, str(exc), "InternalServerError") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        raw_options = body.get("stream_options")
        stream_options: dict[str, Any] = raw_options if isinstance(raw_options, dict) else {}
        try:
            if body.get("stream"):
                include = bool(stream_options.get("include_usage"))
                return await self._stream(http, requests, rid, created, chat, include,
                                          include and bool(stream_options.get("continuous_usage_stats")))
            outputs = [await self._collect(r) for r in requests]
        except BaseException:
            for r in requests:
                if not r.finished:
                    self.engine.abort(r)
            raise
        usage = self._usage(requests)
        if chat:  # vLLM 0.32's fields (its message drops an empty tool_calls)
            r = requests[0]
            return _json({"id": rid, "object": "chat.completion", "created": created, "model": self.model,
                          "choices": [{"index": 0, "message": {
                              "role": "assistant", "content": outputs[0], "refusal": None, "annotations": None,
                              "audio": None, "function_call": None, "reasoning": None},
                              "logprobs": None, "finish_reason": r.finish_reason, "stop_reason": None,
                              "token_ids": None, "routed_experts": None}],
                          "service_tier": None, "system_fingerprint": self.fingerprint, "usage": usage,
                          "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
                          "kv_transfer_params": self._transfer_result(r), "ec_transfer_params": None,
                          "metrics": None})
        return _json({"id": rid, "object": "text_completion", "created": created, "model": self.model,
                      "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": r.finish_reason,
                                   "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                                   "prompt_token_ids": None, "routed_experts": None}
                                  for i, (r, text) in enumerate(zip(requests, outputs, strict=True))],
                      "service_tier": None, "system_fingerprint": self.fingerprint, "usage": usage,
                      "kv_transfer_params": self._transfer_result(requests[0]), "ec_transfer_params": None,
                      "metrics": None})

    async def _from_tier(self, ids: list[int]) -> int:
        """Leading prompt tokens the shared tier gives beyond the local prefix cache (``--kv-volume``: read from the
        volume now; ``--kv-remote``: the bookkeeping tier's count). Never the last token: the engine computes it."""
        remote, volume = self.engine.remote, self.engine.volume
        if remote is None and volume is None:
            return 0
        pool = self.engine.pool
        hashes = pool.hashes(ids, limit=(len(ids) - 1) // pool.block_size)
        local = len(pool.cached_prefix(hashes))
        found = 0
        if volume is not None:
            found = await volume.load(ids, local, len(hashes))
            if self.engine.metrics is not None:
                self.engine.metrics.external(len(ids), found * pool.block_size)
        elif local < len(hashes):
            found = await remote.fetchable(hashes[local:])
        return (local + found) * pool.block_size if found else 0

    async def _collect(self, request: Request) -> str:
        tokens = []
        while (token := await request.tokens_out.get()) is not None:
            tokens.append(token)
        if request.error is not None:
            raise ApiError(500, f"the engine failed this request: {request.error}", "InternalServerError")
        return self.tokenizer.decode(tokens)

    @staticmethod
    def _usage(requests: list[Request]) -> dict[str, Any]:
        prompt = sum(len(r.prompt) for r in requests)
        completion = sum(len(r.output) for r in requests)
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
                "prompt_tokens_details": None, "completion_tokens_details": None}

    async def _stream(self, http: web.Request, requests: list[Request], rid: str, created: int, chat: bool,
                      include_usage: bool, continuous_usage: bool = False) -> web.StreamResponse:
        """As vLLM 0.32 streams (its chunks' fields, unset ones left out): chunks carry ``usage`` only with
        ``continuous_usage_stats`` (the usage so far), ``include_usage`` adds a last chunk with the whole usage, no
        choices and the ``system_fingerprint`` (else the finishing chunk has it). The finish reason comes with the
        last token's chunk, as vLLM sends it: a token is the last when the request has finished and no other of its
        tokens is still queued (the engine queues a request's last token and finishes it in one step)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)
        kind = "chat.completion.chunk" if chat else "text_completion"
        sent = [0] * len(requests)  # tokens streamed so far, per request (continuous usage)

        async def send(index: int, choice: dict[str, Any], **more: Any) -> None:
            chunk = {"id": rid, "object": kind, "created": created, "model": self.model, "choices": [choice]}
            if continuous_usage:
                prompt, done = len(requests[index].prompt), sent[index]
                usage: dict[str, Any] = {"prompt_tokens": prompt, "total_tokens": prompt + done,
                                         "completion_tokens": done}
                if chat:
                    usage["completion_tokens_details"] = None
                chunk["usage"] = usage
            await response.write(b"data: " + orjson.dumps({**chunk, **more}) + b"\n\n")

        def choice(index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
            if chat:
                finished = {"stop_reason": None} if finish_reason is not None else {}
                return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish_reason,
                        **finished, "token_ids": None}
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                    "stop_reason": None, "prompt_token_ids": None, "token_ids": None}

        if chat:
            await send(0, {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}, prompt_token_ids=None, prompt_text=None)
        for index, request in enumerate(requests):
            finished = False
            while (token := await request.tokens_out.get()) is not None:
                sent[index] += 1
                last = request.finished and request.error is None and sent[index] == len(request.output)
                text = self.tokenizer.decode([token])
                if last:
                    await send(index, choice(index, text, request.finish_reason),
                               **self._finishing(request, include_usage))
                else:
                    await send(index, choice(index, text))
                finished = finished or last
            if request.error is not None:  # vLLM's streamed error: an error object, then [DONE]
                await response.write(b"data: " + orjson.dumps({"error": {
                    "message": f"the engine failed this request: {request.error}", "type": "InternalServerError",
                    "param": None, "code": 500}}) + b"\n\n")
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            if not finished:  # no token carried the finish reason (none came): a chunk of its own
                await send(index, choice(index, "", request.finish_reason), **self._finishing(request, include_usage))
        if include_usage:
            usage = {k: v for k, v in self._usage(requests).items() if v is not None}  # vLLM: exclude_none
            chunk = {"id": rid, "object": kind, "created": created, "model": self.model, "choices": [],
                     "usage": usage, "system_fingerprint": self.fingerprint}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _finishing(self, request: Request, include_usage: bool) -> dict[str, Any]:
        """What a request's finishing chunk carries beyond its choice: the ``system_fingerprint`` unless a usage
        chunk follows (vLLM's), and for a prefill engine's request the ``kv_transfer_params``."""
        more: dict[str, Any] = {} if include_usage else {"system_fingerprint": self.fingerprint}
        if request.remote_decode:
            more["kv_transfer_params"] = self._transfer_result(request)
        return more

    # Other endpoints ---------------------------------------------------------------------------------------------
    async def models(self, _http: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self.started, "owned_by": "vllm", "root": self.model,
            "parent": None, "max_model_len": self.engine.settings.max_model_len, "permission": [{
                "id": f"modelperm-{self.model}", "object": "model_permission", "created": self.started,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False}]}]})

    async def tokenize(self, http: web.Request) -> web.Response:
        body = await self._body(http)
        ids = self._chat_ids(body) if "messages" in body else self._prompts(body)[0]
        return _json({"count": len(ids), "max_model_len": self.engine.settings.max_model_len, "tokens": ids,
                      "token_strs": None})

    async def detokenize(self, http: web.Request) -> web.Response:
        body = await self._body(http)
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise ApiError(400, "tokens must be an array of token ids", param="tokens")
        try:
            tokenizer.check_token_ids(tokens, self.tokenizer.vocab_size)
        except tokenizer.TokenIdError as exc:
            raise ApiError(400, str(exc), param="tokens") from None
        return _json({"prompt": self.tokenizer.decode(tokens)})

    async def render_completion(self, http: web.Request) -> web.Response:
        body = await self._body(http)
        return _json({"token_ids": self._prompts(body)[0]})

    async def render_chat(self, http: web.Request) -> web.Response:
        body = await self._body(http)
        return _json({"token_ids": self._chat_ids(body)})

    async def health(self, _http: web.Request) -> web.Response:
        if self.engine.failure is not None:  # a dead loop is not healthy: 503, as vLLM answers on EngineDeadError
            return web.Response(status=503, text=self.engine.failure)
        return web.Response(status=200)

    async def version(self, _http: web.Request) -> web.Response:
        from fuyao import __version__

        return _json({"version": f"fuyao-engine-sim {__version__}"})

    async def metrics(self, _http: web.Request) -> web.Response:
        metrics = self.engine.metrics
        return web.Response(body=metrics.render() if metrics else b"", content_type="text/plain", charset="utf-8")

    async def reset_prefix_cache(self, _http: web.Request) -> web.Response:
        """vLLM's: ``{"success": false}`` while requests hold blocks; the ``AllBlocksCleared`` goes out with the next
        step. vLLM serves it only with ``VLLM_SERVER_DEV_MODE=1``; the simulator, a test tool, always."""
        return _json({"success": self.engine.reset_prefix_cache()})

    async def fault(self, http: web.Request) -> web.Response:
        """``POST /fault {"slowdown": 3, "error_status": 503, "error_count": 2, "drop_count": 1, "events": false,
        "request_errors": 1, "loop_failure": true}``; ``DELETE /fault`` clears everything (a loop that died stays
        dead). ``request_errors``: the next N requests the loop admits raise inside it; ``loop_failure``: every
        loop iteration raises outside any request, until the loop gives up."""
        if http.method == "DELETE":
            self.faults = Faults()
            self.engine.set_slowdown(1.0)
            self.engine.inject_request_errors = 0
            self.engine.inject_loop_failure = False
            if self.publisher is not None:
                self.publisher.enabled = True
            return _json({"faults": "cleared"})
        body = await self._body(http)
        if "slowdown" in body:
            value = body["slowdown"]
            if not isinstance(value, int | float) or value <= 0:
                raise ApiError(400, "slowdown must be a positive number", param="slowdown")
            self.engine.set_slowdown(float(value))
        for key in ("error_count", "drop_count"):
            if key in body:
                setattr(self.faults, key, self._int(body, key, 0, minimum=0))
        if "error_status" in body:
            status = self._int(body, "error_status", 503, minimum=400)
            if status is None or status > 599:
                raise ApiError(400, "error_status must be 400..599", param="error_status")
            self.faults.error_status = status
        if "events" in body and self.publisher is not None:
            self.publisher.enabled = bool(body["events"])
        if "request_errors" in body:
            self.engine.inject_request_errors = self._int(body, "request_errors", 0, minimum=0) or 0
        if body.get("loop_failure") is True:
            self.engine.break_loop()
        return _json({"slowdown": self.engine.slowdown, "error_status": self.faults.error_status,
                      "error_count": self.faults.error_count, "drop_count": self.faults.drop_count,
                      "events": self.publisher.enabled if self.publisher is not None else None})

    # Wiring ------------------------------------------------------------------------------------------------------
    def _guarded(self, handler: Handler, faulty: bool = False) -> Handler:
        async def wrapped(http: web.Request) -> web.StreamResponse:
            if faulty and self.faults.drop_count > 0:
                self.faults.drop_count -= 1
                if http.transport is not None:
                    http.transport.close()
                raise asyncio.CancelledError
            if faulty and self.faults.error_count > 0:
                self.faults.error_count -= 1
                return _error(self.faults.error_status, "injected fault", "InternalServerError")
            try:
                return await handler(http)
            except ApiError as exc:
                return _error(exc.status, exc.message, exc.kind, exc.param)
            except (ConnectionError, asyncio.CancelledError):
                raise  # the client went away: nothing to answer
            except Exception as exc:  # a bug answers a clear 500 and is logged; the server goes on
                log.exception("%s %s failed", http.method, http.path)
                return _error(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError")
        return wrapped

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        g = self._guarded
        app.router.add_post("/v1/completions", g(self.completions, faulty=True))
        app.router.add_post("/v1/chat/completions", g(self.chat, faulty=True))
        app.router.add_get("/v1/models", g(self.models))
        app.router.add_post("/tokenize", g(self.tokenize))
        app.router.add_post("/detokenize", g(self.detokenize))
        app.router.add_post("/v1/completions/render", g(self.render_completion))
        app.router.add_post("/v1/chat/completions/render", g(self.render_chat))
        app.router.add_get("/health", g(self.health, faulty=True))
        app.router.add_get("/version", g(self.version))
        app.router.add_get("/metrics", g(self.metrics))
        app.router.add_post("/reset_prefix_cache", g(self.reset_prefix_cache))
        if self.fault_injection:
            app.router.add_post("/fault", g(self.fault))
            app.router.add_delete("/fault", g(self.fault))
        return app
