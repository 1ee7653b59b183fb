"""fuyao's KV connector for vLLM: KV blocks shared between engines through a directory on an RWX volume.

Start vLLM with the checkout on ``PYTHONPATH`` and::

    --kv-transfer-config '{"kv_connector": "FuyaoKVConnector",
                           "kv_connector_module_path": "fuyao.kvcache.connector",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"path": "/mnt/kv"}}'

What it does (vLLM 0.32's ``KVConnectorBase_V1``; facts in docs/facts/vllm-kv-connector.md):

- **Store.** After each step, every block of a request that became full and computed in that step (prompt and
  generated tokens alike, so a multi-turn conversation's next turn finds its last answer) is copied out of the KV
  cache and written, by a background thread, as one file holding the block's page from every layer
  (``fuyao.kvcache.blockstore``: content keys, atomic renames; ``Writer``): the step never waits for the volume. A
  block the tier already holds is not written again; one that finds the writer behind (``write_queue_mb`` of copies
  waiting) is dropped and counted.
- **Load.** For a new request, the scheduler side counts the leading blocks after the engine's own prefix-cache hit
  whose files exist (never the prompt's last token: vLLM must compute at least one). The worker copies them into
  the blocks vLLM allocated, one block at a time, before the forward pass (a synchronous load). vLLM counts them in
  ``vllm:external_prefix_cache_hits_total``, labelled ``disk`` in ``vllm:prompt_tokens_cached_by_source``.
- **Best effort.** ``requires_kv_delivery`` is False (vLLM's default for ``kv_both`` is True): a store the tier
  misses is a miss later, so vLLM need not recompute a preempted request for the connector's sake.
- **Faults.** A file that is gone, partial or corrupt at load time is reported to vLLM as a load error for that block
  (``get_block_ids_with_load_errors``), and vLLM recomputes it and what follows: the connector refuses to start
  unless ``"kv_load_failure_policy": "recompute"`` (vLLM's default, ``fail``, would fail the request). Nothing a
  request computed on top of a block that failed to load is stored: its stores, and those of any request admitted
  with that block, are skipped until vLLM has rolled it back (then the recomputed blocks are stored). A volume that
  refuses writes (full, read-only) stops the stores for ``retry_s`` seconds and is retried; nothing else changes.
- **Metrics** (on the engine's ``/metrics``): ``fuyao_kv_tier_{blocks,bytes}_{stored,loaded}_total``,
  ``fuyao_kv_tier_blocks_missed_total``, ``fuyao_kv_tier_blocks_corrupt_total``,
  ``fuyao_kv_tier_write_errors_total``, ``fuyao_kv_tier_blocks_dropped_total``, ``fuyao_kv_tier_load_seconds_total``
  (``blockstore.COUNTERS``).

Extra config: ``path`` (required), ``retry_s`` (default 30), ``write_queue_mb`` (default 256: the copies of blocks
waiting for the volume, at most). Two engines share files only when their namespace matches
(``blockstore.Namespace``: the model and what changes its weights or computation (revision, quantization,
``hf_overrides``...), dtype, block size, KV heads, head size, the KV cache's layers, vLLM's KV cache layout, and, on
CPU, the attention kernel's instruction set, which orders the bytes of a page: vLLM's own choice,
``attention_isa``). A block's key covers its tokens and everything before it, and what else vLLM's own block hash
covers (its extra keys: the LoRA adapter, images, the request's ``cache_salt``, prompt embeddings), so a block
computed for one adapter, image or tenant is never loaded for another. With tensor, pipeline, prefill context or
decode context parallelism (each rank holds or computes its own heads, layers or tokens of a block) the connector
stays off and says so at start (``parallelism_problem``): the tier holds one file per block.

Imports only the standard library, vLLM and its dependencies (torch), and fuyao's kvcache block store, so it runs in
any vLLM environment without fuyao's server dependencies.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import platform
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from fuyao.kvcache.blockstore import (
    COUNTERS,
    DEFAULT_QUEUE_BYTES,
    METRIC_PREFIX,
    BlockStore,
    Namespace,
    Writer,
    chain_keys,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.fuyao.kvcache.connector")  # under vLLM's logger: its handler and format



MODEL_FACTORS = ("model_weights", "revision", "code_revision", "hf_config_path", "hf_overrides", "quantization",
                 "quantization_config", "model_class_overrides", "model_impl", "runner", "convert",
                 "disable_sliding_window")
"""The fields of vLLM's ``ModelConfig`` besides the model itself and its dtype that change the KV a prompt gives
(other weights, another config, a quantization, another implementation or attention span): in the namespace. Not
``ModelConfig.compute_hash()``: it leaves ``hf_overrides`` out (it hashes their effect through the whole
``hf_config``, an object model code may change in the worker's process, which has loaded the model, and not in the
scheduler's: their namespaces must be equal), and covers settings that change no KV value (``max_model_len``,
``max_logprobs``...), which would keep engines apart for nothing."""


def attention_isa(dtype: Any, block_size: int, head_size: int, cache_dtype: str) -> str:
    """The instruction set of the CPU attention kernel vLLM runs for these settings, which orders the bytes of a
    page: vLLM's own choice (``_get_attn_isa`` of its CPU attention backend, called with what its metadata builder
    passes: the model's dtype, the block size, the head size, the KV cache dtype), so engines share files only when
    their kernels write the same bytes (``amx`` only for bfloat16 with AMX tiles, ``vec16`` for a head size that is a
    multiple of 16 and not of 32, ...); with the machine, whose byte order the pages keep. Imported here, not at the
    top: only a CPU engine has that backend."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return f"{platform.machine()}:{_get_attn_isa(dtype, block_size, head_size, cache_dtype)}"


