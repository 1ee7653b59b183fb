"""Cluster state from watches of Nodes and Pods (``fuyao.kube_watch``: list, watch, re-list on 410), kept as
parsed :class:`NodeInfo` / :class:`PodInfo` and as rows of the node table. Pods the binder just bound are *assumed*
on their node until the watch shows them, so two binds in a row never hand out the same devices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import aiohttp

from fuyao.contracts import LABEL_PD_TOPOLOGY_DEFAULT
from fuyao.kube_client import RestEndpoint
from fuyao.kube_watch import WATCH_TIMEOUT_S, AsyncListWatch

from .features import NodeTable, PdIndex
from .model import NodeInfo, PodInfo, parse_node, parse_pod
from .partial import ProtocolError

log = logging.getLogger(__name__)
T = TypeVar("T")

ASSUME_TTL_S = 60.0
REQUESTED_KEPT = 8192
"""Pending pods kept as the scheduler's requests carried them (see :meth:`ClusterCache.remember`)."""


class ClusterCache:
    """Nodes and pods as the watches report them, kept three ways: the raw node objects, a parsed
    :class:`NodeInfo` per node (with its pods: what the binder reads) and a :class:`NodeTable` row per node (what
    the plugins read). Every change recomputes the rows of the nodes it touches as the watch applies it, so
    requests only gather rows. ``lock`` guards all of it (events arrive on the event loop, full lists in a worker
    thread); a request holds it while it reads the table."""

    def __init__(self, domain_key: str = LABEL_PD_TOPOLOGY_DEFAULT) -> None:
        self.lock = threading.RLock()
        self._nodes: dict[str, NodeInfo] = {}  # name → parsed node without pods
        self._pods: dict[str, PodInfo] = {}  # uid → pod
        self._by_node: dict[str, set[str]] = {}
        self._assumed: dict[str, tuple[PodInfo, float]] = {}  # uid → (pod as bound, when)
        self._requested: OrderedDict[str, PodInfo] = OrderedDict()  # pending pods as the scheduler sent them
        self._assumed_on: dict[str | None, set[str]] = {}  # node → uids assumed there (events touch one node each)
        self._infos: dict[str, NodeInfo] = {}  # name → node with its pods
        self.table = NodeTable(domain_key, long_lived=True)
        self.pd = PdIndex()
        self.synced = {"nodes": False, "pods": False}
        self.failing: dict[str, str] = {}  # kind → the error of a list/watch that keeps failing (readiness)
        self.relists = {"nodes": 0, "pods": 0}

    # Updates (from the watch) ------------------------------------------------------------------------------------
    def replace_nodes(self, items: Iterable[dict[str, Any]]) -> None:
        parsed = _each(parse_node, items, "node")
        with self.lock:
            gone = set(self._nodes) - {n.name for n in parsed}
            self._nodes = {n.name: n for n in parsed}
            for name in gone:
                self._forget_node(name)
            self.synced["nodes"] = True
            for name in self._nodes:
                self._touch(name)

    def upsert_node(self, obj: dict[str, Any]) -> None:
        info = _parsed(parse_node, obj, "node")  # a bad object is logged and left out, not a re-list
        if info is None:
            return
        with self.lock:
            self._nodes[info.name] = info
            self._touch(info.name)

    def delete_node(self, obj: dict[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        with self.lock:
            self._nodes.pop(name, None)
            self._forget_node(name)

    def replace_pods(self, items: Iterable[dict[str, Any]]) -> None:
        parsed = _each(parse_pod, items, "pod")
        with self.lock:
            # an assumed pod the list shows bound is counted from the list from now on (as upsert_pod does): keeping
            # the assumption would count it twice in the prefill/decode index until it expired
            for pod in parsed:
                if pod.node_name and pod.uid in self._assumed:
                    self._unassume(pod.uid)
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
        pod = _parsed(parse_pod, obj, "pod")  # a bad object is logged and left out, not a re-list
        if pod is None:
            return
        with self.lock:
            touched = set()
            old = self._pods.get(pod.uid)
            if old is not None and _same_accounting(old, pod):  # node_name is one of the accounted fields
                self._pods[pod.uid] = pod  # a status update (Running, conditions, IPs): the node's rows stay
                info = self._infos.get(pod.node_name or "")
                if info is not None:
                    info.pods[:] = [pod if p.uid == pod.uid else p for p in info.pods]
                return
            assumed = self._assumed.get(pod.uid)
            if pod.node_name and (old is None or not old.node_name) and assumed is not None \
                    and _same_accounting(assumed[0], pod):
                # our own bind, reported by the watch as we assumed it: the node's row already counts it
                self._unassume(pod.uid)
                self._put_pod(pod)
                info = self._infos.get(pod.node_name)
                if info is not None:
                    info.pods[:] = [pod if p.uid == pod.uid else p for p in info.pods]
                return
            if old is not None:
                self._drop_pod(old)
                touched.add(old.node_name)
            self._put_pod(pod)
            touched.add(pod.node_name)
            if pod.node_name:
                was = self._unassume(pod.uid)
                if was is not None:
                    touched.add(was.node_name)
            for name in touched:
                if name:
                    self._touch(name)

    def delete_pod(self, obj: dict[str, Any]) -> None:
        uid = (obj.get("metadata") or {}).get("uid", "")
        with self.lock:
            old = self._pods.pop(uid, None)
            if old is not None:
                self._drop_pod(old)
                if old.node_name:
                    self._touch(old.node_name)
            self._forget(uid)

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
            previous = self._unassume(pod.uid)
            self._assumed[pod.uid] = (pod, time.monotonic())
            self._assumed_on.setdefault(pod.node_name, set()).add(pod.uid)
            self.pd.add(pod)
            if previous is not None and previous.node_name and previous.node_name != pod.node_name:
                self._touch(previous.node_name)
            if pod.node_name:
                self._touch(pod.node_name)

    def forget_assumed(self, uid: str, only: PodInfo | None = None) -> None:
        """A bind we assumed did not happen: give its devices back. ``only``: if the pod is still assumed as that
        (the very object given to :meth:`assume`), not as another attempt's later assumption."""
        with self.lock:
            entry = self._assumed.get(uid)
            if entry is not None and (only is None or entry[0] is only):
                self._forget(uid)

    def _forget(self, uid: str) -> None:
        """Stop counting an assumed pod and recompute its node (under the lock)."""
        pod = self._unassume(uid)
        if pod is not None and pod.node_name:
            self._touch(pod.node_name)

    def _unassume(self, uid: str) -> PodInfo | None:
        """Stop counting an assumed pod (under the lock); the pod, or None if it was not assumed."""
        entry = self._assumed.pop(uid, None)
        if entry is None:
            return None
        pod = entry[0]
        on = self._assumed_on.get(pod.node_name)
        if on is not None:
            on.discard(uid)
            if not on:
                del self._assumed_on[pod.node_name]
        self.pd.remove(pod)
        return pod

    def expire_assumed(self) -> None:
        """Forget assumed pods the watch never reported (their bind was lost). ``_assumed`` is in the order of
        assumption (a re-assumed pod moves to the end), so only the expired head is visited. Not while the pod
        watch is failing: then its silence says nothing, and a bound pod forgotten would free its devices twice."""
        if not self._assumed or "pods" in self.failing:
            return
        cutoff = time.monotonic() - ASSUME_TTL_S
        with self.lock:
            expired = []
            for uid, (_pod, at) in self._assumed.items():
                if at > cutoff:
                    break
                expired.append(uid)
            for uid in expired:
                self._forget(uid)

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

    def pod_by_uid(self, uid: str) -> PodInfo | None:
        """The pod as the watch last reported it, else as the scheduler last sent it (a pending pod: the watch
        carries bound pods only)."""
        with self.lock:
            return self._pods.get(uid) or self._requested.get(uid)

    def remember(self, pod: PodInfo) -> None:
        """A pending pod as a scheduler request carried it (kube-scheduler's copy, with its resourceVersion): what
        the binder binds, without a GET. The last ``REQUESTED_KEPT``."""
        if not pod.uid or pod.node_name:
            return
        with self.lock:
            self._requested[pod.uid] = pod
            self._requested.move_to_end(pod.uid)
            if len(self._requested) > REQUESTED_KEPT:
                self._requested.popitem(last=False)

    def _pods_on(self, node: str) -> list[PodInfo]:
        pods = [self._pods[u] for u in self._by_node.get(node, ()) if u in self._pods]
        seen = {p.uid for p in pods}
        pods.extend(self._assumed[uid][0] for uid in self._assumed_on.get(node, ()) if uid not in seen)
        return pods

    def pods_on(self, node: str) -> list[PodInfo]:
        with self.lock:
            return self._pods_on(node)

    def node_info(self, name: str) -> NodeInfo | None:
        """The node as the cache knows it."""
        with self.lock:
            return self._infos.get(name)

    def names_if_current(self, nodes: list[tuple[str, str]]) -> list[str] | None:
        """The names of these (name, resourceVersion) Nodes if the cache holds exactly these versions of them (so
        its table rows describe them), else None."""
        with self.lock:
            for name, version in nodes:
                known = self._nodes.get(name)
                if known is None or not known.resource_version or known.resource_version != version:
                    return None
        return [name for name, _ in nodes]

    def all_nodes(self) -> dict[str, NodeInfo]:
        with self.lock:
            return dict(self._infos)


_UNACCOUNTED = frozenset({"resource_version", "phase_status", "problems"})
"""PodInfo fields nothing derived from a node's pods reads (rows, the P/D index): the phase only through
``terminal``, compared on its own."""
_ACCOUNTED = tuple(f.name for f in dataclasses.fields(PodInfo) if f.name not in _UNACCOUNTED)


def _parsed(parse: Callable[[dict[str, Any]], T], item: dict[str, Any], what: str) -> T | None:
    """One object parsed, or None when it cannot be (an identifying field of the wrong type): logged and left out
    instead of failing its list or watch (and every re-list after it)."""
    try:
        return parse(item)
    except ProtocolError as exc:
        name = (item.get("metadata") or {}).get("name") if isinstance(item, dict) else None
        log.warning("left out: the %s %r: %s", what, name, exc)
        return None


def _each(parse: Callable[[dict[str, Any]], T], items: Iterable[dict[str, Any]], what: str) -> list[T]:
    """Every item of a list parsed (see :func:`_parsed`)."""
    return [x for item in items if (x := _parsed(parse, item, what)) is not None]


def _same_accounting(old: PodInfo, new: PodInfo) -> bool:
    """Whether ``new`` leaves its node's accounting as ``old`` did (most pod events after binding are status)."""
    return old.terminal == new.terminal and all(getattr(old, f) == getattr(new, f) for f in _ACCOUNTED)


class _Kind:
    """One kind's events into the cache (a :class:`fuyao.kube_watch.Sink`)."""

    def __init__(self, cache: ClusterCache, kind: str):
        self.cache, self.kind = cache, kind

    def replace(self, items: list[dict[str, Any]]) -> None:
        (self.cache.replace_nodes if self.kind == "nodes" else self.cache.replace_pods)(items)
        self.cache.relists[self.kind] += 1

    def upsert(self, obj: dict[str, Any]) -> None:
        (self.cache.upsert_node if self.kind == "nodes" else self.cache.upsert_pod)(obj)

    def delete(self, obj: dict[str, Any]) -> None:
        (self.cache.delete_node if self.kind == "nodes" else self.cache.delete_pod)(obj)


class Watcher:
    """Feeds a :class:`ClusterCache` from the API server: list + watch of nodes and of pods (all namespaces), on the
    running event loop (the one that answers requests: events land between requests, no watch threads)."""

    def __init__(self, endpoint: RestEndpoint, cache: ClusterCache, watch_timeout_s: int = WATCH_TIMEOUT_S,
                 bound_pods_only: bool = False):
        """``bound_pods_only``: watch pods that have a node (field selector ``spec.nodeName!=``): at a scheduler's
        pace pending pods are half of all pod events (each one JSON-encoded by the API server for this watch, then
        parsed here), and nothing reads them: the binder binds the pod the scheduler's own filter request carried
        (:meth:`ClusterCache.remember`), and a pod it never saw costs one GET."""
        self.cache = cache
        pods = {"fieldSelector": "spec.nodeName!="} if bound_pods_only else {}
        self.watches = {kind: AsyncListWatch(kind, path, _Kind(cache, kind), endpoint, params=params,
                                             watch_timeout_s=watch_timeout_s, after_list=cache.settle,
                                             failing=cache.failing)
                        for kind, path, params in (("nodes", "/api/v1/nodes", {}), ("pods", "/api/v1/pods", pods))}
        self._session: aiohttp.ClientSession | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(w.run(self._session, self._stop), name=f"watch-{kind}")
                       for kind, w in self.watches.items()]

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
