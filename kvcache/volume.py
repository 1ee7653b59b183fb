"""The shared tier's size, held on the volume itself: which block files to remove so what the connectors stored
(``fuyao.kvcache.blockstore``) fits ``size``, by the configured policy.

Records come from the volume, with nothing else to keep in step:

- a file's modification time is when it was stored (FIFO, and TTL: older than ``ttl`` since stored is gone,
  whatever the policy);
- its access time is when an engine last loaded it (a load sets it), or its store time if never loaded (LRU);
- loads per block for LFU come from the connectors' access logs (``<namespace>/.access/<host>-<pid>.log``, one key
  per line, each process its own file: appends never interleave across NFS clients), which the manager consumes by
  renaming them (a writer opens per append, so it starts a new file).

``plan`` is the decision, a pure function of the records, the clock and the settings (tested with a fake clock);
``scan``, ``consume_access_logs`` and ``remove`` are the I/O around it; ``VolumeTier`` runs them as one sweep and
publishes what the volume holds to the index's lookups.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fuyao.contracts import KvCachePolicy
from fuyao.kv_blocks import block_hashes

from .blockstore import ACCESS_DIR, NAMESPACE_FILE, SUFFIX, block_key, read_header


@dataclass(frozen=True)
class FileRecord:
    key: str
    path: Path
    size: int
    stored_at: float
    accessed_at: float
    depth: int = 0  # its position in its chain (when known): among equals, deeper blocks go first

    @property
    def last_used(self) -> float:
        return max(self.stored_at, self.accessed_at)


@dataclass(frozen=True)
class Plan:
    expired: list[FileRecord]
    evicted: list[FileRecord]
    kept_bytes: int

    @property
    def removed(self) -> list[FileRecord]:
        return self.expired + self.evicted


def plan(records: Sequence[FileRecord], capacity_bytes: int, policy: KvCachePolicy, now: float,
         ttl_s: float | None = None, hits: Counter[str] | None = None) -> Plan:
    """What to remove: every block older than ``ttl_s`` since stored, then, while the rest is over
    ``capacity_bytes``, blocks in the policy's order — LRU: least recently stored or loaded; LFU: fewest loads, the
    least recently used among equals; FIFO: oldest stored (loads do not renew)."""
    hits = hits or Counter()
    expired = [r for r in records if ttl_s is not None and now - r.stored_at > ttl_s]
    gone = {r.key for r in expired}
    alive = [r for r in records if r.key not in gone]
    total = sum(r.size for r in alive)
    if policy == KvCachePolicy.FIFO:
        order = sorted(alive, key=lambda r: (r.stored_at, -r.depth, r.key))
    elif policy == KvCachePolicy.LFU:
        order = sorted(alive, key=lambda r: (hits[r.key], r.last_used, -r.depth, r.key))
    else:
        order = sorted(alive, key=lambda r: (r.last_used, -r.depth, r.key))
    evicted: list[FileRecord] = []
    for record in order:
        if total <= capacity_bytes:
            break
        evicted.append(record)
        total -= record.size
    return Plan(expired=expired, evicted=evicted, kept_bytes=total)


LEFTOVER_S = 3600.0
"""A writer's temporary file (``.<key>.<pid>.<ns>.tmp``) or a consumed access log older than this was left by a
process that died mid-write: removed by the sweep (else it would take volume space forever, uncounted)."""


def scan(namespace_dir: Path) -> list[FileRecord]:
    """Every block file under a namespace's directory (files that vanish while scanned are skipped); leftovers
    older than :data:`LEFTOVER_S` are removed on the way."""
    found: list[FileRecord] = []
    cutoff = time.time() - LEFTOVER_S
    for shard in sorted(namespace_dir.iterdir()) if namespace_dir.is_dir() else []:
        if not shard.is_dir() or shard.name.startswith("."):
            continue
        for path in shard.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                _remove_if_older(path, cutoff)
                continue
            if not path.name.endswith(SUFFIX) or path.name.startswith("."):
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append(FileRecord(key=path.name[:-len(SUFFIX)], path=path, size=stat.st_size,
                                    stored_at=stat.st_mtime, accessed_at=stat.st_atime))
    return found


def _remove_if_older(path: Path, cutoff: float) -> None:
    try:
        if path.stat().st_mtime < cutoff:
            path.unlink()
    except OSError:
        pass  # gone already, or not ours to remove


def consume_access_logs(namespace_dir: Path, held: dict[Path, int] | None = None) -> Counter[str]:
    """Loads per key recorded since the last call. Each log is renamed, then read.

    A writer opens its log per append, so one that opened it just before the rename appends to the renamed file
    after it was read. With ``held`` (renamed file → bytes read so far, kept by the caller between calls) such
    files stay until the next call, which reads what was appended since and removes them, so no such append is
    lost. Without it they are removed at once. A file a crashed manager left renamed is removed once old."""
    counts: Counter[str] = Counter()
    directory = namespace_dir / ACCESS_DIR
    if held is not None:
        for taken in [p for p in held if p.parent == directory]:
            counts.update(_read_keys(taken, held.pop(taken)))
            with contextlib.suppress(OSError):
                taken.unlink()
    cutoff = time.time() - LEFTOVER_S
    for leftover in directory.glob("*.consumed") if directory.is_dir() else []:
        _remove_if_older(leftover, cutoff)
    for log in sorted(directory.glob("*.log")) if directory.is_dir() else []:
        taken = log.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}.consumed")
        try:
            log.rename(taken)
        except OSError:
            continue
        try:
            data = taken.read_bytes()
        except OSError:
            data = b""
        offset = data.rfind(b"\n") + 1  # a line still being appended is read next time
        counts.update(_keys(data[:offset]))
        if held is not None:
            held[taken] = offset
        else:
            with contextlib.suppress(OSError):
                taken.unlink()
    return counts


def _read_keys(path: Path, start: int) -> list[str]:
    """The keys in ``path`` from byte ``start`` on."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return []
    return _keys(data)


