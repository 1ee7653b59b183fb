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
  block the tier already holds is not written again; one that finds the writer behind is dropped and counted.
- **Load.** For a new request, the scheduler side counts the leading blocks after the engine's own prefix-cache hit
  whose files exist (never the prompt's last token: vLLM must compute at least one). The worker copies them into
  the blocks vLLM allocated, before the forward pass (a synchronous load). vLLM counts them in
  ``vllm:external_prefix_cache_hits_total``.
- **Faults.** A file that is gone, partial or corrupt at load time is reported to vLLM as a load error for that block
  (``get_block_ids_with_load_errors``); with ``"kv_load_failure_policy": "recompute"`` vLLM recomputes it and the
  request never fails (the connector warns at start when the policy is vLLM's default, ``fail``). A volume that
  refuses writes (full, read-only) stops the stores for ``retry_s`` seconds and is retried; nothing else changes.
- **Metrics** (on the engine's ``/metrics``): ``fuyao_kv_tier_{blocks,bytes}_{stored,loaded}_total``,
  ``fuyao_kv_tier_blocks_missed_total``, ``fuyao_kv_tier_blocks_corrupt_total``,
  ``fuyao_kv_tier_write_errors_total``, ``fuyao_kv_tier_blocks_dropped_total``, ``fuyao_kv_tier_load_seconds_total``
  (``blockstore.COUNTERS``).

Extra config: ``path`` (required), ``retry_s`` (default 30). Two engines share files only when their namespace
matches (``blockstore.Namespace``: model, dtype, block size, KV heads, head size, layers, and the CPU attention
kernel's instruction set, which orders the bytes of a page). A block's key covers its tokens and everything before
it, and what else vLLM's own block hash covers (its extra keys: the LoRA adapter, images, the request's
``cache_salt``, prompt embeddings), so a block computed for one adapter, image or tenant is never loaded for
another. With tensor or pipeline parallelism (each rank holds its own heads or layers) the connector stays off and
says so at start: the tier holds one file per block.

Imports only the standard library, vLLM and its dependencies (torch), and fuyao's kvcache block store, so it runs in
any vLLM environment without fuyao's server dependencies.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

from fuyao.kvcache.blockstore import COUNTERS, METRIC_PREFIX, BlockStore, Namespace, Writer, chain_keys

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.fuyao.kvcache.connector")  # under vLLM's logger: its handler and format



def _cpu_isa() -> str:
    """What orders the bytes of a CPU attention page (vLLM picks the kernel by these CPU features)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    except OSError:
        flags = []
    wanted = ("amx_tile", "amx_bf16", "avx512f", "avx512_bf16", "avx512vl", "avx2", "asimd", "sve")
    return f"{platform.machine()}:" + ",".join(sorted(f for f in flags if f in wanted))


def namespace_of(vllm_config: VllmConfig) -> Namespace:
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    device = getattr(vllm_config.device_config, "device_type", "cpu")
    return Namespace(
        model=str(model.served_model_name if isinstance(model.served_model_name, str)
                  else (model.served_model_name or [model.model])[0]) + f"@{model.model}",
        dtype=f"{model.dtype}/{vllm_config.cache_config.cache_dtype}",
        block_size=int(vllm_config.cache_config.block_size),
        num_kv_heads=int(model.get_num_kv_heads(parallel)),
        head_size=int(model.get_head_size()),
        num_layers=int(model.get_num_layers(parallel)),
        layout=f"{device}/{_cpu_isa() if device == 'cpu' else device}/tp{parallel.tensor_parallel_size}",
    )


@dataclass
class FuyaoConnectorMetadata(KVConnectorMetadata):
    """Scheduler → worker, each step (pickled): blocks to load (block id, key) and to store (block id, key, parent
    key, position, token ids)."""

    loads: list[tuple[int, str]] = field(default_factory=list)
    stores: list[tuple[int, str, str, int, list[int]]] = field(default_factory=list)


@dataclass
class _Tracked:
    """A running request on the scheduler side."""

    request: Any
    block_ids: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    stored: int = 0  # leading blocks stored or known to be in the tier
    external: int = 0  # tokens to load (update_state_after_alloc)
    mm_index: int = 0  # vLLM's multimodal index after the last keyed block (its extra keys walk the images)


def _has_extra_keys(request: Any) -> bool:
    """Whether vLLM's block hash of this request covers more than tokens (LoRA, images, a salt, embeddings)."""
    return (getattr(request, "lora_request", None) is not None or bool(getattr(request, "mm_features", None))
            or bool(getattr(request, "cache_salt", None)) or getattr(request, "prompt_embeds", None) is not None)


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
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        path = transfer.get_from_extra_config("path", None)
        if not path:
            raise ValueError('FuyaoKVConnector: kv_connector_extra_config needs "path" (the shared tier directory)')
        self._retry_s = float(transfer.get_from_extra_config("retry_s", 30))
        self._namespace = namespace_of(vllm_config)
        parallel = vllm_config.parallel_config
        self._off = ""
        if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
            self._off = (f"tensor_parallel_size {parallel.tensor_parallel_size}, pipeline_parallel_size "
                         f"{parallel.pipeline_parallel_size}: each rank holds its own heads or layers, and the tier "
                         "keeps one file per block")
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
        self._load_errors: set[int] = set()
        self._writer: Writer | None = None  # the worker's background stores (made in register_kv_caches)
        self._reported = self._store.stats.as_dict()
        if self._off:
            log.error("FuyaoKVConnector is off (nothing loaded or stored): %s", self._off)
        if role == KVConnectorRole.SCHEDULER:
            if getattr(transfer, "kv_load_failure_policy", "fail") == "fail":
                log.warning('FuyaoKVConnector: kv_load_failure_policy is "fail": a tier file that goes missing or '
                            'is corrupt between lookup and load fails its request; set "recompute"')
            log.info("FuyaoKVConnector: shared tier %s (namespace %s: %s)", self._store.dir, self._namespace.id(),
                     self._namespace)

    # Scheduler side ----------------------------------------------------------------------------------------
    def _keys(self, tracked: _Tracked, blocks: int) -> list[str]:
        """The keys of the request's first ``blocks`` full blocks (extended as it grows)."""
        if len(tracked.keys) < blocks:
            tokens = list(tracked.request.all_token_ids)
            parent = tracked.keys[-1] if tracked.keys else ""
            start = len(tracked.keys)
            extras = self._extras(tracked, start, min(blocks, len(tokens) // self._block_size)) \
                if _has_extra_keys(tracked.request) else ()
            tracked.keys += chain_keys(self._namespace, tokens, blocks, parent=parent, start=start, extras=extras)
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
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._tracked.get(new.req_id)
            if tracked is None:
                continue
            tracked.block_ids = list(new.block_ids[0])
            self._loads(meta, tracked, new.num_computed_tokens)
            self._stores(meta, tracked, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        resumed: set[str] = set(getattr(cached, "resumed_req_ids", None) or ())
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._tracked.get(req_id)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in resumed:
                tracked.block_ids = list(new_ids[0]) if new_ids else []
                tracked.stored = 0
                self._loads(meta, tracked, cached.num_computed_tokens[i])  # a resumed request may load again
            elif new_ids:
                tracked.block_ids += list(new_ids[0])
            self._stores(meta, tracked, cached.num_computed_tokens[i] + scheduled.get(req_id, 0))
        return meta

    def _loads(self, meta: FuyaoConnectorMetadata, tracked: _Tracked, computed: int) -> None:
        """The blocks ``update_state_after_alloc`` said to load: the ``external`` tokens just before ``computed``
        (what the engine's own cache and the tier hold together), into the request's blocks there."""
        if tracked.external <= 0:
            return
        bs = self._block_size
        first, count = (computed - tracked.external) // bs, tracked.external // bs
        keys = self._keys(tracked, first + count)
        meta.loads += [(tracked.block_ids[first + i], keys[first + i]) for i in range(count)]
        tracked.stored = first + count  # in the tier already
        tracked.external = 0

    def _stores(self, meta: FuyaoConnectorMetadata, tracked: _Tracked, computed: int) -> None:
        """The blocks full and computed after this step that the tier does not hold yet."""
        if self._off:
            return
        bs = self._block_size
        full = min(computed, tracked.request.num_tokens) // bs
        full = min(full, len(tracked.block_ids))
        if full <= tracked.stored:
            return
        keys = self._keys(tracked, full)
        tokens = list(tracked.request.all_token_ids)
        for position in range(tracked.stored, full):
            key = keys[position]
            if not self._store.has(key):
                meta.stores.append((tracked.block_ids[position], key, keys[position - 1] if position else "",
                                    position, tokens[position * bs:(position + 1) * bs]))
        tracked.stored = full

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        return False, None

    # Worker side -----------------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._writer is None:
            self._writer = Writer(self._store, retry_s=self._retry_s, logger=log)
        self._caches = dict(sorted(kv_caches.items()))
        self._layout = [(name, cache[0].numel() * cache.element_size()) for name, cache in self._caches.items()]
        """Each layer's page size in bytes: what a block file of this engine holds, in this order."""

    def _pages(self, block_id: int) -> list[torch.Tensor]:
        """Each layer's page of a block as bytes: a view into the cache (a page is contiguous; a view of one that is
        not fails here rather than being copied, which would load into the copy)."""
        return [cache[block_id].view(torch.uint8).reshape(-1) for cache in self._caches.values()]

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, FuyaoConnectorMetadata) or not meta.loads:
            return
        blocks = self._store.read_many([key for _, key in meta.loads])
        for (block_id, key), block in zip(meta.loads, blocks, strict=True):
            if block is None or block.layers != self._layout:
                if block is not None:
                    self._store.stats.blocks_missed += 1
                self._load_errors.add(block_id)
                log.warning("FuyaoKVConnector: block %s could not be loaded (%s): recomputed", key[:16],
                            "missing or corrupt" if block is None else "its layers differ from this engine's")
                continue
            payload = torch.frombuffer(bytearray(block.payload), dtype=torch.uint8)
            offset = 0
            for page in self._pages(block_id):
                page.copy_(payload[offset:offset + page.numel()])
                offset += page.numel()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None  # loads are synchronous: done in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # a block is stored whole (every layer) in wait_for_save, after the forward pass

    def wait_for_save(self) -> None:
        """Copy each block to store out of the cache now (vLLM may reuse it after this step) and hand the copies to
        the background writer: the step does not wait for the volume."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, FuyaoConnectorMetadata) or not meta.stores or self._writer is None:
            return
        if self._writer.paused:  # the volume refused a write lately: not even the copies
            self._store.stats.blocks_dropped += len(meta.stores)
            return
        for block_id, key, parent, position, token_ids in meta.stores:
            pages = [(name, page.cpu().numpy().tobytes())  # a device page (GPU, NPU) copied to the host first
                     for (name, _), page in zip(self._layout, self._pages(block_id), strict=True)]
            self._writer.put(key, parent, position, token_ids, pages)

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
