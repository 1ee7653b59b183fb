"""The extender's verbs for both schedulers, as methods from decoded JSON to decoded JSON (the HTTP layer only
moves bytes). State comes from the :class:`ClusterCache` (watches) or, when the scheduler sends full objects
(kube-scheduler's ``Nodes`` mode, every Volcano request), from the request itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import xxhash

from fuyao.config_files import ConfigSection

from . import kube_protocol as kp
from .cluster import ClusterCache
from .config import ExtenderConfig
from .features import NodeTable, NodeView, PdIndex
from .framework import Cycle, Explanation, Framework, to_extender_scores
from .metrics import ExtenderMetrics
from .model import NodeInfo, PodInfo, parse_node, parse_pod
from .partial import Kept
from .plugins import DeviceFitArgs, PdAffinityArgs, registry
from .plugins.colocation import be_victims

log = logging.getLogger(__name__)

SHORTLISTS_KEPT = 4096  # filter results waiting for their prioritize (kube-scheduler skips it for one node)
REQUEST_NODES_KEPT = 16_384
"""Nodes parsed from kube-scheduler's full-Node requests, by (name, resourceVersion)."""
REQUEST_PODS_KEPT = 256
"""Pods parsed from kube-scheduler's requests, by their bytes: its prioritize (and a filter it retries) carries the
Pod the filter carried, byte for byte."""
SOFT_SHORTLIST = 16
"""With ``shortlist: 1``, pods with soft scheduling preferences still get this many nodes, for kube-scheduler to weigh
their preferences."""


def build_framework(config: ExtenderConfig) -> Framework:
    """Every registered plugin, made from its args in the config, with its weight; device-fit's
    ``requireTopology: null`` resolved to whether this extender binds."""
    plugins: ConfigSection = config.plugins
    fit = registry.args_of(plugins, "device-fit")
    assert isinstance(fit, DeviceFitArgs)
    if fit.require_topology is None:
        fit = fit.model_copy(update={"require_topology": config.bind})
        plugins = plugins.model_copy(update={registry.REGISTRY["device-fit"].field: fit})
    return Framework(registry.build(plugins))


def pd_topology_key(config: ExtenderConfig) -> str:
    """The topology domain of prefill/decode affinity: what the node tables index domains by."""
    args = registry.args_of(config.plugins, "pd-affinity")
    assert isinstance(args, PdAffinityArgs)
    return args.topology_key


