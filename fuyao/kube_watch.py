"""List + watch of one kind of Kubernetes object, an informer in miniature, shared by the components that follow
the API server: :class:`ListWatch` in a thread (the QoS agent's view of its node, the router's and the KV index's
discovery), :class:`AsyncListWatch` on an asyncio loop (the scheduler extender's cache, read by its requests).

List, then watch from the list's resourceVersion; a watch that ends is resumed from the last resourceVersion seen;
``410 Gone`` (or any error) re-lists, with backoff. Raw JSON is read with orjson (no client model
deserialisation: that would dominate at thousands of objects). Each event goes to a :class:`Sink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
import orjson

from .backoff import Backoff
from .kube_client import RestEndpoint

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 300
HEALTHY_WATCH_S = 5.0
"""A watch open this long (or carrying any event) worked: the re-list backoff starts over."""
FAILING_AFTER = 5
"""Failures in a row after which a kind is reported ``failing`` (readiness): what we hold is going stale."""


class Sink(Protocol):
    def replace(self, items: list[dict[str, Any]]) -> None:
        """A full list: these are all the objects now."""

    def upsert(self, obj: dict[str, Any]) -> None: ...

    def delete(self, obj: dict[str, Any]) -> None: ...


class _Follower:
    """What both list + watch flavours share: the sink they feed, the retry policy, readiness reporting."""

    def __init__(self, kind: str, sink: Sink, watch_timeout_s: int, after_list: Callable[[], None] | None,
                 failing: dict[str, str] | None, backoff_s: float):
        self.kind = kind
        self.sink = sink
        self.watch_timeout_s = watch_timeout_s
        self.after_list = after_list
        self.failing = failing if failing is not None else {}
        """kind → the error of a list/watch that keeps failing (readiness); shared by several watches."""
        self.backoff = Backoff(initial=backoff_s, factor=2.0, cap=60 * backoff_s, jitter=0.1)
        """Re-list delays: from ``backoff_s``, doubling up to 60x, 10% jitter (replicas that lost the API server
        together do not re-list together); from the fifth failure in a row the kind is reported ``failing``."""
        self.relists = 0
        self.events = 0  # watch event lines applied (bookmarks too)

    def _listed(self, body: bytes) -> str:
        """A full list's body into the sink; the resourceVersion to watch from."""
        data = orjson.loads(body)
        items = data.get("items") or []
        self.sink.replace(items)
        self.relists += 1
        if self.after_list is not None:
            self.after_list()
        log.info("listed %d %s", len(items), self.kind)
        return str((data.get("metadata") or {}).get("resourceVersion") or "")

    def _recovered(self) -> None:
        self.failing.pop(self.kind, None)
        self.backoff.reset()

    def _watched(self, started: float, events_before: int) -> float | None:
        """After a watch ended without an error: None when it worked (it carried an event, or stayed open
        :data:`HEALTHY_WATCH_S`), which resets the backoff; else the delay before the next try. A list alone never
        resets it: a watch that fails or ends at once after every good list (RBAC without ``watch``, a proxy that
        cuts long requests) backs off and is reported ``failing`` instead of re-listing twice a second."""
        if self.events > events_before or time.monotonic() - started >= HEALTHY_WATCH_S:
            self._recovered()
            return None
        return self._failed(RuntimeError("the watch ended at once, with no event"))

    def _failed(self, exc: Exception) -> float:
        """Log a failed list or watch; the delay before re-listing."""
        delay = self.backoff.next()
        log.warning("%s watch failed (re-listing in %.1fs): %s", self.kind, delay, exc)
        if self.backoff.failures >= FAILING_AFTER:  # several attempts in a row: what we hold is going stale
            self.failing[self.kind] = str(exc)
        return delay

    def _cut(self, found: str | None, exc: Exception) -> str | None:
        """A watch stream broken mid-way (a reset, an idle cut by a load balancer, a read timeout): resumed from the
        last event applied, as client-go does, instead of a full re-list (the partial line is dropped: that event
        comes again from that version)."""
        log.info("%s watch stream cut (%s); resuming from %s", self.kind, exc or type(exc).__name__, found)
        return found

    def _applied(self, lines: list[bytes], version: str | None, stopped: Callable[[], bool]) -> str | None:
        """Watch event lines into the sink; the version to resume from, or None (stopped, or re-list)."""
        for line in lines:
            if stopped():
                return None
            found = apply_event(self.kind, self.sink, line, version)
            self.events += 1
            if found is None:
                return None
            version = found
        return version