def _keys(data: bytes) -> list[str]:
    return [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]


def remove(records: Iterable[FileRecord]) -> int:
    """Delete the files; returns the bytes freed (a file already gone frees nothing)."""
    freed = 0
    for record in records:
        try:
            record.path.unlink()
            freed += record.size
        except OSError:
            continue
    return freed


@dataclass
class SweepReport:
    blocks: int = 0
    bytes: int = 0
    expired: int = 0
    evicted: int = 0
    freed_bytes: int = 0
    seconds: float = 0.0


class VolumeTier:
    """Holds the tier at ``capacity_bytes`` on the volume at ``root`` (all namespaces together: one volume, one
    size), one sweep at a time: scan, read the access logs, plan, remove. LFU's load counts persist across sweeps
    (and are forgotten with their block).

    It also publishes what the volume holds in the index's own block keys (fuyao's content chain with
    ``block_size`` and ``seed``), per served model: each new file's header (its tokens and parent) is read once, and
    a block whose parent chain is complete gets the content hash an index lookup of the same tokens computes.
    Namespaces of another block size are not published (their blocks are not the index's blocks)."""

    def __init__(self, root: str | Path, capacity_bytes: int, policy: KvCachePolicy, ttl_s: float | None = None,
                 clock: Callable[[], float] = time.time, block_size: int = 0, seed: int = 0):
        self.root = Path(root)
        self.block_size = block_size
        self.seed = seed
        self._held: dict[str, tuple[str, str, int, list[int], bool]] = {}
        """key → (namespace dir, parent, position, tokens, plain: its key is of its tokens alone, no extra keys)."""
        self._content: dict[str, int] = {}  # key → the index's key of that block
        self._models: dict[str, str] = {}  # namespace dir → served model name ("" when unknown)
        self.published: dict[str, frozenset[int]] = {}
        """Served model → the index keys of the blocks the volume holds, and "" → those of every model (replaced whole
        after each sweep, so a lookup reads one set)."""
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.ttl_s = ttl_s
        self.clock = clock
        self.hits: Counter[str] = Counter()
        self._loaded_at: dict[str, float] = {}  # key → when a sweep last saw it loaded (access logs)
        self._logs_read: dict[Path, int] = {}  # renamed access logs → bytes read (finished next sweep)
        self.last = SweepReport()
        self.expired_total = 0
        self.evicted_total = 0

    def namespaces(self) -> list[Path]:
        base = self.root / "v1"
        return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def sweep(self) -> SweepReport:
        started = time.monotonic()
        records: list[FileRecord] = []
        loaded_now: set[str] = set()
        now = self.clock()
        for directory in self.namespaces():
            records += scan(directory)
            loaded = consume_access_logs(directory, self._logs_read)
            self.hits.update(loaded)
            loaded_now.update(loaded)
            for key in loaded:  # the logs, not atime, say when a block was last loaded: a reader that does not
                self._loaded_at[key] = now  # own the file cannot set its atime, and relatime updates it daily
        access_dirs = {d / ACCESS_DIR for d in self.namespaces()}
        self._logs_read = {p: n for p, n in self._logs_read.items() if p.parent in access_dirs}
        self._learn(records)
        decided = plan(self._for_eviction(records), self.capacity_bytes, self.policy, now, self.ttl_s, self.hits)
        freed = remove(decided.removed)
        seen = {r.key for r in records}
        for key in [k for k in self.hits if k not in seen and k not in loaded_now]:
            del self.hits[key]  # removed by a reader (corrupt) or by hand, or never a file here: forgotten
        for record in decided.removed:
            self.hits.pop(record.key, None)
        self.expired_total += len(decided.expired)
        self.evicted_total += len(decided.evicted)
        gone = {r.key for r in decided.removed}
        kept = [r for r in records if r.key not in gone]
        self._loaded_at = {r.key: self._loaded_at[r.key] for r in kept if r.key in self._loaded_at}
        self._publish(kept)
        self.last = SweepReport(blocks=len(records) - len(decided.removed), bytes=decided.kept_bytes,
                                expired=len(decided.expired), evicted=len(decided.evicted), freed_bytes=freed,
                                seconds=time.monotonic() - started)
        return self.last

    def _for_eviction(self, records: list[FileRecord]) -> list[FileRecord]:
        """The records as eviction weighs them: last loaded when the access logs say so (atime may not move), and
        each block's times raised to the latest of the blocks after it in its chain (and its depth set), from the
        headers: a block no lookup reaches without its parent, so a parent must never go before its children (a
        chain is stored and loaded parent first, so by its own times the first block would always be the oldest,
        and its removal would strand the rest)."""
        stored = {r.key: r.stored_at for r in records}
        accessed = {r.key: max(r.accessed_at, self._loaded_at.get(r.key, 0.0)) for r in records}
        held = self._held
        for key in sorted(stored, key=lambda k: -held[k][2] if k in held else 0):  # deepest first
            parent = held[key][1] if key in held else ""
            if parent in stored:
                stored[parent] = max(stored[parent], stored[key])
                accessed[parent] = max(accessed[parent], accessed[key])
        return [FileRecord(r.key, r.path, r.size, stored[r.key], accessed[r.key],
                           held[r.key][2] if r.key in held else 0) for r in records]

    def _model(self, namespace_dir: Path) -> str:
        """The served model name of a namespace (its namespace.json, written by the connector), or "" when its block
        size is not the index's (not published)."""
        name = str(namespace_dir)
        if name not in self._models:
            try:
                described = json.loads((namespace_dir / NAMESPACE_FILE).read_text())
                model = str(described["model"]).split("@", 1)[0]
                self._models[name] = model if int(described["block_size"]) == self.block_size else ""
            except (OSError, ValueError, KeyError, TypeError):
                return ""  # not described yet: asked again next sweep
        return self._models[name]

    def _learn(self, records: list[FileRecord]) -> None:
        """Read the headers of block files not seen before (chain, position, tokens): what eviction orders chains
        by and what lookups are answered from."""
        for record in records:
            if record.key in self._held:
                continue
            header = read_header(record.path)
            if header is None:
                continue
            try:
                namespace, parent = record.path.parent.parent, str(header.get("parent", ""))
                tokens = [int(t) for t in header["token_ids"]]
                plain = block_key(bytes.fromhex(namespace.name), bytes.fromhex(parent), tokens).hex() == record.key
                self._held[record.key] = (str(namespace), parent, int(header["position"]), tokens, plain)
            except (KeyError, TypeError, ValueError, OverflowError, struct.error):  # not of the connector's shape
                continue

    def _publish(self, kept: list[FileRecord]) -> None:
        keep = {r.key for r in kept}
        for key in [k for k in self._held if k not in keep]:
            del self._held[key]
            self._content.pop(key, None)
        if not self.block_size:
            return
        published: dict[str, set[int]] = {}
        for key, (namespace, parent, _position, tokens, plain) in sorted(self._held.items(), key=lambda kv: kv[1][2]):
            model = self._model(Path(namespace))
            if not model or not plain or len(tokens) != self.block_size:
                continue  # a block keyed with a LoRA adapter, images or a salt is not a plain prompt's (nor below it)
            if key not in self._content:
                if parent and parent not in self._content:
                    continue  # its parent is gone or not published: no lookup reaches it
                try:
                    self._content[key] = block_hashes(tokens, self.block_size, self.seed,
                                                      parent=self._content[parent] if parent else None)[0]
                except (ValueError, IndexError):
                    continue
            published.setdefault(model, set()).add(self._content[key])
        every = frozenset().union(*published.values())
        self.published = {"": every, **{model: frozenset(keys) for model, keys in published.items()}}

    def leading(self, hashes: Sequence[int], model: str = "") -> int:
        """How many of a prompt's leading blocks (index keys) the volume holds, for ``model`` (any when empty)."""
        held = self.published.get(model, frozenset())
        count = 0
        for block in hashes:
            if block not in held:
                break
            count += 1
        return count
