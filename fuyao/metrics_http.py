"""``/metrics`` over HTTP for a daemon's own Prometheus registry (each daemon owns one, so tests can run several in a
process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from .netaddr import bind_listen, listen_parts


class MetricsEndpoint:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._server: Any = None

    def serve(self, address: str) -> tuple[str, int]:
        """Serve /metrics on ``HOST:PORT`` (port 0 picks a free one); returns the bound address. OSError when the
        address cannot be bound."""
        host, port = listen_parts(address)
        server, _thread = bind_listen(host, lambda at: start_http_server(port, addr=at, registry=self.registry))
        self._server = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
