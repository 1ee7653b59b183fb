"""Runs npu-smi with a timeout and hands its output to the parsers.

Every call has a timeout and kills the whole process group when it expires: a hung npu-smi (a wedged driver) must
never hang a daemon. The client holds no state beyond its configuration, so it is safe to share between threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

from . import parse
from .errors import NpuSmiClosed, NpuSmiCommandFailed, NpuSmiNotFound, NpuSmiTimeout, NpuSmiUnsupported
from .models import (
    ChipMapping,
    HealthReport,
    KeyValueReport,
    NpuCount,
    NpuSmiInfo,
    PhyIdRemap,
    SetResult,
    Topology,
    VnpuInfo,
    VnpuTemplate,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0

# Linux: an npu-smi child dies with the process that started it (no orphan finishing a create after a crash).
# setpriv (util-linux) sets the parent-death signal before exec; a preexec_fn would do it in Python between fork
# and exec, which is unsafe in a threaded daemon.
_SETPRIV = shutil.which("setpriv")
_OUTPUT_LIMIT = 4 * 1024 * 1024


class NpuSmi:
    """A handle on one npu-smi binary. ``path`` may be a name on PATH or a file path."""

    def __init__(self, path: str = "npu-smi", timeout_s: float = DEFAULT_TIMEOUT_S,
                 env: dict[str, str] | None = None):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.path = path
        self.timeout_s = timeout_s
        self.env = env
        self._running: set[subprocess.Popen[bytes]] = set()
        self._running_lock = threading.RLock()  # close() runs from a signal handler on a thread inside run()
        self._closed = False

    def resolve(self) -> str:
        """The executable that will run, or :class:`NpuSmiNotFound`."""
        found = shutil.which(self.path)
        if found is None:
            raise NpuSmiNotFound(f"npu-smi not found or not executable: {self.path!r}")
        return found

    def run(self, args: Sequence[str], timeout_s: float | None = None, answer: str | None = None) -> str:
        """Run ``npu-smi ARGS`` and return stdout; raise a typed error on timeout or a non-zero exit. ``answer`` is
        written to its stdin (a confirmation prompt's reply); without it stdin is empty."""
        exe = self.resolve()
        command = (exe, *args)
        limit = self.timeout_s if timeout_s is None else timeout_s
        env = None if self.env is None else {**os.environ, **self.env}
        started = time.monotonic()
        with self._running_lock:  # started and registered atomically with respect to close()
            if self._closed:
                raise NpuSmiClosed("npu-smi client closed (shutting down)", command)
            try:
                argv = (_SETPRIV, "--pdeathsig", "KILL", "--", *command) if _SETPRIV else command
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL if answer is None else subprocess.PIPE,
                                        start_new_session=True, env=env)
            except OSError as exc:
                raise NpuSmiNotFound(f"cannot start npu-smi: {exc}", command) from None
            self._running.add(proc)
            if self._closed:  # close() ran (from a signal handler on this thread) between Popen and here
                _kill_group(proc)
        try:
            out, err = proc.communicate(None if answer is None else answer.encode(), timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise NpuSmiTimeout(limit, command) from None
        finally:
            with self._running_lock:
                self._running.discard(proc)
        elapsed = time.monotonic() - started
        stdout = out[:_OUTPUT_LIMIT].decode("utf-8", errors="replace")
        stderr = err[:_OUTPUT_LIMIT].decode("utf-8", errors="replace")
        log.debug("npu-smi %s exited %d in %.3fs", " ".join(args), proc.returncode, elapsed)
        if proc.returncode != 0:
            text = (stdout + stderr).strip()
            if parse.is_unsupported_message(text):
                raise NpuSmiUnsupported(f"npu-smi says: {text}", command)
            tail = text.splitlines()[-1] if text else "no output"
            raise NpuSmiCommandFailed(f"npu-smi exited with code {proc.returncode}: {tail}", proc.returncode, text,
                                      command)
        return stdout

    def close(self) -> int:
        """Refuse new calls and kill every call in flight (a daemon shutting down must neither wait for nor leave
        behind a hung npu-smi). Returns how many were killed; their callers get :class:`NpuSmiCommandFailed`."""
        with self._running_lock:
            self._closed = True
            procs = list(self._running)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        return len(procs)

    # Queries ---------------------------------------------------------------------------------------------------
    def info(self) -> NpuSmiInfo:
        return parse.parse_info(self.run(["info"]))

    def npu_list(self) -> list[NpuCount]:
        return parse.parse_npu_list(self.run(["info", "-l"]))

    def chip_map(self) -> list[ChipMapping]:
        return parse.parse_chip_map(self.run(["info", "-m"]))

    def phyid_remap(self, phy_id: int) -> PhyIdRemap:
        """Which card and chip physical id ``phy_id`` (``/dev/davinci<phy_id>``) is."""
        return parse.parse_phyid_remap(self.run(["info", "-t", "phyid-remap", "-p", str(phy_id)]))

    def health(self, npu_id: int, chip_id: int | None = None) -> HealthReport:
        return parse.parse_health(self.run(["info", "-t", "health", *_target(npu_id, chip_id)]))

    def usages(self, npu_id: int) -> KeyValueReport:
        return parse.parse_key_values(self.run(["info", "-t", "usages", "-i", str(npu_id)]), "-t usages")

    def memory(self, npu_id: int) -> KeyValueReport:
        return parse.parse_key_values(self.run(["info", "-t", "memory", "-i", str(npu_id)]), "-t memory")

    def common(self, npu_id: int) -> KeyValueReport:
        return parse.parse_key_values(self.run(["info", "-t", "common", "-i", str(npu_id)]), "-t common")

    def board(self, npu_id: int, chip_id: int | None = None) -> KeyValueReport:
        return parse.parse_key_values(self.run(["info", "-t", "board", *_target(npu_id, chip_id)]), "-t board")

    def topology(self) -> Topology:
        return parse.parse_topology(self.run(["info", "-t", "topo"]))

    def templates(self, npu_id: int | None = None) -> list[VnpuTemplate]:
        args = ["info", "-t", "template-info"] + ([] if npu_id is None else ["-i", str(npu_id)])
        return parse.parse_template_info(self.run(args))

    def vnpu_info(self, npu_id: int, chip_id: int) -> VnpuInfo:
        return parse.parse_vnpu_info(self.run(["info", "-t", "info-vnpu", *_target(npu_id, chip_id)]))

    # Changes ---------------------------------------------------------------------------------------------------
    def create_vnpu(self, npu_id: int, chip_id: int, template: str, vnpu_id: int | None = None,
                    vgroup_id: int | None = None) -> SetResult:
        args = ["set", "-t", "create-vnpu", *_target(npu_id, chip_id), "-f", template]
        if vnpu_id is not None:
            args += ["-v", str(vnpu_id)]
        if vgroup_id is not None:
            args += ["-g", str(vgroup_id)]
        return self._checked_set(args, "create-vnpu")

    def destroy_vnpu(self, npu_id: int, chip_id: int, vnpu_id: int) -> SetResult:
        return self._checked_set(["set", "-t", "destroy-vnpu", *_target(npu_id, chip_id), "-v", str(vnpu_id)],
                                 "destroy-vnpu")

    def reset_chip(self, npu_id: int, chip_id: int, timeout_s: float | None = None) -> SetResult:
        """Hot reset of one chip, ``npu-smi set -t reset -i N -c C``, answering its confirmation prompt. Raises
        :class:`NpuSmiCommandFailed` unless npu-smi reports ``Status : OK``."""
        args = ["set", "-t", "reset", *_target(npu_id, chip_id)]
        try:
            text = self.run(args, timeout_s=timeout_s, answer="Y\n")
        except NpuSmiCommandFailed as exc:
            raise NpuSmiCommandFailed(f"npu-smi reset failed: {exc.output or exc}", exc.returncode, exc.output,
                                      exc.command) from None
        result = parse.parse_reset_result(text)
        if result.status.upper() != "OK":
            raise NpuSmiCommandFailed(f"npu-smi reset failed: {result.message}", 0, text, tuple(args))
        return result

    def _checked_set(self, args: list[str], what: str) -> SetResult:
        try:
            text = self.run(args)
        except NpuSmiCommandFailed as exc:
            raise NpuSmiCommandFailed(f"npu-smi {what} failed: {exc.output or exc}", exc.returncode, exc.output,
                                      exc.command) from None
        result = parse.parse_set_result(text, what)
        if result.status.upper() != "OK":
            raise NpuSmiCommandFailed(f"npu-smi {what} failed: {result.message}", 0, text, tuple(args))
        return result


def _target(npu_id: int, chip_id: int | None) -> list[str]:
    return ["-i", str(npu_id)] + ([] if chip_id is None else ["-c", str(chip_id)])


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    try:
        proc.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        log.warning("npu-smi pid %d did not exit after SIGKILL", proc.pid)
