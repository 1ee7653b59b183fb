"""The shared KV tier's files: one file per KV block on a directory every engine mounts (an RWX volume), named by a
content key, so any engine can reuse any prefix another engine computed.

**Keys.** A block's key is a SHA-256 chain over the blocks of token ids that lead to it, inside a namespace:
``k_i = SHA-256(namespace-digest || k_{i-1} || tokens_i as little-endian int32)`` (``k_{-1}`` empty). The namespace
is everything that makes two engines' KV bytes interchangeable (model, dtype, block size, KV heads, head size, the
attention backend's memory layout: ``Namespace``), so engines that differ never share a file. A cryptographic hash,
not the index's fast content hash (``fuyao.kv_blocks``): a collision here would inject another prompt's KV.

**Layout.** ``<root>/v1/<namespace id>/<key[:2]>/<key>.kv``. A file is written to a temporary name in the same
directory and renamed (atomic on a local file system and on NFS), so a reader sees a whole file or none; no locks.
Two engines storing the same block at once each write a whole, valid file of it (not necessarily the same bytes: a
different batch can round differently); the last rename wins. A block already on the volume is not written again.

**Format.** ``FYKV`` magic, a format version byte, a 4-byte little-endian header length, a JSON header (namespace id,
key, parent key, block position, its token ids, the payload's per-layer byte sizes, its size and BLAKE2b digest), then
the payload (each layer's block page, opaque bytes). A reader checks all of it, the header's fields and their types
included: a missing, partial, truncated or corrupt file is a miss (counted), never an exception; a corrupt one is
removed so nobody claims it again.

**Access records.** Loading a block sets its file's access time (the modification time stays its store time), so the
tier manager can evict LRU from ``atime`` and FIFO/TTL from ``mtime`` without any other bookkeeping.

Standard library only: it runs inside vLLM's processes (``fuyao.kvcache.connector``) and in the tier manager.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"FYKV"
FORMAT_VERSION = 1
SUFFIX = ".kv"
ACCESS_DIR = ".access"
"""Per namespace: each process's log of the keys it loaded, one per line (LFU's records; fuyao.kvcache.volume)."""
NAMESPACE_FILE = "namespace.json"
DIR_MODE = 0o2775
FILE_MODE = 0o664
"""Group-writable (the volume's group: the chart's ``kvCache.volume.fsGroup``), so any engine and the tier manager
can replace and remove what another wrote."""
METRIC_PREFIX = "fuyao_kv_tier_"
"""Every engine that uses the tier (the vLLM connector, the simulator) exposes ``StoreStats`` as counters named
``fuyao_kv_tier_<field>`` (``_total`` on the page); the router reads the load time from them (tierLoadCost)."""
COUNTERS = {
    "blocks_stored": "KV blocks this engine wrote to fuyao's shared tier",
    "bytes_stored": "bytes of KV this engine wrote to fuyao's shared tier",
    "blocks_loaded": "KV blocks this engine loaded from fuyao's shared tier instead of computing them",
    "bytes_loaded": "bytes of KV this engine loaded from fuyao's shared tier",
    "blocks_missed": "KV blocks claimed from the tier that could not be loaded (gone, partial, corrupt): recomputed",
    "blocks_corrupt": "tier files found corrupt or partial (removed)",
    "write_errors": "tier writes the volume refused (full, read-only...)",
    "blocks_dropped": "KV blocks not stored: the volume was behind (the write queue full: its blocks or its bytes) or "
                      "refusing writes",
    "load_seconds": "seconds spent loading KV blocks from the tier",
}
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
MAX_HEADER = 1 << 20
DEFAULT_QUEUE_BYTES = 256 << 20
"""What a ``Writer`` holds at most by default: the bytes of the blocks handed over and not yet written."""


@dataclass(frozen=True)
class Namespace:
    """What must match for two engines' KV pages to be interchangeable."""

    model: str
    """The served model's name (before the first ``@``: the tier manager publishes blocks under it), then what
    else identifies the weights and the computation (the vLLM connector: ``<name>@<path>#<digest of its model
    config's revision, quantization, hf_overrides...>``)."""
    dtype: str
    block_size: int
    num_kv_heads: int
    head_size: int
    num_layers: int
    layout: str
    """The page layout: the device, the attention backend's (on CPU: the kernel's instruction set, which orders the
    bytes), the parallelism and vLLM's KV cache layout."""

    def id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def chain_keys(namespace: Namespace, token_ids: Sequence[int], blocks: int, parent: str = "",
               start: int = 0, extras: Sequence[bytes] = ()) -> list[str]:
    """Keys of blocks ``start .. blocks-1`` of ``token_ids`` (``parent``: the key of block ``start-1``).
    ``extras[i - start]``: what else block ``i``'s KV depends on besides its tokens (vLLM's extra keys: a LoRA
    adapter, images, a cache salt, prompt embeddings), mixed into its key; none for a plain block, whose key is
    then the same as without."""
    bs = namespace.block_size
    salt = bytes.fromhex(namespace.id())
    keys: list[str] = []
    previous = bytes.fromhex(parent) if parent else b""
    for i in range(start, blocks):
        chunk = token_ids[i * bs:(i + 1) * bs]
        if len(chunk) < bs:
            break
        digest = block_key(salt, previous, chunk, extras[i - start] if i - start < len(extras) else b"")
        keys.append(digest.hex())
        previous = digest
    return keys


