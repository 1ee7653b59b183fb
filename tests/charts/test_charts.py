"""fuyao's Helm charts without a cluster: ``helm lint`` and ``helm template`` with default and custom values, every
rendered object checked against the Kubernetes 1.34 OpenAPI schemas (kubernetes-validate, strict: unknown fields
fail), the config files the charts write accepted by the components' own config models, RBAC equal to the rules
the integration tests run each component with, and alerts / dashboard on metrics the components really export.
The server-side dry run and a real install are in tests/e2e/test_charts_on_cluster.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fuyao.contracts import EXTENDER_MANAGED_RESOURCES, kube_scheduler_managed
from tests.support.apiserver import binary
from tests.support.charts import CHARTS, INSTALL_ORDER

REPO = CHARTS.parent
K8S_VERSION = "1.34.0"
MONITORING_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule",
                   "monitoring.coreos.com/v1/PodMonitor", "keda.sh/v1alpha1/ScaledObject")

CUSTOM_VALUES: dict[str, dict[str, Any]] = {
    "npu-device-plugin": {
        "image": {"repository": "registry.example.com/fuyao", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}], "privileged": False, "serverUsage": "infer",
        "nodeSelector": {"node-role/npu": "true"},
        "health": {"interval": "2s", "failureThreshold": 5, "reset": {"maxAttempts": 2, "window": "1h"},
                   "faultTable": {"NotHandleFaultCodes": ["80E21007"], "RestartNPUCodes": ["8C03A000"]},
                   "hccnTool": ""},
        "vnpu": {"mode": "static", "config": {"devices": [{"device_id": "0", "vnpu_count": 4,
                                                           "vnpu_memory": "3GB"}]}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                    "prometheusRule": {"enabled": True, "resetPendingFor": "30m"}},
        "config": {"preferSchedulerAssignment": False},
        "extraArgs": ["--log-level=debug"],
    },
    "scheduler-extender": {
        "tls": {"secretName": "extender-tls"}, "bind": False, "service": {"clusterIP": "10.96.0.50"},
        "config": {"shortlist": 32, "plugins": {"deviceFit": {"strategy": "spread"}, "pdAffinity": {"ratio": "1:2"}}},
        "scheduler": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "qos-agent": {
        "nodeSelector": {"volcano.sh/colocation": "true"}, "interval": "5s", "metrics": {"enabled": False},
        "config": {"cpuSuppress": {"thresholdPercent": 70}, "memoryEviction": {"highPercent": 90, "lowPercent": 85}},
    },
    "ai-inference-optimization": {
        "router": {"replicas": 3, "strategy": "intelligent", "discovery": {"namespace": "llm"},
                   "pdSeparation": {"enabled": True}, "model": "qwen", "config": {"router": {"retries": 1}}},
        "kvCache": {"size": "20Gi", "blockSize": 32, "config": {"evictionPolicy": "LFU", "ttl": "1h"},
                    "volume": {"enabled": True, "storageClass": "nfs-client", "size": "50Gi"}},
        "monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                       "grafanaDashboard": {"enabled": True}, "enginePodMonitor": {"enabled": True}},
        "autoscaling": {"enabled": True, "targets": [
            {"deployment": "chat-decode", "namespace": "llm", "minReplicas": 0, "maxReplicas": 4},
            {"deployment": "chat-prefill", "maxReplicas": 2, "requestsPerReplica": 8}]},
    },
}
CUSTOM_VALUES["npu-operator"] = {
    "image": {"repository": "registry.example.com/fuyao", "tag": "1.2.3"},
    "operator": {"resync": "1m", "nfdEnv": {"A": "b"}, "nfdHostDirs": ["/opt/npu"]},
    "driver": {"version": "24.1.rc3"}, "qosAgent": {"enabled": True, "values": {"interval": "5s"}},
    "vnpu": {"enabled": True, "mode": "static", "config": {"devices": [{"device_id": "0", "vnpu_count": 2}]}},
    "devicePlugin": {"values": {"serverUsage": "infer"}}, "exporter": {"serviceMonitor": True},
}
CHART_NAMES = (*INSTALL_ORDER, "npu-operator")
CASES = [(chart, variant) for chart in CHART_NAMES for variant in ("default", "custom")]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([binary("helm"), *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)}:\n{result.stderr}")
    return result


def values_args(chart: str, variant: str, tmp_path: Path) -> list[str]:
    if variant == "default":
        return []
    path = tmp_path / f"{chart}.yaml"
    path.write_text(yaml.safe_dump(CUSTOM_VALUES[chart]))
    return ["--values", str(path)]


def render(chart: str, variant: str, tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    apis = [arg for api in MONITORING_APIS for arg in ("--api-versions", api)]
    out = helm("template", "rel", str(CHARTS / chart), "--namespace", "fuyao-system", "--kube-version", K8S_VERSION,
               *apis, *values_args(chart, variant, tmp_path), *extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def config_map(docs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    found = [d["data"][key] for d in of_kind(docs, "ConfigMap") if key in d.get("data", {})]
    assert len(found) == 1, f"{key}: {len(found)} ConfigMaps carry it"
    return yaml.safe_load(found[0])  # type: ignore[no-any-return]


def test_committed_schemas_are_what_the_generator_writes() -> None:
    result = subprocess.run([sys.executable, str(REPO / "hack" / "gen-chart-schemas.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("chart", "variant"), CASES)
def test_lint_is_clean(chart: str, variant: str, tmp_path: Path) -> None:
    result = helm("lint", "--strict", str(CHARTS / chart), *values_args(chart, variant, tmp_path))
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize(("chart", "variant"), CASES)
def test_rendered_objects_are_valid_kubernetes_1_34(chart: str, variant: str, tmp_path: Path) -> None:
    docs = render(chart, variant, tmp_path)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith(("monitoring.coreos.com/", "keda.sh/")):
            continue  # a CRD's kind: no schema in kubernetes-validate; the e2e tests apply them to the real CRDs
        if doc["kind"] == "NPUClusterPolicy":  # ours: checked against the CRD's model
            from fuyao.npu_operator.api import PolicySpec

            PolicySpec.model_validate(doc["spec"])
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at "
                                 f"{'/'.join(map(str, exc.path))}") from exc
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "fuyao", f"{doc['kind']} {doc['metadata']['name']}"


def test_bad_values_are_refused_with_the_key_named(tmp_path: Path) -> None:
    for chart, values, expected in [
        ("npu-device-plugin", ["--set", "vnpu.mode=sometimes"], "/vnpu/mode"),
        ("scheduler-extender", ["--set", "replicas=-1"], "/replicas"),
        ("scheduler-extender", ["--set", "leaderElection.enabled=false"], "needs leaderElection.enabled"),  # 2 binders
        ("scheduler-extender", ["--set", "antiAffinity=always"], "/antiAffinity"),
        ("scheduler-extender", ["--set", "extenderEntry.managedResources=npu.huawei.com/NPU"],
         "/extenderEntry/managedResources"),  # a string stops vc-scheduler at every session open
        ("qos-agent", ["--set", "interval=ten"], "/interval"),
        ("ai-inference-optimization", ["--set", "router.strategy=random"], "/router/strategy"),
        ("ai-inference-optimization", ["--set", "kvCache.sise=1Gi"], "sise"),
    ]:
        result = helm("template", "rel", str(CHARTS / chart), *values, check=False)
        assert result.returncode != 0 and expected in result.stderr, (chart, values, result.stderr)


@pytest.mark.parametrize("variant", ["default", "custom"])
def test_config_files_the_charts_write_are_accepted_by_the_components(variant: str, tmp_path: Path) -> None:
    from fuyao.deviceplugin.config import build_config as device_plugin_config
    from fuyao.inference_router.config import build_config as router_config
    from fuyao.kvcache.config import build_config as kvcache_config
    from fuyao.qos.config import build_config as qos_config
    from fuyao.scheduler_extender.config import build_config as extender_config

    plugin = device_plugin_config(config_map(render("npu-device-plugin", variant, tmp_path), "config.yaml"))
    extender = extender_config(config_map(render("scheduler-extender", variant, tmp_path), "config.yaml"))
    agent = qos_config(config_map(render("qos-agent", variant, tmp_path), "config.yaml"))
    inference = render("ai-inference-optimization", variant, tmp_path)
    router = router_config(config_map(inference, "config.yaml"))
    index = kvcache_config(config_map(inference, "kvcache.yaml"))
    # every address of every family (an IPv6 single-stack cluster's pods have no 0.0.0.0 to be reached on)
    assert plugin.metrics_address.startswith(":") and extender.listen.startswith(":")
    assert agent.metrics_address.startswith(":") or not agent.metrics_address  # "": metrics off
    assert router.router.listen.startswith(":")
    assert index.listen.startswith(":")
    assert agent.cgroup_root == "/host/sys/fs/cgroup" and router.router.discovery.enabled
    assert index.kv_cache.events.discovery.enabled
    if variant == "custom":  # the chart's values and the free-form config both arrive
        assert plugin.vnpu.mode == "static" and plugin.vnpu.config and plugin.server_usage == "infer"
        assert plugin.prefer_scheduler_assignment is False and plugin.health.failure_threshold == 5
        assert plugin.health.reset.max_attempts == 2 and plugin.health.hccn_tool == ""
        from fuyao.deviceplugin.faults.table import FaultLevel, parse_table

        table = parse_table(config_map(render("npu-device-plugin", variant, tmp_path), "fault-table.json"), "cm")
        assert plugin.health.fault_table == "/etc/fuyao/faults/fault-table.json"
        assert table.level_of_code("8C03A000") == FaultLevel.RESTART_NPU
        assert extender.tls is not None and extender.bind is False and extender.shortlist == 32
        assert extender.plugins.device_fit.strategy == "spread" and extender.plugins.pd_affinity.ratio == "1:2"
        assert agent.cpu_suppress.threshold_percent == 70 and agent.metrics_address == ""
        assert router.router.strategy == "intelligent" and router.router.retries == 1
        assert router.pd_separation.enabled and router.router.discovery.namespace == "llm"
        assert index.kv_cache.size == 20 * 2**30 and index.kv_cache.block_size == router.kv_cache.block_size == 32
    else:
        assert router.kv_cache.service == "http://rel-ai-inference-optimization-kvcache.fuyao-system.svc:8100"


def rules_of(docs: list[dict[str, Any]], kind: str = "ClusterRole") -> list[dict[str, Any]]:
    roles = of_kind(docs, kind)
    assert len(roles) == 1, [r["metadata"]["name"] for r in roles]
    return roles[0]["rules"]  # type: ignore[no-any-return]


def test_rbac_is_exactly_what_the_integration_tests_run_each_component_with(tmp_path: Path) -> None:
    from tests.integration.test_deviceplugin_cluster import DEVICE_PLUGIN_RULES
    from tests.integration.test_extender_cluster import EXTENDER_RULES
    from tests.integration.test_extender_ha import leader_rules
    from tests.integration.test_qos_cluster import QOS_AGENT_RULES

    assert rules_of(render("npu-device-plugin", "default", tmp_path)) == DEVICE_PLUGIN_RULES
    assert rules_of(render("scheduler-extender", "default", tmp_path)) == EXTENDER_RULES
    assert rules_of(render("qos-agent", "default", tmp_path)) == QOS_AGENT_RULES
    assert rules_of(render("scheduler-extender", "default", tmp_path), "Role") == leader_rules("rel-scheduler-extender")
    no_bind = render("scheduler-extender", "default", tmp_path, "--set", "bind=false")
    assert rules_of(no_bind) == [r for r in EXTENDER_RULES if r["resources"] != ["pods/binding"]]
    assert not of_kind(no_bind, "Role")  # no binder, no lease
    # discovery in one namespace: Roles there, no ClusterRole
    inference = render("ai-inference-optimization", "custom", tmp_path)
    assert not of_kind(inference, "ClusterRole")
    assert {r["metadata"]["namespace"] for r in of_kind(inference, "Role")} == {"llm"}
    for doc in of_kind(inference, "Role"):
        assert all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in doc["rules"])


def test_the_operator_holds_every_permission_it_grants_its_components(tmp_path: Path) -> None:
    """Kubernetes refuses a ClusterRole with rules its creator does not hold (no escalate verb here): the operator's
    ClusterRole must cover each component's, in every variant the operator renders."""
    operator = [d for d in render("npu-operator", "default", tmp_path)  # not the CRD hook's own account
                if "helm.sh/hook" not in (d["metadata"].get("annotations") or {})]
    held = rules_of(operator)
    namespaced = rules_of(operator, "Role")

    def covered(rule: dict[str, Any], by: list[dict[str, Any]]) -> bool:
        return all(any(g in r["apiGroups"] and res in r["resources"] and verb in r["verbs"] for r in by)
                   for g in rule["apiGroups"] for res in rule["resources"] for verb in rule["verbs"])

    from fuyao.npu_operator.render import Settings, nfd_objects

    component_roles = [rules_of(render(chart, variant, tmp_path)) for chart in INSTALL_ORDER[:3]
                       for variant in ("default", "custom")]
    component_roles.append(rules_of([o for o in nfd_objects(Settings()) if o["kind"] == "ClusterRole"]))
    for rules in component_roles:
        for rule in rules:
            assert covered(rule, held), rule
    for variant in ("default", "custom"):  # the Roles it applies in its namespace (the extender's binder lease)
        for role in of_kind(render("scheduler-extender", variant, tmp_path), "Role"):
            for rule in role["rules"]:
                assert covered(rule, namespaced), rule
    # what it applies in its namespace, and its policy
    for kind in ("configmaps", "services", "serviceaccounts", "pods"):
        assert covered({"apiGroups": [""], "resources": [kind], "verbs": ["create", "patch", "delete"]}, namespaced)
    assert covered({"apiGroups": ["npu.openfuyao.com"], "resources": ["npuclusterpolicies/status"],
                    "verbs": ["patch"]}, held)
    assert not any("escalate" in r["verbs"] or "bind" in r["verbs"] or "*" in r["verbs"] for r in held + namespaced)
    # nothing it or a component does needs it to change pods cluster-wide (an image swap on any pod would be)
    assert not covered({"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}, held)
    assert not covered({"apiGroups": [""], "resources": ["pods"], "verbs": ["update"]}, held)


def test_the_operator_chart_carries_the_crd_the_api_generates() -> None:
    from fuyao.npu_operator.api import crd

    committed = yaml.safe_load((CHARTS / "npu-operator" / "crds" / "npuclusterpolicies.yaml").read_text())
    assert committed == crd(), "regenerate: python -m fuyao.npu_operator.cli crd > charts/npu-operator/crds/..."


def test_the_design_doc_flags_make_the_policy(tmp_path: Path) -> None:
    docs = helm("template", "npu-operator", str(CHARTS / "npu-operator"), "--set", "driver.enabled=true",
                "--set", "driver.version=24.1.rc2", "--set", "devicePlugin.enabled=true", "--set", "nfd.enabled=true",
                "--set", "schedulerExtender.enabled=false").stdout
    from fuyao.npu_operator.api import Component, PolicySpec

    policy = next(d for d in yaml.safe_load_all(docs) if d and d["kind"] == "NPUClusterPolicy")
    spec = PolicySpec.model_validate(policy["spec"])
    assert policy["metadata"]["name"] == "cluster" and spec.driver.version == "24.1.rc2"
    assert spec.enabled(Component.NODE_FEATURE_DISCOVERY) and spec.enabled(Component.DEVICE_PLUGIN)
    assert not spec.enabled(Component.SCHEDULER_EXTENDER) and not spec.enabled(Component.QOS_AGENT)


def test_only_the_device_plugin_is_privileged_and_api_pods_run_as_non_root(tmp_path: Path) -> None:
    for chart in CHART_NAMES:
        for workload in [d for d in render(chart, "default", tmp_path) if d["kind"] in ("DaemonSet", "Deployment")]:
            pod = workload["spec"]["template"]["spec"]
            for container in pod["containers"]:
                security = container.get("securityContext", {})
                assert security.get("privileged", False) == (chart == "npu-device-plugin"), workload["metadata"]
                if chart in ("scheduler-extender", "ai-inference-optimization", "npu-operator"):
                    assert pod["securityContext"]["runAsNonRoot"] is True
                    assert security["capabilities"] == {"drop": ["ALL"]}
                    assert security["readOnlyRootFilesystem"] is True
                if chart == "qos-agent":  # root for the host's cgroup files, but no capability
                    assert security["capabilities"] == {"drop": ["ALL"]}
                    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
                    assert security["allowPrivilegeEscalation"] is False


def test_scheduler_snippets_match_the_documented_examples(tmp_path: Path) -> None:
    docs = render("scheduler-extender", "default", tmp_path)
    snippets = next(d for d in of_kind(docs, "ConfigMap") if "kube-scheduler-config.yaml" in d["data"])["data"]
    example = yaml.safe_load((REPO / "docs" / "examples" / "kube-scheduler-config.yaml").read_text())
    rendered = yaml.safe_load(snippets["kube-scheduler-config.yaml"])
    assert rendered["extenders"][0]["urlPrefix"] == "http://rel-scheduler-extender.fuyao-system.svc:8888"
    assert ({**rendered["extenders"][0], "urlPrefix": "-"} == {**example["extenders"][0], "urlPrefix": "-"})
    volcano_example = yaml.safe_load((REPO / "docs" / "examples" / "volcano-scheduler.conf").read_text())
    volcano = yaml.safe_load(snippets["volcano-scheduler.conf"])
    args = volcano["tiers"][0]["plugins"][3]["arguments"]
    assert args.pop("extender.urlPrefix") == "http://rel-scheduler-extender.fuyao-system.svc:8888/volcano"
    volcano_example["tiers"][0]["plugins"][3]["arguments"].pop("extender.urlPrefix")
    assert volcano == volcano_example
    # both snippets send every pod that asks for something the extender decides about
    assert args["extender.managedResources"] == list(EXTENDER_MANAGED_RESOURCES)
    assert [r["name"] for r in rendered["extenders"][0]["managedResources"]] == list(kube_scheduler_managed())
    assert "extender.jobEnqueueableVerb" not in args
    docs = render("scheduler-extender", "default", tmp_path, "--set", "extenderEntry.volcanoJobEnqueueable=true")
    volcano = yaml.safe_load(next(d for d in of_kind(docs, "ConfigMap")
                                  if "volcano-scheduler.conf" in d["data"])["data"]["volcano-scheduler.conf"])
    assert volcano["tiers"][0]["plugins"][3]["arguments"]["extender.jobEnqueueableVerb"] == "jobEnqueueable"
    # the optional second scheduler: its own profile, leader lease and the extender
    docs = render("scheduler-extender", "custom", tmp_path)
    config = yaml.safe_load(next(d for d in of_kind(docs, "ConfigMap")
                                 if "kube-scheduler-config.yaml" in d["data"])["data"]["kube-scheduler-config.yaml"])
    assert config["profiles"] == [{"schedulerName": "fuyao-scheduler"}]
    assert config["extenders"][0]["urlPrefix"].startswith("https://") and "bindVerb" not in config["extenders"][0]
    assert any(d["metadata"]["name"] == "rel-scheduler-extender-scheduler" for d in of_kind(docs, "Deployment"))


def exported_metrics() -> set[str]:
    """The series names every component serves, read from their registries' exposition by prometheus_client's parser
    (counters and histograms by family name: the alerts' ``_total`` / ``_bucket`` suffixes are stripped by
    ``metrics_in``), plus ``up``, which Prometheus records for every target."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from fuyao.deviceplugin.metrics import PluginMetrics
    from fuyao.inference_router.metrics import RouterMetrics
    from fuyao.kvcache.config import KvCacheSection
    from fuyao.kvcache.service import KvCacheService
    from fuyao.qos.metrics import AgentMetrics
    from fuyao.scheduler_extender.metrics import ExtenderMetrics

    registries = [ExtenderMetrics().registry, AgentMetrics().registry, PluginMetrics("node").registry,
                  RouterMetrics().registry, KvCacheService(KvCacheSection(tokenizer="builtin")).metrics.registry]
    names = {"up"}
    for registry in registries:
        names |= {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    return names


def metrics_in(expr: str) -> set[str]:
    words = set(re.findall(r"\b([a-z_:][a-z0-9_:]*)\s*(?:\{|\[)", expr))
    words |= set(re.findall(r"\(\s*([a-z_][a-z0-9_]*)\s*\)", expr))  # avg by (node) (npu_utilization)
    return {re.sub(r"_(bucket|total|count|sum)$", "", w) for w in words if "_" in w or w == "up"}


def test_the_npu_fault_alerts_use_metrics_the_device_plugin_exports(tmp_path: Path) -> None:
    exported = exported_metrics()
    docs = render("npu-device-plugin", "custom", tmp_path)
    (rule,) = of_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    from fuyao.deviceplugin.faults.table import FaultLevel

    # one alert per fault level, one for isolation, one for links, and the device and registration alerts
    assert set(alerts) == {f"NpuFault{level.value}" for level in FaultLevel} | {
        "NpuIsolated", "NpuLinkDown", "NpuUnhealthy", "NpuAllocatableBelowCapacity", "DevicePluginNotRegistered",
        "DevicePluginDown"}
    for name, alert in alerts.items():
        used = metrics_in(alert["expr"])
        assert used and used <= exported, (name, used - exported)
        assert alert["labels"]["severity"] in ("info", "warning", "critical") and alert["annotations"]["summary"]
    assert alerts["NpuFaultRestartNPU"]["for"] == alerts["NpuFaultFreeRestartNPU"]["for"] == "30m"
    assert alerts["NpuFaultSeparateNPU"]["labels"]["severity"] == "critical"
    assert not of_kind(render("npu-device-plugin", "default", tmp_path), "PrometheusRule")


def test_the_four_alerts_and_the_dashboard_use_metrics_fuyao_exports(tmp_path: Path) -> None:
    exported = exported_metrics()
    docs = render("ai-inference-optimization", "custom", tmp_path)
    (rule,) = of_kind(docs, "PrometheusRule")
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"HighInferenceLatency", "HighInferenceErrorRate", "LowCacheHitRate", "LowNPUUtilization",
                           "RouterCircuitOpen", "KvEventStreamDown", "KvEventStreamStale"}
    for name, alert in alerts.items():
        used = metrics_in(alert["expr"])
        assert used and used <= exported, (name, used - exported)
        assert alert["labels"]["severity"] and alert["annotations"]["summary"]
    assert len(of_kind(docs, "ServiceMonitor")) == 2
    dashboard = json.loads((CHARTS / "ai-inference-optimization" / "dashboards" / "fuyao.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert {r["title"] for r in dashboard["panels"] if r["type"] == "row"} == {"NPUs", "Scheduling", "Router",
                                                                                "KV cache"}
    for panel in panels:
        for target in panel["targets"]:
            used = metrics_in(target["expr"])
            assert used and used <= exported, (panel["title"], used - exported)
    (shipped,) = [d for d in of_kind(docs, "ConfigMap") if "fuyao.json" in d.get("data", {})]
    assert json.loads(shipped["data"]["fuyao.json"]) == dashboard
    # without the CRDs nothing of the monitoring API is rendered, even when asked for
    plain = helm("template", "rel", str(CHARTS / "ai-inference-optimization"),
                 *values_args("ai-inference-optimization", "custom", tmp_path)).stdout
    assert "monitoring.coreos.com" not in plain


def test_the_router_gets_the_engines_api_key_from_a_secret_only_when_one_is_named(tmp_path: Path) -> None:
    """``router.engineApiKeySecret``: the key reaches the router as ``FUYAO_ENGINE_API_KEY`` from the Secret (never
    as a literal in the manifest); without a name the router has no such variable."""
    def router_env(*extra: str) -> list[dict[str, Any]]:
        docs = render("ai-inference-optimization", "default", tmp_path, *extra)
        [deployment] = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-router")]
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        return container.get("env") or []

    assert router_env() == []
    assert router_env("--set", "router.engineApiKeySecret.name=vllm-key") == [{
        "name": "FUYAO_ENGINE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "vllm-key", "key": "api-key"}}}]


def test_inference_rbac_binds_the_service_account_its_pods_run_as(tmp_path: Path) -> None:
    docs = render("ai-inference-optimization", "default", tmp_path, "--set", "serviceAccount.create=false",
                  "--set", "serviceAccount.name=llm-sa", "--set", "kvCache.enabled=true")
    pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["serviceAccountName"]
            for d in of_kind(docs, "Deployment")}
    assert set(pods.values()) == {"llm-sa"}
    bound = {s["name"] for kind in ("ClusterRoleBinding", "RoleBinding") for d in of_kind(docs, kind)
             for s in d["subjects"]}
    assert bound == {"llm-sa"}  # the bindings name the account the pods use (they named an uncreated one)
    assert not of_kind(docs, "ServiceAccount")


def test_long_and_dotted_release_names_give_distinct_valid_names(tmp_path: Path) -> None:
    release = "my.inference-release-with-a-rather-long-name-01"  # 47 characters, a dot
    out = helm("template", release, str(CHARTS / "ai-inference-optimization"), "--namespace", "llm",
               "--kube-version", K8S_VERSION, "--set", "kvCache.enabled=true").stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for kind in ("Service", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"):
        names = [d["metadata"]["name"] for d in of_kind(docs, kind)]
        assert len(names) == len(set(names)), (kind, names)  # router and kvcache never truncate to one name
        assert all(len(n) <= 63 and "." not in n for n in names), (kind, names)


def test_managed_resources_without_a_domain_are_refused(tmp_path: Path) -> None:
    # kube-scheduler exits on such a managedResources entry ("an invalid extended resource name")
    result = helm("template", "rel", str(CHARTS / "scheduler-extender"),
                  "--set-json", 'extenderEntry.managedResources=["npu.huawei.com/NPU","gpu"]', check=False)
    assert result.returncode != 0 and "managedResources" in result.stderr


def test_the_bundled_scheduler_pods_are_not_counted_as_extender_replicas(tmp_path: Path) -> None:
    # scheduler.enabled: its kube-scheduler pods carry the chart's name and instance labels; the PDB counted them
    # (a drain could take both extender replicas) and the anti-affinity kept them apart from the extender
    docs = render("scheduler-extender", "default", tmp_path, "--set", "scheduler.enabled=true")
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}

    def matches(selector: dict[str, Any]) -> set[str]:
        def one(labels: dict[str, str]) -> bool:
            if not (selector.get("matchLabels") or {}).items() <= labels.items():
                return False
            return all(e["operator"] == "NotIn" and labels.get(e["key"]) not in e["values"]
                       for e in selector.get("matchExpressions") or [])
        return {name for name, labels in pods.items() if one(labels)}

    extender = {n for n in pods if not n.endswith("-scheduler")}
    assert matches(of_kind(docs, "PodDisruptionBudget")[0]["spec"]["selector"]) == extender
    # pods of an earlier chart version (no component label) still count: an upgrade never empties the PDB
    assert matches({"matchLabels": {"app.kubernetes.io/name": "scheduler-extender"},
                    "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "NotIn",
                                          "values": ["scheduler"]}]}) >= extender
    deployment = deployments[next(iter(extender))]
    terms = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = (terms.get("preferredDuringSchedulingIgnoredDuringExecution") or [{}])[0].get("podAffinityTerm") or \
        terms["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert matches(term["labelSelector"]) == extender
    # the Service's named target port is declared by the extender's pods only: never the scheduler's endpoints
    target = of_kind(docs, "Service")[0]["spec"]["ports"][0]["targetPort"]
    declared = {n: {p.get("name") for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports") or []}
                for n, d in deployments.items()}
    assert {n for n, ports in declared.items() if target in ports} == extender


def test_hard_anti_affinity_rolls_one_replica_at_a_time_and_a_fixed_cluster_ip_is_the_url(tmp_path: Path) -> None:
    hard = render("scheduler-extender", "default", tmp_path, "--set", "antiAffinity=hard")
    strategy = of_kind(hard, "Deployment")[0]["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}  # a surge pod may have no node
    one = render("scheduler-extender", "default", tmp_path, "--set", "antiAffinity=hard", "--set", "replicas=1",
                 "--set", "leaderElection.enabled=true")
    assert of_kind(one, "Deployment")[0]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 1  # never zero replicas
    # a fixed clusterIP is what the snippet for a hostNetwork kube-scheduler (no cluster DNS) must point at
    fixed = yaml.safe_dump(render("scheduler-extender", "default", tmp_path, "--set", "service.clusterIP=10.96.0.50"))
    assert "urlPrefix: http://10.96.0.50:8888" in fixed and "svc:8888" not in fixed


def test_operator_arguments_are_quoted(tmp_path: Path) -> None:
    docs = render("npu-operator", "default", tmp_path, "--set-string", "operator.nfdEnv.OPTS=--level debug #x",
                  "--set-string", "operator.nfdEnv.MAP=a: b")
    args = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--nfd-env=OPTS=--level debug #x" in args and "--nfd-env=MAP=a: b" in args


def test_values_that_would_render_harmful_manifests_are_refused(tmp_path: Path) -> None:
    # a PDB as large as the Deployment blocks every drain; hccnTool at the root would mount the host's /; "10K" is
    # no Kubernetes quantity
    pdb = helm("template", "r", str(CHARTS / "scheduler-extender"), "--set", "podDisruptionBudget.minAvailable=2",
               check=False)
    assert pdb.returncode != 0 and "must be below replicas" in pdb.stderr
    root = helm("template", "r", str(CHARTS / "npu-device-plugin"), "--set", "health.hccnTool=/hccn_tool",
                check=False)
    assert root.returncode != 0 and "host's root" in root.stderr
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_schemas", REPO / "hack" / "gen-chart-schemas.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    quantity = re.compile(generator.QUANTITY["pattern"])
    assert quantity.match("10Ki") and quantity.match("10k") and quantity.match("1.5G") and not quantity.match("10K")


def test_a_tls_extenders_service_monitor_checks_its_certificate(tmp_path: Path) -> None:
    # scheme https without tlsConfig: Prometheus checked the pod IP against the system CAs and the scrape failed
    # for good (SchedulerExtenderDown fired)
    docs = render("scheduler-extender", "default", tmp_path, "--set", "metrics.serviceMonitor.enabled=true",
                  "--set", "tls.secretName=ext-tls")
    endpoint = of_kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"serverName": "rel-scheduler-extender.fuyao-system.svc",
                                     "ca": {"secret": {"name": "ext-tls", "key": "ca.crt"}}}
    own = render("scheduler-extender", "default", tmp_path, "--set", "metrics.serviceMonitor.enabled=true",
                 "--set", "tls.secretName=ext-tls", "--set", "metrics.serviceMonitor.tlsConfig.insecureSkipVerify=true")
    assert of_kind(own, "ServiceMonitor")[0]["spec"]["endpoints"][0]["tlsConfig"] == {"insecureSkipVerify": True}


def test_the_kube_scheduler_entry_can_check_the_extenders_certificate(tmp_path: Path) -> None:
    docs = render("scheduler-extender", "default", tmp_path, "--set", "tls.secretName=ext-tls", "--set",
                  "extenderEntry.tlsConfig.serverName=rel-scheduler-extender.fuyao-system.svc",
                  "--set", "extenderEntry.tlsConfig.caData=QUJD")
    text = "\n".join(v for d in of_kind(docs, "ConfigMap") for v in (d.get("data") or {}).values())
    assert "caData: QUJD" in text and "serverName: rel-scheduler-extender.fuyao-system.svc" in text
    bad = helm("template", "r", str(CHARTS / "scheduler-extender"), "--set", "extenderEntry.tlsConfig.caDta=x",
               check=False)
    assert bad.returncode != 0 and "caDta" in bad.stderr  # a misspelt field is refused, not silently dropped


def test_the_inference_chart_never_grants_its_rights_to_the_default_service_account() -> None:
    result = helm("template", "r", str(CHARTS / "ai-inference-optimization"), "--set", "serviceAccount.create=false",
                  check=False)
    assert result.returncode != 0 and "serviceAccount.name" in result.stderr
