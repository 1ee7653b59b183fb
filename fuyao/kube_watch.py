"""List + watch of one kind of Kubernetes object, an informer in miniature, shared by the components that follow
the API server (the scheduler extender's cache, the QoS agent's view of its node).

List, then watch from the list's resourceVersion; a watch that ends is resumed from the last resourceVersion seen;
``410 Gone`` (or any error) re-lists, with backoff. Raw JSON is read with orjson (no client model
deserialisation: that would dominate at thousands of objects). Each event goes to a :class:`Sink`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 300


class Sink(Protocol):
    def replace(self, items: list[dict[str, Any]]) -> None:
        """A full list: these are all the objects now."""

    def upsert(self, obj: dict[str, Any]) -> None: ...

    def delete(self, obj: dict[str, Any]) -> None: ...


class ListWatch:
    """Keeps ``sink`` in step with ``call`` (a list function of the official client, e.g. ``CoreV1Api.list_node``,
    called with ``kwargs`` such as a field selector) in a daemon thread."""

    def __init__(self, kind: str, call: Callable[..., Any], sink: Sink, *, kwargs: dict[str, Any] | None = None,
                 watch_timeout_s: int = WATCH_TIMEOUT_S, after_list: Callable[[], None] | None = None,
                 failing: dict[str, str] | None = None):
        self.kind = kind
        self.call = call
        self.sink = sink
        self.kwargs = kwargs or {}
        self.watch_timeout_s = watch_timeout_s
        self.after_list = after_list
        self.failing = failing if failing is not None else {}
        """kind → the error of a list/watch that keeps failing (readiness); shared by several watches."""
        self.relists = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ListWatch:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                version = self._list()
                self.failing.pop(self.kind, None)
                backoff = 0.5
                while not self._stop.is_set() and version is not None:
                    version = self._watch(version)
            except Exception as exc:
                log.warning("%s watch failed (re-listing in %.1fs): %s", self.kind, backoff, exc)
                if backoff >= 8.0:  # several attempts in a row: what we hold is going stale
                    self.failing[self.kind] = str(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _list(self) -> str:
        response = self.call(_preload_content=False, _request_timeout=60, **self.kwargs)
        data = orjson.loads(response.data)
        items = data.get("items") or []
        self.sink.replace(items)
        self.relists += 1
        if self.after_list is not None:
            self.after_list()
        log.info("listed %d %s", len(items), self.kind)
        return str((data.get("metadata") or {}).get("resourceVersion") or "")

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
        try:
            for line in _lines(response):
                if self._stop.is_set():
                    return None
                if not line.strip():
                    continue
                event = orjson.loads(line)
                kind_of, obj = event.get("type"), event.get("object") or {}
                if kind_of == "ERROR":
                    if obj.get("code") == 410:
                        log.info("%s watch expired (410 Gone); re-listing", self.kind)
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind_of in ("ADDED", "MODIFIED"):
                    self.sink.upsert(obj)
                elif kind_of == "DELETED":
                    self.sink.delete(obj)
        finally:
            response.release_conn()
        return version


def _lines(response: Any) -> Iterable[bytes]:
    buffer = b""
    for chunk in response.stream(65536, decode_content=True):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line
    if buffer:
        yield buffer
