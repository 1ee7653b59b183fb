"""Host and port into an address: an IPv6 literal goes in brackets (``[fd00::1]:8000``), as URLs (RFC 3986) and
ZeroMQ's ``tcp://`` endpoints want it. One spelling everywhere, so the name an engine is known by is the same string
in the router, the KV index and Ray Serve whatever the pod network's address family."""

from __future__ import annotations


def host_port(host: str, port: int | str) -> str:
    """``host:port``, with an IPv6 literal in brackets (already bracketed hosts are kept as they are)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def url(scheme: str, host: str, port: int | str) -> str:
    """``scheme://host:port`` (``http``, ``https``, ``tcp``), with an IPv6 literal in brackets."""
    return f"{scheme}://{host_port(host, port)}"


ZMQ_ENDPOINT = r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}|(ipc|inproc)://\S+)$"
"""A ZeroMQ endpoint a subscriber can connect to (a pattern for config fields): ``tcp://`` needs a host, an IPv6
literal in brackets, and a port (ZeroMQ refuses less when it connects)."""
