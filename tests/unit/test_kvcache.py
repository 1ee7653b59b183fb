"""The engine's block pool (prefix caching, LRU eviction, events), the global index against a brute-force model,
the shared tier's eviction policies and ttl, and the subscriber's gap handling over real ZMQ sockets."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from fuyao.contracts import KvCachePolicy
from fuyao.engine_sim.kv import BlockPool
from fuyao.kv_blocks import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, block_hashes, encode_batch
from fuyao.kvcache.index import KvIndex
from fuyao.kvcache.keys import VllmKeys
from fuyao.kvcache.subscriber import Source, Subscriber
from fuyao.kvcache.tier import SharedTier
from tests.support.apiserver import free_port
from tests.support.polling import wait_for


# --- the engine's block pool ------------------------------------------------------------------------------------------
def run(pool: BlockPool, prompt: list[int], output: int = 0) -> int:
    """A request through the pool: reuse, allocate, compute, finish; returns its cached tokens."""
    allocation, cached = pool.start(prompt)
    tokens = prompt + [7] * output
    assert pool.grow(allocation, len(tokens))
    pool.computed(allocation, tokens, len(tokens))
    pool.release(allocation)
    return cached


def test_prefix_cache_hits_and_events() -> None:
    pool = BlockPool(num_blocks=8, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    assert run(pool, prompt) == 0
    stored = pool.take_events()
    assert stored == [BlockStored(block_hashes(prompt, 4), None, prompt[:8], 4, extra_keys=[None, None], group_idx=0,
                                  kv_cache_spec_kind="full_attention")]  # as vLLM 0.32 writes it
    assert run(pool, prompt) == 8  # both full blocks reused
    assert run(pool, [*prompt[:8], 1, 2, 3]) == 8  # a different tail: the shared blocks still hit
    assert run(pool, prompt[:8]) == 4  # the last token is always computed: 7 of 8 tokens → one block
    assert pool.queries == 10 + 10 + 11 + 8 and pool.hits == 8 + 8 + 4
    assert pool.usage == 0.0  # everything released


def test_lru_eviction_emits_block_removed_tail_first() -> None:
    pool = BlockPool(num_blocks=6, block_size=2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]  # 2 full blocks + 1 partial each
    run(pool, [*a, 0])
    run(pool, [*b, 0])
    pool.take_events()
    # a third prompt needs 3 blocks: the LRU free blocks go first; a's tail block before its head
    run(pool, [9, 10, 11, 12, 13])
    removed = [e for e in pool.take_events() if isinstance(e, BlockRemoved)]
    a_hashes = block_hashes(a, 2)
    assert removed == [BlockRemoved([a_hashes[1], a_hashes[0]])]  # one event for the run
    assert run(pool, [*b, 0]) == 4  # b survived (more recently used)


def test_grow_refuses_without_taking_anything() -> None:
    pool = BlockPool(num_blocks=2, block_size=2)
    allocation, _ = pool.start([1, 2, 3])
    assert not pool.grow(allocation, 5) and allocation.blocks == [] and pool.num_free == 2


# --- the index ----------------------------------------------------------------------------------------------------
TOKENS = [list(range(seed, seed + 64)) for seed in (0, 1000, 2000)]
CHAINS = [block_hashes(tokens, 4) for tokens in TOKENS]
SALTS = {"a": 0, "b": 0x5A5A_1234_0000_FFFF, "c": (1 << 63) | 77}
"""Engine "a" hashes as the index does (the simulator); "b" and "c" hash otherwise (vLLM's sha256 or xxhash with
its own seed; "c"'s hashes are above 2^63 as vLLM's are): the index must find the same blocks on all three."""
ops = st.lists(st.one_of(
    st.tuples(st.just("store"), st.sampled_from("abc"), st.integers(0, 2), st.integers(0, 15), st.integers(1, 6)),
    st.tuples(st.just("remove"), st.sampled_from("abc"), st.integers(0, 2), st.integers(0, 15), st.integers(1, 6)),
    st.tuples(st.just("clear"), st.sampled_from("abc")),
), max_size=60)


def engine_event(endpoint: str, chain: int, start: int, length: int) -> BlockStored:
    """What engine ``endpoint`` publishes when it stores blocks ``start``.. of a chain: its own hashes, the parent's
    (its own) hash, and the blocks' tokens."""
    salt = SALTS[endpoint]
    hashes = [h ^ salt for h in CHAINS[chain][start:start + length]]
    parent = CHAINS[chain][start - 1] ^ salt if start else None
    return BlockStored(hashes, parent, TOKENS[chain][4 * start:4 * (start + len(hashes))], 4)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_index_lookups_equal_a_brute_force_model(history: list[tuple]) -> None:  # type: ignore[type-arg]
    """Whatever each engine's hash: a block counts once its tokens are stored with a parent the index placed (or the
    chain's root); it stops counting when removed or cleared. Lookups equal that model's."""
    index = KvIndex(block_size=4)
    model: dict[str, set[int]] = {e: set() for e in "abc"}
    placed: dict[str, set[int]] = {e: set() for e in "abc"}  # ever stored (and so translatable) since the last clear
    for op in history:
        if op[0] == "clear":
            index.apply(op[1], [AllBlocksCleared()])
            model[op[1]].clear()
            placed[op[1]].clear()
            continue
        _, endpoint, chain, start, length = op
        hashes = CHAINS[chain][start:start + length]
        if op[0] == "store":
            event = engine_event(endpoint, chain, start, length)
            index.apply(endpoint, [event])
            if start == 0 or CHAINS[chain][start - 1] in placed[endpoint]:
                model[endpoint].update(hashes)
                placed[endpoint].update(hashes)
        else:
            index.apply(endpoint, [BlockRemoved([h ^ SALTS[endpoint] for h in hashes])])
            model[endpoint].difference_update(hashes)
    for chain in CHAINS:
        expected = {}
        for endpoint, held in model.items():
            depth = 0
            while depth < len(chain) and chain[depth] in held:
                depth += 1
            if depth:
                expected[endpoint] = depth
        assert index.lookup(hashes=chain) == expected
    assert set(index.blocks) == set().union(*model.values())


