"""The operator's I/O with the API server: plain REST on the official client's ``ApiClient`` (its auth, TLS and
in-cluster config), server-side apply, and the few kinds the operator manages. JSON is read with orjson, as
``fuyao.kube_watch`` does; nothing here decides anything."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from .render import MANAGER

KINDS: dict[str, tuple[str, str, bool]] = {
    "ConfigMap": ("v1", "configmaps", True),
    "Service": ("v1", "services", True),
    "ServiceAccount": ("v1", "serviceaccounts", True),
    "Pod": ("v1", "pods", True),
    "DaemonSet": ("apps/v1", "daemonsets", True),
    "Deployment": ("apps/v1", "deployments", True),
    "Role": ("rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "PodDisruptionBudget": ("policy/v1", "poddisruptionbudgets", True),
    "ServiceMonitor": ("monitoring.coreos.com/v1", "servicemonitors", True),
    "PrometheusRule": ("monitoring.coreos.com/v1", "prometheusrules", True),
}
"""kind → (apiVersion, plural, namespaced): every kind the operator applies, and therefore prunes."""


class KubeError(Exception):
    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"{status}: {message}")


def collection(api_version: str, plural: str, namespace: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{base}/namespaces/{quote(namespace)}/{plural}" if namespace else f"{base}/{plural}"


def object_path(obj: Mapping[str, Any]) -> str:
    kind = obj["kind"]
    if kind not in KINDS:
        raise KubeError(400, f"the operator does not manage {kind} objects")
    api_version, plural, namespaced = KINDS[kind]
    meta = obj["metadata"]
    return f"{collection(api_version, plural, meta.get('namespace') if namespaced else None)}/{quote(meta['name'])}"


class Rest:
    """Requests against the API server through a ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any):
        self.client = api_client

    def request(self, method: str, path: str, body: Any = None, query: Mapping[str, Any] | None = None,
                content_type: str = "application/json", timeout_s: float = 30.0) -> Any:
        """The decoded JSON answer; :class:`KubeError` with the API server's status and message otherwise."""
        _, url, headers, data, _ = self.client.param_serialize(
            method, path, query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"}, body=body,
            auth_settings=["BearerToken"])
        response = self.client.call_api(method, url, header_params=headers, body=data, _request_timeout=timeout_s)
        raw = response.read()
        if not 200 <= response.status < 300:
            message = response.reason or ""
            with contextlib.suppress(Exception):  # a Status object names the problem; anything else does not
                message = orjson.loads(raw).get("message") or message
            raise KubeError(response.status, message)
        return orjson.loads(raw) if raw else None

    def get(self, path: str, query: Mapping[str, Any] | None = None) -> Any | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", path, query=query)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        """The items, each with its ``apiVersion`` and ``kind`` (a list leaves them out)."""
        answer = self.get(path, {"labelSelector": label_selector} if label_selector else None) or {}
        kind = str(answer.get("kind", "")).removesuffix("List")
        items = list(answer.get("items") or [])
        for item in items:
            item.setdefault("apiVersion", answer.get("apiVersion"))
            item.setdefault("kind", kind)
        return items

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply as the operator's field manager, taking over fields another manager changed (drift)."""
        applied: dict[str, Any] = self.request("PATCH", object_path(obj), body=dict(obj),
                                               query={"fieldManager": MANAGER, "force": "true"},
                                               content_type="application/apply-patch+yaml")
        return applied

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        api_version, plural, namespaced = KINDS[obj["kind"]]
        path = collection(api_version, plural, obj["metadata"].get("namespace") if namespaced else None)
        created: dict[str, Any] = self.request("POST", path, body=dict(obj))
        return created

    def delete(self, obj: Mapping[str, Any]) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            self.request("DELETE", object_path(obj), body={"propagationPolicy": "Background"})
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def merge_patch(self, path: str, patch: Mapping[str, Any]) -> Any:
        return self.request("PATCH", path, body=dict(patch), content_type="application/merge-patch+json")

    def served(self, group_version: str) -> set[str]:
        """The kinds a group version serves (empty when it is not served)."""
        answer = self.get(f"/apis/{group_version}")
        return {r["kind"] for r in (answer or {}).get("resources") or [] if "/" not in r["name"]}
