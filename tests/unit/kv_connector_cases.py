"""Cases of fuyao's vLLM KV connector (fuyao.kvcache.connector) without an engine, run in the cached vLLM venv (torch
and vLLM live only there) by tests/unit/test_kv_connector_parts.py:
``python -m tests.unit.kv_connector_cases DIR [CASE...]`` (``FUYAO_TINY_MODEL``: the generated model's directory)
prints, as its last line, ``MARK`` and a JSON object: each case → "" when it passed, else its traceback.

The scheduler side is driven the way vLLM drives it (``get_num_new_matched_tokens``, ``update_state_after_alloc``,
``build_connector_meta`` each step), with stand-ins for vLLM's ``Request`` and ``SchedulerOutput`` that carry the
fields the connector reads; the metadata is pickled to the worker side as vLLM does, whose caches are real tensors
shaped as vLLM's per-layer views ([blocks, KV heads, block size, 2 * head size]), with the LBHNC layout (the CPU
backend's: each page contiguous) or LBNHC (the default elsewhere: a page's logical view is not contiguous)."""

from __future__ import annotations

import copy
import json
import os
import pickle
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, overload

import torch
from vllm.config import KVTransferConfig, ParallelConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from fuyao.kvcache.blockstore import DEFAULT_QUEUE_BYTES
from fuyao.kvcache.connector import (
    FuyaoConnectorMetadata,
    FuyaoKVConnector,
    namespace_of,
    parallelism_problem,
    stable,
)

MARK = "KV-CONNECTOR-CASES "
BS = 4
HEADS, WIDTH = 2, 8  # KV heads; K and V of a 4-wide head
NUM_BLOCKS = 32
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
SCHEDULER, WORKER = KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER


class Model:
    """Stands in for vLLM's ``ModelConfig`` (what ``namespace_of`` reads)."""

    served_model_name = "tiny"
    model = "/models/tiny"
    dtype = torch.bfloat16  # a torch dtype, as vLLM's ModelConfig.dtype (its CPU kernel choice compares it)

    def get_num_kv_heads(self, parallel: Any) -> int:
        return HEADS

    def get_head_size(self) -> int:
        return WIDTH // 2

    def get_num_layers(self, parallel: Any) -> int:
        return len(LAYERS)


def vllm_config(tier: Path, policy: str = "recompute", layout: str = "LBHNC", model: Any = None,
                extra: dict[str, Any] | None = None, parallel: Any = None, block_size: int = BS) -> Any:
    transfer = KVTransferConfig(kv_connector="FuyaoKVConnector", kv_connector_module_path="fuyao.kvcache.connector",
                                kv_role="kv_both", kv_load_failure_policy=policy,
                                kv_connector_extra_config={"path": str(tier), **(extra or {})})
    return SimpleNamespace(
        model_config=model or Model(), kv_transfer_config=transfer,
        cache_config=SimpleNamespace(block_size=block_size, cache_dtype="auto", kv_cache_layout=layout),
        parallel_config=parallel or ParallelConfig(),  # one rank
        device_config=SimpleNamespace(device_type="cpu"))


def kv_cache_config(layers: Sequence[str] = tuple(LAYERS), layout: str = "LBHNC") -> Any:
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=list(layers))], kv_cache_layout=layout)


def connector(tier: Path, role: KVConnectorRole, layout: str = "LBHNC", **config: Any) -> FuyaoKVConnector:
    return FuyaoKVConnector(vllm_config(tier, layout=layout, **config), role, kv_cache_config(layout=layout))


def make_caches(layout: str, seed: int | None) -> dict[str, torch.Tensor]:
    """Per layer, vLLM's logical view [blocks, heads, block size, K|V] over memory in ``layout``'s order; random
    values from ``seed``, or zeros."""
    generator = torch.Generator().manual_seed(seed or 0)
    caches = {}
    for name in LAYERS:
        if layout == "LBNHC":  # memory [blocks, block size, heads, K|V]
            memory = torch.zeros(NUM_BLOCKS, BS, HEADS, WIDTH, dtype=torch.bfloat16)
            cache = memory.permute(0, 2, 1, 3)
        else:
            cache = torch.zeros(NUM_BLOCKS, HEADS, BS, WIDTH, dtype=torch.bfloat16)
        if seed is not None:
            cache.copy_(torch.randn(cache.shape, generator=generator).to(torch.bfloat16))
        caches[name] = cache
    return caches


