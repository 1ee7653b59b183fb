"""The shared KV tier's files (fuyao.kvcache.blockstore): content keys, atomic writes, validation of what is read,
access records, and a volume that refuses writes. The connector that uses it inside vLLM: tests/vllm."""

from __future__ import annotations

import errno
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fuyao.contracts import KvCachePolicy
from fuyao.kvcache import blockstore, volume
from fuyao.kvcache.blockstore import BlockStore, Namespace, chain_keys

NS = Namespace(model="tiny@/m", dtype="bfloat16/auto", block_size=4, num_kv_heads=2, head_size=64, num_layers=2,
               layout="cpu/x86_64:avx2/tp1")
TOKENS = list(range(100, 118))  # 4 full blocks of 4, and 2 tokens over


def pages(seed: int) -> list[tuple[str, bytes]]:
    return [(f"model.layers.{i}.self_attn.attn", bytes((seed + i + j) % 256 for j in range(64))) for i in range(2)]


def test_keys_chain_every_earlier_token_and_the_namespace() -> None:
    keys = chain_keys(NS, TOKENS, 10)
    assert len(keys) == 4  # a partial block has no key
    assert keys == chain_keys(NS, TOKENS, 4) and len(set(keys)) == 4
    changed = list(TOKENS)
    changed[5] += 1  # a token of block 1: blocks 1.. change, block 0 does not
    other = chain_keys(NS, changed, 4)
    assert other[0] == keys[0] and all(a != b for a, b in zip(other[1:], keys[1:], strict=True))
    assert chain_keys(NS, TOKENS, 4, parent=keys[1], start=2) == keys[2:]  # extending a known chain
    wider = Namespace(**{**NS.__dict__, "head_size": 128})  # another engine's page layout: no shared file
    assert not set(chain_keys(wider, TOKENS, 4)) & set(keys)


def test_a_block_round_trips_atomically_and_reads_record_the_access(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, NS)
    keys = chain_keys(NS, TOKENS, 4)
    assert store.leading(keys) == 0 and store.read(keys[0]) is None
    assert store.stats.blocks_missed == 1
    for i, key in enumerate(keys[:3]):
        assert store.write(key, keys[i - 1] if i else "", i, TOKENS[i * 4:(i + 1) * 4], pages(i))
    assert not store.write(keys[0], "", 0, TOKENS[:4], pages(0))  # already there: not rewritten
    assert store.leading(keys) == 3 and store.has(keys[2]) and not store.has(keys[3])
    assert not list(tmp_path.rglob("*.tmp"))  # written to a temporary name, then renamed
    path = store.path(keys[1])
    assert path.parent.parent == tmp_path / "v1" / NS.id()
    old = time.time() - 3600
    os.utime(path, (old, old))
    block = store.read(keys[1])
    assert block is not None and block.parent == keys[0] and block.position == 1
    assert block.token_ids == TOKENS[4:8] and block.payload == b"".join(data for _, data in pages(1))
    assert block.layers == [(name, len(data)) for name, data in pages(1)]
    assert path.stat().st_atime > old + 3000 and path.stat().st_mtime == pytest.approx(old)  # LRU record, FIFO kept
    assert (store.stats.blocks_stored, store.stats.blocks_loaded, store.stats.bytes_loaded) == (3, 1, 128)
    # another namespace does not see it
    assert BlockStore(tmp_path, Namespace(**{**NS.__dict__, "num_layers": 3})).leading(keys) == 0


