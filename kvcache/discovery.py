"""Engines found as pods: a watch of the pods matching the discovery selector; each running pod with an IP
becomes a KV event source ``tcp://<pod IP>:<kv-events-port>`` named ``http://<pod IP>:<http port>`` (the
container port named ``http``, else 8000) — the URL a router knows the engine by. Pods that stop running or go
away are unfollowed (and their index entries dropped)."""

from __future__ import annotations

import logging
from typing import Any

from fuyao.contracts import (
    ANNOTATION_KV_EVENTS_PORT,
    ANNOTATION_KV_REPLAY_PORT,
    ANNOTATION_SERVED_MODEL,
    DEFAULT_ENGINE_HTTP_PORT,
    DEFAULT_KV_EVENTS_PORT,
)
from fuyao.kube_client import connect
from fuyao.kube_watch import ListWatch
from fuyao.netaddr import url

from .config import DiscoveryConfig
from .subscriber import Source, Subscriber

log = logging.getLogger(__name__)


def source_of(pod: dict[str, Any]) -> Source | None:
    """The event source of a running engine pod, or None (not running, no IP, bad annotation — logged)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    ip = status.get("podIP")
    if status.get("phase") != "Running" or not ip or meta.get("deletionTimestamp"):
        return None
    annotations = meta.get("annotations") or {}
    ports = {}
    for key, default in ((ANNOTATION_KV_EVENTS_PORT, DEFAULT_KV_EVENTS_PORT), (ANNOTATION_KV_REPLAY_PORT, None)):
        raw = annotations.get(key)
        if raw is None:
            ports[key] = default
            continue
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            log.warning("pod %s/%s: %s=%r is not a port; not followed", meta.get("namespace"), meta.get("name"),
                        key, raw)
            return None
        ports[key] = int(raw)
    http = next((p.get("containerPort") for c in spec.get("containers") or [] for p in c.get("ports") or []
                 if p.get("name") == "http"), DEFAULT_ENGINE_HTTP_PORT)
    replay, events = ports[ANNOTATION_KV_REPLAY_PORT], ports[ANNOTATION_KV_EVENTS_PORT] or DEFAULT_KV_EVENTS_PORT
    return Source(name=url("http", ip, http), events=url("tcp", ip, events),
                  replay=url("tcp", ip, replay) if replay else None, model=annotations.get(ANNOTATION_SERVED_MODEL, ""))


class _Pods:
    """Pod events → subscriber sources (a :class:`fuyao.kube_watch.Sink`)."""

    def __init__(self, subscriber: Subscriber):
        self.subscriber = subscriber
        self.by_uid: dict[str, Source] = {}

    def _set(self, uid: str, source: Source | None) -> None:
        old = self.by_uid.get(uid)
        if old == source:
            return
        if old is not None:
            del self.by_uid[uid]
            if not any(s.name == old.name for s in self.by_uid.values()):  # a new pod may hold its IP already
                self.subscriber.remove(old.name)
        if source is not None:
            self.subscriber.add(source)
            self.by_uid[uid] = source

    def replace(self, items: list[dict[str, Any]]) -> None:
        found = {(pod.get("metadata") or {}).get("uid", ""): pod for pod in items}
        for uid in set(self.by_uid) - set(found):  # gone pods first: a new pod may have taken one's IP
            self._set(uid, None)
        for uid, pod in found.items():
            self._set(uid, source_of(pod))

    def upsert(self, obj: dict[str, Any]) -> None:
        self._set((obj.get("metadata") or {}).get("uid", ""), source_of(obj))

    def delete(self, obj: dict[str, Any]) -> None:
        self._set((obj.get("metadata") or {}).get("uid", ""), None)


def follow_pods(kubeconfig: str | None, config: DiscoveryConfig, subscriber: Subscriber) -> ListWatch | None:
    api = connect(kubeconfig)
    if api is None:
        log.error("engine discovery is enabled but no cluster is configured (kubeconfig or in-cluster)")
        return None
    kwargs = {"label_selector": config.label_selector}
    if config.namespace:
        call, kwargs = api.list_namespaced_pod, {**kwargs, "namespace": config.namespace}
    else:
        call = api.list_pod_for_all_namespaces
    return ListWatch("engine-pods", call, _Pods(subscriber), kwargs=kwargs).start()