def test_blocks_of_another_size_or_with_an_unknown_parent_are_skipped_not_guessed(
        caplog: pytest.LogCaptureFixture) -> None:
    index = KvIndex(block_size=4)
    index.apply("b", [engine_event("b", 0, 2, 3)])  # its parent (block 1) was never stored
    index.apply("b", [BlockStored([99], None, list(range(8)), 8)])  # 8-token blocks: not this index's
    index.apply("b", [BlockStored([98], None, list(range(8)), 8)])
    assert index.lookup(hashes=CHAINS[0]) == {} and index.endpoints["b"].skipped == 5
    # a block size that is not the engine's is said, once per engine (every event was skipped in silence)
    said = [r.getMessage() for r in caplog.records if "8-token blocks" in r.getMessage()]
    assert len(said) == 1 and "kvCache.blockSize" in said[0]
    index.apply("b", [engine_event("b", 0, 0, 5)])
    assert index.lookup(TOKENS[0]) == {"b": 5}


def test_lora_and_extra_key_blocks_are_kept_apart_from_plain_ones() -> None:
    """As in vLLM (its block hash covers LoRA, multimodal and cache-salt keys): the same tokens stored under a LoRA
    adapter or a cache salt are not hits for a plain prompt; their chain's children are not either."""
    index = KvIndex(block_size=4)
    tokens = TOKENS[0][:16]
    index.apply("lora", [BlockStored([1, 2, 3, 4], None, tokens, 4, lora_id=7, lora_name="adapter")])
    index.apply("salt", [BlockStored([5, 6, 7, 8], None, tokens, 4, extra_keys=[("cache_salt", "s"), None, None,
                                                                                   None])])
    index.apply("plain", [BlockStored([9, 10, 11, 12], None, tokens, 4, extra_keys=[None] * 4)])
    assert index.lookup(tokens) == {"plain": 4}
    index.apply("salt", [BlockRemoved([5, 6, 7, 8])])
    index.apply("lora", [BlockRemoved([1, 2, 3, 4])])
    assert index.endpoints["salt"].hashes == index.endpoints["lora"].hashes == set() and len(index) == 4