@pytest.mark.parametrize("damage", ["truncated", "flipped", "header", "empty", "other-key"])
def test_a_partial_or_corrupt_file_is_a_miss_and_is_removed(tmp_path: Path, damage: str) -> None:
    store = BlockStore(tmp_path, NS)
    keys = chain_keys(NS, TOKENS, 2)
    for i, key in enumerate(keys):
        store.write(key, keys[i - 1] if i else "", i, TOKENS[i * 4:(i + 1) * 4], pages(i))
    path = store.path(keys[0])
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:-10])
    elif damage == "flipped":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "header":
        path.write_bytes(data[:12] + b"{" + data[13:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(store.path(keys[1]).read_bytes())  # a whole, valid file under the wrong name
    assert store.read(keys[0]) is None
    assert store.stats.blocks_corrupt == 1 and store.stats.blocks_missed == 1
    assert not path.exists()  # nobody claims it again
    assert store.read(keys[1]) is not None  # its neighbour is untouched


def test_a_volume_that_refuses_writes_is_counted_and_never_raises(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlockStore(tmp_path, NS)
    keys = chain_keys(NS, TOKENS, 2)

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blockstore, "open", full, raising=False)
    assert not store.write(keys[0], "", 0, TOKENS[:4], pages(0))
    assert store.stats.write_errors == 1 and "No space left" in store.last_write_error
    assert not store.has(keys[0]) and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    assert store.write(keys[0], "", 0, TOKENS[:4], pages(0)) and store.stats.write_errors == 1


def test_the_background_writer_stores_in_order_drops_when_behind_and_pauses_on_a_refusal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Writer``: what an engine hands over is written by one thread; a full queue drops (counted), never blocks
    the caller; a refused write pauses the stores for ``retry_s`` (what arrives meanwhile is dropped, counted), then
    writes resume."""
    import threading

    store = BlockStore(tmp_path, NS)
    keys = chain_keys(NS, TOKENS, 4)
    gate = threading.Event()
    real_write = store.write

    def slow_write(*args: Any) -> bool:
        gate.wait(5)
        return real_write(*args)

    monkeypatch.setattr(store, "write", slow_write)
    writer = blockstore.Writer(store, capacity=2, retry_s=0.3)
    try:
        accepted = [writer.put(keys[i], keys[i - 1] if i else "", i, TOKENS[i * 4:(i + 1) * 4], pages(i))
                    for i in range(4)]
        # the thread holds the first, the queue two more: the fourth finds it full (the caller never waited)
        assert accepted.count(False) >= 1 and store.stats.blocks_dropped == accepted.count(False)
        gate.set()
        assert writer.flush(5)
        assert [store.has(k) for k in keys] == accepted
        assert store.read(keys[0]) is not None
        # a volume that refuses: the writer pauses, drops what comes, and resumes after retry_s
        monkeypatch.setattr(store, "write", real_write)
        monkeypatch.setattr(blockstore, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")),
                            raising=False)
        other = chain_keys(NS, [t + 1 for t in TOKENS], 2)
        writer.put(other[0], "", 0, [t + 1 for t in TOKENS[:4]], pages(9))
        assert writer.flush(5) and store.stats.write_errors == 1 and writer.paused
        dropped = store.stats.blocks_dropped
        assert not writer.put(other[1], other[0], 1, [t + 1 for t in TOKENS[4:8]], pages(9))
        assert store.stats.blocks_dropped == dropped + 1
        monkeypatch.undo()
        time.sleep(0.35)
        assert not writer.paused and writer.put(other[0], "", 0, [t + 1 for t in TOKENS[:4]], pages(9))
        assert writer.flush(5) and store.has(other[0])
    finally:
        gate.set()
        writer.close()


def _rewrite_header(path: Path, **fields: Any) -> None:
    """Replace fields of a block file's header, keeping its payload (and so its size and digest) valid."""
    data = path.read_bytes()
    header = blockstore.parse_header(data)
    assert header is not None
    length = blockstore._PREFIX.unpack_from(data)[2]
    payload = data[blockstore._PREFIX.size + length:]
    encoded = json.dumps({**header, **fields}).encode()
    path.write_bytes(blockstore._PREFIX.pack(blockstore.MAGIC, blockstore.FORMAT_VERSION, len(encoded)) + encoded
                     + payload)


@pytest.mark.parametrize("fields", [{"position": None}, {"position": "1"}, {"token_ids": 5}, {"token_ids": None},
                                    {"token_ids": [1, "2"]}, {"parent": 7}, {"layers": [["a", "b"]]}],
                         ids=["position-null", "position-string", "tokens-int", "tokens-null", "tokens-string",
                              "parent-int", "layer-size-string"])
def test_a_header_with_a_field_of_the_wrong_type_is_a_corrupt_file_never_an_exception(
        tmp_path: Path, fields: dict[str, Any]) -> None:
    """Valid JSON, the right key, namespace, size and digest, but a field no writer of ours makes (another writer,
    a damaged volume): a miss, counted corrupt and removed, like any corrupt file; the engine's worker goes on."""
    store = BlockStore(tmp_path, NS)
    key = chain_keys(NS, TOKENS, 1)[0]
    assert store.write(key, "", 0, TOKENS[:4], pages(0))
    _rewrite_header(store.path(key), **fields)
    assert store.read(key) is None
    assert (store.stats.blocks_corrupt, store.stats.blocks_missed) == (1, 1)
    assert not store.path(key).exists()


def test_blocks_are_read_one_at_a_time_and_their_loads_logged_together(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``iter_read`` reads a block only when the caller takes it (a caller copying each block into its cache holds
    one in memory, not a whole prompt's), and appends the loads to the access log once, at the end."""
    _store, keys = _chain(tmp_path, TOKENS, 3)
    reader = BlockStore(tmp_path, NS, writer="reader")
    opened: list[str] = []
    real = reader._read_one

    def spy(key: str) -> blockstore.Block | None:
        opened.append(key)
        return real(key)

    monkeypatch.setattr(reader, "_read_one", spy)
    reads = reader.iter_read([keys[0], "0" * 64, keys[2]])
    assert opened == []
    first = next(reads)
    assert first is not None and first.key == keys[0] and opened == [keys[0]]
    assert not (reader.dir / blockstore.ACCESS_DIR).exists()  # logged when the iteration ends
    assert [b is not None for b in reads] == [False, True] and opened == [keys[0], "0" * 64, keys[2]]
    assert volume.consume_access_logs(reader.dir) == Counter({keys[0]: 1, keys[2]: 1})
    assert (reader.stats.blocks_loaded, reader.stats.blocks_missed) == (2, 1) and reader.stats.load_seconds > 0


def test_the_writer_holds_at_most_its_byte_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue is capped in bytes as well as blocks (a 16 MiB block times 1,024 would be 16 GiB): a block that
    would take the queued bytes over ``max_bytes`` is dropped and counted, and a block counts until written."""
    import threading

    store = BlockStore(tmp_path, NS)
    keys = chain_keys(NS, TOKENS, 4)
    gate = threading.Event()
    real_write = store.write

    def slow_write(*args: Any) -> bool:
        gate.wait(5)
        return real_write(*args)

    monkeypatch.setattr(store, "write", slow_write)
    size = sum(len(data) for _, data in pages(0))  # 128 bytes a block
    writer = blockstore.Writer(store, capacity=100, max_bytes=2 * size + size // 2)
    assert blockstore.Writer(store).max_bytes == blockstore.DEFAULT_QUEUE_BYTES == 256 << 20
    try:
        assert writer.put(keys[0], "", 0, TOKENS[:4], pages(0)) and writer.put(keys[1], keys[0], 1, TOKENS[4:8],
                                                                                 pages(1))
        assert writer.queued_bytes == 2 * size and not writer.accepts(size)
        assert not writer.put(keys[2], keys[1], 2, TOKENS[8:12], pages(2))  # a third would be over the budget
        assert store.stats.blocks_dropped == 1
        gate.set()
        assert writer.flush(5) and writer.queued_bytes == 0 and writer.accepts(size)
        assert [store.has(k) for k in keys[:3]] == [True, True, False]
        assert writer.put(keys[2], keys[1], 2, TOKENS[8:12], pages(2)) and writer.flush(5) and store.has(keys[2])
    finally:
        gate.set()
        writer.close()


def test_blocks_dropped_by_two_threads_at_once_are_all_counted(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's thread (a paused writer drops what it is handed) and the writer's thread (dropping what was
    queued before the pause) count drops at the same time: none is lost. The counter here reads slowly, so two
    unguarded ``+= 1`` would interleave."""
    import threading

    class SlowStats(blockstore.StoreStats):
        @property
        def blocks_dropped(self) -> int:
            value = self.__dict__.get("_dropped", 0)
            time.sleep(0.0005)  # the window in which another thread's increment is lost without a lock
            return int(value)

        @blocks_dropped.setter
        def blocks_dropped(self, value: int) -> None:
            self.__dict__["_dropped"] = value

    store = BlockStore(tmp_path, NS, stats=SlowStats())
    keys = chain_keys(NS, list(range(400)), 100)
    gate, entered = threading.Event(), threading.Event()
    real_write = store.write

    def refuse_first(*args: Any) -> bool:  # the first write waits, then the volume refuses it: the writer pauses
        entered.set()
        gate.wait(5)
        store.stats.write_errors += 1
        store.last_write_error = "full"
        return False

    monkeypatch.setattr(store, "write", refuse_first)
    writer = blockstore.Writer(store, capacity=200, retry_s=30)
    try:
        queued = 40
        for i in range(queued + 1):  # the first is held by the thread, 40 wait behind it
            assert writer.put(keys[i], "", i, list(range(i * 4, i * 4 + 4)), pages(i))
        assert entered.wait(5)
        monkeypatch.setattr(store, "write", real_write)
        gate.set()
        deadline = time.monotonic() + 5
        while not writer.paused and time.monotonic() < deadline:
            time.sleep(0.001)
        handed = 40
        for i in range(handed):  # while the writer thread drops the 40 queued ones
            assert not writer.put(keys[50 + i], "", 0, [0, 1, 2, 3], pages(i))
        assert writer.flush(10)
        assert store.stats.blocks_dropped == queued + handed
    finally:
        gate.set()
        writer.close()


# The tier's size on the volume (fuyao.kvcache.volume) -------------------------------------------------------------
def records(*specs: tuple[str, int, float, float]) -> list[volume.FileRecord]:
    """(key, size, stored_at, accessed_at) → records (paths unused by the plan)."""
    return [volume.FileRecord(key, Path(f"/x/{key}.kv"), size, stored, accessed)
            for key, size, stored, accessed in specs]


def test_the_plan_keeps_the_size_in_each_policys_order_and_drops_expired_blocks_first() -> None:
    now = 1_000.0
    tier = records(("a", 10, 100, 900), ("b", 10, 200, 200), ("c", 10, 300, 950), ("d", 10, 400, 400))

    def keys(removed: list[volume.FileRecord]) -> list[str]:
        return [r.key for r in removed]

    # 40 bytes held, 25 allowed: two go
    lru = volume.plan(tier, 25, KvCachePolicy.LRU, now)
    assert keys(lru.evicted) == ["b", "d"] and lru.kept_bytes == 20  # a and c were loaded lately
    fifo = volume.plan(tier, 25, KvCachePolicy.FIFO, now)
    assert keys(fifo.evicted) == ["a", "b"]  # loads do not renew
    lfu = volume.plan(tier, 25, KvCachePolicy.LFU, now, hits=Counter({"a": 5, "b": 3, "c": 0, "d": 1}))
    assert keys(lfu.evicted) == ["c", "d"]  # fewest loads first, whatever their recency
    assert volume.plan(tier, 40, KvCachePolicy.LRU, now).removed == []  # fits
    # TTL: stored more than 750 s ago is gone whatever the policy, and counts towards the size
    ttl = volume.plan(tier, 25, KvCachePolicy.LRU, now, ttl_s=750)
    assert keys(ttl.expired) == ["a", "b"] and ttl.evicted == [] and ttl.kept_bytes == 20
    later = volume.plan(tier, 100, KvCachePolicy.LFU, now + 100, ttl_s=750)  # the clock moves: c expires too
    assert keys(later.expired) == ["a", "b", "c"]


def test_the_volume_is_scanned_access_logs_are_consumed_once_and_removal_frees_the_bytes(tmp_path: Path) -> None:
    writer = BlockStore(tmp_path, NS, writer="host-1")
    other = BlockStore(tmp_path, NS, writer="host-2")
    keys = chain_keys(NS, TOKENS, 3)
    for i, key in enumerate(keys):
        writer.write(key, keys[i - 1] if i else "", i, TOKENS[i * 4:(i + 1) * 4], pages(i))
    for store, key in ((writer, keys[0]), (other, keys[0]), (other, keys[1])):
        assert store.read(key) is not None
    found = volume.scan(writer.dir)
    assert sorted(r.key for r in found) == sorted(keys) and all(r.size > 128 for r in found)
    assert volume.consume_access_logs(writer.dir) == Counter({keys[0]: 2, keys[1]: 1})
    assert volume.consume_access_logs(writer.dir) == Counter()  # consumed
    other.read(keys[2])  # a new log after the rename
    assert volume.consume_access_logs(writer.dir) == Counter({keys[2]: 1})
    # one request's blocks: read together, logged together; a gap ends the read when asked to
    gone = "0" * 64
    assert [b is not None for b in other.read_many([keys[0], gone, keys[1]])] == [True, False, True]
    assert [b is not None for b in other.read_many([keys[0], gone, keys[1]], until_miss=True)] == [True, False]
    assert volume.consume_access_logs(writer.dir) == Counter({keys[0]: 2, keys[1]: 1})
    planned = volume.plan(found, max(r.size for r in found), KvCachePolicy.LRU, time.time())
    assert len(planned.evicted) == 2
    assert volume.remove(planned.evicted) == sum(r.size for r in planned.evicted)
    assert volume.remove(planned.evicted) == 0  # already gone
    assert len(volume.scan(writer.dir)) == 1


def test_what_the_tier_makes_is_writable_by_the_volumes_group(tmp_path: Path) -> None:
    """Every engine and the tier manager replace and remove each other's files: directories group-writable with
    setgid, files group-writable (the chart's kvCache.volume.fsGroup is the group)."""
    store = BlockStore(tmp_path / "tier", NS, writer="w")
    key = chain_keys(NS, TOKENS, 1)[0]
    assert store.describe() and store.write(key, "", 0, TOKENS[:4], pages(0)) and store.read(key)
    for directory in (store.dir, store.path(key).parent, store.dir / blockstore.ACCESS_DIR):
        assert directory.stat().st_mode & 0o7777 == blockstore.DIR_MODE, directory
    assert store.path(key).stat().st_mode & 0o777 == blockstore.FILE_MODE
    assert (store.dir / blockstore.NAMESPACE_FILE).stat().st_mode & 0o777 == blockstore.FILE_MODE


def _chain(tmp_path: Path, tokens: list[int], blocks: int) -> tuple[BlockStore, list[str]]:
    store = BlockStore(tmp_path, NS, writer="w")
    keys = chain_keys(NS, tokens, blocks)
    for i, key in enumerate(keys):
        store.write(key, keys[i - 1] if i else "", i, tokens[i * 4:(i + 1) * 4], pages(i))
    return store, keys


@pytest.mark.parametrize("policy", list(KvCachePolicy))
def test_a_sweep_evicts_a_chains_last_blocks_first_never_stranding_them(tmp_path: Path,
                                                                         policy: KvCachePolicy) -> None:
    """A chain is stored (and loaded) parent first, so by its own times its first block is always the oldest; a
    block no lookup reaches without its parent must not outlive it. Over the cap by one block: the chain's last one
    goes, whatever the policy, and what stays is still a chain from its first block."""
    store, keys = _chain(tmp_path, TOKENS, 4)
    size = max(r.size for r in volume.scan(store.dir))
    tier = volume.VolumeTier(tmp_path, 3 * size, policy, block_size=4)
    tier.sweep()  # reads the headers, then evicts one block
    left = {r.key for r in volume.scan(store.dir)}
    assert len(left) == 3 and left == set(keys[:3]), policy  # the deepest block went, not the first


def test_the_last_load_comes_from_the_access_logs_not_atime(tmp_path: Path) -> None:
    """A reader that does not own a block file cannot set its atime (and relatime updates it once a day): LRU reads
    when a block was loaded from the access logs the sweep consumes."""
    store, keys = _chain(tmp_path, TOKENS, 2)
    _other, other_keys = _chain(tmp_path, [t + 1000 for t in TOKENS], 2)
    old = time.time() - 7200
    for path in [store.path(k) for k in keys + other_keys]:
        os.utime(path, (old, old))
    size = max(r.size for r in volume.scan(store.dir))
    tier = volume.VolumeTier(tmp_path, 10 * size, KvCachePolicy.LRU, block_size=4)
    tier.sweep()
    reader = BlockStore(tmp_path, NS, writer="reader")
    assert reader.read(keys[0]) is not None and reader.read(keys[1]) is not None
    for path in [store.path(k) for k in keys]:
        os.utime(path, (old, old))  # as if the reader could not touch them
    tier.capacity_bytes = 2 * size
    tier.sweep()
    assert {r.key for r in volume.scan(store.dir)} == set(keys)  # the loaded chain stayed, the other went


def test_an_append_to_a_log_already_read_is_counted_by_the_next_consumption(tmp_path: Path) -> None:
    """A writer opens its log per append: one that opened it just before the manager renamed it appends to the
    renamed file after the manager read it. That load still counts, once, at the next consumption."""
    store, keys = _chain(tmp_path, TOKENS, 2)
    log_dir = store.dir / blockstore.ACCESS_DIR
    log_dir.mkdir(exist_ok=True)
    held: dict[Path, int] = {}
    with open(log_dir / "slow-1.log", "a") as late:  # opened before the rename ...
        late.write(keys[0] + "\n")
        late.flush()
        assert volume.consume_access_logs(store.dir, held) == Counter({keys[0]: 1})
        late.write(keys[1] + "\n" + keys[0] + "\n")  # ... appended to after the read
    assert volume.consume_access_logs(store.dir, held) == Counter({keys[1]: 1, keys[0]: 1})
    assert held == {} and list(log_dir.iterdir()) == []  # finished and removed
    assert volume.consume_access_logs(store.dir, held) == Counter()


def test_lfu_forgets_the_loads_of_blocks_that_are_gone_however_they_went(tmp_path: Path) -> None:
    """Load counts live as long as their block file: one a reader removed (corrupt) or an operator deleted takes
    its count with it, so the counts never grow beyond what the volume holds."""
    store, keys = _chain(tmp_path, TOKENS, 3)
    size = max(r.size for r in volume.scan(store.dir))
    tier = volume.VolumeTier(tmp_path, 10 * size, KvCachePolicy.LFU, block_size=4)
    reader = BlockStore(tmp_path, NS, writer="reader")
    for key in keys:
        assert reader.read(key) is not None
    tier.sweep()
    assert set(tier.hits) == set(keys)
    store.path(keys[2]).unlink()  # gone behind the manager's back
    tier.sweep()
    tier.sweep()  # the log read last time is finished now
    assert set(tier.hits) == set(keys[:2]) and tier.hits[keys[0]] == 1


def test_the_tier_publishes_plain_blocks_only_not_those_keyed_with_a_lora_or_a_salt(tmp_path: Path) -> None:
    """A block keyed with vLLM's extra keys (a LoRA adapter, images, a cache salt) holds KV a plain request of the
    same tokens cannot use: lookups are told of the plain chain only (a salted first block hides its whole chain)."""
    from fuyao.kv_blocks import block_hashes

    store, _plain = _chain(tmp_path, TOKENS, 2)
    assert store.describe()
    salted_tokens = [t + 500 for t in TOKENS]
    salted = chain_keys(NS, salted_tokens, 2, extras=[b"('salt',)"])
    assert salted != chain_keys(NS, salted_tokens, 2)
    for i, key in enumerate(salted):
        store.write(key, salted[i - 1] if i else "", i, salted_tokens[i * 4:(i + 1) * 4], pages(i))
    tier = volume.VolumeTier(tmp_path, 10**9, KvCachePolicy.LRU, block_size=4)
    tier.sweep()
    assert tier.leading(block_hashes(TOKENS[:8], 4, 0), "tiny") == 2
    assert tier.leading(block_hashes(salted_tokens[:8], 4, 0), "tiny") == 0
    assert len(tier.published["tiny"]) == 2 and len(volume.scan(store.dir)) == 4  # kept, just not published


def test_a_sweep_removes_what_dead_writers_left_and_survives_a_strange_header(tmp_path: Path) -> None:
    store, keys = _chain(tmp_path, TOKENS, 2)
    shard = store.path(keys[0]).parent
    old_tmp, new_tmp = shard / f".{keys[0]}.1.1.tmp", shard / f".{keys[1]}.2.2.tmp"
    old_tmp.write_bytes(b"x" * 5000)
    new_tmp.write_bytes(b"y")
    stale = time.time() - 2 * volume.LEFTOVER_S
    os.utime(old_tmp, (stale, stale))
    logs = store.dir / blockstore.ACCESS_DIR
    logs.mkdir(exist_ok=True)
    consumed = logs / "host.123.consumed"
    consumed.write_text("abc\n")
    os.utime(consumed, (stale, stale))
    weird = store.path(chain_keys(NS, [9] * 8, 2)[1])
    weird.parent.mkdir(parents=True, exist_ok=True)
    header = b'{"parent":"","position":1e400,"token_ids":[1,2,3,4]}'
    weird.write_bytes(blockstore._PREFIX.pack(blockstore.MAGIC, blockstore.FORMAT_VERSION, len(header)) + header)
    tier = volume.VolumeTier(tmp_path, 10**9, KvCachePolicy.LRU, block_size=4)
    tier.sweep()  # neither the leftovers nor the header stop it
    assert not old_tmp.exists() and new_tmp.exists() and not consumed.exists()
    assert tier.leading([], "") == 0


def test_a_volume_with_no_size_is_refused() -> None:
    from fuyao.kvcache.config import build_config

    with pytest.raises(Exception, match="would delete every block"):
        build_config({"kvCache": {"size": 0, "volume": {"path": "/mnt/kv"}}})
    assert build_config({"kvCache": {"size": 0}}).kv_cache.size == 0  # an index only


def test_what_else_a_block_depends_on_is_in_its_key() -> None:
    """vLLM's extra keys (a LoRA adapter, images, a cache salt, prompt embeddings) mixed into a block's key: a block
    of the same tokens for another adapter or tenant has another key, and so has every block after it; a plain
    block's key is the same as without extras."""
    plain = chain_keys(NS, TOKENS, 4)
    assert chain_keys(NS, TOKENS, 4, extras=[b"", b"", b"", b""]) == plain
    salted = chain_keys(NS, TOKENS, 4, extras=[b"(('cache_salt', 'tenant-a'),)", b"", b"", b""])
    assert not set(salted) & set(plain)  # the salt is on block 0 only, and the chain carries it
    other = chain_keys(NS, TOKENS, 4, extras=[b"(('cache_salt', 'tenant-b'),)", b"", b"", b""])
    assert not set(other) & set(salted)
    lora_late = chain_keys(NS, TOKENS, 4, extras=[b"", b"", b"('lora',)", b"('lora',)"])
    assert lora_late[:2] == plain[:2] and not set(lora_late[2:]) & set(plain)
    assert chain_keys(NS, TOKENS, 4, parent=salted[1], start=2, extras=[b"", b""]) == salted[2:]  # extending