def stable(value: Any) -> Any:
    """A config value as JSON that is the same in every process of every engine given the same settings (a function
    or class: its qualified name, never its address)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return stable(value.value)
    if isinstance(value, Mapping):
        return {str(k): stable(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, set | frozenset):
        return sorted((stable(v) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [stable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return stable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    if callable(getattr(value, "model_dump", None)):  # a pydantic model
        return stable(value.model_dump())
    text = str(value)
    return type(value).__qualname__ if " at 0x" in text else f"{type(value).__qualname__}:{text}"  # no address


def model_digest(model_config: Any) -> str:
    """What of ``MODEL_FACTORS`` this engine runs with, as a short digest."""
    factors = {name: stable(getattr(model_config, name)) for name in MODEL_FACTORS if hasattr(model_config, name)}
    return hashlib.sha256(json.dumps(factors, sort_keys=True).encode()).hexdigest()[:16]


def kv_layers(kv_cache_config: KVCacheConfig | None) -> list[str]:
    """The attention layers of the KV cache vLLM allocates (what ``register_kv_caches`` receives, but for layers
    sharing another's cache), known to the scheduler and the worker alike; empty when not given."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    return sorted({name for group in groups for name in group.layer_names})


def namespace_of(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None = None) -> Namespace:
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    device = getattr(vllm_config.device_config, "device_type", "cpu")
    kv_layout = (getattr(cache, "kv_cache_layout", None)
                 or getattr(kv_cache_config, "kv_cache_layout", None) or "unresolved")
    layers = kv_layers(kv_cache_config)
    served = str(model.served_model_name if isinstance(model.served_model_name, str)
                 else (model.served_model_name or [model.model])[0])
    block_size, head_size = int(cache.block_size), int(model.get_head_size())
    kernel = attention_isa(model.dtype, block_size, head_size, cache.cache_dtype) if device == "cpu" else device
    return Namespace(
        model=f"{served}@{model.model}#{model_digest(model)}",
        dtype=f"{model.dtype}/{cache.cache_dtype}",
        block_size=block_size,
        num_kv_heads=int(model.get_num_kv_heads(parallel)),
        head_size=head_size,
        num_layers=len(layers) if layers else int(model.get_num_layers(parallel)),
        layout=f"{device}/{kernel}/tp{parallel.tensor_parallel_size}/{kv_layout}",
    )


def parallelism_problem(parallel: Any) -> str:
    """Why the tier cannot serve this engine's parallelism (empty when it can): with tensor or pipeline parallelism
    each rank holds its own heads or layers, with decode context parallelism each rank holds its own tokens of a
    block, and with prefill context parallelism each rank computes its own part of a prompt; the tier keeps one file
    per block, written and read by one worker."""
    sizes = {"tensor_parallel_size": parallel.tensor_parallel_size,
             "pipeline_parallel_size": parallel.pipeline_parallel_size,
             "prefill_context_parallel_size": getattr(parallel, "prefill_context_parallel_size", 1),
             "decode_context_parallel_size": getattr(parallel, "decode_context_parallel_size", 1)}
    over = {name: size for name, size in sizes.items() if size > 1}
    if not over:
        return ""
    return (", ".join(f"{name} {size}" for name, size in over.items())
            + ": each rank holds or computes its own part of a block's KV (heads, layers or tokens), and the tier "
              "keeps one file per block, written and read by one worker")


def queue_bytes(extra: Any) -> int:
    """``write_queue_mb`` of the extra config in bytes (default ``DEFAULT_QUEUE_BYTES``)."""
    if extra is None:
        return DEFAULT_QUEUE_BYTES
    try:
        megabytes = float(extra)
    except (TypeError, ValueError):
        megabytes = 0.0
    if not megabytes > 0:
        raise ValueError(f"FuyaoKVConnector: kv_connector_extra_config write_queue_mb must be a positive number of "
                         f"MiB, not {extra!r}")
    return max(1, int(megabytes * (1 << 20)))


class Store(NamedTuple):
    """One block to store: whose it is, where it is in the cache, and its file's header fields."""

    request_id: str
    block_id: int
    key: str
    parent: str
    position: int
    token_ids: list[int]


@dataclass
class FuyaoConnectorMetadata(KVConnectorMetadata):
    """Scheduler → worker, each step (pickled): blocks to load (block id, key) and to store; for each request
    admitted this step, the blocks loaded this step its KV reads (``depends``: a failed load spoils its stores); the
    requests vLLM rolled back or re-admitted, whose KV is being recomputed (``recomputed``)."""

    loads: list[tuple[int, str]] = field(default_factory=list)
    stores: list[Store] = field(default_factory=list)
    depends: dict[str, list[int]] = field(default_factory=dict)
    recomputed: list[str] = field(default_factory=list)


@dataclass
class _Tracked:
    """A running request on the scheduler side."""

    request: Any
    block_ids: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    stored: int = 0  # leading blocks stored or known to be in the tier
    external: int = 0  # tokens to load (update_state_after_alloc)
    mm_index: int = 0  # vLLM's multimodal index after the last keyed block (its extra keys walk the images)
    scheduled_to: int = 0  # tokens computed once the last scheduled step ran (vLLM computing fewer: a rollback)


def _has_extra_keys(request: Any) -> bool:
    """Whether vLLM's block hash of this request covers more than tokens (LoRA, images, a salt, embeddings)."""
    return (getattr(request, "lora_request", None) is not None or bool(getattr(request, "mm_features", None))
            or bool(getattr(request, "cache_salt", None)) or getattr(request, "prompt_embeds", None) is not None)


def depends_on(admitted: Iterable[_Tracked], loading: set[int]) -> dict[str, list[int]]:
    """For each request admitted this step, the blocks loaded this step among its blocks (its own loads, or blocks
    another request loads that it got from the engine's prefix cache): a request running before this step holds
    none (a block being loaded was allocated this step)."""
    return {tracked.request.request_id: sorted(loading.intersection(tracked.block_ids)) for tracked in admitted
            if not loading.isdisjoint(tracked.block_ids)}


def byte_page(cache: torch.Tensor, block_id: int) -> torch.Tensor:
    """A block's page of one layer's cache as bytes, in its logical shape: a view into the cache, never a copy,
    whatever the KV cache layout's strides (a page that is not contiguous, e.g. vLLM's LBNHC, is copied into and
    out of element by element; reshaping it to one dimension would copy it, and a load would fill the copy)."""
    return cache[block_id].view(torch.uint8)


def check_caches(caches: Mapping[str, torch.Tensor], layers: Iterable[str]) -> str:
    """What makes these caches unusable for the tier (empty when nothing): a layer of the namespace without a cache,
    or a page that has no byte view."""
    missing = sorted(set(layers) - set(caches))
    if missing:
        return f"no KV cache registered for layers {missing[:4]} of the KV cache config"
    for name, cache in caches.items():
        try:
            byte_page(cache, 0)
        except RuntimeError as exc:
            return (f"layer {name}: its KV cache (shape {tuple(cache.shape)}, strides {cache.stride()}) has no byte "
                    f"view of a block's page ({exc})")
    return ""


class FuyaoKVStats(KVConnectorStats):
    """Counter deltas since the last report (summed across workers and intervals)."""

    def reset(self) -> None:
        self.data: dict[str, float] = {}

    def aggregate(self, other: KVConnectorStats) -> FuyaoKVStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class FuyaoKVPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: VllmConfig, metric_types: dict[Any, Any], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters: dict[str, dict[int, Any]] = {}
        for name, documentation in COUNTERS.items():
            counter = self._counter_cls(name=METRIC_PREFIX + name, documentation=documentation,
                                        labelnames=labelnames)
            self.counters[name] = {engine: counter.labels(*values)
                                   for engine, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            per_engine = self.counters.get(name)
            if per_engine and value and engine_idx in per_engine:
                per_engine[engine_idx].inc(value)


class FuyaoKVConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.DISK
    """What vLLM labels this connector's hits with (``vllm:prompt_tokens_cached_by_source{source="disk"}``): a
    shared volume, as vLLM's own file-backed offload labels its hits."""

    @property
    def requires_kv_delivery(self) -> bool:
        """False: the tier is a best-effort cache (a store dropped is a miss later), so a request vLLM preempts is
        not recomputed for the connector's sake (vLLM's default is True for ``kv_both``, a producer's). Every store
        is copied out of the cache in the step that computed it (``wait_for_save``): a preemption's freed blocks
        are never read."""
        return False

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        path = transfer.get_from_extra_config("path", None)
        if not path:
            raise ValueError('FuyaoKVConnector: kv_connector_extra_config needs "path" (the shared tier directory)')
        policy = getattr(transfer, "kv_load_failure_policy", "fail")
        if policy != "recompute":
            raise ValueError(
                f'FuyaoKVConnector needs "kv_load_failure_policy": "recompute" in --kv-transfer-config, not '
                f"{policy!r}: a tier block evicted or found corrupt between the lookup and the load is reported to "
                f"vLLM as a load error, which with {policy!r} fails the request instead of recomputing the block")
        self._retry_s = float(transfer.get_from_extra_config("retry_s", 30))
        self._queue_bytes = queue_bytes(transfer.get_from_extra_config("write_queue_mb", None))
        self._namespace = namespace_of(vllm_config, kv_cache_config)
        self._kv_layers = kv_layers(kv_cache_config)
        self._off = parallelism_problem(vllm_config.parallel_config)
        self._store = BlockStore(path, self._namespace, writer=f"{socket.gethostname()}-{os.getpid()}")
        self._block_size = self._namespace.block_size
        if not self._store.describe():
            log.warning("FuyaoKVConnector: could not write %s/namespace.json (the tier manager publishes blocks by "
                        "it); the volume may be read-only", self._store.dir)
        # scheduler side
        self._tracked: dict[str, _Tracked] = {}
        # worker side
        self._caches: dict[str, torch.Tensor] = {}
        self._layout: list[tuple[str, int]] = []
        """Each layer's page size in bytes: what a block file of this engine holds, in this order."""
        self._block_bytes = 0
        self._load_errors: set[int] = set()
        self._spoiled: set[str] = set()
        """Requests whose KV reads a block that failed to load: nothing of theirs is stored until vLLM recomputes."""
        self._writer: Writer | None = None  # the worker's background stores (made in register_kv_caches)
        self._reported = self._store.stats.as_dict()
        if self._off:
            log.error("FuyaoKVConnector is off (nothing loaded or stored): %s", self._off)
        if role == KVConnectorRole.SCHEDULER:
            log.info("FuyaoKVConnector: shared tier %s (namespace %s: %s)", self._store.dir, self._namespace.id(),
                     self._namespace)

    # Scheduler side ----------------------------------------------------------------------------------------
    def _keys(self, tracked: _Tracked, blocks: int) -> list[str]:
        """The keys of the request's first ``blocks`` full blocks (extended as it grows, from the new tokens only)."""
        have = len(tracked.keys)
        end = min(blocks, tracked.request.num_tokens // self._block_size)
        if have < end:
            bs = self._block_size
            tokens = tracked.request.all_token_ids[have * bs:end * bs]
            extras = self._extras(tracked, have, end) if _has_extra_keys(tracked.request) else ()
            tracked.keys += chain_keys(self._namespace, tokens, end - have,
                                       parent=tracked.keys[-1] if tracked.keys else "", extras=extras)
        return tracked.keys[:blocks]

    def _extras(self, tracked: _Tracked, start: int, end: int) -> list[bytes]:
        """vLLM's extra keys of blocks ``start .. end-1`` (its own function, so they are what its block hash
        covers), as bytes (their repr: strings, bytes and numbers in tuples, the same in every process)."""
        bs, out = self._block_size, []
        for i in range(start, end):
            extra, tracked.mm_index = generate_block_hash_extra_keys(tracked.request, i * bs, (i + 1) * bs,
                                                                     tracked.mm_index)
            out.append(repr(extra).encode() if extra else b"")
        return out

    def _track(self, request: Request) -> _Tracked:
        tracked = self._tracked.get(request.request_id)
        if tracked is None or tracked.request is not request:
            tracked = self._tracked[request.request_id] = _Tracked(request)
        return tracked

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._off:
            return 0, False
        bs = self._block_size
        limit = (request.num_tokens - 1) // bs  # vLLM computes at least the last token
        local = num_computed_tokens // bs
        if limit <= local:
            return 0, False
        keys = self._keys(self._track(request), limit)  # cached per request: no other side effect
        found = self._store.leading(keys[local:])
        return max(0, (local + found) * bs - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._track(request).external = num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = FuyaoConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        admitted: list[_Tracked] = []  # new or re-admitted this step: their blocks may be loading this step
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            admitted.append(tracked)
            self._loads(meta, tracked, new.num_computed_tokens)
            self._stores(meta, tracked, new.num_computed_tokens, scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        resumed: set[str] = set(getattr(cached, "resumed_req_ids", None) or ())
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            computed, new_ids = cached.num_computed_tokens[i], cached.new_block_ids[i]
            if req_id in resumed:
                tracked.block_ids = list(new_ids[0]) if new_ids else []
                tracked.stored = 0
                meta.recomputed.append(req_id)
                admitted.append(tracked)
                self._loads(meta, tracked, computed)  # a resumed request may load again
            else:
                if new_ids:
                    tracked.block_ids += list(new_ids[0])
                if computed < tracked.scheduled_to:
                    # vLLM rolled the request back (a block failed to load: it recomputes from there): the blocks
                    # from there on are computed again, and stored then
                    tracked.stored = min(tracked.stored, computed // self._block_size)
                    meta.recomputed.append(req_id)
            self._stores(meta, tracked, computed, scheduled.get(req_id, 0))
        if meta.loads:
            meta.depends = depends_on(admitted, {block_id for block_id, _ in meta.loads})
        return meta

    def _loads(self, meta: FuyaoConnectorMetadata, tracked: _Tracked, computed: int) -> None:
        """The blocks ``update_state_after_alloc`` said to load: the ``external`` tokens just before ``computed``
        (what the engine's own cache and the tier hold together), into the request's blocks there. They count as
        stored; one that fails to load makes vLLM roll the request back to it, and ``build_connector_meta`` then
        lowers ``stored`` to it (so it is stored again once recomputed)."""
        if tracked.external <= 0:
            return
        bs = self._block_size
        first, count = (computed - tracked.external) // bs, tracked.external // bs
        keys = self._keys(tracked, first + count)
        meta.loads += [(tracked.block_ids[first + i], keys[first + i]) for i in range(count)]
        tracked.stored = first + count  # in the tier already
        tracked.external = 0

    def _stores(self, meta: FuyaoConnectorMetadata, tracked: _Tracked, computed: int, scheduled: int) -> None:
        """The blocks full and computed after this step (``computed`` before it, ``scheduled`` in it) that the
        tier does not hold yet."""
        tracked.scheduled_to = computed + scheduled
        if self._off:
            return
        bs = self._block_size
        request = tracked.request
        full = min(computed + scheduled, request.num_tokens) // bs
        full = min(full, len(tracked.block_ids))
        first = tracked.stored
        if full <= first:
            return
        keys = self._keys(tracked, full)
        tokens = request.all_token_ids[first * bs:full * bs]  # only these: a long request is not copied each step
        for position in range(first, full):
            key = keys[position]
            if not self._store.has(key):
                offset = (position - first) * bs
                meta.stores.append(Store(request.request_id, tracked.block_ids[position], key,
                                         keys[position - 1] if position else "", position,
                                         list(tokens[offset:offset + bs])))
        tracked.stored = full

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        return False, None

    # Worker side -----------------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._off:  # nothing is loaded or stored: the caches need not suit the tier
            return
        caches = dict(sorted(kv_caches.items()))
        problem = check_caches(caches, self._kv_layers)
        if problem:
            raise ValueError(f"FuyaoKVConnector cannot use this engine's KV cache: {problem}; remove the connector "
                             "from --kv-transfer-config or report this layout")
        self._caches = caches
        self._layout = [(name, cache[0].numel() * cache.element_size()) for name, cache in caches.items()]
        self._block_bytes = sum(size for _, size in self._layout)
        if self._block_bytes > self._queue_bytes:
            log.error("FuyaoKVConnector: a block is %d bytes, more than write_queue_mb (%d bytes) lets wait for the "
                      "volume: nothing will be stored; raise write_queue_mb", self._block_bytes, self._queue_bytes)
        if self._writer is None:
            self._writer = Writer(self._store, retry_s=self._retry_s, logger=log, max_bytes=self._queue_bytes)

    def _pages(self, block_id: int) -> list[torch.Tensor]:
        """Each layer's page of a block as bytes (``byte_page``: views into the cache)."""
        return [byte_page(cache, block_id) for cache in self._caches.values()]

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Copy this step's loads into the cache, one block read at a time (a long prompt's blocks are not all held
        in memory at once); a block that cannot be loaded is a load error, and the requests whose KV reads it store
        nothing until vLLM has recomputed them."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, FuyaoConnectorMetadata):
            return
        self._spoiled.difference_update(meta.recomputed)
        if not meta.loads:
            return
        failed: set[int] = set()
        blocks = self._store.iter_read([key for _, key in meta.loads])
        for (block_id, key), block in zip(meta.loads, blocks, strict=True):
            if block is None or block.layers != self._layout:
                if block is not None:
                    self._store.stats.blocks_missed += 1
                failed.add(block_id)
                log.warning("FuyaoKVConnector: block %s could not be loaded (%s): recomputed", key[:16],
                            "missing or corrupt" if block is None else "its layers differ from this engine's")
                continue
            payload = torch.frombuffer(bytearray(block.payload), dtype=torch.uint8)
            offset = 0
            for page in self._pages(block_id):
                page.copy_(payload[offset:offset + page.numel()].view(page.shape))
                offset += page.numel()
        if failed:
            self._load_errors |= failed
            self._spoiled.update(req for req, blocks_read in meta.depends.items() if not failed.isdisjoint(blocks_read))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are synchronous: done in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # a block is stored whole (every layer) in wait_for_save, after the forward pass

    def wait_for_save(self) -> None:
        """Copy each block to store out of the cache now (vLLM may reuse it after this step) and hand the copies to
        the background writer: the step does not wait for the volume. Nothing of a request whose KV reads a block
        that failed to load is stored (vLLM recomputes it; ``build_connector_meta`` stores it then)."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, FuyaoConnectorMetadata) or not meta.stores or self._writer is None:
            return
        stores = [store for store in meta.stores if store.request_id not in self._spoiled]
        if self._writer.paused:  # the volume refused a write lately: not even the copies
            self._writer.drop(len(stores))
            return
        for store in stores:
            if not self._writer.accepts(self._block_bytes):  # the writer is behind: not copied, dropped
                self._writer.drop()
                continue
            # each page in its logical order, whatever its strides; a device page (GPU, NPU) through the host
            pages = [(name, page.cpu().numpy().tobytes())
                     for (name, _), page in zip(self._layout, self._pages(store.block_id), strict=True)]
            self._writer.put(store.key, store.parent, store.position, store.token_ids, pages)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self._spoiled.difference_update(finished_req_ids)  # nothing async: nothing to report
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        now = self._store.stats.as_dict()
        delta = {name: now[name] - self._reported.get(name, 0.0) for name in COUNTERS}
        self._reported = now
        if not any(delta.values()):
            return None
        return FuyaoKVStats(data=delta)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return FuyaoKVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectorPromMetrics | None:
        return FuyaoKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
