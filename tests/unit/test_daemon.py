"""fuyao.daemon's process tuning: with ``keep_freed_heap`` a daemon stops paying fresh pages for every large request
body (glibc), and leaves an operator's own glibc settings alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, sys
from fuyao import daemon
applied = daemon.keep_freed_heap() if sys.argv[1] == "tuned" else None

def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])  # minflt

def rounds(count):  # 16 bodies of 150-300 kB in flight, then answered and dropped: Volcano's 16 predicates at a time
    for r in range(count):
        bodies = [b"x" * ((150 + (r * 16 + i) * 37 % 150) * 1024) for i in range(16)]
        del bodies

rounds(5)  # the allocator settles
before = faults()
rounds(20)
print(applied, faults() - before)
"""


def probe(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))},
                              **(env or {})}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat") or sys.platform != "linux", reason="Linux /proc")
def test_large_bodies_reuse_freed_heap_instead_of_fresh_pages() -> None:
    _, default_faults = probe("default")
    applied, tuned_faults = probe("tuned")
    if applied != "True":
        pytest.skip("not glibc: mallopt is not there")
    # 320 bodies of 37-75 pages each: glibc's defaults take fresh pages for most of them; tuned, almost none
    assert default_faults > 5000, default_faults
    assert tuned_faults < 500, tuned_faults


def test_an_operators_glibc_settings_win() -> None:
    applied, _faults = probe("tuned", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"})
    assert applied == "False"


def _answers(host: str, port: int, path: str = "/metrics") -> bool:
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status in (200, 404)
    finally:
        conn.close()


def _ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_an_empty_listen_host_takes_both_address_families() -> None:
    # the charts listen on ":PORT": 0.0.0.0 was IPv4 only, unreachable in an IPv6 single-stack cluster
    import asyncio

    from prometheus_client import CollectorRegistry

    from fuyao.http_server import HttpServer
    from fuyao.metrics_http import MetricsEndpoint
    from fuyao.netaddr import listen_parts

    assert listen_parts(":9400") == ("", 9400) and listen_parts("[fd00::1]:80") == ("fd00::1", 80)
    endpoint = MetricsEndpoint(CollectorRegistry())
    _host, port = endpoint.serve(":0")
    try:
        assert _answers("127.0.0.1", port) and _answers("::1", port)
    finally:
        endpoint.shutdown()

    async def served() -> None:
        app = HttpServer()
        _bound, port = await app.start("", 0)
        loop = asyncio.get_running_loop()
        try:
            for host in ("127.0.0.1", "::1"):
                assert await loop.run_in_executor(None, _answers, host, port, "/")
        finally:
            await app.stop(1)

    asyncio.run(served())


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_a_taken_port_is_an_error_not_a_fall_back_to_ipv4_alone() -> None:
    # any error fell back to 0.0.0.0: with [::]:P taken, the daemon listened on IPv4 alone, silently (unreachable in
    # an IPv6 single-stack cluster); only an address family that is not there falls back
    import errno
    import socket

    from fuyao.netaddr import wildcard_socket

    with socket.socket(socket.AF_INET6) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        taken.bind(("::", 0))
        taken.listen()
        with pytest.raises(OSError) as raised:
            wildcard_socket(taken.getsockname()[1]).close()
        assert raised.value.errno == errno.EADDRINUSE