class Tokens(Sequence[int]):
    """A request's token ids that count how many are read."""

    def __init__(self, tokens: Sequence[int]):
        self.tokens, self.read = list(tokens), 0

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            part = self.tokens[index]
            self.read += len(part)
            return part
        value = self.tokens[index]
        self.read += 1
        return value

    def __len__(self) -> int:
        return len(self.tokens)


class Request:
    """Stands in for vLLM's ``Request`` (what the scheduler side reads): a plain one, no LoRA, images or salt."""

    lora_request = None
    mm_features = None
    cache_salt = None
    prompt_embeds = None

    def __init__(self, request_id: str, tokens: Sequence[int]):
        self.request_id = request_id
        self.all_token_ids: Sequence[int] = tokens if isinstance(tokens, Tokens) else list(tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def output(new: Sequence[tuple[Request, Sequence[int], int, int]] = (),
           cached: Sequence[tuple[Request, Sequence[int] | None, int, int]] = ()) -> Any:
    """A step's ``SchedulerOutput``: new requests (request, block ids, computed tokens, scheduled tokens), running
    ones (request, block ids added this step, computed tokens before the step, scheduled tokens)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r.request_id, block_ids=(list(ids),), num_computed_tokens=c)
                            for r, ids, c, _ in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r.request_id for r, *_ in cached], resumed_req_ids=set(),
            new_block_ids=[(list(ids),) if ids else None for _, ids, _, _ in cached],
            num_computed_tokens=[c for _, _, c, _ in cached]),
        num_scheduled_tokens={r.request_id: s for r, _, _, s in [*new, *cached]},
        finished_req_ids=set())


class Engine:
    """One engine's two connectors (its scheduler's and its worker's) on one tier directory, and its caches."""

    def __init__(self, tier: Path, layout: str = "LBHNC", seed: int | None = None, **config: Any):
        self.scheduler = connector(tier, SCHEDULER, layout=layout, **config)
        self.worker = connector(tier, WORKER, layout=layout, **config)
        self.caches = make_caches(layout, seed)
        self.worker.register_kv_caches(self.caches)

    def admit(self, request: Request, local_tokens: int = 0) -> int:
        """What vLLM does when it admits a request with ``local_tokens`` from its own prefix cache: the tokens the
        tier adds."""
        external, load_async = self.scheduler.get_num_new_matched_tokens(request, local_tokens)
        assert external is not None and not load_async
        self.scheduler.update_state_after_alloc(request, None, external)
        return external

    def step(self, scheduled: Any) -> tuple[FuyaoConnectorMetadata, set[int]]:
        """One step, in vLLM's order (kv_connector_model_runner_mixin): the metadata, the loads, (the forward), the
        stores, the load errors; then the background writes finish. The metadata and the load errors."""
        meta = self.scheduler.build_connector_meta(scheduled)
        worker = self.worker
        worker.bind_connector_metadata(pickle.loads(pickle.dumps(meta)))  # as it reaches the worker
        worker.start_load_kv(None)
        worker.wait_for_save()
        errors = worker.get_block_ids_with_load_errors()
        worker.get_finished(scheduled.finished_req_ids)
        worker.clear_connector_metadata()
        assert worker._writer is not None and worker._writer.flush(10)
        assert isinstance(meta, FuyaoConnectorMetadata)
        return meta, errors

    def keys(self, request: Request) -> list[str]:
        return self.scheduler._keys(self.scheduler._track(request), request.num_tokens // BS)

    def has(self, key: str) -> bool:
        return self.scheduler._store.has(key)

    def close(self) -> None:
        if self.worker._writer is not None:
            self.worker._writer.close()


def positions(meta: FuyaoConnectorMetadata, request: Request) -> list[int]:
    return [store.position for store in meta.stores if store.request_id == request.request_id]


PROMPT = list(range(1000, 1043))  # 10 full blocks of 4, and 3 tokens over


def seeded(tier: Path, blocks: int) -> None:
    """Another engine computed the first ``blocks`` blocks of PROMPT: they are in the tier."""
    one = Engine(tier, seed=1)
    seed = Request("seed", PROMPT[:blocks * BS + 1])
    assert one.admit(seed) == 0
    one.step(output(new=[(seed, range(blocks + 1), 0, blocks * BS + 1)]))
    assert all(one.has(key) for key in one.keys(seed))
    one.close()


# Cases ---------------------------------------------------------------------------------------------------------------
def load_error_stores_nothing_computed_on_the_bad_block(tier: Path) -> None:
    seeded(tier, 8)
    two = Engine(tier)
    a = Request("a", PROMPT)
    assert two.admit(a) == 8 * BS
    # c shares a's first 5 blocks, from the engine's own prefix cache (vLLM caches a's loaded blocks when it
    # allocates them): c's KV reads a's block 3 too
    c = Request("c", PROMPT[:20] + list(range(2000, 2010)))
    assert two.admit(c, local_tokens=20) == 0
    keys_a, keys_c = two.keys(a), two.keys(c)
    two.scheduler._store.path(keys_a[3]).unlink()  # evicted between the lookup and the load
    a_blocks, c_blocks = list(range(11)), [0, 1, 2, 3, 4, 20, 21, 22]
    meta, errors = two.step(output(new=[(a, a_blocks, 8 * BS, 11), (c, c_blocks, 20, 10)]))
    assert errors == {3}
    # nothing either computed on top of the bad block is in the tier
    assert [two.has(k) for k in keys_a] == [True] * 3 + [False] + [True] * 4 + [False, False]
    assert not any(two.has(keys_c[i]) for i in (5, 6))
    assert positions(meta, a) == [8, 9] and positions(meta, c) == [3, 5, 6]  # handed over, and skipped
    assert meta.depends == {"a": list(range(8)), "c": [0, 1, 2, 3, 4]}
    # vLLM rolls a back to its first failed block and c to before the step (scheduler.py,
    # _update_requests_with_invalid_blocks); next step both are computed again, and stored
    meta, errors = two.step(output(cached=[(a, None, 3 * BS, 43 - 3 * BS), (c, None, 20, 10)]))
    assert errors == set() and sorted(meta.recomputed) == ["a", "c"]
    assert positions(meta, a) == [3, 8, 9] and positions(meta, c) == [5, 6]
    assert all(two.has(k) for k in keys_a) and all(two.has(k) for k in keys_c)
    two.close()


def a_spoiled_request_stores_nothing_until_vllm_rolls_it_back(tier: Path) -> None:
    """With async scheduling vLLM schedules the next step before it has seen this step's load errors: a request
    whose load failed runs once more on the bad block; what that step fills is not stored either."""
    seeded(tier, 8)
    two = Engine(tier)
    a = Request("a", PROMPT)
    assert two.admit(a) == 8 * BS
    keys = two.keys(a)
    two.scheduler._store.path(keys[3]).unlink()
    _, errors = two.step(output(new=[(a, range(11), 8 * BS, 11)]))
    assert errors == {3}
    a.all_token_ids = [*PROMPT, 7]  # its first output token: block 10 is full after the next step
    keys = two.keys(a)
    meta, _ = two.step(output(cached=[(a, None, 43, 1)]))  # scheduled before the rollback
    assert not two.has(keys[10]) and positions(meta, a) == [10]
    meta, _ = two.step(output(cached=[(a, None, 3 * BS, 44 - 3 * BS)]))  # the rollback is seen
    assert meta.recomputed == ["a"] and positions(meta, a) == [3, 8, 9, 10]
    assert all(two.has(k) for k in keys)
    two.close()


def a_non_contiguous_page_is_loaded_into_the_cache(tier: Path) -> None:
    one = Engine(tier, layout="LBNHC", seed=5)
    two = Engine(tier, layout="LBNHC")
    assert not one.caches[LAYERS[0]][1].is_contiguous()  # what LBNHC gives: a page's logical view has gaps
    first = Request("r1", PROMPT[:9])
    assert one.admit(first) == 0
    one.step(output(new=[(first, [5, 6, 7], 0, 9)]))
    second = Request("r2", PROMPT[:9])
    assert two.admit(second) == 2 * BS
    _, errors = two.step(output(new=[(second, [1, 2, 3], 2 * BS, 1)]))
    assert errors == set()
    for name in LAYERS:
        assert torch.equal(two.caches[name][1], one.caches[name][5]), name
        assert torch.equal(two.caches[name][2], one.caches[name][6]), name
    # an engine whose KV cache layout differs never reads these files
    other = Engine(tier, layout="LBHNC")
    assert other.scheduler._namespace.id() != one.scheduler._namespace.id()
    assert other.admit(Request("r3", PROMPT[:9])) == 0
    for engine in (one, two, other):
        engine.close()


def caches_the_tier_cannot_use_are_refused_at_registration(tier: Path) -> None:
    """A page with no byte view (its innermost axis not the channels) or a layer of the KV cache config without a
    cache: a clear error when vLLM registers the caches, not a failed or silent load later."""
    worker = connector(tier, WORKER)
    odd = {name: torch.zeros(NUM_BLOCKS, HEADS, WIDTH, BS, dtype=torch.bfloat16).transpose(2, 3) for name in LAYERS}
    for caches, expected in ((odd, "no byte view"), (dict(list(make_caches("LBHNC", None).items())[:1]), LAYERS[1])):
        try:
            worker.register_kv_caches(caches)
        except ValueError as exc:
            assert "FuyaoKVConnector" in str(exc) and expected in str(exc), exc
        else:
            raise AssertionError(f"registered caches it cannot use ({expected})")


def loads_read_one_block_at_a_time(tier: Path) -> None:
    one = Engine(tier, seed=3)
    first = Request("r1", PROMPT[:17])
    one.admit(first)
    one.step(output(new=[(first, range(5), 0, 17)]))
    two = Engine(tier)
    targets = [10, 11, 12, 13]
    seen: list[list[bool]] = []  # at each block read: which targets hold their data already
    parse = two.worker._store._parse

    def spy(key: str, data: bytes) -> Any:
        seen.append([bool(two.caches[LAYERS[0]][b].abs().sum()) for b in targets])
        return parse(key, data)

    two.worker._store._parse = spy  # type: ignore[method-assign]
    second = Request("r2", PROMPT[:17])
    assert two.admit(second) == 4 * BS
    _, errors = two.step(output(new=[(second, [*targets, 14], 4 * BS, 1)]))
    assert errors == set()
    assert seen == [[i < k for i in range(4)] for k in range(4)], seen  # each copied before the next is read
    for engine in (one, two):
        engine.close()


def the_write_queue_holds_at_most_write_queue_mb(tier: Path) -> None:
    small = Engine(tier / "small", seed=2, extra={"write_queue_mb": 0.0001})  # 104 bytes: less than a block (256)
    request = Request("r", PROMPT[:9])
    small.admit(request)
    small.step(output(new=[(request, range(3), 0, 9)]))
    assert not any(small.has(k) for k in small.keys(request))
    assert small.worker._store.stats.blocks_dropped == 2
    small.close()
    default = Engine(tier)
    assert default.worker._writer is not None and default.worker._writer.max_bytes == DEFAULT_QUEUE_BYTES
    default.close()
    try:
        Engine(tier / "bad", extra={"write_queue_mb": "lots"})
    except ValueError as exc:
        assert "write_queue_mb" in str(exc), exc
    else:
        raise AssertionError("write_queue_mb 'lots' was accepted")


def the_namespace_covers_what_changes_the_kv(tier: Path) -> None:
    from vllm.config import ModelConfig

    model = ModelConfig(model=os.environ["FUYAO_TINY_MODEL"], dtype="bfloat16")

    def namespace(changed: Any, *config: Any) -> Any:
        return namespace_of(vllm_config(tier, model=changed), *config)

    base = namespace(model)
    assert namespace(copy.copy(model)) == base  # the same settings: the same namespace

    def hook(config: Any) -> Any:
        return config

    for field, value in [("revision", "v2"), ("code_revision", "c2"), ("quantization", "fp8"),
                         ("hf_overrides", {"rope_theta": 1e6}), ("hf_overrides", hook),
                         ("model_weights", "s3://bucket/other"), ("disable_sliding_window", True)]:
        changed = copy.copy(model)
        setattr(changed, field, value)
        assert namespace(changed).id() != base.id(), field
    # a function by its name, not its address: the same in the scheduler's process and the worker's
    assert stable(hook) == f"{__name__}.the_namespace_covers_what_changes_the_kv.<locals>.hook"
    changed = copy.copy(model)
    changed.max_model_len = 128  # changes no KV value: engines still share
    assert namespace(changed) == base
    # the layers are those of the KV cache vLLM allocates, which the scheduler and the worker both know
    three = namespace(model, kv_cache_config([*LAYERS, "model.layers.2.self_attn.attn"]))
    assert three.num_layers == 3 and model.get_num_layers(ParallelConfig()) == 2
    assert namespace_of(vllm_config(tier, model=model, layout="LBNHC")).id() != base.id()  # vLLM's KV cache layout


def the_fail_policy_is_refused_at_start(tier: Path) -> None:
    for role in (SCHEDULER, WORKER):
        try:
            FuyaoKVConnector(vllm_config(tier, policy="fail"), role, kv_cache_config())
        except ValueError as exc:
            assert "kv_load_failure_policy" in str(exc) and "recompute" in str(exc), exc
        else:
            raise AssertionError(f"{role}: started with kv_load_failure_policy 'fail'")


def a_growing_request_reads_each_token_a_bounded_number_of_times(tier: Path) -> None:
    engine = Engine(tier)
    tokens = Tokens(range(BS))
    request = Request("long", tokens)
    engine.admit(request)
    engine.step(output(new=[(request, [0], 0, BS)]))
    for block in range(1, 150):  # decoding: a block fills every BS steps (here one step a block)
        tokens.tokens += range(block * BS, (block + 1) * BS)
        engine.step(output(cached=[(request, [block % NUM_BLOCKS], block * BS, BS)]))
    assert all(engine.has(k) for k in engine.keys(request))
    assert tokens.read <= 3 * len(tokens), f"{tokens.read} token reads for {len(tokens)} tokens"
    engine.close()


def the_tier_is_a_best_effort_disk_cache_to_vllm(tier: Path) -> None:
    """vLLM asks ``requires_kv_delivery`` (for kv_both its default is True: a preempted request is recomputed for a
    pending hand-off) and labels external hits by ``get_external_cache_hit_sources``: the tier is a best-effort
    cache on a volume, its hits ``disk``."""
    seeded(tier, 2)
    engine = Engine(tier)
    scheduler = engine.scheduler
    assert scheduler._kv_transfer_config.is_kv_producer  # kv_both: vLLM's default would be True
    assert scheduler.requires_kv_delivery is False and engine.worker.requires_kv_delivery is False
    request = Request("r", PROMPT[:2 * BS + 1])
    hits = engine.admit(request)
    assert hits == 2 * BS
    sources = scheduler.get_external_cache_hit_sources(request, hits)
    assert sources == {CacheHitSource.DISK: hits} and next(iter(sources)).value == "disk", sources
    assert scheduler.get_external_cache_hit_sources(request, 0) == {}
    engine.close()


def context_parallelism_keeps_the_connector_off(tier: Path) -> None:
    """Prefill or decode context parallelism (each rank computes or holds its own tokens of a block), like tensor and
    pipeline parallelism: nothing is looked up, loaded or stored, and the reason names the setting."""
    seeded(tier, 2)
    for field_name in ("prefill_context_parallel_size", "decode_context_parallel_size", "tensor_parallel_size",
                       "pipeline_parallel_size"):
        parallel = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1, prefill_context_parallel_size=1,
                                   decode_context_parallel_size=1)
        setattr(parallel, field_name, 2)
        assert field_name in parallelism_problem(parallel), field_name
        scheduler = FuyaoKVConnector(vllm_config(tier, parallel=parallel), SCHEDULER, kv_cache_config())
        request = Request("r", PROMPT[:2 * BS + 1])
        assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False), field_name
        meta = scheduler.build_connector_meta(output(new=[(request, range(3), 0, 2 * BS + 1)]))
        assert isinstance(meta, FuyaoConnectorMetadata) and not meta.stores and not meta.loads, field_name
    assert parallelism_problem(ParallelConfig()) == ""
    # vLLM 0.32's ParallelConfig has both context parallel sizes (the guard reads them, not a default)
    assert all(hasattr(ParallelConfig(), name) for name in ("prefill_context_parallel_size",
                                                           "decode_context_parallel_size"))


