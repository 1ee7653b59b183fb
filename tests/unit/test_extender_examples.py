"""The example scheduler configurations in docs/examples point at routes the extender serves, with the types the
schedulers require (Volcano: httpTimeout a string, managedResources a list)."""

from __future__ import annotations

from urllib.parse import urlparse

import yaml

from fuyao.scheduler_extender.cluster import ClusterCache
from fuyao.scheduler_extender.config import build_config
from fuyao.scheduler_extender.metrics import ExtenderMetrics
from fuyao.scheduler_extender.server import build_app
from fuyao.scheduler_extender.service import ExtenderService
from tests.conftest import REPO

EXAMPLES = REPO / "docs" / "examples"


def post_routes() -> set[str]:
    app = build_app(ExtenderService(build_config({}), ClusterCache(), ExtenderMetrics()))
    return {path for path, methods in app.routes.items() if "POST" in methods}


def test_kube_scheduler_example_verbs_are_served() -> None:
    config = yaml.safe_load((EXAMPLES / "kube-scheduler-config.yaml").read_text())
    assert config["apiVersion"] == "kubescheduler.config.k8s.io/v1"
    extender = config["extenders"][0]
    prefix = urlparse(extender["urlPrefix"]).path.rstrip("/")
    routes = post_routes()
    for verb in ("filterVerb", "prioritizeVerb", "preemptVerb", "bindVerb"):
        assert f"{prefix}/{extender[verb]}" in routes, verb
    assert extender["nodeCacheCapable"] is True and extender["weight"] >= 1
    assert {r["name"] for r in extender["managedResources"]} >= {"npu.huawei.com/NPU"}


def test_volcano_example_verbs_and_argument_types() -> None:
    config = yaml.safe_load((EXAMPLES / "volcano-scheduler.conf").read_text())
    plugins = [p for tier in config["tiers"] for p in tier["plugins"] if p["name"] == "extender"]
    assert len(plugins) == 1
    args = plugins[0]["arguments"]
    prefix = urlparse(args["extender.urlPrefix"]).path.rstrip("/")
    routes = post_routes()
    verbs = {k: v for k, v in args.items() if k.endswith("Verb")}
    assert len(verbs) == 4 and not any("Session" in k for k in verbs)  # see the example's comment
    for key, verb in verbs.items():
        assert f"{prefix}/{verb}" in routes, key
    assert isinstance(args["extender.httpTimeout"], str)  # Volcano ignores a non-string timeout
    assert isinstance(args["extender.managedResources"], list)  # a string makes Volcano exit
    assert args["extender.ignorable"] is False
