"""The router's decisions on controlled loads (each strategy), the circuit breaker, vLLM metric parsing, the
config, and backend discovery from Service / EndpointSlice / Pod fixtures."""

from __future__ import annotations

import pytest

from fuyao.inference_router.balancing import Candidate, CircuitBreaker, Decision, RoundRobin
from fuyao.inference_router.config import ConfigError, build_config, with_overrides
from fuyao.inference_router.discovery import backends_from
from fuyao.inference_router.fleet import Fleet, PrefixSource, parse_vllm_metrics
from fuyao.inference_router.policies import (
    IntelligentArgs as IntelligentWeights,
)
from fuyao.inference_router.policies import (
    PolicyArgs,
    RoutingRequest,
    decide,
    health_scores,
    make_policy,
    prefix_scores,
)
from fuyao.inference_router.policies import (
    PrefixAwareArgs as PrefixWeights,
)


def choose(strategy: str, candidates: list[Candidate], rr: RoundRobin, *, total_blocks: int = 0,
           prompt_tokens: int = 0, prefix: PolicyArgs | None = None) -> Decision:
    """The registered policy ``strategy`` (the factory) deciding among ``candidates``, as the router asks it."""
    return decide(make_policy(strategy, prefix), candidates, RoutingRequest(prompt_tokens, total_blocks, 16), rr)


def test_round_robin_and_least_connections() -> None:
    rr = RoundRobin()
    fleet = [Candidate("http://a"), Candidate("http://b"), Candidate("http://c")]
    assert [choose("round-robin", fleet, rr).url for _ in range(4)] == ["http://a", "http://b", "http://c",
                                                                       "http://a"]
    loaded = [Candidate("http://a", in_flight=5), Candidate("http://b", waiting=1, running=2),
              Candidate("http://c", in_flight=4)]
    assert choose("least-connections", loaded, rr).url == "http://b"  # load = max(in-flight, waiting + running)


def test_intelligent_is_the_design_docs_health_score() -> None:
    weights = IntelligentWeights(queue_scale=32)
    idle = Candidate("http://idle")
    assert health_scores([idle], weights)["http://idle"] == pytest.approx(1.0)
    busy = Candidate("http://busy", waiting=16, running=32, kv_usage=0.5)
    # 0.4*(1 - 16/32) + 0.3*(1 - 32/64) + 0.3*(1 - 0.5)   (queue relative to max(queue_scale, the most queued))
    assert health_scores([busy], weights)["http://busy"] == pytest.approx(0.4 * 0.5 + 0.3 * 0.5 + 0.3 * 0.5)
    fresh = Candidate("http://fresh", in_flight=40)  # the router's own count, before any scrape
    assert health_scores([fresh], weights)["http://fresh"] < 0.7
    assert choose("intelligent", [busy, idle, fresh], RoundRobin()).url == "http://idle"


