"""What every fuyao daemon's entry point shares: the standard flags, config errors as exit code 2 naming the
field, and serving an aiohttp app (or the router's :class:`~fuyao.http_server.HttpServer`) until SIGTERM/SIGINT
(exit 1 when the address cannot be bound)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import faulthandler
import io
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from . import __version__, logs, netaddr
from .config_files import ConfigError
from .http_server import HttpServer

T = TypeVar("T")


def parser(prog: str, description: str, docs: str) -> argparse.ArgumentParser:
    """An argument parser with ``--version``; :func:`parse` adds the logging flags last."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=f"Docs: {docs}")
    p.add_argument("--version", action="version", version=f"{prog} (fuyao {__version__})")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add ``--log-level`` / ``--log-format``, parse, configure logging; from then on SIGUSR1 writes every thread's
    stack to stderr (``kill -USR1 <pid>``: what a daemon that does not answer, or does not stop, is doing)."""
    logs.add_arguments(p)
    args = p.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):  # stderr without a descriptor
        faulthandler.register(signal.SIGUSR1, all_threads=True)                        # (embedded, captured)
    return args


def config_or_exit(prog: str, build: Callable[[], T]) -> T:
    """``build()``, or exit 2 with the error naming the field."""
    try:
        return build()
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(2)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a daemon's main coroutine, on uvloop when it is installed (libuv: fewer system calls and less Python per
    I/O event than asyncio's selector loop; the router's added latency and CPU per request drop with it).
    ``FUYAO_EVENT_LOOP=asyncio`` picks the standard loop."""
    choice = os.environ.get("FUYAO_EVENT_LOOP", "auto")
    if choice not in ("auto", "uvloop", "asyncio"):
        raise SystemExit(f"FUYAO_EVENT_LOOP={choice}: expected auto, uvloop or asyncio")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("FUYAO_EVENT_LOOP=uvloop: uvloop is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_heap(trim_bytes: int = 64 << 20, mmap_bytes: int = 16 << 20) -> bool:
    """Keep freed heap memory for reuse instead of handing it back to the kernel after every request (glibc only;
    whether it was applied). By default glibc serves a request body of a few hundred kB from fresh pages (mmap, or
    the heap top it trims again right after), so every such request costs page faults and a ``brk`` pair: a
    Volcano predicate carries a 200-300 kB NodeInfo, 420 of them per task. Bodies up to ``mmap_bytes`` then come from
    the heap, which keeps up to ``trim_bytes`` free at its top. Left alone when the operator set glibc's own knobs
    (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``)."""
    if any(name in os.environ for name in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, trim_bytes)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes))


async def serve_until_signal(app: web.Application | HttpServer, listen: str, log: logging.Logger, *,
                             ssl_context: ssl.SSLContext | None = None, backlog: int = 1024,
                             shutdown_timeout: float = 1.0, keepalive_timeout: float = 75.0,
                             reuse_port: bool = False,
                             started: Callable[[str, int], None] | None = None,
                             stopping: Callable[[], Awaitable[None] | None] | None = None) -> int:
    """Serve ``app`` on ``listen`` (HOST:PORT; port 0 picks one, ``started`` learns it) until SIGTERM or SIGINT;
    ``stopping`` runs before the server stops accepting and drains (up to ``shutdown_timeout``); an idle client
    connection is closed after ``keepalive_timeout``. ``reuse_port``: several processes may listen on the port
    (SO_REUSEPORT; the kernel spreads new connections over them). Returns the exit code: 0, or 1 when the address
    cannot be bound."""
    host, port = netaddr.listen_parts(listen)
    runner: web.AppRunner | None = None
    sock: socket.socket | None = None
    try:
        # an empty host: every address of every family, on one socket
        sock = netaddr.wildcard_socket(port, reuse_port, backlog) if host == "" else None
        if isinstance(app, HttpServer):
            app.keepalive_timeout = keepalive_timeout
            bound = await app.start(host, port, ssl_context=ssl_context, backlog=backlog, reuse_port=reuse_port,
                                    sock=sock)
        else:
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout,
                                   keepalive_timeout=keepalive_timeout)
            await runner.setup()
            site: web.BaseSite = (
                web.SockSite(runner, sock, ssl_context=ssl_context, backlog=backlog) if sock is not None else
                web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=backlog,
                            reuse_port=reuse_port or None))
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []  # the bound address (port 0 → the kernel's pick)
            bound = sockets[0].getsockname()[:2] if sockets else (host, port)
    except OSError as exc:
        log.error("cannot listen on %s: %s", listen, exc)
        if runner is not None:
            await runner.cleanup()
        if sock is not None:
            sock.close()
        return 1
    if started is not None:
        started(str(bound[0]), int(bound[1]))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    if stopping is not None:
        result = stopping()
        if result is not None:
            await result
    if runner is not None:
        await runner.cleanup()
    else:
        assert isinstance(app, HttpServer)
        await app.stop(shutdown_timeout)
    return 0
