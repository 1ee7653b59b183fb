"""Backends from Kubernetes: Services annotated ``inference.openfuyao.com/enable-router: "true"`` → their
EndpointSlices (label ``kubernetes.io/service-name``) → ready endpoints → the pods behind them, pooled by the pod's
``phase`` label (prefill / decode; none: both). Health checks follow the Service's
``inference.openfuyao.com/health-check-path`` / ``…/health-check-interval``. Three watches (Services,
EndpointSlices, Pods), one pure function (:func:`backends_from`) from what they hold to the backend list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fuyao import netaddr
from fuyao.contracts import LABEL_SERVICE_NAME, ContractError, Phase, RouterServiceSettings, parse_phase
from fuyao.kube_client import connect
from fuyao.kube_watch import ListWatch

from .fleet import Backend, Role

log = logging.getLogger(__name__)


def backends_from(services: Iterable[Mapping[str, Any]], slices: Iterable[Mapping[str, Any]],
                  pods: Mapping[tuple[str, str], Mapping[str, Any]]) -> list[Backend]:
    """The backends the annotated Services point at. Pure: what the watches hold → backends."""
    enabled: dict[tuple[str, str], RouterServiceSettings] = {}
    for service in services:
        meta = service.get("metadata") or {}
        try:
            settings = RouterServiceSettings.from_annotations(meta.get("annotations") or {})
        except ContractError as exc:
            log.warning("service %s/%s: %s; not routed", meta.get("namespace"), meta.get("name"), exc)
            continue
        if settings.enabled:
            enabled[(meta.get("namespace") or "default", meta.get("name") or "")] = settings
    out: dict[str, Backend] = {}
    for item in slices:
        meta = item.get("metadata") or {}
        key = (meta.get("namespace") or "default", (meta.get("labels") or {}).get(LABEL_SERVICE_NAME, ""))
        routed = enabled.get(key)
        if routed is None:
            continue
        ports = item.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == "http"), ports[0].get("port") if ports else None)
        if not port:
            continue
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            addresses = endpoint.get("addresses") or []
            if not addresses:
                continue
            ref = endpoint.get("targetRef") or {}
            pod = pods.get((ref.get("namespace") or key[0], ref.get("name") or ""), {})
            role: Role = "both"
            try:
                phase = parse_phase((pod.get("metadata") or {}).get("labels") or {})
            except ContractError as exc:
                log.warning("pod %s: %s; routed as both phases", ref.get("name"), exc)
                phase = None
            if phase == Phase.PREFILL:
                role = "prefill"
            elif phase == Phase.DECODE:
                role = "decode"
            host = addresses[0]
            url = netaddr.url("http", host, port)
            node = endpoint.get("nodeName") or (pod.get("spec") or {}).get("nodeName")
            out[url] = Backend(url, role, node=node if isinstance(node, str) else None,
                               health_path=routed.health_check_path,
                               health_interval=routed.health_check_interval_s)
    return list(out.values())


class _Store:
    """Objects of one kind by (namespace, name); calls ``changed`` after each event (a Sink)."""

    def __init__(self, changed: Callable[[], None]):
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self.changed = changed
        self.lock = threading.Lock()

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return meta.get("namespace") or "default", meta.get("name") or ""

    def replace(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            self.items = {self._key(i): i for i in items}
        self.changed()

    def upsert(self, obj: dict[str, Any]) -> None:
        with self.lock:
            self.items[self._key(obj)] = obj
        self.changed()

    def delete(self, obj: dict[str, Any]) -> None:
        with self.lock:
            self.items.pop(self._key(obj), None)
        self.changed()


class Discovery:
    """Watches Services, EndpointSlices and Pods; hands the backend list to ``apply`` (called from watch threads,
    so ``apply`` must hand over to the event loop)."""

    def __init__(self, kubeconfig: str | None, namespace: str | None, apply: Callable[[list[Backend]], object]):
        self.apply = apply
        self.services, self.slices, self.pods = (_Store(self._changed) for _ in range(3))
        api = connect(kubeconfig)
        if api is None:
            raise RuntimeError("discovery is enabled but no cluster is configured (kubeconfig or in-cluster)")
        from kubernetes import client

        discovery_api = client.DiscoveryV1Api(api.api_client)
        ns = {"namespace": namespace} if namespace else {}
        self.watches = [
            ListWatch("services", api.list_namespaced_service if namespace else api.list_service_for_all_namespaces,
                      self.services, kwargs=ns),
            ListWatch("endpointslices", discovery_api.list_namespaced_endpoint_slice if namespace
                      else discovery_api.list_endpoint_slice_for_all_namespaces, self.slices, kwargs=ns),
            ListWatch("pods", api.list_namespaced_pod if namespace else api.list_pod_for_all_namespaces, self.pods,
                      kwargs=ns),
        ]

    def start(self) -> Discovery:
        for watch in self.watches:
            watch.start()
        return self

    def stop(self) -> None:
        for watch in self.watches:
            watch.stop()

    def _changed(self) -> None:
        with self.services.lock, self.slices.lock, self.pods.lock:
            found = backends_from(list(self.services.items.values()), list(self.slices.items.values()),
                                  dict(self.pods.items))
            # handed on under the locks: two watch threads' lists reach the fleet in the order they were computed
            # (else an older list could replace a newer one until the next event)
            self.apply(found)