def block_key(salt: bytes, parent: bytes, chunk: Sequence[int], extra: bytes = b"") -> bytes:
    """One block's key (as bytes): its namespace's id, its parent's key, its tokens and its extra keys, if any."""
    material = salt + parent + struct.pack(f"<{len(chunk)}i", *chunk)
    if extra:  # length-prefixed: no extra can pass for another block's tokens
        material += b"extra" + struct.pack("<I", len(extra)) + extra
    return hashlib.sha256(material).digest()


@dataclass
class StoreStats:
    """Counters of one process's use of the tier (the connector's metrics)."""

    blocks_stored: int = 0
    bytes_stored: int = 0
    blocks_loaded: int = 0
    bytes_loaded: int = 0
    blocks_missed: int = 0
    """Blocks claimed but not loadable at load time (gone, partial, corrupt): recomputed."""
    blocks_corrupt: int = 0
    write_errors: int = 0
    blocks_dropped: int = 0
    """Blocks not stored because the writer was behind or paused (``Writer``, which counts them under its lock: more
    than one thread drops blocks)."""
    load_seconds: float = 0.0
    store_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Block:
    """A block read from the tier: its header fields and payload."""

    key: str
    parent: str
    position: int
    token_ids: list[int]
    layers: list[tuple[str, int]]
    payload: bytes