class Explanations:
    """The last decision per pod, bounded twice: at most ``limit`` pods and ``node_budget`` node entries in all
    (a decision over 5,000 nodes holds 5,000), oldest first out."""

    def __init__(self, limit: int, node_budget: int = 2_000_000):
        self.limit = limit
        self.node_budget = node_budget
        self._items: OrderedDict[str, dict[str, Explanation]] = OrderedDict()
        self._at: dict[str, float] = {}
        self._size = 0
        self._lock = threading.Lock()

    def record(self, explanation: Explanation) -> None:
        if self.limit <= 0:
            return
        with self._lock:
            entry = self._items.pop(explanation.pod, {})
            old = entry.get(explanation.verb)
            if old is not None:
                self._size -= old.size
            entry[explanation.verb] = explanation
            self._size += explanation.size
            self._items[explanation.pod] = entry
            self._at[explanation.pod] = time.time()
            while self._items and (len(self._items) > self.limit or self._size > self.node_budget):
                if len(self._items) == 1 and len(entry) == 1:
                    break  # keep the newest decision, however large
                pod, gone = self._items.popitem(last=False)
                self._at.pop(pod, None)
                self._size -= sum(e.size for e in gone.values())

    def get(self, pod: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._items.get(pod)
            if entry is None:
                return None
            at = self._at.get(pod)
            return {verb: e.as_dict() | {"at": at} for verb, e in entry.items()}


class ExtenderService:
    def __init__(self, config: ExtenderConfig, cache: ClusterCache, metrics: ExtenderMetrics,
                 binder: Callable[[kp.BindingArgs, bool], Awaitable[str]] | None = None,
                 warn_pod: Callable[[PodInfo, str], None] | None = None, has_cluster: bool = False):
        self.config = config
        self.cache = cache
        self.metrics = metrics
        self.framework = build_framework(config)
        for plugin in self.framework.filters:  # every (plugin, reason) at 0: a rejections rate is 0, not "no data"
            for kind in plugin.kinds:
                metrics.rejections.labels(plugin.name, kind.code)
        self.domain_key = pd_topology_key(config)
        with cache.lock:
            cache.table.set_domain_key(self.domain_key)
        self.explanations = Explanations(config.explain_entries, config.explain_node_budget)
        self.binder = binder
        self.warn_pod = warn_pod
        self.has_cluster = has_cluster
        self._warned: set[tuple[str, str]] = set()
        # pod uid → the shortlist's scores, computed by filter, answered by the prioritize that follows it
        self._shortlisted: OrderedDict[str, Explanation] = OrderedDict()
        self._request_nodes: Kept[Any, NodeInfo] = Kept(REQUEST_NODES_KEPT)
        self._request_pods: Kept[bytes, PodInfo] = Kept(REQUEST_PODS_KEPT)

    # Shared ------------------------------------------------------------------------------------------------------
    def pod(self, raw: Mapping[str, Any]) -> PodInfo:
        pod = parse_pod(raw)
        if pod.problems and self.warn_pod is not None:
            for problem in pod.problems:
                if (pod.uid, problem) not in self._warned:
                    if len(self._warned) > 100_000:
                        self._warned.clear()  # bounded: at worst a pod is warned twice
                    self._warned.add((pod.uid, problem))
                    self.warn_pod(pod, problem)
        return pod

    @contextlib.contextmanager
    def request_view(self, nodes: list[NodeInfo]) -> Iterator[tuple[NodeView, Cycle]]:
        """Candidates the request carried in full (kube-scheduler's Nodes mode, Volcano): a table of their own;
        prefill/decode counts from the cache when it is synced (it sees every node), else from these nodes. The
        table is built outside the cache's lock (its cost grows with the request); the decision reads the cache's
        counts under it (a big request is decided in a worker thread while the watch applies events)."""
        view = NodeTable.of(nodes, self.domain_key).view_all()
        if not self.cache.ready:
            yield view, Cycle(pd=PdIndex.of(nodes))
            return
        with self.cache.lock:
            yield view, Cycle(pd=self.cache.pd, domains=self.cache.table)

    @contextlib.contextmanager
    def _candidates(self, args: kp.ExtenderArgs) -> Iterator[tuple[NodeView, Cycle, list[str]]]:
        """The candidate nodes of a kube-scheduler request, the cycle, and the names the extender does not know.
        From the cache's table (under its lock) for ``NodeNames``, and for ``Nodes`` whose versions the cache
        holds; otherwise from the Node objects of the request."""
        names = args.node_names
        if names is None and self.cache.ready:
            names = self.cache.names_if_current([(ref.name, ref.version) for ref in args.nodes or []])
        if names is not None:
            self.cache.expire_assumed()
            with self.cache.lock:
                view, unknown = self.cache.table.view(names)
                yield view, Cycle(pd=self.cache.pd, domains=self.cache.table), unknown
            return
        infos = [self._request_node(ref) for ref in args.nodes or []]
        with self.request_view(infos) as (view, cycle):
            yield view, cycle, []

    def _request_node(self, ref: kp.NodeRef) -> NodeInfo:
        """A Node the request carried, with the cache's pods on it. The Node is parsed once per version (by name
        and resourceVersion, or by its bytes when it has no version)."""
        if ref.version:
            key: Any = (ref.name, ref.version)
        elif ref.raw is not None:
            key = xxhash.xxh3_128_digest(ref.raw)
        else:
            return parse_node(ref.decoded(), self.cache.pods_on(ref.name))
        base = self._request_nodes.get_or(key, lambda: parse_node(ref.decoded()))
        pods = self.cache.pods_on(ref.name)
        return dataclasses.replace(base, pods=pods, memo={}).refresh() if pods else base

    def observe(self, rejections: Mapping[tuple[str, str], int]) -> None:
        for (plugin, code), count in rejections.items():
            self.metrics.rejections.labels(plugin, code).inc(count)

    # kube-scheduler --------------------------------------------------------------------------------------------
    def args(self, body: bytes | Any) -> kp.ExtenderArgs:
        """``body``: the request's bytes (the server's path: only what is read is decoded) or decoded JSON."""
        return kp.decode_extender_args(body) if isinstance(body, bytes) else kp.parse_extender_args(body)

    def request(self, body: bytes | Any) -> tuple[kp.ExtenderArgs, PodInfo]:
        """The request's arguments and its pod. In kube-scheduler's ``NodeNames`` form the Pod is parsed once per
        distinct bytes (its prioritize repeats the filter's Pod); ``args.pod`` is then left empty."""
        split = kp.split_names_body(body) if isinstance(body, bytes) else None
        if split is None:
            args = self.args(body)
            return args, self.pod(args.pod)
        raw, names = split
        key = xxhash.xxh3_128_digest(raw)
        pod = self._request_pods.get(key)
        if pod is None:
            try:
                decoded = kp.decode_pod(raw)
            except kp.ProtocolError:  # not cut where the Pod ends: decoded whole (which names what is wrong)
                args = self.args(body)
                return args, self.pod(args.pod)
            pod = self._request_pods.get_or(key, lambda: self.pod(decoded))
        return kp.ExtenderArgs(pod={}, nodes=None, node_names=names), pod

    def filter(self, body: bytes | Any) -> bytes:
        """The encoded ``ExtenderFilterResult``."""
        args, pod = self.request(body)
        self.cache.remember(pod)  # the copy the binder binds (the pod watch carries bound pods only)
        if self._unsynced(args):
            # full Nodes too: the pods on them (what they hold) come from the cache, which is not there yet
            self.metrics.decisions.labels("filter", "error").inc()
            return kp.filter_result(args, [], {}, {}, error=(
                "the extender has no cluster state (use nodeCacheCapable: false, or give it a kubeconfig)"
                if not self.has_cluster else "the extender is still listing nodes and pods"))
        with self._candidates(args) as (view, cycle, unknown):
            outcome = self.framework.filter(pod, view, cycle)
            scored = self.framework.shortlist(pod, view, outcome, self.shortlist_for(pod), cycle)
        if scored is not None and len(scored.names) > 1:  # for a single node kube-scheduler skips prioritize
            with self.cache.lock:  # big requests are decided in worker threads
                self._shortlisted[pod.uid or pod.key] = scored
                self._shortlisted.move_to_end(pod.uid or pod.key)
                while len(self._shortlisted) > SHORTLISTS_KEPT:
                    self._shortlisted.popitem(last=False)
        if unknown:
            for name in unknown:
                outcome.failed[name] = outcome.explanation.rejected[name] = "node unknown to the extender's cache"
            outcome.rejections[("extender", "node-unknown")] = len(unknown)
        self.explanations.record(outcome.explanation)
        self.observe(outcome.rejections)
        self.metrics.decisions.labels("filter", "ok" if outcome.passed else "none-fit").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("filter %s", pod.key, extra=outcome.explanation.as_dict())
        return kp.filter_result(args, outcome.passed, outcome.failed, outcome.unresolvable)

    def shortlist_for(self, pod: PodInfo) -> int:
        """How many feasible nodes the filter passes. ``shortlist: 1`` makes the extender decisive: kube-scheduler
        binds its single node without scoring (no prioritize call, no score plugins: the throughput profile) —
        except for pods with preferences only kube-scheduler's scoring honours, which get ``SOFT_SHORTLIST``."""
        if self.config.shortlist == 1 and pod.soft_preferences:
            return SOFT_SHORTLIST
        return self.config.shortlist

    def _unsynced(self, args: kp.ExtenderArgs) -> bool:
        """The request needs the cache (node names; or full Nodes, whose pods come from it) and it is not synced."""
        return not self.cache.ready and (args.node_names is not None or self.has_cluster)

    def prioritize(self, body: bytes | Any) -> list[dict[str, Any]]:
        args, pod = self.request(body)
        if self._unsynced(args):
            return []  # the filter already answered with an error
        with self.cache.lock:
            explanation = self._shortlisted.pop(pod.uid or pod.key, None)
        asked = args.node_names if args.node_names is not None else [ref.name for ref in args.nodes or []]
        if explanation is None or len(explanation.names) != len(asked) or set(explanation.names) != set(asked):
            with self._candidates(args) as (view, cycle, _unknown):
                explanation = self.framework.score(pod, view, cycle)
        self.explanations.record(explanation)
        self.metrics.decisions.labels("prioritize", "ok").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("prioritize %s", pod.key, extra=explanation.as_dict())
        assert explanation.totals is not None  # a score explanation has totals
        return kp.priority_list(explanation.names, to_extender_scores(explanation.totals))

    async def bind(self, body: Any) -> dict[str, Any]:
        return await self._bind(body, forwarded=False)

    async def bind_forwarded(self, body: Any) -> dict[str, Any]:
        """A bind another replica forwarded to this one (the binder lease's holder): bound here, never forwarded."""
        return await self._bind(body, forwarded=True)

    async def _bind(self, body: Any, forwarded: bool) -> dict[str, Any]:
        args = kp.parse_binding_args(body)
        if self.binder is None:
            error = "this extender is not configured to bind (no cluster, or bind: false)"
        else:
            error = await self.binder(args, forwarded)
        self.metrics.decisions.labels("bind-forwarded" if forwarded else "bind", "error" if error else "ok").inc()
        return {"Error": error}

    def preempt(self, body: Any) -> dict[str, Any]:
        args = kp.parse_preemption_args(body)
        preemptor = self.pod(args.pod)
        kept: dict[str, list[str]] = {}
        candidates: dict[str, list[PodInfo]] = {}
        if args.victims is not None:
            candidates = {n: [parse_pod(p) for p in pods] for n, pods in args.victims.items()}
        elif args.meta_victims is not None:
            for node, uids in args.meta_victims.items():
                by_uid = {p.uid: p for p in self.cache.pods_on(node)}
                # a victim we do not know is treated as latency-sensitive: never evicted on a guess
                candidates[node] = [by_uid.get(u) or dataclasses.replace(
                    parse_pod({"metadata": {"uid": u}}), qos_explicit=True) for u in uids]
        for node, victims in candidates.items():
            allowed = be_victims(preemptor, victims)
            if not allowed or not self._helps(preemptor, node, {v.uid for v in allowed}):
                continue
            kept[node] = [v.uid for v in allowed]
        self.metrics.decisions.labels("preempt", "ok" if kept else "none").inc()
        return kp.preemption_result(kept, args.pdb_violations)

    def _helps(self, preemptor: PodInfo, node: str, victims: set[str]) -> bool:
        """Would the preemptor pass our filters once the victims are gone? (Evicting pods that would not make room
        — say a NUMA or ring shape that stays wrong — only hurts them.) Unknown nodes are not second-guessed."""
        info = self.cache.node_info(node) if self.cache.ready else None
        if info is None:
            return True
        reduced = info.without({p.key for p in info.pods if p.uid in victims})  # their devices free too
        return self.framework.check(preemptor, reduced) is None

    # Health ----------------------------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if not self.has_cluster:
            return True, ("serving without cluster state: requests must carry full Node objects "
                          "(nodeCacheCapable: false, or Volcano); pods on nodes are unknown")
        if not self.cache.ready:
            return False, f"waiting for the first list of nodes and pods ({self.cache.synced})"
        if self.cache.failing:
            return False, f"the API server watch keeps failing, cluster state is stale: {self.cache.failing}"
        return True, f"cluster state synced ({len(self.cache.node_names())} nodes)"
