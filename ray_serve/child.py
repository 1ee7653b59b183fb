"""Start a child process that dies with this process, from whatever thread asks.

``PR_SET_PDEATHSIG`` sends its signal when the *thread* that forked the child exits, not when the process does
(prctl(2): "the parent in this case is considered to be the thread that created this process"). A Serve replica's
constructor may run on a thread that ends after it, which would take the engine down with it: the engine's port then
refuses connections while the replica, its health check not yet due, still routes to it. So every child is forked
by one thread that lives as long as the process, and its death signal means "this process is gone".
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

PR_SET_PDEATHSIG = 1

_FORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="child-forker")
"""Its one worker thread lives until the interpreter exits (ThreadPoolExecutor workers do not end when idle)."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``argv`` started with ``env``; it gets SIGTERM when this process dies (Linux), however it dies."""
    return _FORKER.submit(subprocess.Popen, list(argv), env=dict(env), preexec_fn=_die_with_parent).result()


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
