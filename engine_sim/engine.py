"""The simulated engine: continuous batching over a paged KV cache, driven by a clock.

Each step (vLLM v1's scheduler, simplified): running requests first — one token for each decoding request, the
next chunk for each one still in prefill — then waiting requests in arrival order while there is room (at most
``max_num_seqs`` running, ``max_num_batched_tokens`` tokens per step, free KV blocks). A step costs
``step_base_ms + prefill_per_token_ms x prefill tokens + decode_per_seq_ms x decoding requests`` of wall time
(divided by ``time_scale``), so a long prefill slows every decode sharing the engine — what prefill/decode
disaggregation removes. When a request's every token has its KV computed, the step samples its next token.
A request that cannot get a block for its next token preempts the newest running request (recomputed later).

Faults: an exception while the loop works on one request fails that request (its answer is an error naming the
cause; its blocks are freed) and the loop goes on. An exception outside any one request fails the requests of that
step. Should the loop end anyway (``MAX_LOOP_FAILURES`` failing iterations in a row), every request it held fails,
new ones are refused, and ``failure`` says why (``/health`` answers 500 with it, as vLLM's does for a dead engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from fuyao import tokenizer
from fuyao.kv_blocks import BlockStored, EventBatch, KvEvent

from .kv import Allocation, BlockPool, VllmChain
from .profile import LatencyProfile
from .shared_volume import SharedVolume

log = logging.getLogger(__name__)

_ids = itertools.count(1)
MAX_LOOP_FAILURES = 3
"""Iterations in a row that fail outside any one request before the loop gives up (and /health says so)."""


class EngineDead(RuntimeError):
    """The engine's loop has stopped; the message says why."""


@dataclass
class EngineSettings:
    model: str = "fuyao-sim-7b"
    block_size: int = 16
    num_gpu_blocks: int = 4096
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 32768
    seed: int = 0
    time_scale: float = 1.0
    default_max_tokens: int = 256  # chats without max_tokens (nor ignore_eos): the EOS a model would sample
    role: str = "both"  # prefill | decode | both
    engine_id: str = ""
    hash_algo: str = "builtin"  # builtin (fuyao.kv_blocks, seeded by seed) | one of vLLM's (fuyao.vllm_hashing)


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    max_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    output: list[int] = field(default_factory=list)
    computed: int = 0
    cached_tokens: int = 0
    allocation: Allocation = field(default_factory=Allocation)
    ready_at: float = 0.0  # not before (a KV transfer in flight)
    remote_prefill: bool = False  # decode side of a P/D pair: pull the prompt's KV instead of computing it
    remote_decode: bool = False  # prefill side: stop after the first token, hand the KV over
    external_tokens: int = 0  # leading prompt tokens whose KV the shared tier has (fetched, not computed)
    loaded_tokens: int = 0  # prompt tokens whose KV came from elsewhere (the tier, a prefill engine)
    load_seconds: float = 0.0  # the modelled time its tier load took (wall time)
    scheduled_at: float | None = None  # when the engine first took it up (vLLM's prefill time starts here)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None  # the engine failed this request: why
    first_token_at: float | None = None
    last_token_at: float | None = None
    rng: random.Random = field(default_factory=random.Random)
    tokens_out: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    aborted: bool = False
    queried: bool = False  # counted in the prefix-cache query metrics already
    block_ids: list[int] = field(default_factory=list)  # the blocks it held when it finished (P/D hand-over)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def all_tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class StepPlan:
    granted: list[tuple[Request, int]]
    prefill_tokens: int
    decodes: int


