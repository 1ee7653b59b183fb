"""The ledger: which vNPUs fuyao created, for whom, and which creations were in flight.

A vNPU outlives the process that created it, so ownership is written down before the vNPU exists: a ``pending``
record (with the vNPU id we are about to ask for) is written, then npu-smi creates it, then the record becomes
``created``. After a crash, a pending record is resolved against what npu-smi reports — adopted if the vNPU exists,
dropped if not — so a crash at any point leaves neither an orphan nor a duplicate. Only vNPUs in the ledger are
ever destroyed automatically; vNPUs made by others are left alone.

The file is rewritten atomically and durably (temp file, fsync, rename, fsync of the directory: the rename is on disk
before the caller acts on it), with a backup copy a corrupted file falls back to.
Every create, destroy and recovery runs inside :meth:`Ledger.transaction` (an flock), so the device plugin's
threads and an operator's ``fuyao-vnpu`` never interleave, and a pending record is only resolved once the process
that wrote it is gone — and dropped, its vNPU absent, only a grace period after the creation began (a killed npu-smi
call may still take effect in the driver).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)

DEFAULT_LEDGER = "/var/lib/fuyao/vnpu-ledger.json"
OWNER_STATIC = "static"
DYNAMIC_PREFIX = "dynamic:"


class VnpuRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    vnpu_id: int
    device_id: str
    npu_id: int
    chip_id: int
    template: str
    owner: str
    """``static`` (from the ConfigMap) or ``dynamic:<allocation key>`` (created at Allocate)."""
    state: Literal["pending", "created"]
    at: float
    pid: int | None = None
    """The process that wrote a ``pending`` record (with its start time): while it lives, the creation may still
    be in flight and the record must not be resolved by anyone else."""
    pid_started: float | None = None
    recreate: bool = False
    """A ``pending`` record that replaced a ``created`` one to re-create its vanished vNPU (a container holds it):
    if that vNPU never appears, the record goes back to ``created`` — and is re-created again — rather than away."""

    @property
    def dynamic(self) -> bool:
        return self.owner.startswith(DYNAMIC_PREFIX)

    @property
    def cores(self) -> frozenset[str]:
        """The ``npu.huawei.com/npu-core`` devices a dynamic vNPU was created for."""
        return frozenset(self.owner[len(DYNAMIC_PREFIX):].split(",")) if self.dynamic else frozenset()


def dynamic_owner(cores: Iterable[str]) -> str:
    """Owner of a vNPU created at Allocate for these core devices (the kubelet's allocation is the key)."""
    return DYNAMIC_PREFIX + ",".join(sorted(set(cores)))


class _File(BaseModel):
    schema_version: Literal[1] = 1
    records: list[VnpuRecord] = []


class LedgerConflict(Exception):
    """A record for this vNPU id already belongs to another owner."""


class Ledger:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.backup = self.path.with_name(self.path.name + ".bak")
        self._lock = threading.RLock()
        self._depth = 0
        self._lock_file: Any = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Exclusive across threads and processes (flock), re-entrant within a thread. Hold it across a whole
        pending → npu-smi → created sequence, so nobody resolves or reuses a record while its vNPU is in flight."""
        with self._lock:
            if self._depth == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115
                fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._lock_file, fcntl.LOCK_UN)
                    self._lock_file.close()
                    self._lock_file = None

    def records(self) -> list[VnpuRecord]:
        with self.transaction():
            return self._read()

    def _read(self) -> list[VnpuRecord]:
        try:
            return self._parse(self.path.read_text())
        except FileNotFoundError:
            return []
        except (json.JSONDecodeError, ValidationError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            try:
                records = self._parse(self.backup.read_text())
            except (OSError, json.JSONDecodeError, ValidationError):
                # Nothing trustworthy left: vNPUs are treated as not ours and never destroyed automatically.
                log.error("vNPU ledger %s is unreadable (%s) and has no usable backup; moved it to %s and starting "
                          "empty — vNPUs it listed are now treated as not ours", self.path, exc, aside)
                return []
            log.error("vNPU ledger %s is unreadable (%s); moved it to %s and restored the last good copy (%d "
                      "records)", self.path, exc, aside, len(records))
            self._write(records)
            return records

    @staticmethod
    def _parse(raw: str) -> list[VnpuRecord]:
        return _File.model_validate(json.loads(raw)).records

    def _write(self, records: list[VnpuRecord]) -> None:
        data = _File(records=sorted(records, key=lambda r: (r.device_id, r.vnpu_id))).model_dump_json(indent=1)
        for target in (self.path, self.backup):  # the backup is what a torn or corrupted ledger falls back to
            tmp = target.with_name(target.name + ".tmp")
            with open(tmp, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            _sync_directory(target.parent)  # the rename itself: a power loss must not bring back the old file

    def update(self, change: Callable[[list[VnpuRecord]], list[VnpuRecord]]) -> list[VnpuRecord]:
        """Read, apply ``change``, write — atomically with respect to other writers."""
        with self.transaction():
            records = change(self._read())
            self._write(records)
            return records

    def put(self, record: VnpuRecord) -> None:
        """Add or replace the record of this vNPU; :class:`LedgerConflict` if another owner holds the id."""
        self.update(lambda records: _put(records, record))

    def replace(self, old: VnpuRecord, new: VnpuRecord) -> None:
        """``remove(old)`` then ``put(new)`` in one rewrite of the file (a record moving from pending to created,
        or getting a new grace period)."""
        self.update(lambda records: _put([r for r in records if r != old], new))

    def remove(self, record: VnpuRecord) -> bool:
        """Remove exactly this record (same owner, state and time); False if it changed meanwhile."""
        removed = False

        def change(records: list[VnpuRecord]) -> list[VnpuRecord]:
            nonlocal removed
            kept = [r for r in records if r != record]
            removed = len(kept) != len(records)
            return kept

        self.update(change)
        return removed


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put(records: list[VnpuRecord], record: VnpuRecord) -> list[VnpuRecord]:
    other = next((r for r in records if _same(r, record)), None)
    if other is not None and other.owner != record.owner:
        raise LedgerConflict(f"vNPU {record.vnpu_id} on {record.device_id} already belongs to {other.owner}")
    return [r for r in records if not _same(r, record)] + [record]


def _same(a: VnpuRecord, b: VnpuRecord) -> bool:
    return a.device_id == b.device_id and a.vnpu_id == b.vnpu_id
