"""The simulated engine's scheduler, step by step (no clock): chunked prefill within the token budget, decodes
sharing the step with prefill, max_num_seqs, KV-pool admission, preemption, outputs, P/D pull."""

from __future__ import annotations

import asyncio

from fuyao.engine_sim.engine import Engine, EngineSettings
from fuyao.engine_sim.profile import LatencyProfile


def engine(**settings: int) -> Engine:
    return Engine(EngineSettings(**{"num_gpu_blocks": 64, "block_size": 4, "max_num_batched_tokens": 16,
                                    "max_num_seqs": 4, **settings}), LatencyProfile())  # type: ignore[arg-type]


def step(e: Engine, now: float = 1e9) -> tuple[list[tuple[str, int]], int, int]:
    plan = e._plan(now=now)
    e._apply(plan)
    return [(r.id, n) for r, n in plan.granted], plan.prefill_tokens, plan.decodes


def test_chunked_prefill_shares_steps_with_decodes() -> None:
    async def scenario() -> None:
        e = engine()
        short = e.submit(list(range(3)), max_tokens=5, request_id="short")
        assert step(e) == ([("short", 3)], 3, 0) and short.output  # prefill done, first token sampled
        long = e.submit(list(range(100, 140)), max_tokens=2, request_id="long")
        # the decode (1 token) goes first, the long prompt gets the remaining 15 of the 16-token budget
        assert step(e) == ([("short", 1), ("long", 15)], 15, 1)
        assert not long.output and long.computed == 15
        assert step(e) == ([("short", 1), ("long", 15)], 15, 1)
        assert step(e) == ([("short", 1), ("long", 10)], 10, 1) and len(long.output) == 1
        # the step with prefill costs more than a pure decode step: what P/D disaggregation removes
        p = e.profile
        assert p.step_base_ms + 15 * p.prefill_per_token_ms + p.decode_per_seq_ms > p.step_base_ms + \
            2 * p.decode_per_seq_ms
    asyncio.run(scenario())


def test_max_num_seqs_and_finish() -> None:
    async def scenario() -> None:
        e = engine(max_num_seqs=2)
        requests = [e.submit([i, i + 1], max_tokens=2, request_id=f"r{i}") for i in range(3)]
        granted, _, _ = step(e)
        assert [g[0] for g in granted] == ["r0", "r1"] and len(e.waiting) == 1
        step(e)  # both finish (2 tokens each)
        assert all(r.finished for r in requests[:2]) and requests[0].finish_reason == "length"
        assert [g[0] for g in step(e)[0]] == ["r2"]
        assert e.pool.usage > 0 and requests[0].tokens_out.qsize() == 3  # 2 tokens + the end marker
    asyncio.run(scenario())


def test_a_full_pool_blocks_admission_and_preempts_the_newest() -> None:
    async def scenario() -> None:
        e = engine(num_gpu_blocks=4, max_num_batched_tokens=64)  # 16 tokens of KV in all
        a = e.submit(list(range(7)), max_tokens=10, request_id="a")  # 2 blocks, growing
        b = e.submit(list(range(20, 27)), max_tokens=10, request_id="b")
        step(e)
        assert {r.id for r in e.running} == {"a", "b"}
        for _ in range(3):
            step(e)
        # both need a third block at 9 tokens: no room, the newest (b) is preempted and recomputed later
        assert e.running == [a] and e.waiting[0] is b and b.computed == 0 and b.output
        while not a.finished:
            step(e)
        while not b.finished:
            step(e)
        assert len(b.output) == 10
    asyncio.run(scenario())


def test_decode_side_pulls_the_prompt() -> None:
    async def scenario() -> None:
        e = engine()
        r = e.submit(list(range(30)), max_tokens=3, remote_prefill=True, request_id="d")
        assert step(e) == ([], 0, 0)  # 29 tokens in transfer: 0.29 ms at 0.01 ms per token
        assert r.ready_at > 1e9 and r.computed == 29
        granted, prefill, decodes = step(e, now=1e9 + 1)
        # pulled, not computed: the first step computes the last prompt token and samples
        assert granted == [("d", 1)] and prefill == 0 and decodes == 1 and len(r.output) == 1
        assert r.cached_tokens == 0 and e.pool.cached  # the pulled full blocks entered the prefix cache
    asyncio.run(scenario())


def test_aborting_a_request_whose_kv_is_still_arriving_frees_its_blocks() -> None:
    async def scenario() -> None:
        e = engine()
        free = len(e.pool.free)
        r = e.submit(list(range(30)), max_tokens=3, remote_prefill=True, request_id="d")
        step(e)  # the prompt's KV is in transfer: blocks taken, the request still waiting
        assert r in e.waiting and len(e.pool.free) < free
        e.abort(r)  # the client went away meanwhile
        assert len(e.pool.free) == free  # every block back (they leaked: the pool shrank with each such abort)
    asyncio.run(scenario())