class ListWatch(_Follower):
    """Keeps ``sink`` in step with ``call`` (a list function of the official client, e.g. ``CoreV1Api.list_node``,
    called with ``kwargs`` such as a field selector) in a daemon thread."""

    def __init__(self, kind: str, call: Callable[..., Any], sink: Sink, *, kwargs: dict[str, Any] | None = None,
                 watch_timeout_s: int = WATCH_TIMEOUT_S, after_list: Callable[[], None] | None = None,
                 failing: dict[str, str] | None = None):
        super().__init__(kind, sink, watch_timeout_s, after_list, failing, backoff_s=0.5)
        self.call = call
        self.kwargs = kwargs or {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ListWatch:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version: str | None = self._list()
                self.failing.pop(self.kind, None)  # fresh again; the backoff waits for a working watch
                while not self._stop.is_set() and version is not None:
                    started, before = time.monotonic(), self.events
                    version = self._watch(version)
                    if self._stop.is_set():
                        return
                    delay = self._watched(started, before)
                    if delay is not None:
                        self._stop.wait(delay)
            except Exception as exc:
                self._stop.wait(self._failed(exc))

    def _list(self) -> str:
        return self._listed(self.call(_preload_content=False, _request_timeout=60, **self.kwargs).data)

    def _watch(self, version: str) -> str | None:
        """Stream events from ``version``; returns the last version (resume) or None (re-list: 410 Gone)."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.call(watch=True, resource_version=version, allow_watch_bookmarks=True,
                                 timeout_seconds=self.watch_timeout_s, _preload_content=False,
                                 _request_timeout=self.watch_timeout_s + 30, **self.kwargs)
        except ApiException as exc:
            if exc.status == 410:
                log.info("%s watch from %s expired (410 Gone); re-listing", self.kind, version)
                return None
            raise
        from urllib3.exceptions import ProtocolError, ReadTimeoutError

        lines = LineSplitter()
        found: str | None = version
        try:
            for chunk in response.stream(65536, decode_content=True):
                found = self._applied(lines.feed(chunk), found, self._stop.is_set)
                if found is None:
                    return None
            return self._applied(lines.rest(), found, self._stop.is_set)
        except (ProtocolError, ReadTimeoutError, ConnectionError) as exc:
            return self._cut(found, exc)
        finally:
            response.release_conn()


class LineSplitter:
    """Newline-delimited watch events out of arbitrary chunks (an event may span chunks; a chunk may hold many)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += chunk
        end = buffer.rfind(b"\n")
        if end < 0:
            return []
        lines = bytes(buffer[:end]).split(b"\n")
        del buffer[: end + 1]
        return lines

    def rest(self) -> list[bytes]:
        """What is left when the stream ends (a last event without its newline)."""
        rest, self._buffer = bytes(self._buffer), bytearray()
        return [rest] if rest.strip() else []


def apply_event(kind: str, sink: Sink, line: bytes, version: str | None) -> str | None:
    """One watch event line into ``sink``; the resourceVersion to resume from, or None when the watch must re-list
    (410 Gone). Raises on an ERROR event of another kind."""
    if not line.strip():
        return version
    event = orjson.loads(line)
    kind_of, obj = event.get("type"), event.get("object") or {}
    if kind_of == "ERROR":
        if obj.get("code") == 410:
            log.info("%s watch expired (410 Gone); re-listing", kind)
            return None
        raise RuntimeError(f"watch error: {obj.get('message')}")
    found = str((obj.get("metadata") or {}).get("resourceVersion") or version)
    if kind_of in ("ADDED", "MODIFIED"):
        sink.upsert(obj)
    elif kind_of == "DELETED":
        sink.delete(obj)
    return found


class AsyncListWatch(_Follower):
    """The same list + watch on the caller's asyncio event loop (aiohttp), for a daemon whose requests read what
    the watch writes: events are applied between requests on one thread. A watch thread would contend with the
    request thread for the GIL and the cache lock, and read the stream through urllib3's pure-Python chunk parser
    (the extender spent as much CPU there as in its filter). A full list is parsed and applied in a worker thread
    (tens of MB at 5,000 nodes: the loop keeps answering meanwhile)."""

    EVENTS_PER_TURN = 64  # events applied before letting requests in (a burst after a rollout)

    def __init__(self, kind: str, path: str, sink: Sink, endpoint: RestEndpoint, *,
                 params: dict[str, str] | None = None, watch_timeout_s: int = WATCH_TIMEOUT_S,
                 after_list: Callable[[], None] | None = None, failing: dict[str, str] | None = None,
                 backoff_s: float = 0.5):
        super().__init__(kind, sink, watch_timeout_s, after_list, failing, backoff_s)
        self.path = path
        self.endpoint = endpoint
        self.params = params or {}

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """List and watch until ``stop``; failures re-list with backoff (never raises)."""
        while not stop.is_set():
            try:
                version: str | None = await self._list(session)
                self.failing.pop(self.kind, None)  # fresh again; the backoff waits for a working watch
                while not stop.is_set() and version is not None:
                    started, before = time.monotonic(), self.events
                    version = await self._watch(session, version, stop)
                    if stop.is_set():
                        return
                    delay = self._watched(started, before)
                    if delay is not None:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._failed(exc))

    async def _get(self, session: aiohttp.ClientSession, params: dict[str, str],
                   timeout: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        return await session.get(self.endpoint.base_url + self.path, params={**self.params, **params},
                                 headers={"Accept": "application/json", **self.endpoint.headers()},
                                 ssl=self.endpoint.ssl_context if self.endpoint.ssl_context is not None else True,
                                 server_hostname=self.endpoint.server_hostname, timeout=timeout)

    async def _list(self, session: aiohttp.ClientSession) -> str:
        # no deadline on the whole download (tens of MB from a loaded API server): on connecting and on each read
        async with await self._get(session, {}, aiohttp.ClientTimeout(total=None, sock_connect=30,
                                                                      sock_read=60)) as response:
            if response.status != 200:
                raise RuntimeError(f"list {self.path}: HTTP {response.status}: {(await response.text())[:300]}")
            body = await response.read()
        return await asyncio.to_thread(self._listed, body)

    async def _watch(self, session: aiohttp.ClientSession, version: str, stop: asyncio.Event) -> str | None:
        """Stream events from ``version``; returns the last version (resume) or None (re-list: 410 Gone)."""
        params = {"watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(self.watch_timeout_s)}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.watch_timeout_s + 30)
        async with await self._get(session, params, timeout) as response:
            if response.status == 410:
                log.info("%s watch from %s expired (410 Gone); re-listing", self.kind, version)
                return None
            if response.status != 200:
                raise RuntimeError(f"watch {self.path}: HTTP {response.status}: {(await response.text())[:300]}")
            lines = LineSplitter()
            found: str | None = version
            try:
                async for chunk in response.content.iter_any():
                    batch = lines.feed(chunk)
                    for at in range(0, len(batch), self.EVENTS_PER_TURN):
                        if at:
                            await asyncio.sleep(0)
                        found = self._applied(batch[at:at + self.EVENTS_PER_TURN], found, stop.is_set)
                        if found is None:
                            return None
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                return self._cut(found, exc)
            return self._applied(lines.rest(), found, stop.is_set)