@dataclass
class BlockStore:
    root: Path
    namespace: Namespace
    stats: StoreStats = field(default_factory=StoreStats)
    writer: str = ""
    """Names this process's access log (e.g. ``<host>-<pid>``); empty: loads are not logged."""

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.dir = self.root / "v1" / self.namespace.id()
        self.last_write_error = ""
        """What the volume said to the last write it refused (``stats.write_errors`` counts them)."""

    def describe(self) -> bool:
        """Write ``namespace.json`` (what this namespace is: the tier manager publishes its blocks under the model's
        name) unless it is there; False when the volume refused."""
        target = self.dir / NAMESPACE_FILE
        if target.exists():
            return True
        tmp = target.with_name(f".{NAMESPACE_FILE}.{os.getpid()}.tmp")
        try:
            _shared_dirs(self.dir, self.root)
            tmp.write_text(json.dumps(asdict(self.namespace), indent=2) + "\n")
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}{SUFFIX}"

    def has(self, key: str) -> bool:
        try:
            return self.path(key).stat().st_size > _PREFIX.size
        except OSError:
            return False

    def leading(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, the tier holds."""
        for i, key in enumerate(keys):
            if not self.has(key):
                return i
        return len(keys)

    def write(self, key: str, parent: str, position: int, token_ids: Sequence[int],
              layers: Sequence[tuple[str, bytes]]) -> bool:
        """Store one block (all its layers' pages); False when it was not written (already there, or the volume
        refused: counted in ``write_errors``, never raised)."""
        path = self.path(key)
        if path.exists():
            return False
        started = time.monotonic()
        payload = b"".join(data for _, data in layers)
        header = json.dumps({
            "namespace": self.namespace.id(), "key": key, "parent": parent, "position": position,
            "token_ids": list(token_ids), "layers": [[name, len(data)] for name, data in layers],
            "size": len(payload), "digest": hashlib.blake2b(payload, digest_size=16).hexdigest(),
        }, separators=(",", ":")).encode()
        tmp = path.with_name(f".{key}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            _shared_dirs(path.parent, self.root)
            with open(tmp, "wb") as f:
                f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
                f.write(header)
                f.write(payload)
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
        except OSError as exc:
            self.stats.write_errors += 1
            self.last_write_error = f"{path}: {exc.strerror or exc}"
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        self.stats.blocks_stored += 1
        self.stats.bytes_stored += len(payload)
        self.stats.store_seconds += time.monotonic() - started
        return True

    def read(self, key: str) -> Block | None:
        """A whole, valid block, or None (a miss: gone, partial, from another namespace, or corrupt, which is also
        removed). Sets the file's access time (the LRU record) and logs the load (LFU's record)."""
        return self.read_many([key])[0]

    def read_many(self, keys: Sequence[str], until_miss: bool = False) -> list[Block | None]:
        """``read`` for each of ``keys`` (one request's blocks), with one append to the access log for all;
        ``until_miss``: stop at the first miss (the list ends with its None). Holds every block in memory at once:
        ``iter_read`` holds one."""
        blocks: list[Block | None] = []
        reads = self.iter_read(keys)
        try:
            for block in reads:
                blocks.append(block)
                if until_miss and block is None:
                    break
        finally:
            reads.close()  # the access log is appended now, not when the generator is collected
        return blocks

    def iter_read(self, keys: Sequence[str]) -> Generator[Block | None, None, None]:
        """``read`` for each of ``keys`` in turn, each block read only when the previous one has been taken (so a
        caller that copies each before taking the next holds one block in memory, not the request's every block);
        the loads are appended to the access log together, when the iteration ends or is closed."""
        loaded: list[str] = []
        spent = 0.0
        try:
            for key in keys:
                started = time.monotonic()
                block = self._read_one(key)
                spent += time.monotonic() - started
                if block is not None:
                    loaded.append(block.key)
                yield block
        finally:
            if loaded:
                self._log_access(loaded)
                self.stats.load_seconds += spent

    def _read_one(self, key: str) -> Block | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            self.stats.blocks_missed += 1
            return None
        block = self._parse(key, data)
        if block is None:
            self.stats.blocks_missed += 1
            self.stats.blocks_corrupt += 1
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path, (time.time(), path.stat().st_mtime))
        self.stats.blocks_loaded += 1
        self.stats.bytes_loaded += len(block.payload)
        return block

    def _log_access(self, keys: Sequence[str]) -> None:
        if not self.writer:
            return
        with contextlib.suppress(OSError):
            log_path = self.dir / ACCESS_DIR / f"{self.writer}.log"
            _shared_dirs(log_path.parent, self.root)
            with open(log_path, "a") as f:  # opened per append: a consumer may have renamed the last one
                f.write("".join(key + "\n" for key in keys))

    def _parse(self, key: str, data: bytes) -> Block | None:
        header = parse_header(data)
        if header is None:
            return None
        length = _PREFIX.unpack_from(data)[2]
        payload = data[_PREFIX.size + length:]
        if (header.get("key") != key or header.get("namespace") != self.namespace.id()
                or header.get("size") != len(payload)
                or header.get("digest") != hashlib.blake2b(payload, digest_size=16).hexdigest()):
            return None
        return block_of(key, header, payload)


def block_of(key: str, header: dict[str, Any], payload: bytes) -> Block | None:
    """The block a checked header and its payload describe, or None when a field is missing or of the wrong type (a
    file some other writer or a damaged volume made: a corrupt file, never an exception)."""
    position, parent = header.get("position", -1), header.get("parent", "")
    token_ids, layers = header.get("token_ids", []), header.get("layers")
    if not (_is_int(position) and isinstance(parent, str) and isinstance(token_ids, list)
            and all(_is_int(token) for token in token_ids) and isinstance(layers, list)
            and all(_is_layer(layer) for layer in layers)):
        return None
    pages = [(str(name), int(size)) for name, size in layers]
    if sum(size for _, size in pages) != len(payload):
        return None
    return Block(key=key, parent=parent, position=position, token_ids=token_ids, layers=pages, payload=payload)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_layer(value: Any) -> bool:
    """A header's ``[layer name, page bytes]``."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and _is_int(value[1])
            and value[1] >= 0)


_Item = tuple[str, str, int, list[int], list[tuple[str, bytes]], int]
"""A queued block: key, parent key, position, token ids, its layers' pages, their size in bytes."""


class Writer:
    """Stores blocks in one background thread, so an engine's step never waits for the volume. The caller hands over
    each block's bytes (already copied out of the KV cache); at most ``capacity`` blocks and ``max_bytes`` bytes wait
    (a block counts until it is written), and are written in order. A block that finds the queue full (the volume
    is slower than the engine) is dropped and counted (``blocks_dropped``). When the volume refuses a write (full,
    read-only), the writer pauses for ``retry_s``: blocks handed over meanwhile are dropped, then writes are tried
    again. Safe to call from any thread (the counters it keeps are updated under its lock)."""

    def __init__(self, store: BlockStore, capacity: int = 1024, retry_s: float = 30.0,
                 logger: logging.Logger | None = None, max_bytes: int = DEFAULT_QUEUE_BYTES):
        if max_bytes <= 0:
            raise ValueError(f"Writer: max_bytes must be positive, not {max_bytes}")
        self.store, self.retry_s, self.log, self.max_bytes = store, retry_s, logger or log, max_bytes
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=capacity)
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self._paused_until = 0.0
        self._thread = threading.Thread(target=self._run, name="fuyao-kv-tier-writer", daemon=True)
        self._thread.start()

    @property
    def paused(self) -> bool:
        """The volume refused a write lately: blocks handed over now would be dropped (skip copying them)."""
        return time.monotonic() < self._paused_until

    @property
    def queued_bytes(self) -> int:
        """The bytes of the blocks handed over and not written yet."""
        return self._queued_bytes

    def accepts(self, size: int) -> bool:
        """Whether a block of ``size`` bytes handed over now would be queued (so a caller copies it out of its
        cache only then); ``put`` decides."""
        with self._lock:
            return not self.paused and not self._queue.full() and self._queued_bytes + size <= self.max_bytes

    def drop(self, blocks: int = 1) -> None:
        """Count ``blocks`` the caller did not hand over (they would have been dropped)."""
        with self._lock:
            self.store.stats.blocks_dropped += blocks

    def put(self, key: str, parent: str, position: int, token_ids: Sequence[int],
            layers: Sequence[tuple[str, bytes]]) -> bool:
        """Queue one block; False when it was dropped (paused, or the queue is full: its blocks or its bytes)."""
        size = sum(len(data) for _, data in layers)
        with self._lock:
            if self.paused or self._queued_bytes + size > self.max_bytes:
                self.store.stats.blocks_dropped += 1
                return False
            try:
                self._queue.put_nowait((key, parent, position, list(token_ids), list(layers), size))
            except queue.Full:
                self.store.stats.blocks_dropped += 1
                return False
            self._queued_bytes += size
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued block is written (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to ``timeout``), then stop the thread."""
        self.flush(timeout)
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self.paused:
                    self.drop()
                    continue
                refused = self.store.stats.write_errors
                self.store.write(*item[:5])
                if self.store.stats.write_errors > refused:
                    self._paused_until = time.monotonic() + self.retry_s
                    self.log.warning("the KV tier refused a write (%s): no stores for %.0f s",
                                     self.store.last_write_error, self.retry_s)
            except Exception:  # a bug here must not end the thread (and with it every later store)
                self.log.exception("storing a KV block failed")
            finally:
                if item is not None:
                    with self._lock:
                        self._queued_bytes -= item[5]
                self._queue.task_done()


def _shared_dirs(directory: Path, root: Path) -> None:
    """Make ``directory`` (and its missing parents below ``root``) writable by the volume's group: every engine and
    the tier manager write and remove files there (setgid keeps the group on what is made inside)."""
    missing = []
    current = directory
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):
            made.mkdir()
        if root in made.parents:  # not the volume's root itself (the mount point is the platform's)
            with contextlib.suppress(OSError):
                os.chmod(made, DIR_MODE)


def parse_header(data: bytes) -> dict[str, Any] | None:
    """The JSON header of a block file's first bytes (at least the whole header), or None when they are not one."""
    if len(data) < _PREFIX.size:
        return None
    magic, version, length = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or length > MAX_HEADER or len(data) < _PREFIX.size + length:
        return None
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + length])
    except (ValueError, RecursionError):  # not JSON, or nested past the recursion limit
        return None
    return header if isinstance(header, dict) else None


def read_header(path: Path) -> dict[str, Any] | None:
    """A block file's header, reading only it (the tier manager's scan); None when missing or not a block file."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                return None
            length = _PREFIX.unpack_from(prefix)[2]
            if length > MAX_HEADER:
                return None
            return parse_header(prefix + f.read(length))
    except OSError:
        return None

