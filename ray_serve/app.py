"""The Serve application builder: ``import_path: fuyao.ray_serve.app:build`` in a Serve config or a RayService's
``serveConfigV2`` (its ``args`` are :class:`fuyao.ray_serve.settings.AppSettings`), or ``serve.run(build({...}))``.

Two deployments: ``ingress`` (:class:`fuyao.ray_serve.ingress.OpenAiIngress`, the OpenAI API over Serve's HTTP
proxy) and ``engine`` (:class:`fuyao.ray_serve.engine.EngineReplica`: ``replicas`` replicas, each holding
``npusPerReplica`` of Ray's ``NPU`` resource and one engine process), routed by the chosen policy (``router.policy``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from fuyao.contracts import RAY_RESOURCE_NPU

from .engine import EngineReplica
from .ingress import OpenAiIngress
from .settings import app_settings, router_config


def build(args: Mapping[str, Any] | None = None) -> Application:
    settings = app_settings(args)
    engine = serve.deployment(EngineReplica).options(
        name="engine", num_replicas=settings.replicas, max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.num_cpus, "resources": {RAY_RESOURCE_NPU: settings.npus_per_replica}},
        request_router_config=router_config(settings.router), health_check_period_s=10)
    ingress = serve.deployment(OpenAiIngress).options(
        name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1000, settings.max_ongoing_requests * settings.replicas))
    return ingress.bind(engine.bind(settings.engine.model_dump()))
