"""fuyao's KV connector (fuyao.kvcache.connector) in two real vLLM engines (CPU build) sharing one directory: a
context computed on engine 1 is loaded, not recomputed, on engine 2 — vLLM's own
``vllm:external_prefix_cache_hits_total`` counts it, and engine 2 answers exactly as engine 1 does from its own
prefix cache (same weights: vLLM's dummy loader is seeded; same split of cached and computed tokens). Per-block keys:
a different question after the same context reuses the context's blocks. A corrupt file is recomputed, never an
error. Marker ``vllm`` (hack/test.sh builds the cached venv first). Two engines at once (~9 GB)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fuyao.contracts import KvCachePolicy
from fuyao.kv_blocks import block_hashes
from fuyao.kvcache.volume import VolumeTier
from tests.support.engines import Daemon, http_json, metric_total, start_all
from tests.support.polling import wait_for
from tests.support.vllm import BLOCK_SIZE, MODEL, REPO, vllm_engine

pytestmark = pytest.mark.vllm

CONTEXT = "Context about rivers: " + "floods and levees rain storm water banks delta silt " * 30


def connector_args(path: Path) -> list[str]:
    return ["--kv-transfer-config", json.dumps({
        "kv_connector": "FuyaoKVConnector", "kv_connector_module_path": "fuyao.kvcache.connector",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"path": str(path)}})]


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kv-tier")


@pytest.fixture(scope="module")
def engines(tier: Path) -> Iterator[list[Daemon]]:
    env = {"PYTHONPATH": str(REPO)}  # the checkout: vLLM imports the connector by module path
    pair = [vllm_engine(*connector_args(tier), env=env), vllm_engine(*connector_args(tier), env=env)]
    try:
        start_all(pair, timeout=420)  # side by side: each takes ~40-100 s, mostly its own start-up
        yield pair
    finally:
        for daemon in pair:
            daemon.close()


def complete(daemon: Daemon, prompt: str) -> dict[str, Any]:
    return http_json(daemon.url + "/v1/completions",  # type: ignore[no-any-return]
                     {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=120)


def metrics(daemon: Daemon) -> str:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def counted(daemon: Daemon, name: str) -> str | None:
    """The metrics page once ``name`` is above zero (the connector's counters reach the API server with a step's
    output)."""
    page = metrics(daemon)
    return page if metric_total(page, name) > 0 else None


def settled(tier: Path, at_least: int = 0) -> list[Path]:
    """The tier's block files once the engines' background writers are done: at least ``at_least`` files, and the
    same files for half a second with no temporary one."""
    def still() -> list[Path] | None:
        before = sorted(tier.rglob("*.kv"))
        time.sleep(0.5)
        after = sorted(tier.rglob("*.kv"))
        return after if after == before and len(after) >= at_least and not list(tier.rglob("*.tmp")) else None

    return wait_for(still, 15, f"at least {at_least} block files written")


def tokens(daemon: Daemon, prompt: str) -> int:
    return len(http_json(daemon.url + "/tokenize", {"model": MODEL, "prompt": prompt})["tokens"])


def test_a_context_computed_on_one_engine_is_loaded_not_recomputed_on_the_other(engines: list[Daemon],
                                                                                 tier: Path) -> None:
    one, two = engines
    prompt = CONTEXT + " Question: where do floods start?"
    n = tokens(one, prompt)
    loadable = (n - 1) // BLOCK_SIZE * BLOCK_SIZE  # vLLM computes at least the last token
    assert loadable >= 8 * BLOCK_SIZE
    first = complete(one, prompt)
    files = settled(tier, n // BLOCK_SIZE)  # written in the background: the step did not wait for them
    assert len(files) >= n // BLOCK_SIZE, f"{len(files)} block files for a {n}-token prompt"
    again = complete(one, prompt)  # engine 1 from its own prefix cache: the same split of cached/computed tokens
    assert metric_total(metrics(one), "vllm:prefix_cache_hits_total") >= loadable
    assert metric_total(metrics(one), "vllm:external_prefix_cache_hits_total") == 0
    loaded = complete(two, prompt)
    page = wait_for(lambda: counted(two, "fuyao_kv_tier_blocks_loaded_total"), 15, "engine 2's connector metrics")
    assert metric_total(page, "vllm:external_prefix_cache_hits_total") == loadable
    assert metric_total(page, "vllm:prefix_cache_hits_total") == 0  # nothing came from its own cache
    assert metric_total(page, "fuyao_kv_tier_blocks_loaded_total") == loadable // BLOCK_SIZE
    assert metric_total(page, "fuyao_kv_tier_blocks_missed_total") == 0
    # the loaded KV is the KV engine 1 computed: engine 2 answers as engine 1 does with that prefix cached
    assert loaded["choices"][0]["text"] == again["choices"][0]["text"]
    assert first["choices"][0]["text"]
    # fuyao-kvcache's volume tier publishes these blocks under the served model, in the index's own keys
    volume = VolumeTier(tier, 1 << 40, KvCachePolicy.LRU, block_size=BLOCK_SIZE)
    volume.sweep()
    ids = http_json(one.url + "/tokenize", {"model": MODEL, "prompt": prompt})["tokens"]
    assert volume.leading(block_hashes(ids, BLOCK_SIZE), MODEL) == n // BLOCK_SIZE


def test_another_question_after_the_same_context_reuses_the_contexts_blocks(engines: list[Daemon],
                                                                           tier: Path) -> None:
    one, two = engines
    shared = CONTEXT + " Second part: " + "meanders oxbow lakes and floodplains " * 12
    before_files = len(list(tier.rglob("*.kv")))
    complete(one, shared + " Question A?")
    settled(tier, before_files + 1)
    before = metric_total(metrics(two), "vllm:external_prefix_cache_hits_total")
    complete(two, shared + " Question B, asked differently?")
    gained = metric_total(metrics(two), "vllm:external_prefix_cache_hits_total") - before
    common = tokens(two, shared) // BLOCK_SIZE * BLOCK_SIZE
    # engine 2 already holds the CONTEXT blocks of the first test in its own cache; the rest of the shared part
    # comes from the tier, block by block (a whole-prompt key would find nothing: the questions differ)
    assert gained >= common - tokens(two, CONTEXT) - 2 * BLOCK_SIZE and gained > 0, (gained, common)


def test_a_cache_salt_keeps_a_tenants_blocks_to_itself(engines: list[Daemon], tier: Path) -> None:
    """vLLM's ``cache_salt`` separates tenants in its own prefix cache; the tier must too: a context computed under
    one salt is loaded for that salt and never for another or for none (vLLM's external-hit counter says so)."""
    one, two = engines
    context = "Salted context about glaciers: " + "ice sheets moraines crevasses calving fjords " * 20
    prompt = context + " Question: how do glaciers move?"
    n = tokens(one, prompt)
    before_files = len(list(tier.rglob("*.kv")))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    http_json(one.url + "/v1/completions", {**body, "cache_salt": "tenant-a"}, timeout=120)
    settled(tier, before_files + n // BLOCK_SIZE)

    def external() -> float:
        return metric_total(metrics(two), "vllm:external_prefix_cache_hits_total")

    start = external()
    for other in ({**body, "cache_salt": "tenant-b"}, body):  # another tenant, then no salt: nothing loaded
        http_json(two.url + "/v1/completions", other, timeout=120)
        time.sleep(1)
        assert external() == start, other.get("cache_salt")
    http_json(two.url + "/v1/completions", {**body, "cache_salt": "tenant-a"}, timeout=120)
    wait_for(lambda: external() > start, 15, "tenant-a's blocks loaded on engine 2")


def test_a_corrupt_block_is_recomputed_and_the_request_succeeds(engines: list[Daemon], tier: Path) -> None:
    """Half-written files (as a crash would leave) among the blocks engine 2 is about to load: they are misses,
    removed, reported to vLLM as load errors and recomputed; the request answers (no error)."""
    one, two = engines
    prompt = "Unrelated context about mountains: " + "peaks ridges glaciers valleys snow " * 25 + " Why?"
    before_files = len(list(tier.rglob("*.kv")))
    complete(one, prompt)
    made = sorted(settled(tier, before_files + 3), key=lambda p: p.stat().st_mtime)[-3:]  # two at least: the prompt's
    truncated = {}
    for path in made:
        truncated[path] = path.read_bytes()[:-7]
        path.write_bytes(truncated[path])
    missed_before = metric_total(metrics(two), "fuyao_kv_tier_blocks_missed_total")
    answer = complete(two, prompt)
    assert answer["choices"][0]["text"] and answer["choices"][0]["finish_reason"] == "length"
    page = wait_for(lambda: counted(two, "fuyao_kv_tier_blocks_corrupt_total"), 15, "the corrupt blocks counted")
    assert metric_total(page, "fuyao_kv_tier_blocks_missed_total") > missed_before
    # each corrupt file is removed, then stored again whole once engine 2 has recomputed its block
    wait_for(lambda: all(not p.exists() or p.read_bytes() != truncated[p] for p in made), 15,
             "no corrupt block file left for others to claim")
    assert "could not be loaded" in two.log_text()
