"""``fuyao-kvcache`` as a real process following real engine simulators' KV events: lookups name the engine
with the longest cached prefix, a cleared cache leaves the index, joining mid-stream catches up through replay;
bad config exits 2 naming the field; discovery turns engine pods into event sources."""

from __future__ import annotations

import subprocess
import sys
import time

from fuyao.kvcache.discovery import _Pods, source_of
from fuyao.kvcache.subscriber import Source, SourceStats
from tests.support.engines import engine, kvcache
from tests.support.polling import wait_for

SHARED = "You are a helpful assistant. Answer in one short paragraph, citing sources. " * 4


def test_the_index_follows_engines_and_answers_lookups() -> None:
    a = engine(events=True, replay=True).start()
    b = engine(events=True, replay=True).start()
    # a computes a prompt before the index exists: the index catches up through a's replay buffer
    a.post("/v1/completions", {"prompt": SHARED + "Question one?", "max_tokens": 1})
    cache = kvcache("--kv-events", f"{a.url}={a.events},{a.replay}",  # type: ignore[attr-defined]
                    "--kv-events", f"{b.url}={b.events}").start()  # type: ignore[attr-defined]
    try:
        # the subscription is live once b's events arrive: prompt b until then
        wait_for(lambda: b.post("/v1/completions", {"prompt": SHARED[:150], "max_tokens": 1}) and
                 cache.post("/v1/lookup", {"prompt": SHARED[:150]})[1]["endpoints"].get(b.url))
        a.post("/v1/completions", {"prompt": "unrelated " * 40, "max_tokens": 1})  # a's stream is live: catch up
        found = wait_for(lambda: (r := cache.post("/v1/lookup", {"prompt": SHARED + "Question two?"})[1])
                         ["endpoints"].get(a.url) and r)
        assert found["endpoints"][a.url] > found["endpoints"].get(b.url, 0)  # a holds the longer prefix
        assert found["block_size"] == 16 and found["blocks"] >= found["endpoints"][a.url]
        # every engine's prefix-cache size comes with it (a router weighs what a new prompt evicts there)
        assert found["cached_blocks"][a.url] >= found["endpoints"][a.url] and found["cached_blocks"][b.url] > 0
        endpoints = cache.post("/v1/lookup", {"prompt": "nothing like it"})[1]["endpoints"]
        assert endpoints == {}
        assert a.request("POST", "/reset_prefix_cache") == (200, b'{"success":true}')
        # the AllBlocksCleared goes out with the engine's next step, as vLLM's: an idle engine needs a request
        a.post("/v1/completions", {"prompt": "after the reset " * 20, "max_tokens": 1})
        wait_for(lambda: a.url not in cache.post("/v1/lookup", {"prompt": SHARED + "Question two?"})[1]["endpoints"])
        stats = wait_for(lambda: (s := __import__("json").loads(cache.get("/v1/endpoints")[1])) and s)
        assert set(stats) == {a.url, b.url} and stats[a.url]["gaps"] == 0
        assert cache.metric("kv_cache_requests") > 0 and cache.metric("fuyao_kvcache_events_total") > 0
        # what the KvEventStreamDown / KvEventStreamStale alerts read, per engine
        for url in (a.url, b.url):
            assert cache.metric(f'fuyao_kvcache_event_stream_connected{{endpoint="{url}"}}') == 1
            last = cache.metric(f'fuyao_kvcache_last_event_timestamp_seconds{{endpoint="{url}"}}')
            assert time.time() - 120 < last <= time.time()
        assert cache.post("/v1/lookup", {"token_ids": [-1]})[0] == 400
        assert cache.post("/v1/blocks", {"hashes": "x"})[0] == 400
    finally:
        for daemon in (cache, a, b):
            daemon.close()