class Engine:
    def __init__(self, settings: EngineSettings, profile: LatencyProfile, metrics: Any = None,
                 publish: Callable[[EventBatch], None] | None = None,
                 output_ids: Sequence[int] = tokenizer.OUTPUT_IDS):
        self.settings = settings
        self.output_ids = tuple(output_ids)  # what it generates from (the tokenizer's ordinary word pieces)
        self.profile = profile
        self.metrics = metrics
        self.publish = publish
        chain = VllmChain(settings.block_size, settings.hash_algo) if settings.hash_algo != "builtin" else None
        self.pool = BlockPool(settings.num_gpu_blocks, settings.block_size, settings.seed, chain)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.slowdown = 1.0  # fault injection: every step takes this many times longer
        self.inject_request_errors = 0  # fault injection: this many next admitted requests raise inside the loop
        self.inject_loop_failure = False  # fault injection: every iteration raises outside any request
        self.remote: Any = None  # the shared block tier client (--kv-remote)
        self.volume: SharedVolume | None = None  # the shared tier's volume (--kv-volume)
        self.steps = 0
        self.failure: str | None = None  # why the loop stopped, when it did
        self._current: Request | None = None  # the request the loop is working on, for failing just that one
        self._wake = asyncio.Event()
        self._resume = asyncio.Event()  # the slowdown changed: a slowed step in progress ends now
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    # Lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")
        self._task.add_done_callback(self._loop_ended)

    def set_slowdown(self, factor: float) -> None:
        """Fault injection: every step takes ``factor`` times longer, from the step in progress on (a step slowed
        before is cut short, so a stall ends when the factor goes back to 1)."""
        self.slowdown = factor
        self._resume.set()

    def break_loop(self) -> None:
        """Fault injection: from now on every iteration raises outside any request (the loop then gives up)."""
        self.inject_loop_failure = True
        self._wake.set()

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        exc = None if task.cancelled() else task.exception()
        self.failure = f"the engine loop stopped: {type(exc).__name__}: {exc}" if exc else "the engine loop stopped"
        log.error("%s; failing every request it held", self.failure, exc_info=exc)
        for request in [*self.running, *self.waiting]:
            self._fail(request, self.failure)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    # Requests ----------------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], max_tokens: int, *, request_seed: int | None = None,
               remote_prefill: bool = False, remote_decode: bool = False, external_tokens: int = 0,
               request_id: str | None = None) -> Request:
        if self.failure is not None:
            raise EngineDead(self.failure)
        key = xxhash.xxh64_hexdigest(repr((self.settings.seed, request_seed, len(prompt), prompt[:64],
                                           prompt[-64:])).encode())
        request = Request(id=request_id or f"req-{next(_ids)}", prompt=list(prompt), max_tokens=max(1, max_tokens),
                          rng=random.Random(key), remote_prefill=remote_prefill, remote_decode=remote_decode,
                          external_tokens=min(external_tokens, max(0, len(prompt) - 1)))
        if remote_decode:
            request.max_tokens = 1  # the prefill side of a P/D pair computes the prompt and one token
        self.waiting.append(request)
        self._wake.set()
        return request

    def abort(self, request: Request) -> None:
        """The client went away: free what it holds."""
        request.aborted = True
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        # a waiting request may hold blocks too (its KV still arriving from a prefill engine or the tier)
        self.pool.release(request.allocation)
        request.finished = True

    def _fail(self, request: Request, why: str) -> None:
        """The engine cannot finish ``request``: free what it holds and end its answer with ``why``."""
        if request.error is not None or request.aborted:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
        self.pool.release(request.allocation)
        request.finished, request.finish_reason, request.error = True, "error", why
        request.tokens_out.put_nowait(None)
        if self.metrics is not None:
            self.metrics.request_errors.inc()

    # The loop ----------------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._iteration()
                failures = 0
            except Exception as exc:  # one request's fault must fail that request, never the engine
                current, self._current = self._current, None
                why = f"{type(exc).__name__}: {exc}"
                if current is not None:
                    log.warning("request %s failed in the engine: %s", current.id, why, exc_info=exc)
                    self._fail(current, why)
                    continue
                failures += 1
                log.exception("engine step failed outside any one request (%d in a row); failing its requests",
                              failures)
                for request in list(self.running):
                    self._fail(request, why)
                if failures >= MAX_LOOP_FAILURES:
                    raise

    async def _iteration(self) -> None:
        """One step: plan, wait the step's cost, apply; or wait for work."""
        if self.inject_loop_failure:
            raise RuntimeError("injected fault: the engine loop fails")
        now = time.monotonic()
        plan = self._plan(now)
        if not plan.granted:
            self._publish_events()
            self._observe_state()
            delay = self._next_ready(now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            return
        step_ms = (self.profile.step_base_ms + self.profile.prefill_per_token_ms * plan.prefill_tokens
                   + self.profile.decode_per_seq_ms * plan.decodes) * self.slowdown
        if self.slowdown == 1.0:
            await asyncio.sleep(step_ms / 1000 / self.settings.time_scale)
        else:  # injected slowness: interruptible, so that clearing it ends a stall
            self._resume.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resume.wait(), timeout=step_ms / 1000 / self.settings.time_scale)
        self._apply(plan)
        self.steps += 1
        self._publish_events()
        self._observe_state()

    def _next_ready(self, now: float) -> float | None:
        pending = [r.ready_at - now for r in self.waiting if r.ready_at > now]
        return max(0.001, min(pending)) if pending else None

    def _plan(self, now: float) -> StepPlan:
        budget = self.settings.max_num_batched_tokens
        granted: list[tuple[Request, int]] = []
        for request in list(self.running):
            if request not in self.running or budget <= 0:
                continue
            want = min(request.num_tokens - request.computed, budget)
            while not self.pool.grow(request.allocation, request.computed + want):
                victim = self.running[-1]
                self._preempt(victim)
                granted = [(r, n) for r, n in granted if r is not victim]
                if victim is request:
                    break
            if request not in self.running:
                continue
            granted.append((request, want))
            budget -= want
        for request in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.settings.max_num_seqs:
                break
            if request.ready_at > now:
                continue  # its KV is still in transfer
            self._current = request
            if self.inject_request_errors > 0:
                self.inject_request_errors -= 1
                raise RuntimeError("injected fault: this request fails inside the engine loop")
            if not request.allocation.blocks and not request.computed:
                request.scheduled_at = request.scheduled_at or now
                request.allocation, cached = self.pool.start(request.all_tokens(), count_query=not request.queried)
                request.queried = True
                request.computed = request.cached_tokens = cached
                target = len(request.prompt) - 1 if request.remote_prefill else request.external_tokens
                if target > request.computed:
                    if not self._load(request, target, now):
                        break
                    if request.ready_at > now:
                        continue
            want = min(request.num_tokens - request.computed, budget)
            if not self.pool.grow(request.allocation, request.computed + want):
                self.pool.release(request.allocation)
                request.computed = 0
                break  # first come, first served: no overtaking for memory
            self.waiting.remove(request)
            self.running.append(request)
            granted.append((request, want))
            budget -= want
        self._current = None
        decoding = [n for r, n in granted if r.num_tokens - r.computed == 1]  # one token, the rest computed
        return StepPlan(granted, sum(n for _, n in granted) - len(decoding), len(decoding))

    def _load(self, request: Request, target: int, now: float) -> bool:
        """KV that comes from elsewhere instead of being computed: the decode side of a P/D pair pulls the prompt
        from the prefill engine (all but the last token, which its first decode step computes), an engine with
        ``--kv-remote`` fetches leading blocks from the shared tier. Blocks are taken for them now; the request
        waits ``kv_transfer_per_token_ms`` per transferred token."""
        if not self.pool.grow(request.allocation, target):
            self.pool.release(request.allocation)
            request.computed = 0
            return False
        transferred = target - request.computed
        request.computed = target
        request.loaded_tokens = transferred
        self.pool.computed(request.allocation, request.all_tokens(), request.computed)
        from_tier = not request.remote_prefill
        request.remote_prefill = False
        request.external_tokens = 0
        delay_s = transferred * self.profile.kv_transfer_per_token_ms / 1000
        request.ready_at = now + delay_s / self.settings.time_scale
        if from_tier and self.volume is not None:
            request.load_seconds = delay_s / self.settings.time_scale  # counted with its first token (see _apply)
        if self.metrics is not None:
            self.metrics.kv_transferred_tokens.inc(transferred)
        return True

    def _preempt(self, request: Request) -> None:
        log.debug("preempting %s (no free KV block)", request.id)
        self.running.remove(request)
        self.pool.release(request.allocation)
        request.computed = 0
        self.waiting.appendleft(request)
        if self.metrics is not None:
            self.metrics.preemptions.inc()

    def _apply(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for request, count in plan.granted:
            if request.aborted or request.finished:
                continue
            self._current = request
            request.computed += count
            tokens = request.all_tokens()
            self.pool.computed(request.allocation, tokens, request.computed)
            if request.computed < request.num_tokens:
                continue  # a prefill chunk: no token yet
            token = self.output_ids[request.rng.randrange(len(self.output_ids))]
            request.output.append(token)
            if request.first_token_at is None and request.load_seconds and self.volume is not None:
                # as vLLM's synchronous load: reported with the step that ends the prefill it belongs to
                self.volume.stats.load_seconds += request.load_seconds
            if self.metrics is not None:
                self.metrics.token(request, now)
            request.first_token_at = request.first_token_at or now
            request.last_token_at = now
            request.tokens_out.put_nowait(token)
            if len(request.output) >= request.max_tokens or request.num_tokens >= self.settings.max_model_len:
                self._finish(request, "length")
        self._current = None

    def _finish(self, request: Request, reason: str) -> None:
        request.finished = True
        request.finish_reason = reason
        if request in self.running:
            self.running.remove(request)
        self.pool.computed(request.allocation, request.all_tokens(), request.computed)
        request.block_ids = [b.id for b in request.allocation.blocks]
        self.pool.release(request.allocation)
        request.tokens_out.put_nowait(None)
        if self.metrics is not None:
            self.metrics.finished(request)

    def _publish_events(self) -> None:
        events: list[KvEvent] = self.pool.take_events()
        if events and self.publish is not None:
            self.publish(EventBatch(time.time(), events, 0))
        if events and self.volume is not None:
            self.volume.stored([e for e in events if isinstance(e, BlockStored)])
        if events and self.remote is not None:
            stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
            if stored:
                self.remote.store(stored)

    def _observe_state(self) -> None:
        if self.metrics is not None:
            self.metrics.state(len(self.running), len(self.waiting), self.pool)

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; False (nothing dropped) while requests hold blocks, as vLLM's. Its
        ``AllBlocksCleared`` goes out with the events of the next step, as vLLM's (its scheduler publishes what the
        block pool queued in ``update_from_output``): an idle engine publishes it with its next request's."""
        return self.pool.clear()