def test_an_adapters_and_a_salted_requests_blocks_are_found_by_the_routers_keys_for_them() -> None:
    """vLLM 0.32 publishes extra keys untagged (``to_event_extra_keys``): the adapter's name first on every block,
    the cache salt on a request's first block only, nothing on a salted chain's later events. The router keys such a
    request as the plain chain moved into its space (``prompt_keys``): the index keys the events the same way, so
    each finds the other's blocks (they never did), and no other tenant's or adapter's."""
    from fuyao.inference_router.prompts import prompt_keys

    index = KvIndex(block_size=4)
    tokens = TOKENS[0][:16]
    plain = index.hashes(tokens)
    adapters = frozenset({"adapter", "other"})
    index.apply("lora", [BlockStored([1, 2, 3, 4], None, tokens, 4, lora_id=7, lora_name="adapter",
                                     extra_keys=[("adapter",)] * 4)])
    index.apply("salt", [BlockStored([5, 6], None, tokens[:8], 4, extra_keys=[("s",), None])])
    index.apply("salt", [BlockStored([7, 8], 6, tokens[8:], 4)])  # a later step: no extra keys, the parent's salt
    index.apply("both", [BlockStored([9, 10, 11, 12], None, tokens, 4, lora_id=3, lora_name="adapter",
                                     extra_keys=[("adapter", "s"), ("adapter",), ("adapter",), ("adapter",)])])
    index.apply("mm", [BlockStored([13, 14, 15, 16], None, tokens, 4, extra_keys=[(("img", 0),), None, None, None])])

    def found(body: dict) -> dict[str, int]:  # type: ignore[type-arg]
        return index.lookup(hashes=prompt_keys(plain, body, adapters))

    assert found({"model": "adapter"}) == {"lora": 4}
    assert found({"cache_salt": "s"}) == {"salt": 4}
    assert found({"model": "adapter", "cache_salt": "s"}) == {"both": 4}
    assert found({"model": "other"}) == {} and found({"cache_salt": "t"}) == {} and found({}) == {}
    index.apply("salt", [BlockRemoved([7, 8])])
    assert found({"cache_salt": "s"}) == {"salt": 2}


def test_vllm_exact_keys_take_event_hashes_as_they_are() -> None:
    """block_hashing.mode vllm: the engines' own hashes are the keys (streams without token_ids, and with them),
    and a lookup by tokens hashes them as vLLM does."""
    keys = VllmKeys(4, "sha256")
    index = KvIndex(block_size=4, keys=keys)
    prompt = list(range(300, 317))
    theirs = keys.chain(prompt)
    index.apply("a", [BlockStored(theirs[:2], None, [], 4)])  # no token_ids
    index.apply("b", [BlockStored(theirs, None, prompt[:16], 4)])  # token_ids, not re-hashed
    assert index.lookup(prompt) == {"a": 2, "b": 4} and set(index.blocks) == set(theirs)
    index.apply("b", [BlockRemoved(theirs[2:])])
    assert index.lookup(prompt) == {"a": 2, "b": 2}
    assert KvIndex(block_size=4).lookup(prompt) == {}  # the content chain names these tokens differently


def test_lookup_by_tokens_and_model() -> None:
    index = KvIndex(block_size=4)
    prompt = list(range(50))
    index.endpoint("a", "llama")
    index.endpoint("b", "qwen")
    for name in "ab":
        index.apply(name, [BlockStored(block_hashes(prompt, 4)[:5], None, prompt[:20], 4)])
    assert index.lookup(prompt) == {"a": 5, "b": 5}
    assert index.lookup(prompt, model="llama") == {"a": 5}
    assert index.drop("a") == 5 and index.lookup(prompt) == {"b": 5} and "a" not in index.endpoints


