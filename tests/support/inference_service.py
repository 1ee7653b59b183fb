"""A prefill/decode-disaggregated inference service of engine-simulator pods, as the design doc deploys vLLM: a
prefill Deployment and a decode Deployment requesting NPUs, labelled with their phase and P/D group (the scheduler
extender's affinity), publishing KV events (the KV-cache index), behind one Service annotated for the router.

Used by the charts' end-to-end test and by ``hack/demo.sh``; the engine is ``engine_sim`` from fuyao's runtime
image, serving vLLM's API, metrics and KV events.
"""

from __future__ import annotations

from typing import Any

from fuyao.contracts import (
    ANNOTATION_ENABLE_ROUTER,
    ANNOTATION_HEALTH_CHECK_PATH,
    ANNOTATION_KV_EVENTS_PORT,
    ANNOTATION_SERVED_MODEL,
    DEFAULT_ENGINE_HTTP_PORT,
    DEFAULT_KV_EVENTS_PORT,
    LABEL_APP,
    LABEL_KV_EVENTS,
    LABEL_PD_GROUP,
    LABEL_PHASE,
    RESOURCE_NPU,
)

ROLES = ("prefill", "decode")


def engine_container(image: str, model: str, role: str = "both", blocks: int = 2048, time_scale: float = 1.0,
                     resources: dict[str, Any] | None = None, extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """An engine-simulator container serving vLLM's API on ``http`` and its KV events on ``kv-events``."""
    return {
        "name": "engine", "image": image, "imagePullPolicy": "Never",
        "command": ["python3", "-m", "fuyao.engine_sim.cli", "--host", "0.0.0.0",
                    "--port", str(DEFAULT_ENGINE_HTTP_PORT), "--model", model, "--role", role,
                    "--num-gpu-blocks", str(blocks), "--time-scale", str(time_scale),
                    "--kv-events-endpoint", f"tcp://*:{DEFAULT_KV_EVENTS_PORT}", *extra_args],
        "ports": [{"name": "http", "containerPort": DEFAULT_ENGINE_HTTP_PORT},
                  {"name": "kv-events", "containerPort": DEFAULT_KV_EVENTS_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1},
        "resources": resources if resources is not None else {},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }


def _deployment(name: str, namespace: str, labels: dict[str, str], selector: dict[str, str], replicas: int,
                model: str, container: dict[str, Any], pod_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": selector},
                 "template": {
                     "metadata": {"labels": labels,
                                  "annotations": {ANNOTATION_KV_EVENTS_PORT: str(DEFAULT_KV_EVENTS_PORT),
                                                  ANNOTATION_SERVED_MODEL: model}},
                     "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                              "securityContext": {"runAsNonRoot": True, "runAsUser": 65534},
                              "containers": [container], **(pod_spec or {})}}}}


def _service(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {LABEL_APP: name},
                     "annotations": {ANNOTATION_ENABLE_ROUTER: "true", ANNOTATION_HEALTH_CHECK_PATH: "/health"}},
        "spec": {"selector": {LABEL_APP: name},
                 "ports": [{"name": "http", "port": DEFAULT_ENGINE_HTTP_PORT, "targetPort": "http"}]}}


def pd_service(name: str, image: str, namespace: str = "default", model: str = "fuyao-sim-7b",
               replicas: dict[str, int] | None = None, npus: int = 1, blocks: int = 2048,
               time_scale: float = 1.0, resources: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The Service and the two Deployments (``replicas`` per role, default one prefill and two decode pods; each
    pod asks for ``npus`` NPUs, or for ``resources`` when given, e.g. vNPU cores and a CPU request)."""
    replicas = replicas or {"prefill": 1, "decode": 2}
    objects: list[dict[str, Any]] = [_service(name, namespace)]
    for role in ROLES:
        labels = {LABEL_APP: name, LABEL_PHASE: role, LABEL_PD_GROUP: name, LABEL_KV_EVENTS: "true"}
        container = engine_container(image, model, role, blocks, time_scale,
                                     resources or {"limits": {RESOURCE_NPU: str(npus)}})
        objects.append(_deployment(f"{name}-{role}", namespace, labels, {LABEL_APP: name, LABEL_PHASE: role},
                                   replicas[role], model, container))
    return objects


def tier_service(name: str, image: str, claim: str, namespace: str, model: str = "fuyao-sim-7b", replicas: int = 2,
                 mount_path: str = "/var/lib/fuyao/kv", fs_group: int = 65534, blocks: int = 2048,
                 time_scale: float = 1.0) -> list[dict[str, Any]]:
    """A Service of ``replicas`` engine pods sharing fuyao's KV tier: each mounts the PVC ``claim`` (the chart's
    ``kvCache.volume``, in its namespace) at ``mount_path`` and stores and loads blocks there (``--kv-volume``),
    with ``fs_group`` owning the files (the chart's ``kvCache.volume.fsGroup``)."""
    labels = {LABEL_APP: name, LABEL_KV_EVENTS: "true"}
    container = engine_container(image, model, "both", blocks, time_scale,
                                 extra_args=("--kv-volume", mount_path))
    container["volumeMounts"] = [{"name": "kv-tier", "mountPath": mount_path}]
    pod_spec = {"volumes": [{"name": "kv-tier", "persistentVolumeClaim": {"claimName": claim}}]}
    deployment = _deployment(name, namespace, labels, {LABEL_APP: name}, replicas, model, container, pod_spec)
    deployment["spec"]["template"]["spec"]["securityContext"]["fsGroup"] = fs_group
    return [_service(name, namespace), deployment]
