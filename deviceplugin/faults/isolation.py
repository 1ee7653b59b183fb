"""The record of isolated NPUs: a small JSON file on the host (``health.isolationState``), written before an
isolation is published, so a plugin restart keeps a sick chip out of service. An operator releases a chip with
``fuyao-device-plugin --release-npu DEVICE`` (the running plugin sees the file change at its next poll).

Writes are atomic (temporary file, fsync, rename) under an flock shared with the release command."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)


class IsolatedNpu(BaseModel):
    model_config = ConfigDict(frozen=True)

    codes: tuple[str, ...] = ()
    level: str | None = None
    reason: str
    since: str = Field(description="RFC 3339 time of the isolation")


class _File(BaseModel):
    version: Literal[1] = 1
    devices: dict[str, IsolatedNpu] = Field(default_factory=dict)


class IsolationRecord:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def stamp(self) -> tuple[int, int] | None:
        """Changes when the file does (checked every poll before re-reading it)."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def read(self) -> dict[str, IsolatedNpu]:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return {}
        except UnicodeDecodeError as exc:
            return self._aside(exc)
        except OSError as exc:  # a directory, no permission...: said, and the plugin keeps running
            log.error("isolation record %s cannot be read (%s): NPUs isolated before are back in service unless "
                      "their fault is still there", self.path, exc.strerror or exc)
            return {}
        try:
            return _File.model_validate(json.loads(raw)).devices
        except (json.JSONDecodeError, ValidationError) as exc:
            return self._aside(exc)

    def _aside(self, exc: Exception) -> dict[str, IsolatedNpu]:
        """Move an unreadable record aside (kept for a person to read) and start from an empty one."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(self.path, aside)
        log.error("isolation record %s is unreadable (%s); moved it to %s: NPUs isolated before are back in "
                  "service unless their fault is still there", self.path, exc, aside)
        return {}

    def _write(self, devices: dict[str, IsolatedNpu]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(_File(devices=dict(sorted(devices.items()))).model_dump_json(indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, device: str, entry: IsolatedNpu) -> None:
        with self._locked():
            devices = self.read()
            devices[device] = entry
            self._write(devices)

    def release(self, device: str) -> bool:
        """Remove ``device``; False when it was not isolated."""
        with self._locked():
            devices = self.read()
            if devices.pop(device, None) is None:
                return False
            self._write(devices)
            return True
