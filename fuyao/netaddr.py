"""Host and port into an address: an IPv6 literal goes in brackets (``[fd00::1]:8000``), as URLs (RFC 3986) and
ZeroMQ's ``tcp://`` endpoints want it. One spelling everywhere, so the name an engine is known by is the same string
in the router, the KV index and Ray Serve whatever the pod network's address family."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def host_port(host: str, port: int | str) -> str:
    """``host:port``, with an IPv6 literal in brackets (already bracketed hosts are kept as they are)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def listen_parts(address: str) -> tuple[str, int]:
    """A listen address ``HOST:PORT`` as (host, port), an IPv6 literal's brackets dropped. An empty host
    (``:9000``) is "": every address of every family the host has, which an IPv6 single-stack pod network needs
    (``0.0.0.0`` is IPv4 only); see :data:`WILDCARDS`."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


WILDCARDS = ("::", "0.0.0.0")
"""What an empty listen host binds, tried in order by a server on one socket: ``::`` takes IPv4 too (a dual-stack
socket, Linux's default), and a host with IPv6 turned off refuses it, where ``0.0.0.0`` still works."""


def wildcard_socket(port: int, reuse_port: bool = False, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on every address of every family (:data:`WILDCARDS`, in order, by
    :func:`bind_listen`): one socket, so port 0 gives one port for both. Raises :class:`OSError` when none binds."""

    def bind(host: str) -> socket.socket:
        sock = socket.socket(family(host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
            return sock
        except OSError:
            sock.close()
            raise

    return bind_listen("", bind)


FAMILY_UNAVAILABLE = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT})
"""The errors that say an address family is not there (IPv6 turned off): only then is the next wildcard tried."""


def bind_listen(host: str, bind: Callable[[str], T]) -> T:
    """``bind(host)``, for a server that binds its own socket; an empty host (every address) tries
    :data:`WILDCARDS` in order, the next only when the family is not there."""
    hosts = WILDCARDS if host == "" else (host,)
    for attempt in hosts[:-1]:
        try:
            return bind(attempt)
        except OSError as exc:
            if exc.errno not in FAMILY_UNAVAILABLE:
                raise  # e.g. the port is taken: never IPv4 alone instead (unreachable on IPv6 single-stack)
    return bind(hosts[-1])


def family(host: str) -> socket.AddressFamily:
    """The address family of a host literal (a name: IPv4's, as socketserver assumes)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def url(scheme: str, host: str, port: int | str) -> str:
    """``scheme://host:port`` (``http``, ``https``, ``tcp``), with an IPv6 literal in brackets."""
    return f"{scheme}://{host_port(host, port)}"


ZMQ_ENDPOINT = r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}|(ipc|inproc)://\S+)$"
"""A ZeroMQ endpoint a subscriber can connect to (a pattern for config fields): ``tcp://`` needs a host, an IPv6
literal in brackets, and a port (ZeroMQ refuses less when it connects)."""