# --- the shared tier ------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tier(policy: KvCachePolicy, ttl: float | None = None, clock: Clock | None = None) -> SharedTier:
    return SharedTier(capacity_bytes=300, block_bytes=100, policy=policy, ttl_s=ttl, clock=clock or Clock())


@pytest.mark.parametrize(("policy", "survivor_after_touching_1"), [
    (KvCachePolicy.LRU, {1, 3, 4}), (KvCachePolicy.FIFO, {2, 3, 4}), (KvCachePolicy.LFU, {1, 3, 4})])
def test_eviction_policies(policy: KvCachePolicy, survivor_after_touching_1: set[int]) -> None:
    t = tier(policy)
    assert t.put([1, 2, 3]) == 3 and t.put([1]) == 0  # already there
    assert t.fetch([1]) == 1  # block 1 used
    t.put([4])  # full: one goes
    assert {b for b in (1, 2, 3, 4) if b in t} == survivor_after_touching_1 and t.evictions == 1


def test_lfu_keeps_the_frequently_fetched() -> None:
    t = tier(KvCachePolicy.LFU)
    t.put([1, 2, 3])
    for _ in range(3):
        t.fetch([2])
    t.fetch([3])
    t.put([4, 5])  # 1 (0 fetches) goes, then 4 (0 fetches, newer than... the oldest of the least used)
    assert 2 in t and 3 in t and 1 not in t and len(t) == 3


def test_fetch_counts_the_leading_run_and_ttl_expires() -> None:
    clock = Clock()
    t = tier(KvCachePolicy.LRU, ttl=10, clock=clock)
    t.put([1, 2])
    assert t.fetch([1, 2, 3]) == 2 and t.fetch([2, 1]) == 2 and t.fetch([3, 1]) == 0
    assert (t.requests, t.hits) == (3 + 2 + 1, 4)
    clock.now = 11
    assert t.peek([1]) == 0 and t.fetch([1, 2]) == 0 and t.expirations == 1
    assert SharedTier(0, 100).put([1]) == 0  # size 0: the tier is off


# --- the subscriber over real sockets -------------------------------------------------------------------------------
def _frames(seq: int, hashes: list[int]) -> list[bytes]:
    batch = EventBatch(time.time(), [BlockStored(hashes, None, [], 4)])  # no tokens: keyed by its hashes
    return [b"kv@test@m", seq.to_bytes(8, "big"), encode_batch(batch)]


@pytest.mark.parametrize("with_replay", [True, False])
def test_a_sequence_gap_is_replayed_or_the_endpoint_dropped(with_replay: bool) -> None:
    ctx = zmq.Context.instance()
    pub, router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    pub_port, replay_port = free_port(), free_port()
    pub.bind(f"tcp://127.0.0.1:{pub_port}")
    router.bind(f"tcp://127.0.0.1:{replay_port}")
    index = KvIndex(block_size=4)
    subscriber = Subscriber(index, replay_timeout_s=2.0).start()
    subscriber.add(Source("engine", f"tcp://127.0.0.1:{pub_port}",
                          f"tcp://127.0.0.1:{replay_port}" if with_replay else None))
    try:
        # the slow-joiner problem: publish until the subscriber is connected (each repeat of batch 0 is taken as a
        # restart: its entries dropped and batch 0 applied again, so 100 is back after every whole batch)
        # (the waits are failure bounds: each condition holds within milliseconds on a quiet machine, but a loaded
        # CI machine took more than 5 s to connect the SUB socket)
        wait_for(lambda: "engine" in subscriber.stats and subscriber.stats["engine"].connected, what="connected")
        wait_for(lambda: pub.send_multipart(_frames(0, [100])) or 100 in index.blocks, what="batch 0")
        pub.send_multipart(_frames(1, [101]))
        wait_for(lambda: 101 in index.blocks, what="block 101")
        pub.send_multipart(_frames(3, [103]))  # 2 was lost
        if with_replay:
            request = router.recv_multipart()  # [identity, "", start]
            assert int.from_bytes(request[2], "big") == 2
            router.send_multipart([request[0], b"", (2).to_bytes(8, "big"), _frames(2, [102])[2]])
            router.send_multipart([request[0], b"", (-1).to_bytes(8, "big", signed=True), b""])
            wait_for(lambda: 103 in index.blocks, what="block 103")
            assert {100, 101, 102, 103} <= set(index.blocks) and subscriber.stats["engine"].replays == 1
        else:
            wait_for(lambda: 103 in index.blocks, what="block 103")
            assert set(index.blocks) == {103}  # what came before the gap cannot be trusted any more
            assert subscriber.stats["engine"].drops == 1
        assert subscriber.stats["engine"].gaps == 1
        pub.send_multipart([b"t", (4).to_bytes(8, "big"), b"\xc1 not msgpack"])
        wait_for(lambda: subscriber.stats["engine"].decode_errors == 1, what="a decode error")
        assert not index.blocks  # an undecodable batch: the endpoint's state is unknown
    finally:
        subscriber.stop()
        pub.close(linger=0)
        router.close(linger=0)


