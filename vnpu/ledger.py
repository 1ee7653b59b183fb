"""The ledger: which vNPUs fuyao created, for whom, and which creations were in flight.

A vNPU outlives the process that created it, so ownership is written down before the vNPU exists: a ``pending``
record (with the vNPU id we are about to ask for) is written, then npu-smi creates it, then the record becomes
``created``. After a crash, a pending record is resolved against what npu-smi reports — adopted if the vNPU exists,
dropped if not — so a crash at any point leaves neither an orphan nor a duplicate. Only vNPUs in the ledger are
ever destroyed automatically; vNPUs made by others are left alone.

The file is rewritten atomically (temp file, fsync, rename) under an flock, so the device plugin and an operator's
``fuyao-vnpu`` never interleave writes.
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
from typing import Literal

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


class Ledger:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def records(self) -> list[VnpuRecord]:
        with self._locked():
            return self._read()

    def _read(self) -> list[VnpuRecord]:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            return _File.model_validate(json.loads(raw)).records
        except (json.JSONDecodeError, ValidationError) as exc:
            # Keep the evidence; start empty. Unknown vNPUs are then treated as foreign: never destroyed.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("vNPU ledger %s is unreadable (%s); moved it to %s and starting empty — vNPUs it listed "
                      "are now treated as not ours and will not be destroyed automatically", self.path, exc, aside)
            return []

    def _write(self, records: list[VnpuRecord]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = _File(records=sorted(records, key=lambda r: (r.device_id, r.vnpu_id))).model_dump_json(indent=1)
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def update(self, change: Callable[[list[VnpuRecord]], list[VnpuRecord]]) -> list[VnpuRecord]:
        """Read, apply ``change``, write — atomically with respect to other writers."""
        with self._locked():
            records = change(self._read())
            self._write(records)
            return records

    def put(self, record: VnpuRecord) -> None:
        self.update(lambda rs: [r for r in rs if not _same(r, record)] + [record])

    def remove(self, record: VnpuRecord) -> None:
        self.update(lambda rs: [r for r in rs if not _same(r, record)])


def _same(a: VnpuRecord, b: VnpuRecord) -> bool:
    return a.device_id == b.device_id and a.vnpu_id == b.vnpu_id