def the_namespace_names_the_kernel_vllm_picks(tier: Path) -> None:
    """On CPU the namespace carries the attention ISA vLLM's own CPU backend picks (``_get_attn_isa``), whatever the
    CPU flags say: AMX tiles change it for bfloat16 (vLLM's ``amx`` kernel) and not for float32 (``vec`` either way);
    a head size that is a multiple of 16 and not of 32 is ``vec16``."""
    from unittest import mock

    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    class Float32(Model):
        dtype = torch.float32

    class Head48(Model):
        def get_head_size(self) -> int:
            return 48

    def layout(model: Any = None, amx: bool = False) -> str:
        with mock.patch.object(torch.cpu, "_is_amx_tile_supported", return_value=amx):
            return namespace_of(vllm_config(tier, model=model, block_size=32), kv_cache_config()).layout

    bf16, bf16_amx = layout(), layout(amx=True)
    assert ":amx/" in bf16_amx and ":amx/" not in bf16, (bf16, bf16_amx)
    assert layout(Float32()) == layout(Float32(), amx=True)
    assert f":{_get_attn_isa(torch.bfloat16, 32, WIDTH // 2, 'auto')}/" in bf16, bf16
    assert ":vec16/" in layout(Head48(), amx=True)
    assert all(layout(model).count("/") == 3 for model in (None, Float32(), Head48()))  # device/isa/tp/layout


CASES: dict[str, Callable[[Path], None]] = {case.__name__: case for case in (
    load_error_stores_nothing_computed_on_the_bad_block, a_spoiled_request_stores_nothing_until_vllm_rolls_it_back,
    a_non_contiguous_page_is_loaded_into_the_cache, caches_the_tier_cannot_use_are_refused_at_registration,
    loads_read_one_block_at_a_time,
    the_write_queue_holds_at_most_write_queue_mb, the_namespace_covers_what_changes_the_kv,
    the_fail_policy_is_refused_at_start, a_growing_request_reads_each_token_a_bounded_number_of_times,
    the_tier_is_a_best_effort_disk_cache_to_vllm, context_parallelism_keeps_the_connector_off,
    the_namespace_names_the_kernel_vllm_picks)}


def main(argv: list[str]) -> int:
    root, names = Path(argv[0]), argv[1:] or list(CASES)
    outcomes = {}
    for name in names:
        tier = Path(tempfile.mkdtemp(prefix=f"{name[:20]}-", dir=root))
        try:
            CASES[name](tier)
            outcomes[name] = ""
        except Exception:
            outcomes[name] = traceback.format_exc()
    print(MARK + json.dumps(outcomes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