def test_prefix_aware_estimates_the_time_to_first_token() -> None:
    w = PrefixWeights()
    cached = Candidate("http://cached", in_flight=3, prefix_blocks=30)  # 480 of 512 prompt tokens cached
    cold = Candidate("http://cold", in_flight=2)
    decision = choose("prefix-aware", [cached, cold], RoundRobin(), total_blocks=32, prompt_tokens=512, prefix=w)
    assert decision.url == "http://cached" and decision.prefix_blocks == 30
    # work: cached 32 uncached + 3 x 24 decoding = 104; cold 512 + 2 x 24 = 560 → scores 1 - work / 560
    assert decision.scores["http://cached"] == pytest.approx(1 - 104 / 560)
    # a hot prefix: its engine already has 2,000 prefill tokens queued by the router → recomputing elsewhere wins
    queued = Candidate("http://cached", in_flight=6, prefix_blocks=30, pending_tokens=2000, prefilling=4)
    assert choose("prefix-aware", [queued, cold], RoundRobin(), total_blocks=32, prompt_tokens=512,
                  prefix=w).url == "http://cold"
    # many requests decoding there (they share every step): the same
    crowded = Candidate("http://cached", in_flight=30, prefix_blocks=30)
    assert choose("prefix-aware", [crowded, cold], RoundRobin(), total_blocks=32, prompt_tokens=512,
                  prefix=w).url == "http://cold"
    scores = prefix_scores([Candidate("http://x", prefix_blocks=8), Candidate("http://y", prefix_blocks=16)], 300,
                           16, w)
    assert scores["http://y"] > scores["http://x"]
    full = Candidate("http://full", kv_usage=0.9)
    assert choose("prefix-aware", [full, Candidate("http://free")], RoundRobin(), prompt_tokens=100,
                  prefix=w).url == "http://free"
    # under KV pressure (every prefix cache full) a copy elsewhere also evicts ~its size of someone's cache: the
    # same queue that spreads a context on a roomy fleet keeps it on its engine on a full one
    roomy_holder = Candidate("http://a", in_flight=2, prefix_blocks=30, pending_tokens=800, prefilling=1)
    roomy_other = Candidate("http://b", in_flight=1)
    assert choose("prefix-aware", [roomy_holder, roomy_other], RoundRobin(), prompt_tokens=512, prefix=w).url \
        == "http://b"
    full_holder = Candidate("http://a", in_flight=2, prefix_blocks=30, pending_tokens=800, prefilling=1,
                            occupancy=1.0)
    full_other = Candidate("http://b", in_flight=1, occupancy=1.0)
    assert choose("prefix-aware", [full_holder, full_other], RoundRobin(), prompt_tokens=512, prefix=w).url \
        == "http://a"
    # a new context (cached nowhere) goes where its blocks evict least
    assert choose("prefix-aware", [Candidate("http://a", occupancy=1.0), Candidate("http://b", occupancy=0.2)],
                  RoundRobin(), prompt_tokens=512, prefix=w).url == "http://b"


def test_circuit_breaker_opens_probes_and_closes() -> None:
    breaker = CircuitBreaker(failure_threshold=3, timeout_s=10)
    for _ in range(2):
        breaker.failure(now=0)
    assert breaker.state == "closed" and breaker.allows(0)
    breaker.failure(now=1)
    assert breaker.state == "open" and not breaker.allows(5)
    assert breaker.allows(11) and breaker.state == "half-open"  # one probe…
    breaker.dispatched()
    assert not breaker.allows(11)  # …at a time
    breaker.failure(now=12)
    assert breaker.state == "open" and not breaker.allows(15)
    assert breaker.allows(23)
    breaker.dispatched()
    breaker.success()
    assert breaker.state == "closed" and breaker.allows(23) and breaker.failures == 0


def test_vllm_metrics_parsing() -> None:
    text = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
