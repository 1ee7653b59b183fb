#!/usr/bin/env python3
"""KV-cache index benchmark: prints one JSON object with the figures of docs/benchmarks.md.

- **Event ingest**: vLLM-encoded batches (release envelope, 16-token blocks, 70% BlockStored / 30% BlockRemoved
  by block) decoded and applied to the index, in-process (the subscriber thread's work), and end to end over
  loopback ZMQ (engine PUB → kvcache SUB). Goal >= 200k block events/s. Baseline: msgpack-decoding the same
  payloads and nothing else.
- **Lookup**: an 8k-token prompt (512 blocks) against an index of ~1M blocks over 8 engines, from token ids
  (hashing included). Goal p99 <= 0.2 ms. Baseline: hashing the prompt's blocks alone.
- **Memory** per million indexed blocks (tracemalloc), one engine holding each block.

Usage: bench/kvcache_bench.py [--batches 4000] [--blocks-per-batch 50]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots
from bench.report import add_out_argument, emit, quantiles
from fuyao.kv_blocks import BlockRemoved, BlockStored, EventBatch, block_hashes, decode_batch, encode_batch
from fuyao.kvcache.index import KvIndex
from fuyao.kvcache.subscriber import Source, Subscriber
from tests.support.apiserver import free_port


def payloads(batches: int, per_batch: int, seed: int = 1) -> tuple[list[bytes], int]:
    rng = random.Random(seed)
    live: list[int] = []
    out, events = [], 0
    next_hash = 1
    for _ in range(batches):
        stored = [next_hash + i for i in range(int(per_batch * 0.7))]
        next_hash += len(stored)
        live.extend(stored)
        removed = [live.pop(rng.randrange(len(live))) for _ in range(min(len(live), per_batch - len(stored)))]
        batch = EventBatch(time.time(), [BlockStored(stored, None, [rng.randrange(32000) for _ in range(16)] *
                                                     len(stored), 16), BlockRemoved(removed)], 0)
        out.append(encode_batch(batch))
        events += len(stored) + len(removed)
    return out, events


def ingest_in_process(data: list[bytes], events: int) -> dict[str, float]:
    index = KvIndex()
    started = time.perf_counter()
    for payload in data:
        index.apply("engine-0", decode_batch(payload).events)
    applied = time.perf_counter() - started
    started = time.perf_counter()
    for payload in data:
        msgpack.unpackb(payload, raw=False)
    floor = time.perf_counter() - started
    return {"block_events_per_s": round(events / applied), "baseline_msgpack_only_per_s": round(events / floor),
            "ratio_to_baseline": round(floor / applied, 3)}


def ingest_over_zmq(data: list[bytes], events: int) -> dict[str, float]:
    port = free_port()
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.set_hwm(0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    index = KvIndex()
    subscriber = Subscriber(index).start()
    subscriber.add(Source("engine-0", f"tcp://127.0.0.1:{port}"))
    seq = 0
    while subscriber.stats.get("engine-0") is None or subscriber.stats["engine-0"].batches == 0:  # slow joiner
        pub.send_multipart([b"kv", seq.to_bytes(8, "big"), encode_batch(EventBatch(time.time(), []))])
        seq += 1
        time.sleep(0.01)
    first = seq
    started = time.perf_counter()
    for payload in data:
        pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])
        seq += 1
    while subscriber.stats["engine-0"].last_seq != seq - 1:
        time.sleep(0.001)
    elapsed = time.perf_counter() - started
    stats = subscriber.stats["engine-0"]
    subscriber.stop()
    pub.close(linger=0)
    return {"block_events_per_s": round(events / elapsed), "batches": seq - first, "gaps": stats.gaps}


def lookup_latency(samples: int = 2000) -> dict[str, object]:
    rng = random.Random(7)
    index = KvIndex()
    prompt = [rng.randrange(32000) for _ in range(8192)]
    chain = block_hashes(prompt, 16)
    # 8 engines: engine k holds the first 64*(k+1) blocks of the prompt, plus ~120k unrelated blocks each
    for k in range(8):
        index.apply(f"engine-{k}", [BlockStored(chain[: 64 * (k + 1)], None, [], 16)])
        index.apply(f"engine-{k}", [BlockStored(list(range(k * 10**7, k * 10**7 + 125_000)), None, [], 16)])
    gc.collect()
    result = index.lookup(prompt)
    assert result["engine-7"] == 512 and result["engine-0"] == 64, result
    times, floors = [], []
    for _ in range(samples):
        started = time.perf_counter()
        index.lookup(prompt)
        times.append(time.perf_counter() - started)
        started = time.perf_counter()
        block_hashes(prompt, 16)
        floors.append(time.perf_counter() - started)
    times.sort()
    return {"prompt_tokens": 8192, "index_blocks": len(index), "engines": 8,
            "lookup_ms": {"p50": round(statistics.median(times) * 1e3, 4),
                          "p99": round(times[int(0.99 * (len(times) - 1))] * 1e3, 4)},
            "baseline_hashing_only_ms_p50": round(statistics.median(floors) * 1e3, 4),
            "cdf_ms": quantiles(times, 1e3, 4), "baseline_hashing_only_cdf_ms": quantiles(floors, 1e3, 4),
            "ratio_to_baseline": round(statistics.median(times) / statistics.median(floors), 2), "goal_p99_ms": 0.2}


def memory_per_million() -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    index = KvIndex()
    before = tracemalloc.get_traced_memory()[0]
    for start in range(0, 1_000_000, 10_000):
        index.apply("engine-0", [BlockStored(list(range(start + 1, start + 10_001)), None, [], 16)])
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return {"blocks": len(index), "mib": round(used / 2**20, 1), "bytes_per_block": round(used / len(index), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=4000)
    parser.add_argument("--blocks-per-batch", type=int, default=50)
    add_out_argument(parser)
    args = parser.parse_args()
    data, events = payloads(args.batches, args.blocks_per_batch)
    result = {"benchmark": "kvcache-index",
              "ingest_in_process": {"block_events": events, **ingest_in_process(data, events), "goal_per_s": 200_000},
              "ingest_over_zmq": ingest_over_zmq(data, events),
              "lookup_8k_tokens": lookup_latency(), "memory_per_million_blocks": memory_per_million()}
    emit(result, args.out, "kvcache", charts)


def charts(result: dict[str, Any], out: Path) -> list[Path]:
    lookup, ingest = result["lookup_8k_tokens"], result["ingest_in_process"]
    return [
        plots.quantile_cdf(out / "kvcache-lookup.png", "lookup of an 8k-token prompt (512 blocks, ~1M indexed)",
                           {"lookup (hashing included)": lookup["cdf_ms"],
                            "baseline: hashing the blocks only": lookup["baseline_hashing_only_cdf_ms"]}, "ms"),
        plots.bars(out / "kvcache-ingest.png", "block events ingested per second", {
            "in process": ingest["block_events_per_s"], "over loopback ZMQ": result["ingest_over_zmq"][
                "block_events_per_s"], "baseline: msgpack only": ingest["baseline_msgpack_only_per_s"]},
            "block events / s", goal=ingest["goal_per_s"]),
    ]


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
