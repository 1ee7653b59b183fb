"""The one way fuyao's daemons reach the API server: a kubeconfig when given, else the in-cluster service account
when running in a pod, else no cluster at all (every daemon has a mode that works without one)."""

from __future__ import annotations

import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def connect(kubeconfig: str | None) -> Any | None:
    """A ``CoreV1Api`` from ``kubeconfig``, else from the in-cluster service account, else None (no cluster).
    The ``kubernetes`` package is imported only here, when a cluster is configured (it is slow to import)."""
    if not kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    from kubernetes import client, config

    if kubeconfig:
        api_client = config.new_client_from_config(config_file=kubeconfig)
        token_file = _token_file(kubeconfig)
        if token_file:
            _reread_token_file(api_client.configuration, token_file)
        return client.CoreV1Api(api_client)
    config.load_incluster_config()
    return client.CoreV1Api(client.ApiClient())


TOKEN_FILE_REREAD_S = 60.0
"""How often a kubeconfig's ``tokenFile`` is read again (client-go's cached file token source: every minute), so a
rotated token (a projected service-account token, a credential refresher's output) is picked up without a restart.
The ``kubernetes`` package reads it once."""


def _token_file(kubeconfig: str) -> str | None:
    """The ``tokenFile`` of the kubeconfig's current context's user (relative paths: from the kubeconfig's
    directory), or None."""
    import yaml

    try:
        with open(kubeconfig, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        context = next(c.get("context") or {} for c in doc.get("contexts") or []
                       if c.get("name") == doc.get("current-context"))
        user = next(u.get("user") or {} for u in doc.get("users") or [] if u.get("name") == context.get("user"))
    except (OSError, yaml.YAMLError, StopIteration, AttributeError, TypeError):
        return None  # the kubernetes package has already refused or accepted this file; nothing more to add
    path = user.get("tokenFile") if isinstance(user, dict) else None
    if not isinstance(path, str) or not path:
        return None
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(kubeconfig)), path)


def _reread_token_file(configuration: Any, path: str) -> None:
    """Make ``configuration`` read its bearer token from ``path`` again every :data:`TOKEN_FILE_REREAD_S` (its
    ``refresh_api_key_hook``, which the client calls before every request's auth settings). A read that fails keeps
    the last token (client-go does the same) and says so once per period. The first call reads it too: the
    ``kubernetes`` package keeps the file's trailing newline in the header (a header value no HTTP client sends)."""
    read_at = [float("-inf")]

    def refresh(conf: Any) -> None:
        now = time.monotonic()
        if now - read_at[0] < TOKEN_FILE_REREAD_S:
            return
        read_at[0] = now
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            log.warning("kubeconfig tokenFile %s cannot be read again (%s): keeping the last token", path,
                        exc.strerror or exc)
            return
        if token:  # trimmed, as client-go does
            conf.api_key["BearerToken"] = f"Bearer {token}"

    configuration.refresh_api_key_hook = refresh


@dataclass(frozen=True)
class RestEndpoint:
    """What an asyncio HTTP client needs to call the same API server as a ``CoreV1Api``: base URL, TLS context and
    auth headers. For hot paths (the extender's bind) where the generated client's per-call overhead and its
    thread pool cost more than the request itself."""

    base_url: str
    ssl_context: ssl.SSLContext | None
    configuration: Any
    server_hostname: str | None = None
    """The name the API server's certificate is checked against when it is not the URL's host (the kubeconfig's
    ``tls-server-name``: an API server reached by IP or through a tunnel); also sent as SNI."""
    _kept: list[Any] = field(default_factory=lambda: [0.0, {}], compare=False, repr=False)
    """When the auth headers were read, and them."""

    def headers(self, max_age_s: float = 0.0) -> dict[str, str]:
        """Auth headers for the next request: read again for every call by default (a bearer token file or an exec
        plugin rotates); a hot path (the extender's binds, where reading the kubeconfig cost more than the request)
        passes ``max_age_s`` to reuse what was read that recently (client-go re-reads a token file every minute)."""
        now = time.monotonic()
        read_at, kept = self._kept
        if kept and max_age_s > 0 and now - read_at < max_age_s:
            return dict(kept)
        headers = {}
        for setting in self.configuration.auth_settings().values():
            if setting.get("in") == "header" and setting.get("value"):
                headers[setting["key"]] = str(setting["value"]).strip()  # a token file's newline is not the token
        self._kept[:] = [now, headers]
        return dict(headers)


HEADERS_KEPT_S = 10.0
"""How long a hot path reuses the auth headers it read (:meth:`RestEndpoint.headers`)."""


def rest_endpoint(api: Any) -> RestEndpoint:
    """The :class:`RestEndpoint` of a ``CoreV1Api`` made by :func:`connect`."""
    conf = api.api_client.configuration
    context = None
    if conf.host.startswith("https:"):
        context = ssl.create_default_context(cafile=conf.ssl_ca_cert or None, cadata=conf.ca_cert_data or None)
        if not conf.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif conf.assert_hostname is False:
            context.check_hostname = False
        if conf.cert_file:
            context.load_cert_chain(conf.cert_file, conf.key_file or None)
    return RestEndpoint(base_url=conf.host.rstrip("/"), ssl_context=context, configuration=conf,
                        server_hostname=(getattr(conf, "tls_server_name", None) or None) if context else None)


class LazySession:
    """An ``aiohttp.ClientSession`` made on first use (inside the running event loop) and made again if it was
    closed: one per client of fuyao's asyncio daemons (the binder, leader election, forwarded binds)."""

    def __init__(self, ssl_context: ssl.SSLContext | None, limit: int, timeout_s: float,
                 connect_timeout_s: float | None = None):
        self.ssl_context, self.limit = ssl_context, limit
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self._session: Any = None

    def __call__(self) -> Any:
        """The session (an ``aiohttp.ClientSession``)."""
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl_context or False, limit=self.limit),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