def test_engines_publishing_bytes_hashes_meet_the_same_lookups() -> None:
    # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: events carry the full digests; in vllm mode they were stored as bytes
    # while lookups hash to 64-bit integers: never a hit
    from fuyao.kv_blocks import decode_batch

    keys = VllmKeys(4, "sha256")
    index = KvIndex(block_size=4, keys=keys)
    prompt = list(range(300, 317))
    digests = keys.hasher.block_hashes(prompt, 4)
    payload = msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": digests, "parent_block_hash": None,
                                    "token_ids": prompt[:16], "block_size": 4, "lora_id": None, "medium": "GPU"}]])
    index.apply("a", decode_batch(payload).events)
    assert index.lookup(prompt) == {"a": 4}
    removed = msgpack.packb([2.0, [{"type": "BlockRemoved", "block_hashes": digests[2:], "medium": "GPU"}]])
    index.apply("a", decode_batch(removed).events)
    assert index.lookup(prompt) == {"a": 2}


def test_a_block_removed_from_one_medium_or_group_stays_where_it_still_is() -> None:
    # vLLM reports a block per medium (GPU, and CPU when it offloads) and per KV cache group (hybrid models): the
    # CPU tier evicting its copy, or a sliding-window group dropping an early block, left the engine holding it
    for keys in (None, VllmKeys(4, "sha256")):
        index = KvIndex(block_size=4, keys=keys)
        prompt = list(range(700, 716))
        theirs = (keys or index.keys).chain(prompt) if keys else block_hashes(prompt, 4)
        index.apply("e", [BlockStored(theirs, None, prompt, 4)])  # on the GPU
        index.apply("e", [BlockStored(theirs, None, prompt, 4, medium="CPU")])  # offloaded: a copy on CPU too
        assert index.medium(index.hashes(prompt)[0], "e") == "GPU"
        index.apply("e", [BlockRemoved(theirs, "CPU")])  # the CPU tier evicts its copy
        assert index.lookup(prompt) == {"e": 4}
        index.apply("e", [BlockStored(theirs[:2], None, prompt[:8], 4, group_idx=1)])  # a second group holds two
        index.apply("e", [BlockRemoved(theirs[:2], "GPU", 1)])  # that group drops them: group 0 still has them
        assert index.lookup(prompt) == {"e": 4}
        index.apply("e", [BlockRemoved(theirs[2:], "GPU")])  # gone from the only place it was
        assert index.lookup(prompt) == {"e": 2} and not index.where
        index.apply("e", [BlockStored(theirs[2:], theirs[1], prompt[8:], 4, medium="CPU")])  # on CPU only
        assert index.lookup(prompt) == {"e": 4} and index.medium(index.hashes(prompt)[3], "e") == "CPU"