def test_config_errors_exit_2_naming_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "kv.yaml"
    config.write_text("version: v1\nkv_cache:\n  eviction_policy: MRU\n")
    result = subprocess.run([sys.executable, "-m", "fuyao.kvcache.cli", "--config", str(config)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "eviction_policy" in result.stderr
    config.write_text("version: v1\nkv_cache:\n  size: lots\n")
    result = subprocess.run([sys.executable, "-m", "fuyao.kvcache.cli", "--config", str(config)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "size" in result.stderr and "quantity" in result.stderr
    result = subprocess.run([sys.executable, "-m", "fuyao.kvcache.cli", "--kv-events", "no-url"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "NAME=URL" in result.stderr


def test_discovery_turns_running_engine_pods_into_sources() -> None:
    pod = {"metadata": {"uid": "u1", "name": "vllm-0", "namespace": "ai", "annotations": {
        "inference.openfuyao.com/kv-events-port": "5600", "inference.openfuyao.com/kv-events-replay-port": "5601",
        "inference.openfuyao.com/model": "llama"}},
        "spec": {"containers": [{"ports": [{"name": "metrics", "containerPort": 9000},
                                           {"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": "10.1.2.3"}}
    assert source_of(pod) == Source("http://10.1.2.3:8080", "tcp://10.1.2.3:5600", "tcp://10.1.2.3:5601", "llama")
    assert source_of({**pod, "status": {"phase": "Pending"}}) is None
    bad = {**pod, "metadata": {**pod["metadata"], "annotations": {"inference.openfuyao.com/kv-events-port": "x"}}}
    assert source_of(bad) is None

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []

        def add(self, source: Source) -> None:
            self.calls.append(("add", source.name))

        def remove(self, name: str) -> None:
            self.calls.append(("remove", name))

    recorder = Recorder()
    pods = _Pods(recorder)  # type: ignore[arg-type]
    pods.replace([pod])
    pods.upsert(pod)  # unchanged: nothing to do
    moved = {**pod, "status": {"phase": "Running", "podIP": "10.1.2.4"}}
    pods.upsert(moved)
    pods.delete(moved)
    assert recorder.calls == [("add", "http://10.1.2.3:8080"), ("remove", "http://10.1.2.3:8080"),
                              ("add", "http://10.1.2.4:8080"), ("remove", "http://10.1.2.4:8080")]
    # a new pod takes a deleted one's IP before the old pod's deletion arrives (or a re-list sees both at once):
    # the new pod stays followed
    recorder.calls.clear()
    old = {**pod, "metadata": {**pod["metadata"], "uid": "old"}}
    new = {**pod, "metadata": {**pod["metadata"], "uid": "new", "name": "vllm-1"}}
    pods.upsert(old)
    pods.upsert(new)
    pods.delete(old)
    assert recorder.calls[-1] == ("add", "http://10.1.2.3:8080") and pods.by_uid["new"].name == "http://10.1.2.3:8080"
    pods.upsert(old)
    recorder.calls.clear()
    pods.replace([new])  # a re-list: the old pod is gone, the new one holds its address
    assert ("remove", "http://10.1.2.3:8080") not in recorder.calls


def test_the_volume_tier_is_held_at_its_size_by_the_policy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``kvCache.volume``: what engines' connectors stored on the volume (block files, written here with the
    connector's own block store) is swept down to ``size``: the least recently loaded blocks go first (LRU), and
    /metrics says what is held and what was removed."""
    from fuyao.kvcache.blockstore import BlockStore, Namespace, chain_keys

    ns = Namespace(model="m", dtype="bf16", block_size=4, num_kv_heads=1, head_size=64, num_layers=1, layout="t")
    store = BlockStore(tmp_path / "tier", ns, writer="engine-1")
    assert store.describe()  # namespace.json: the manager publishes the blocks under model "m"
    tokens = list(range(40))
    keys = chain_keys(ns, tokens, 10)
    for i, key in enumerate(keys):
        store.write(key, keys[i - 1] if i else "", i, tokens[i * 4:(i + 1) * 4], [("layer", bytes(1000))])
    sizes = {key: store.path(key).stat().st_size for key in keys}
    old = time.time() - 600
    for key in keys:
        __import__("os").utime(store.path(key), (old, old))
    for key in keys[:4]:
        assert store.read(key) is not None  # loaded lately: LRU keeps them
    config = tmp_path / "kv.yaml"
    capacity = max(sizes.values()) * 4 + 10  # room for 4 blocks, not 5
    config.write_text(f"version: v1\nkvCache:\n  blockSize: 4\n  size: {capacity}\n  evictionPolicy: LRU\n"
                      f"  volume:\n    path: {tmp_path / 'tier'}\n    interval: 200ms\n")
    cache = kvcache("--config", str(config)).start()
    try:
        wait_for(lambda: cache.metric('fuyao_kvcache_volume_removed_blocks_total{reason="evicted"}') == 6, 20,
                 "six blocks evicted")
        left = sorted(p.name[:-3] for p in (tmp_path / "tier").rglob("*.kv"))
        assert left == sorted(keys[:4])  # the loaded ones stayed
        # lookups say which leading blocks of a prompt the volume holds, in the index's own keys
        found = wait_for(lambda: cache.post("/v1/lookup", {"token_ids": tokens, "model": "m"})[1]
                         .get("volume_blocks"), 10, "the volume's blocks published")
        assert found == 4
        assert cache.post("/v1/lookup", {"token_ids": tokens, "model": "other"})[1]["volume_blocks"] == 0
        assert cache.post("/v1/lookup", {"token_ids": [7, *tokens[1:]]})[1]["volume_blocks"] == 0
        # the router asks the same service: its prefix source reads the tier's share of the prompt
        import asyncio

        import aiohttp

        from fuyao.inference_router.config import build_config as router_config
        from fuyao.inference_router.fleet import PrefixSource

        source = PrefixSource(router_config({"kvCache": {"blockSize": 4, "service": cache.url}}).kv_cache)

        async def ask() -> int:
            async with aiohttp.ClientSession() as session:
                return (await source.lookup(source.keys.chain(tokens), session)).tier_blocks

        assert asyncio.run(ask()) == 4
        assert cache.metric("fuyao_kvcache_volume_blocks") == 4
        assert cache.metric("fuyao_kvcache_volume_bytes") <= capacity
    finally:
        cache.close()


def test_warming_sends_the_queries_through_an_engine_and_survives_one_that_is_down(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``warming.engine``: the queries go to an engine as 1-token completions (with fuyao's KV connector their KV
    lands on the volume tier), at start and again every interval; an engine that is not up yet is retried, and the
    service keeps serving meanwhile."""
    sim = engine()
    config = tmp_path / "kv.yaml"
    config.write_text(f"version: v1\nkvCache:\n  warming:\n    enabled: true\n    engine: {sim.url}\n"
                      "    interval: 300ms\n    queries: ['You are a helpful assistant.', 'Answer briefly.']\n")
    cache = kvcache("--config", str(config)).start()  # before the engine: its first round fails
    try:
        assert cache.get("/healthz")[0] == 200 and cache.metric("fuyao_kvcache_warming_queries_total") == 0
        sim.start()
        wait_for(lambda: cache.metric("fuyao_kvcache_warming_queries_total") >= 4, 30, "two warming rounds")
        assert sim.metric("vllm:request_success_total") >= 4
        assert "warming query not sent" in cache.log_text()  # the first round, said
    finally:
        cache.close()
        sim.close()


def test_an_engine_no_longer_followed_leaves_no_metric_series() -> None:
    # pod churn: per-endpoint series of engines that left went on forever (a frozen lag alerting for a dead pod)
    from fuyao.kvcache.config import build_config
    from fuyao.kvcache.service import KvCacheService

    service = KvCacheService(build_config({}).kv_cache)
    service.subscriber.stats["http://10.0.0.1:8000"] = SourceStats()
    service.metrics.batch("http://10.0.0.1:8000", 3, 0.2)
    service.metrics.batch("http://10.0.0.2:8000", 1, 0.1)
    # the subscriber follows only the first (the second was never added, or its pod went)
    page = service.metrics.render().decode()
    assert 'fuyao_kvcache_event_lag_seconds{endpoint="http://10.0.0.1:8000"}' in page
    assert "10.0.0.2" not in page


def test_the_tiers_cumulative_counts_are_counters() -> None:
    # they were gauges holding running totals: rate() and increase() over them are wrong, and a restart looked like
    # a drop instead of a counter reset
    from prometheus_client.parser import text_string_to_metric_families

    from fuyao.kvcache.config import build_config
    from fuyao.kvcache.service import KvCacheService

    service = KvCacheService(build_config({"kvCache": {"size": 8, "blockSize": 4, "bytesPerToken": 1}}).kv_cache)
    assert service.tier is not None
    service.tier.put([1, 2, 3])  # room for two: one evicted
    families = {f.name: f for f in text_string_to_metric_families(service.metrics.render().decode())}
    evictions = families["fuyao_kvcache_tier_evictions"]
    assert evictions.type == "counter"
    assert [(s.name, s.value) for s in evictions.samples] == [("fuyao_kvcache_tier_evictions_total", 1.0)]
    assert families["fuyao_kvcache_tier_expirations"].type == "counter"
    assert families["fuyao_kvcache_volume_removed_blocks"].type == "counter"  # described even without a volume
