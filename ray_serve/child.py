"""Start a child process that dies with this process, from whatever thread asks, and stop it with everything it
started.

``PR_SET_PDEATHSIG`` sends its signal when the *thread* that forked the child exits, not when the process does
(prctl(2): "the parent in this case is considered to be the thread that created this process"). A Serve replica's
constructor may run on a thread that ends after it, which would take the engine down with it: the engine's port then
refuses connections while the replica, its health check not yet due, still routes to it. So every child is forked
by one thread that lives as long as the process, and its death signal means "this process is gone".

No Python code runs between fork and exec (``preexec_fn`` is unsafe in a process with threads, as a replica is: the
child may deadlock on a lock another thread held at the fork, e.g. the dynamic loader's, which ``ctypes`` takes).
The child is this file run as a script (``python -I child.py PARENT_PID ARGV...``): it asks for the death signal
itself, checks that its parent is still the one that started it (or exits: it died before the ``prctl``), and
execs the engine, which keeps the death signal (execve(2) clears it only for set-user-ID programs).

The child leads its own session and process group (``start_new_session``), so :func:`stop` ends the engine and
everything it started: its process group, and every process below it found before the first signal (a
grandchild that started a session of its own, or lost its parent, is outside the group).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import psutil

PR_SET_PDEATHSIG = 1

_FORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="child-forker")
"""Its one worker thread lives until the interpreter exits (ThreadPoolExecutor workers do not end when idle)."""


def spawn(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``argv`` started with ``env`` in a session of its own; it gets SIGTERM when this process dies (Linux),
    however it dies."""
    command = [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), *argv]
    return _FORKER.submit(subprocess.Popen, command, env=dict(env), start_new_session=True).result()


def stop(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """End ``process``, its process group and every process below it: SIGTERM, and after ``grace`` seconds
    SIGKILL for whatever is left. Also when ``process`` has exited already (its group may live on)."""
    others = _others(process.pid)
    _signal(process, others, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (process.poll() is None or _running(others)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is None or _running(others):
        _signal(process, _running(others), signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # stuck in the driver (D state): not forever
            process.wait(timeout=5)
        deadline = time.monotonic() + 5
        while _running(others) and time.monotonic() < deadline:
            time.sleep(0.05)


def _others(leader: int) -> list[psutil.Process]:
    """The processes below ``leader`` and the other members of its process group, as they are now."""
    try:
        found = {p.pid: p for p in psutil.Process(leader).children(recursive=True)}
    except psutil.NoSuchProcess:
        found = {}
    for proc in psutil.process_iter():
        if proc.pid != leader and proc.pid not in found and _group(proc) == leader:
            found[proc.pid] = proc
    return list(found.values())


def _group(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def _running(procs: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Those still running (not gone, not a zombie its parent has yet to reap), each still the process found."""
    running = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
        except psutil.NoSuchProcess:
            pass
    return running


def _signal(process: subprocess.Popen[bytes], others: Sequence[psutil.Process], sig: signal.Signals) -> None:
    # the group's id is the leader's pid: signal it only while that id cannot have been reused (the leader not
    # reaped yet, or a member of it still running)
    if process.returncode is None or any(_group(p) == process.pid for p in _running(others)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
    if process.poll() is None:
        process.send_signal(sig)
    for proc in others:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)  # psutil checks it is still the process it found (not a reused pid)


def port_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``port`` (of ``host``, or of every address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "", port))
        except OSError:
            return False
    return True


def _exec_with_death_signal(parent: int, argv: Sequence[str]) -> None:  # pragma: no cover - replaced by argv
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the prctl: no signal will come
        os._exit(1)
    os.execvp(argv[0], list(argv))


if __name__ == "__main__":  # the child's first moments: python -I child.py PARENT_PID ARGV...
    _exec_with_death_signal(int(sys.argv[1]), sys.argv[2:])