vllm:num_requests_running{engine="0",model_name="m"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 100.0
garbage line
vllm:num_requests_running{engine="1"} not-a-number
"""
    assert parse_vllm_metrics(text) == {"waiting": 5.0, "running": 7.0, "kv_usage": 0.25}
    # data-parallel engines: requests add up, the KV cache usage (a fraction of each engine's cache) does not
    two = 'vllm:kv_cache_usage_perc{engine="0"} 0.5\nvllm:kv_cache_usage_perc{engine="1"} 0.5\n'
    assert parse_vllm_metrics(two)["kv_usage"] == 0.5


def test_config_validation_overrides_and_pools() -> None:
    config = build_config({"router": {"strategy": "intelligent", "backends": ["http://a:8000/"]},
                           "pdSeparation": {"enabled": True, "prefill": ["http://p:8000"],
                                            "decode": ["http://d:8000"]}})
    assert config.router.backends == ["http://a:8000"]
    assert with_overrides(config, router={"strategy": "round-robin", "listen": None}).router.strategy == "round-robin"
    for bad, field in (({"router": {"strategy": "fastest"}}, "router.strategy"),
                       ({"router": {"backends": ["a:8000"]}}, "router.backends"),
                       ({"router": {"circuitBreaker": {"timeout": "soon"}}}, "router.circuitBreaker.timeout"),
                       ({"kvCache": {"events": {"a:5557": "http://a"}}}, "kvCache.events"),
                       ({"pdSeparation": {"fallback": "retry"}}, "pdSeparation.fallback"),
                       ({"routr": {}}, "routr")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            build_config(bad)
    fleet = Fleet(config.router)
    fleet.configure(config.router, {"http://a:8000": "both", "http://p:8000": "prefill", "http://d:8000": "decode"})
    assert [b.url for b in fleet.pool("prefill")] == ["http://p:8000"]
    assert [b.url for b in fleet.pool("both")] == ["http://a:8000"]
    fleet.backends["http://a:8000"].healthy = False
    assert fleet.pool("both") == [] and fleet.pool("decode")[0].url == "http://d:8000"


def test_snake_case_keys_load_with_a_deprecation_warning_naming_the_camel_case_key(
        caplog: pytest.LogCaptureFixture) -> None:
    camel = build_config({"router": {"maxConcurrentRequests": 7, "prefixAware": {"decodeCostTokens": 3}},
                          "kvCache": {"blockSize": 32}})
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    snake = build_config({"router": {"max_concurrent_requests": 7, "prefix_aware": {"decode_cost_tokens": 3}},
                          "kv_cache": {"block_size": 32}})
    assert snake == camel
    warned = sorted(r.getMessage() for r in caplog.records if "deprecated" in r.getMessage())
    assert len(warned) == 5  # each key written in snake_case, sections and fields alike
    assert any("'kv_cache.block_size'" in w and "write 'kvCache.blockSize'" in w for w in warned)
    assert any("'router.prefix_aware.decode_cost_tokens'" in w and "'router.prefixAware.decodeCostTokens'" in w
               for w in warned)
    # both spellings at once (a chart's generated camelCase defaults with a user's snake_case override on top): the
    # snake_case value wins, and the two sections merge
    both = build_config({"kvCache": {"blockSize": 16, "hashSeed": 5}, "kv_cache": {"block_size": 64}})
    assert both.kv_cache.block_size == 64 and both.kv_cache.hash_seed == 5


def test_prefix_source_remembers_routes() -> None:
    source = PrefixSource(build_config({}).kv_cache)
    hashes = source.keys.chain(list(range(100)), limit=6)
    import asyncio

    source.routed("http://a", hashes)
    assert asyncio.run(source.matches(hashes)) == {"http://a": 6}
    source.forget("http://a")
    assert asyncio.run(source.matches(hashes)) == {}
    # wired to the fleet (as the router's cli does): a backend that leaves takes the record of what was sent there
    fleet = Fleet(build_config({}).router)
    fleet.on_reset.append(source.forget)
    fleet.configure(build_config({}).router, {"http://a": "both", "http://b": "both"})
    source.routed("http://a", hashes)
    source.routed("http://b", hashes)
    fleet.configure(build_config({}).router, {"http://b": "both"})
    assert asyncio.run(source.matches(hashes)) == {"http://b": 6}


def test_an_index_service_answer_of_the_wrong_shape_routes_on_what_the_router_knows() -> None:
    """``fuyao-kvcache`` answering null, a list, or counts that are not numbers: the lookup degrades to the router's
    own record (counted in ``remote_errors``), never fails the request; a well-formed answer is read."""
    import asyncio

    import aiohttp
    from aiohttp import web

    answers: list[object] = [None, [1], {"endpoints": {"http://a": "x"}}, {"endpoints": None, "cached_blocks": 7},
                             {"endpoints": {"http://b": "3"}, "volume_blocks": 2, "cached_blocks": {"http://b": 9}}]

    async def run() -> list[tuple[dict[str, int], int]]:
        async def lookup(_request: web.Request) -> web.Response:
            return web.json_response(answers.pop(0))

        app = web.Application()
        app.router.add_post("/v1/lookup", lookup)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        source = PrefixSource(build_config({"kvCache": {"service": f"http://127.0.0.1:{port}"}}).kv_cache)
        hashes = source.keys.chain(list(range(100)), limit=6)
        source.routed("http://a", hashes[:2])
        seen = []
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(5):
                    found = await source.lookup(hashes, session)
                    seen.append((found.endpoints, found.tier_blocks))
        finally:
            await runner.cleanup()
        assert source.remote_errors == 4
        return seen

    seen = asyncio.run(run())
    assert seen[:4] == [({"http://a": 2}, 0)] * 4  # the router's own record of where it sent the prefix
    assert seen[4] == ({"http://b": 3, "http://a": 2}, 2)


def test_discovery_from_service_endpointslice_and_pod_fixtures() -> None:
    services = [
        {"metadata": {"name": "llm", "namespace": "ai", "annotations": {
            "inference.openfuyao.com/enable-router": "true", "inference.openfuyao.com/health-check-path": "/ready",
            "inference.openfuyao.com/health-check-interval": "3s"}}},
        {"metadata": {"name": "other", "namespace": "ai", "annotations": {}}},
        {"metadata": {"name": "broken", "namespace": "ai", "annotations": {
            "inference.openfuyao.com/enable-router": "yes"}}},
    ]
    slices = [
        {"metadata": {"name": "llm-abc", "namespace": "ai", "labels": {"kubernetes.io/service-name": "llm"}},
         "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8000}],
         "endpoints": [
             {"addresses": ["10.0.0.1"], "conditions": {"ready": True}, "nodeName": "n1",
              "targetRef": {"kind": "Pod", "name": "p-0", "namespace": "ai"}},
             {"addresses": ["10.0.0.2"], "conditions": {"ready": True},
              "targetRef": {"kind": "Pod", "name": "d-0", "namespace": "ai"}},
             {"addresses": ["10.0.0.3"], "conditions": {"ready": False},
              "targetRef": {"kind": "Pod", "name": "x-0", "namespace": "ai"}},
             {"addresses": ["fd00::4"], "targetRef": {"kind": "Pod", "name": "b-0", "namespace": "ai"}}]},
        {"metadata": {"name": "other-x", "namespace": "ai", "labels": {"kubernetes.io/service-name": "other"}},
         "ports": [{"port": 80}], "endpoints": [{"addresses": ["10.9.9.9"]}]},
    ]
    pods = {("ai", "p-0"): {"metadata": {"labels": {"phase": "prefill"}}},
            ("ai", "d-0"): {"metadata": {"labels": {"phase": "decode"}}, "spec": {"nodeName": "n2"}},
            ("ai", "b-0"): {"metadata": {"labels": {"phase": "sideways"}}}}
    found = {b.url: b for b in backends_from(services, slices, pods)}
    assert set(found) == {"http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://[fd00::4]:8000"}
    assert found["http://10.0.0.1:8000"].role == "prefill" and found["http://10.0.0.1:8000"].node == "n1"
    assert found["http://10.0.0.2:8000"].role == "decode" and found["http://10.0.0.2:8000"].node == "n2"
    assert found["http://[fd00::4]:8000"].role == "both"  # an invalid phase label: both, with a warning
    assert found["http://10.0.0.1:8000"].health_path == "/ready"
    assert found["http://10.0.0.1:8000"].health_interval == 3.0


def test_decode_goes_next_to_its_prefill_unless_that_node_is_busier() -> None:
    import asyncio

    from fuyao.inference_router.proxy import Router

    config = build_config({"pd_separation": {"enabled": True, "prefill": ["http://p1:8000"],
                                             "decode": ["http://d1:8000", "http://d2:8000"]}})
    fleet = Fleet(config.router)
    fleet.configure(config.router, {"http://p1:8000": "prefill", "http://d1:8000": "decode",
                                    "http://d2:8000": "decode"})
    fleet.backends["http://d1:8000"].node = "n1"
    fleet.backends["http://d2:8000"].node = "n2"
    router = Router(config, fleet, PrefixSource(config.kv_cache))
    fleet.backends["http://d1:8000"].in_flight = 2  # a little busier than d2, but on the prefill's node
    chosen = asyncio.run(router._decide("decode", [], [], "least-connections", near="n1"))
    assert chosen is not None and chosen[0].url == "http://d1:8000"
    fleet.backends["http://d1:8000"].in_flight = 9  # clearly busier: load wins
    chosen = asyncio.run(router._decide("decode", [], [], "least-connections", near="n1"))
    assert chosen is not None and chosen[0].url == "http://d2:8000"


def test_with_a_shared_tier_a_context_is_not_pinned_to_the_engine_that_computed_it() -> None:
    """Three cases per prompt part: on the engine (free), in the shared tier (loaded at tierLoadCost of computing
    it), nowhere (a full prefill). The holder of a 480-token context has 1,000 prefill tokens queued: without a tier
    the idle engine would recompute the context (512 tokens) and still win; with the context in the tier it only
    loads it, at a fifth of the cost."""
    w = PrefixWeights()
    holder = Candidate("http://holder", in_flight=3, prefix_blocks=30, pending_tokens=1000, prefilling=2)
    idle = Candidate("http://idle")
    without = prefix_scores([holder, idle], 512, 16, w)
    with_tier = prefix_scores([holder, idle], 512, 16, w, tier_blocks=30)
    assert with_tier["http://idle"] > without["http://idle"]
    # the idle engine's cost: 32 computed + 0.2 x 480 loaded, against 512 computed without the tier
    work_idle = 32 + w.tier_load_cost * 480
    work_holder = 1000 + 32 + w.decode_cost_tokens * 1
    assert with_tier["http://idle"] == pytest.approx(1 - work_idle / max(work_idle, work_holder))
    # a busy holder whose queue is short: a load still costs more than a local hit, the holder keeps it
    light = Candidate("http://holder", in_flight=1, prefix_blocks=30, pending_tokens=40, prefilling=1)
    assert choose("prefix-aware", [light, idle], RoundRobin(), total_blocks=32, prompt_tokens=512, prefix=w).url \
        == "http://holder"
    # at full caches, without a tier the idle engine's new blocks evict others' contexts (recomputed later): the
    # holder keeps the context despite its queue; with the context in the tier, what is evicted is in the tier too
    # (loaded back later, not recomputed): the idle engine takes it
    queued = Candidate("http://holder", in_flight=3, prefix_blocks=30, pending_tokens=300, prefilling=1,
                       occupancy=1.0, tier_load_cost=0.05)
    full_idle = Candidate("http://idle", occupancy=1.0, tier_load_cost=0.05)
    assert choose("prefix-aware", [queued, full_idle], RoundRobin(), total_blocks=32, prompt_tokens=512,
                  prefix=w).url == "http://holder"
    tiered = prefix_scores([queued, full_idle], 512, 16, w, tier_blocks=30)
    assert tiered["http://idle"] > tiered["http://holder"]
    # a tier that holds less than the engine adds nothing for it
    assert prefix_scores([holder], 512, 16, w, tier_blocks=10) == prefix_scores([holder], 512, 16, w)
    assert PrefixWeights(tierLoadCost=1.0).tier_load_cost == 1.0  # camelCase in the file
    with pytest.raises(ValueError):
        PrefixWeights(tier_load_cost=5)
    # an engine whose load cost is measured uses its own: at 2x a prefill, the tier makes the idle engine costlier
    # than recomputing would (its connector loads what the tier holds), and with learning off the configured value
    # stands
    slow = Candidate("http://idle", tier_load_cost=2.0)
    assert prefix_scores([holder, slow], 512, 16, w, tier_blocks=30)["http://idle"] < without["http://idle"]
    fixed = PrefixWeights(learnTierLoadCost=False)
    assert prefix_scores([holder, slow], 512, 16, fixed, tier_blocks=30) == with_tier


def test_the_tier_load_cost_is_measured_from_the_engines_counters() -> None:
    """tierLoadCost from two scrapes: load seconds per loaded token over prefill seconds (less the load) per
    computed token; intervals that cannot tell leave the estimate; the estimate is smoothed and bounded."""
    from fuyao.inference_router.tier_cost import MAX_COST, TierReading, interval_cost, updated

    before = TierReading(load_seconds=1.0, blocks_loaded=10, prefill_seconds=5.0, computed_tokens=1000)
    # 20 blocks of 16 tokens loaded in 0.32 s (1 ms/token); 2.32 s of prefill of which 2 s computed 1000 tokens
    after = TierReading(load_seconds=1.32, blocks_loaded=30, prefill_seconds=7.32, computed_tokens=2000)
    assert interval_cost(before, after, 16) == pytest.approx(0.5)
    assert interval_cost(before, before, 16) is None  # nothing loaded
    assert interval_cost(before, TierReading(1.32, 30, 7.32, 1005), 16) is None  # too little computed
    assert interval_cost(after, before, 16) is None  # counters went back (a restart)
    assert interval_cost(before, TierReading(11.0, 11, 15.5, 1100), 16) == MAX_COST  # a load far slower than compute
    assert updated(None, None, after, 16) == (None, after)  # the first scrape: nothing to compare
    cost, baseline = updated(None, before, after, 16)
    assert cost == pytest.approx(0.5) and baseline == after
    assert updated(1.0, before, after, 16)[0] == pytest.approx(0.7 * 1.0 + 0.3 * 0.5)
    # a scrape between a load and its prefill: that interval cannot tell, its baseline stays, the next one counts both
    loaded_only = TierReading(load_seconds=1.32, blocks_loaded=30, prefill_seconds=5.0, computed_tokens=1000)
    assert updated(1.0, before, loaded_only, 16) == (1.0, before)
    assert updated(None, before, after, 16)[0] == pytest.approx(0.5)
    # counters that went back (the engine restarted): a new baseline, the estimate kept
    assert updated(0.4, after, before, 16) == (0.4, before)
    page = """vllm:cache_config_info{block_size="32",num_gpu_blocks="100",engine="0"} 1.0
fuyao_kv_tier_load_seconds_total{engine="0",model_name="m"} 1.5
fuyao_kv_tier_blocks_loaded_total{engine="0",model_name="m"} 12.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 9.0
vllm:request_prefill_kv_computed_tokens_sum{engine="0",model_name="m"} 4000.0
vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 3.0
"""
    assert parse_vllm_metrics(page) == {"num_blocks": 100.0, "block_size": 32.0, "load_seconds": 1.5,
                                        "blocks_loaded": 12.0, "prefill_seconds": 9.0, "computed_tokens": 4000.0}


def test_a_reload_keeps_the_settings_that_need_a_restart_and_names_them() -> None:
    from fuyao.inference_router.config import reloadable

    old = build_config({"router": {"listen": "127.0.0.1:9000", "strategy": "round-robin"},
                        "kvCache": {"blockSize": 16}})
    new = build_config({"router": {"listen": "0.0.0.0:9001", "strategy": "least-connections"},
                        "kvCache": {"blockSize": 32}})
    effective, held = reloadable(old, new)
    assert held == ["router.listen", "kvCache"]
    assert effective.router.strategy == "least-connections"  # what a reload does change
    assert effective.router.listen == "127.0.0.1:9000" and effective.kv_cache.block_size == 16
    assert reloadable(old, old) == (old, [])


def test_a_backend_that_leaves_takes_its_metric_series_with_it() -> None:
    # pod churn: inference_backend_requests_total kept a series per engine pod ever seen (then cleared them all)
    from fuyao.inference_router.metrics import RouterMetrics

    metrics = RouterMetrics()
    fleet = Fleet(build_config({}).router)
    fleet.on_removed.append(lambda url: metrics.backend_requests.forget(0, url))
    fleet.configure(build_config({}).router, {"http://a": "both", "http://b": "both"})
    metrics.backend_requests.inc("http://a", "both")
    metrics.backend_requests.inc("http://b", "both")
    fleet.configure(build_config({}).router, {"http://b": "both"})
    assert set(metrics.backend_requests.values) == {("http://b", "both")}
