"""Cluster state from watches of Nodes and Pods, kept as parsed :class:`NodeInfo` / :class:`PodInfo`.

An informer in miniature: list, then watch from the list's resourceVersion; a watch that ends is resumed from the
last resourceVersion seen; ``410 Gone`` (or any error) re-lists. Raw JSON is read with orjson (no client model
deserialisation: that would dominate at thousands of pods). Pods the binder just bound are *assumed* on their node
until the watch shows them, so two binds in a row never hand out the same devices.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from fuyao.contracts import LABEL_PD_TOPOLOGY_DEFAULT

from .features import NodeTable, PdIndex
from .model import NodeInfo, PodInfo, parse_node, parse_pod

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 300
ASSUME_TTL_S = 60.0


class ClusterCache:
    """Nodes and pods as the watches report them, kept three ways: the raw node objects, a parsed
    :class:`NodeInfo` per node (with its pods: what the binder reads) and a :class:`NodeTable` row per node (what
    the plugins read). Every change recomputes the rows of the nodes it touches, in the watch's thread, so
    requests only gather rows. ``lock`` guards all of it; a request holds it while it reads the table."""

    def __init__(self, domain_key: str = LABEL_PD_TOPOLOGY_DEFAULT) -> None:
        self.lock = threading.RLock()
        self._nodes: dict[str, NodeInfo] = {}  # name → parsed node without pods
        self._pods: dict[str, PodInfo] = {}  # uid → pod
        self._by_node: dict[str, set[str]] = {}
        self._assumed: dict[str, tuple[PodInfo, float]] = {}
        self._infos: dict[str, NodeInfo] = {}  # name → node with its pods
        self.table = NodeTable(domain_key)
        self.pd = PdIndex()
        self.synced = {"nodes": False, "pods": False}
        self.failing: dict[str, str] = {}  # kind → the error of a list/watch that keeps failing (readiness)
        self.relists = {"nodes": 0, "pods": 0}
        self.generation = 0  # grows on every change

    # Updates (from the watch) ------------------------------------------------------------------------------------
    def replace_nodes(self, items: Iterable[dict[str, Any]]) -> None:
        parsed = [parse_node(n) for n in items]
        with self.lock:
            self.generation += 1
            gone = set(self._nodes) - {n.name for n in parsed}
            self._nodes = {n.name: n for n in parsed}
            for name in gone:
                self._forget_node(name)
            self.synced["nodes"] = True
            for name in self._nodes:
                self._touch(name)

    def upsert_node(self, obj: dict[str, Any]) -> None:
        info = parse_node(obj)
        with self.lock:
            self.generation += 1
            self._nodes[info.name] = info
            self._touch(info.name)

    def delete_node(self, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        with self.lock:
            self.generation += 1
            self._nodes.pop(name, None)
            self._forget_node(name)

    def replace_pods(self, items: Iterable[dict[str, Any]]) -> None:
        parsed = [parse_pod(item) for item in items]
        with self.lock:
            self.generation += 1
            self._pods.clear()
            self._by_node.clear()
            self.pd.clear()
            for pod in parsed:
                self._put_pod(pod)
            for pod, _at in self._assumed.values():
                self.pd.add(pod)
            self.synced["pods"] = True
            for name in self._nodes:
                self._touch(name)

    def upsert_pod(self, obj: dict[str, Any]) -> None:
        pod = parse_pod(obj)
        with self.lock:
            self.generation += 1
            touched = set()
            old = self._pods.get(pod.uid)
            if old is not None:
                self._drop_pod(old)
                touched.add(old.node_name)
            self._put_pod(pod)
            touched.add(pod.node_name)
            if pod.node_name:
                assumed = self._assumed.pop(pod.uid, None)
                if assumed is not None:
                    self.pd.remove(assumed[0])
                    touched.add(assumed[0].node_name)
            for name in touched:
                if name:
                    self._touch(name)

    def delete_pod(self, obj: dict[str, Any]) -> None:
        uid = (obj.get("metadata") or {}).get("uid", "")
        with self.lock:
            self.generation += 1
            old = self._pods.pop(uid, None)
            if old is not None:
                self._drop_pod(old)
                if old.node_name:
                    self._touch(old.node_name)
            assumed = self._assumed.pop(uid, None)
            if assumed is not None:
                self.pd.remove(assumed[0])
                if assumed[0].node_name:
                    self._touch(assumed[0].node_name)

    def _put_pod(self, pod: PodInfo) -> None:
        self._pods[pod.uid] = pod
        if pod.node_name:
            self._by_node.setdefault(pod.node_name, set()).add(pod.uid)
            self.pd.add(pod)

    def _drop_pod(self, pod: PodInfo) -> None:
        if pod.node_name:
            self._by_node.get(pod.node_name, set()).discard(pod.uid)
            self.pd.remove(pod)

    def _touch(self, name: str) -> None:
        """Recompute what the cache derives from a node and its pods (under the lock)."""
        base = self._nodes.get(name)
        if base is None:
            self._infos.pop(name, None)
            return
        info = dataclasses.replace(base, pods=self._pods_on(name), memo={}).refresh()
        self._infos[name] = info
        if self.synced["pods"]:  # before the first pod list, rows would be computed twice at start
            self.table.put(info)

    def _forget_node(self, name: str) -> None:
        self._infos.pop(name, None)
        self.table.remove(name)

    def assume(self, pod: PodInfo) -> None:
        """A pod we just bound (with its assignment): count it on its node until the watch reports it."""
        with self.lock:
            known = self._pods.get(pod.uid)
            if known is not None and known.node_name:
                return  # the watch was faster than our bookkeeping
            self.generation += 1
            previous = self._assumed.pop(pod.uid, None)
            self._assumed[pod.uid] = (pod, time.monotonic())
            self.pd.add(pod)
            if previous is not None:
                self.pd.remove(previous[0])
                if previous[0].node_name and previous[0].node_name != pod.node_name:
                    self._touch(previous[0].node_name)
            if pod.node_name:
                self._touch(pod.node_name)

    def expire_assumed(self) -> None:
        """Forget assumed pods the watch never reported (their bind was lost)."""
        if not self._assumed:
            return
        now = time.monotonic()
        with self.lock:
            for uid, (pod, at) in list(self._assumed.items()):
                if now - at > ASSUME_TTL_S:
                    del self._assumed[uid]
                    self.generation += 1
                    self.pd.remove(pod)
                    if pod.node_name:
                        self._touch(pod.node_name)

    def settle(self) -> None:
        """After a full list: move the (long-lived) cached objects out of the garbage collector's generations, so
        its full collections stop scanning them on the request path (pauses of 100+ ms at 5,000 nodes)."""
        gc.collect()
        gc.freeze()

    # Reads -------------------------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return all(self.synced.values())

    def node_names(self) -> list[str]:
        with self.lock:
            return list(self._nodes)

    def pod(self, namespace: str, name: str) -> PodInfo | None:
        with self.lock:
            return next((p for p in self._pods.values() if p.namespace == namespace and p.name == name), None)

    def _pods_on(self, node: str) -> list[PodInfo]:
        pods = [self._pods[u] for u in self._by_node.get(node, ()) if u in self._pods]
        seen = {p.uid for p in pods}
        pods.extend(pod for uid, (pod, _at) in self._assumed.items() if pod.node_name == node and uid not in seen)
        return pods

    def pods_on(self, node: str) -> list[PodInfo]:
        with self.lock:
            return self._pods_on(node)

    def node_info(self, name: str, obj: Mapping[str, Any] | None = None) -> NodeInfo | None:
        """The node as the cache knows it, or parsed from ``obj`` (the scheduler sent the full Node) with the
        cached pods on it."""
        if obj is not None:
            return parse_node(obj, self.pods_on(name))
        with self.lock:
            return self._infos.get(name)

    def names_if_current(self, raws: list[dict[str, Any]]) -> list[str] | None:
        """The names of these full Node objects if the cache holds exactly these versions of them (so its table
        rows describe them), else None."""
        names = []
        with self.lock:
            for raw in raws:
                meta = raw["metadata"]
                known = self._nodes.get(meta["name"])
                if known is None or not known.resource_version or known.resource_version != meta.get(
                        "resourceVersion"):
                    return None
                names.append(meta["name"])
        return names

    def all_nodes(self) -> dict[str, NodeInfo]:
        with self.lock:
            return dict(self._infos)


class Watcher:
    """Feeds a :class:`ClusterCache` from the API server (list + watch with re-list), one thread per kind."""

    def __init__(self, api: Any, cache: ClusterCache, watch_timeout_s: int = WATCH_TIMEOUT_S):
        self.api = api
        self.cache = cache
        self.watch_timeout_s = watch_timeout_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for kind in ("nodes", "pods"):
            t = threading.Thread(target=self._run, args=(kind,), name=f"watch-{kind}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()

    def _calls(self, kind: str) -> Callable[..., Any]:
        return self.api.list_node if kind == "nodes" else self.api.list_pod_for_all_namespaces

    def _run(self, kind: str) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                version = self._list(kind)
                self.cache.failing.pop(kind, None)
                backoff = 0.5
                while not self._stop.is_set() and version is not None:
                    version = self._watch(kind, version)
            except Exception as exc:
                log.warning("%s watch failed (re-listing in %.1fs): %s", kind, backoff, exc)
                if backoff >= 8.0:  # several attempts in a row: the cache is going stale
                    self.cache.failing[kind] = str(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _list(self, kind: str) -> str:
        response = self._calls(kind)(_preload_content=False, _request_timeout=60)
        data = orjson.loads(response.data)
        items = data.get("items") or []
        (self.cache.replace_nodes if kind == "nodes" else self.cache.replace_pods)(items)
        self.cache.relists[kind] += 1
        self.cache.settle()
        log.info("listed %d %s", len(items), kind)
        return str((data.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, kind: str, version: str) -> str | None:
        """Stream events from ``version``; returns the last version (resume) or None (re-list: 410 Gone)."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = self._calls(kind)(watch=True, resource_version=version, allow_watch_bookmarks=True,
                                         timeout_seconds=self.watch_timeout_s, _preload_content=False,
                                         _request_timeout=self.watch_timeout_s + 30)
        except ApiException as exc:
            if exc.status == 410:
                log.info("%s watch from %s expired (410 Gone); re-listing", kind, version)
                return None
            raise
        upsert = self.cache.upsert_node if kind == "nodes" else self.cache.upsert_pod
        delete = self.cache.delete_node if kind == "nodes" else self.cache.delete_pod
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
                        log.info("%s watch expired (410 Gone); re-listing", kind)
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind_of in ("ADDED", "MODIFIED"):
                    upsert(obj)
                elif kind_of == "DELETED":
                    delete(obj)
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
