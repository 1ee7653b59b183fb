"""The charts' alerts, tested as Prometheus tests them: each chart's PrometheusRule, rendered by helm, is checked with
``promtool check rules`` and unit-tested with ``promtool test rules`` (Prometheus's own rule engine, built by
``hack/build-upstream.sh promtool``). Every alert has three cases: its input makes it fire (with these labels and
annotations), it is still only pending just before its ``for`` duration ends, and a healthy input never fires it.
A chart alert without a case here fails the test."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.apiserver import binary
from tests.support.charts import CHARTS

RULE_VALUES = {"ai-inference-optimization": "monitoring.prometheusRule.enabled=true",
               "npu-device-plugin": "metrics.prometheusRule.enabled=true",
               "scheduler-extender": "metrics.prometheusRule.enabled=true",
               "qos-agent": "metrics.prometheusRule.enabled=true"}
RELEASE, NAMESPACE = "rel", "fuyao-system"
DEVICE = {"node": "node-a", "device": "3", "chip": "910B4"}


@dataclass
class Case:
    """One alert's test: ``fires`` (series → promtool values) makes it fire by ``fired_at`` with ``labels`` and
    ``annotations`` and keeps it pending at ``pending_at`` (None: its ``for`` is 0); ``quiet`` never fires it."""

    alert: str
    fires: dict[str, str]
    quiet: dict[str, str]
    fired_at: str
    pending_at: str | None
    labels: dict[str, str]
    annotations: dict[str, str]

    def tests(self) -> list[dict[str, Any]]:
        def series(values: dict[str, str]) -> list[dict[str, str]]:
            return [{"series": name, "values": v} for name, v in values.items()]

        fired = [{"exp_labels": self.labels, "exp_annotations": self.annotations}]
        checks = [{"eval_time": self.fired_at, "alertname": self.alert, "exp_alerts": fired}]
        if self.pending_at is not None:
            checks.insert(0, {"eval_time": self.pending_at, "alertname": self.alert, "exp_alerts": []})
        return [{"name": f"{self.alert} fires", "interval": "1m", "input_series": series(self.fires),
                 "alert_rule_test": checks},
                {"name": f"{self.alert} stays quiet", "interval": "1m", "input_series": series(self.quiet),
                 "alert_rule_test": [{"eval_time": self.fired_at, "alertname": self.alert, "exp_alerts": []}]}]


def _labels(text: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in DEVICE.items()) + (f",{text}" if text else "") + "}"


FAULT_LEVELS = {  # level: (severity, for, what the plugin does), as docs/device-plugin.md "Faults" lists them
    "NotHandleFault": ("info", "1h", "is kept in service; the fault is only published"),
    "SubHealthFault": ("info", "1h", "is kept in service; the fault is only published"),
    "RestartRequest": ("warning", "5m", "takes no new pods while the fault lasts; the workload should retry its "
                                        "requests"),
    "RestartBusiness": ("warning", "5m", "takes no new pods while the fault lasts; the workload should restart"),
    "PreSeparateNPU": ("warning", "5m", "takes no new pods; the pod on it keeps running"),
    "FreeRestartNPU": ("warning", "15m", "waits for a hot reset: it is reset once no pod holds it (the annotation "
                                         "npu.openfuyao.com/faults names the pod)"),
    "RestartNPU": ("warning", "15m", "waits for a hot reset: it is reset once no pod holds it (the annotation "
                                     "npu.openfuyao.com/faults names the pod)"),
    "SeparateNPU": ("critical", "0m", "is isolated until an operator releases it"),
    "ManuallySeparateNPU": ("critical", "0m", "is isolated until an operator releases it"),
}
_MINUTES = {"0m": 0, "5m": 5, "15m": 15, "1h": 60}


def _fault_case(level: str) -> Case:
    severity, wait, does = FAULT_LEVELS[level]
    minutes = _MINUTES[wait]
    fault = "fuyao_npu_fault" + _labels(f'level="{level}",action="keep"')
    return Case(
        f"NpuFault{level}", fires={fault: f"1x{minutes + 10}"}, quiet={fault: f"0x{minutes + 10}"},
        fired_at=f"{minutes + 1}m", pending_at=f"{minutes - 1}m" if minutes else None,
        labels={"severity": severity, "node": "node-a", "device": "3"},
        annotations={"summary": f"NPU 3 on node-a has a {level} fault",
                     "description": f"It {does}. Codes: the node annotation npu.openfuyao.com/faults "
                                    "(hack/diagnose.sh)."})


POD = 'namespace="fuyao-system",pod="rel-npu-device-plugin-x7",resource="huawei.com/Ascend910"'
CASES: dict[str, list[Case]] = {
    "ai-inference-optimization": [
        Case("HighInferenceLatency",
             # 10 requests a minute, all between 0.5 s and 1 s: P88 = 0.5 + 0.88 * 0.5 = 0.94 s
             fires={'inference_latency_bucket{le="0.25"}': "0x20", 'inference_latency_bucket{le="0.5"}': "0x20",
                    'inference_latency_bucket{le="1"}': "0+10x20", 'inference_latency_bucket{le="+Inf"}': "0+10x20"},
             quiet={'inference_latency_bucket{le="0.25"}': "0+10x20", 'inference_latency_bucket{le="0.5"}': "0+10x20",
                    'inference_latency_bucket{le="1"}': "0+10x20", 'inference_latency_bucket{le="+Inf"}': "0+10x20"},
             fired_at="7m", pending_at="5m", labels={"severity": "warning"},
             annotations={"summary": "P88 inference latency through the router is above 0.5s",
                          "description": "P88 = 940ms. Check engine queues (vllm:num_requests_waiting), TTFT "
                                         "(inference_ttft_seconds) and the router /debug/backends."}),
        Case("HighInferenceErrorRate",
             fires={'inference_requests_total{code="200"}': "0+100x20", 'inference_errors_total{reason="backend"}':
                    "0+2x20"},
             # clients' mistakes and clients leaving are not the service failing (they paged critical before)
             quiet={'inference_requests_total{code="200"}': "0+100x20", 'inference_errors_total{reason="backend"}':
                    "0+0.5x20", 'inference_errors_total{reason="bad-request"}': "0+5x20",
                    'inference_errors_total{reason="client-gone"}': "0+5x20"},
             fired_at="7m", pending_at="5m", labels={"severity": "critical"},
             annotations={"summary": "more than 1% of inference requests fail",
                          "description": "error ratio 2% (failures of the router and the engines: not bad requests, "
                                         "unknown models or clients leaving, nor a prefill that fell back to "
                                         "decode-only); inference_errors_total by reason tells why."}),
        Case("LowCacheHitRate",
             fires={'kv_cache_hits{layer="index"}': "0+3x40", 'kv_cache_requests{layer="index"}': "0+10x40"},
             quiet={'kv_cache_hits{layer="index"}': "0+8x40", 'kv_cache_requests{layer="index"}': "0+10x40"},
             fired_at="17m", pending_at="15m", labels={"severity": "warning"},
             annotations={"summary": "KV-cache prefix hit ratio below 0.5",
                          "description": "hit ratio 30%: check that the router uses prefix-aware routing and that "
                                         "engines publish KV events (fuyao_kvcache_event_stream_connected)."}),
        Case("LowNPUUtilization",
             fires={f"npu_utilization{_labels('')}": "0.1x40"}, quiet={f"npu_utilization{_labels('')}": "0.6x40"},
             fired_at="31m", pending_at="29m", labels={"severity": "info", "node": "node-a"},
             annotations={"summary": "NPUs of node-a are mostly idle",
                          "description": "mean AI Core utilization 10% for 30 minutes: consider vNPU slices or "
                                         "co-locating BE work."}),
        Case("RouterCircuitOpen",
             fires={'inference_backend_circuit_open{backend="http://10.244.0.7:8000"}': "0 0 1x10"},
             quiet={'inference_backend_circuit_open{backend="http://10.244.0.7:8000"}': "0 1 0 1 0 1 0 1 0 0"},
             fired_at="4m", pending_at="2m", labels={"severity": "warning", "backend": "http://10.244.0.7:8000"},
             annotations={"summary": "the router keeps requests away from http://10.244.0.7:8000 (circuit open)",
                          "description": "Its requests failed circuit_breaker.failure_threshold times in a row; the "
                                         "router probes it again after the breaker timeout. Check the engine pod and "
                                         "inference_errors_total."}),
        Case("KvEventStreamDown",
             fires={'fuyao_kvcache_event_stream_connected{endpoint="engine-0"}': "1 0x20"},
             quiet={'fuyao_kvcache_event_stream_connected{endpoint="engine-0"}': "1x20"},
             fired_at="7m", pending_at="5m", labels={"severity": "warning", "endpoint": "engine-0"},
             annotations={"summary": "the KV index has no event stream from engine-0",
                          "description": "Prefix-aware routing cannot see that engine's cache: check its "
                                         "--kv-events-config (publisher zmq, endpoint) and the network policy."}),
        Case("KvEventStreamStale",
             # the last event at t=0 while the router keeps sending the engine requests: stale from 5 min on, firing
             # 5 min later
             fires={'fuyao_kvcache_last_event_timestamp_seconds{endpoint="engine-0"}': "0x30",
                    'inference_backend_requests_total{backend="engine-0",role="both"}': "0+10x30"},
             # the same silence while requests flow, but to other engines: an engine without requests publishes
             # nothing (this fired for every idle engine of a busy fleet)
             quiet={'fuyao_kvcache_last_event_timestamp_seconds{endpoint="engine-0"}': "0x30",
                    'inference_backend_requests_total{backend="engine-0",role="both"}': "5x30",
                    'inference_backend_requests_total{backend="engine-1",role="both"}': "0+10x30"},
             fired_at="12m", pending_at="10m", labels={"severity": "warning", "endpoint": "engine-0"},
             annotations={"summary": "no KV event from engine-0 for 300s while the router sends it requests",
                          "description": "The index goes stale and prefix-aware routing falls back to load. Check "
                                         "the engine and fuyao_kvcache_event_gaps_total / decode_errors_total."}),
    ],
    "npu-device-plugin": [
        *(_fault_case(level) for level in FAULT_LEVELS),
        Case("NpuIsolated", fires={f"fuyao_npu_isolated{_labels('')}": "1x5"},
             quiet={f"fuyao_npu_isolated{_labels('')}": "0x5"}, fired_at="0m", pending_at=None,
             labels={"severity": "critical", "node": "node-a", "device": "3"},
             annotations={"summary": "NPU 3 on node-a is isolated",
                          "description": "Repair it, then release it: kubectl exec into the device plugin on the "
                                         "node and run fuyao-device-plugin --config /etc/fuyao/config/config.yaml "
                                         "--release-npu 3."}),
        Case("NpuUnhealthy", fires={f"npu_health{_labels('')}": "1 0x10"},
             quiet={f"npu_health{_labels('')}": "1x10"}, fired_at="7m", pending_at="5m",
             labels={"severity": "warning", "node": "node-a", "device": "3"},
             annotations={"summary": "NPU 3 on node-a is advertised Unhealthy",
                          "description": "The kubelet places no new pod on it. Its faults: the node annotation "
                                         "npu.openfuyao.com/faults (hack/diagnose.sh)."}),
        Case("NpuAllocatableBelowCapacity",
             fires={f'fuyao_deviceplugin_devices{{{POD},health="Unhealthy"}}': "0 2x10",
                    f'fuyao_deviceplugin_devices{{{POD},health="Healthy"}}': "8 6x10"},
             quiet={f'fuyao_deviceplugin_devices{{{POD},health="Unhealthy"}}': "0x10",
                    f'fuyao_deviceplugin_devices{{{POD},health="Healthy"}}': "8x10"},
             fired_at="7m", pending_at="5m",
             labels={"severity": "warning", "namespace": "fuyao-system", "pod": "rel-npu-device-plugin-x7",
                     "resource": "huawei.com/Ascend910"},
             annotations={"summary": "2 huawei.com/Ascend910 devices of rel-npu-device-plugin-x7 are unhealthy: "
                                     "allocatable is below capacity",
                          "description": "kubectl describe node shows the gap; npu_health names the devices."}),
        Case("DevicePluginNotRegistered",
             fires={f"fuyao_deviceplugin_registered{{{POD}}}": "1 0x10"},
             quiet={f"fuyao_deviceplugin_registered{{{POD}}}": "1 0 1x10"},  # a kubelet restart: back in a minute
             fired_at="4m", pending_at="2m",
             labels={"severity": "critical", "namespace": "fuyao-system", "pod": "rel-npu-device-plugin-x7",
                     "resource": "huawei.com/Ascend910"},
             annotations={"summary": "rel-npu-device-plugin-x7 is not registered with its kubelet for "
                                     "huawei.com/Ascend910",
                          "description": "The node advertises none of these devices. Check the kubelet (its "
                                         "device-plugins directory mount) and the plugin's log."}),
        Case("DevicePluginDown",
             fires={'up{job="rel-npu-device-plugin-metrics",pod="rel-npu-device-plugin-x7"}': "1 0x10"},
             quiet={'up{job="rel-npu-device-plugin-metrics",pod="rel-npu-device-plugin-x7"}': "1x10",
                    'up{job="someone-else",pod="other"}': "0x10"},
             fired_at="4m", pending_at="2m",
             labels={"severity": "critical", "job": "rel-npu-device-plugin-metrics",
                     "pod": "rel-npu-device-plugin-x7"},
             annotations={"summary": "the NPU device plugin rel-npu-device-plugin-x7 does not answer its metrics "
                                     "scrape",
                          "description": "kubectl -n fuyao-system describe pod rel-npu-device-plugin-x7"}),
        Case("NpuLinkDown", fires={f"npu_link_up{_labels('')}": "1 0x10"},
             quiet={f"npu_link_up{_labels('')}": "1x10"}, fired_at="7m", pending_at="5m",
             labels={"severity": "warning", "node": "node-a", "device": "3"},
             annotations={"summary": "RoCE link of NPU 3 on node-a is down",
                          "description": "The NPU takes single-NPU pods only until its link is back (hccn_tool -i "
                                         "ID -link -g)."}),
    ],
    "scheduler-extender": [
        Case("SchedulerExtenderErrors",
             fires={'fuyao_extender_decisions_total{verb="filter",result="error"}': "0+6x20",
                    'fuyao_extender_decisions_total{verb="filter",result="ok"}': "0+60x20"},
             quiet={'fuyao_extender_decisions_total{verb="filter",result="error"}': "0x20",
                    'fuyao_extender_decisions_total{verb="filter",result="ok"}': "0+60x20",
                    'fuyao_extender_bad_requests_total{verb="filter"}': "0x20"},
             fired_at="7m", pending_at="5m", labels={"severity": "warning", "verb": "filter"},
             annotations={"summary": "the scheduler extender fails filter calls",
                          "description": "0.10/s answered with an error or 400 for 5 minutes: pods needing NPUs may "
                                         "stay Pending. Its log names each."}),
        Case("SchedulerExtenderBindFailures",
             fires={'fuyao_extender_api_calls_total{call="bind",code="403"}': "0+3x20",
                    'fuyao_extender_api_calls_total{call="bind",code="201"}': "0+30x20"},
             quiet={'fuyao_extender_api_calls_total{call="bind",code="403"}': "7x20",
                    'fuyao_extender_api_calls_total{call="bind",code="201"}': "0+30x20"},
             fired_at="7m", pending_at="5m", labels={"severity": "warning", "call": "bind", "code": "403"},
             annotations={"summary": "the extender's bind calls to the API server fail with 403",
                          "description": "Check its RBAC (pods/binding) and the API server."}),
        Case("SchedulerExtenderSlow",
             # 60 calls a minute, all between 0.25 s and 1 s: p99 = 0.25 + 0.99 * 0.75 = 0.9925 s
             fires={'fuyao_extender_request_duration_seconds_bucket{verb="filter",le="0.25"}': "0x30",
                    'fuyao_extender_request_duration_seconds_bucket{verb="filter",le="1"}': "0+60x30",
                    'fuyao_extender_request_duration_seconds_bucket{verb="filter",le="+Inf"}': "0+60x30"},
             quiet={'fuyao_extender_request_duration_seconds_bucket{verb="filter",le="0.25"}': "0+60x30",
                    'fuyao_extender_request_duration_seconds_bucket{verb="filter",le="1"}': "0+60x30",
                    'fuyao_extender_request_duration_seconds_bucket{verb="filter",le="+Inf"}': "0+60x30"},
             fired_at="12m", pending_at="10m", labels={"severity": "warning", "verb": "filter"},
             annotations={"summary": "p99 of the extender's filter is 992.5ms",
                          "description": "Every scheduling cycle of an NPU pod waits on it. See "
                                         "docs/scheduler-extender.md (shortlist, replicas)."}),
        Case("SchedulerExtenderDown",
             fires={'up{job="rel-scheduler-extender",pod="rel-scheduler-extender-5f"}': "1 0x10"},
             quiet={'up{job="rel-scheduler-extender",pod="rel-scheduler-extender-5f"}': "1x10"},
             fired_at="7m", pending_at="5m",
             labels={"severity": "critical", "job": "rel-scheduler-extender", "pod": "rel-scheduler-extender-5f"},
             annotations={"summary": "the scheduler extender rel-scheduler-extender-5f does not answer its metrics "
                                     "scrape",
                          "description": "kube-scheduler cannot place NPU pods while no extender answers "
                                         "(managedResources make it required)."}),
    ],
    "qos-agent": [
        Case("QosEvictionStorm",
             # an eviction a minute: 10 in 10 minutes (no for: a storm is news at once)
             fires={'fuyao_qos_evictions_total{namespace="fuyao-system",pod="rel-qos-agent-k2",result="ok"}':
                    "0+1x20"},
             # one eviction every 5 minutes: pressure handled
             quiet={'fuyao_qos_evictions_total{namespace="fuyao-system",pod="rel-qos-agent-k2",result="ok"}':
                    "0+0.2x20"},
             fired_at="12m", pending_at=None,
             labels={"severity": "warning", "namespace": "fuyao-system", "pod": "rel-qos-agent-k2"},
             annotations={"summary": "the QoS agent rel-qos-agent-k2 evicted 10 BE pods in 10 minutes",
                          "description": "Memory pressure keeps returning: BE pods are placed on the node faster "
                                         "than it frees memory. Lower the BE batch-memory overcommit or the "
                                         "memoryEviction thresholds (docs/qos.md)."}),
        Case("QosEvictionsFailing",
             fires={'fuyao_qos_evictions_total{namespace="fuyao-system",pod="rel-qos-agent-k2",result="error"}':
                    "0 1 2 3 4 5 6 7 8 9 10"},
             quiet={'fuyao_qos_evictions_total{namespace="fuyao-system",pod="rel-qos-agent-k2",result="error"}':
                    "0x10"},
             fired_at="7m", pending_at="5m",
             labels={"severity": "warning", "namespace": "fuyao-system", "pod": "rel-qos-agent-k2"},
             annotations={"summary": "the QoS agent rel-qos-agent-k2 cannot evict BE pods",
                          "description": "Memory pressure stays on the node; its RBAC (pods/eviction create) or a "
                                         "PodDisruptionBudget stops it."}),
        Case("QosCgroupWritesFailing",
             fires={'fuyao_qos_cgroup_writes_total{namespace="fuyao-system",pod="rel-qos-agent-k2",result="error"}':
                    "0+3x20"},
             quiet={'fuyao_qos_cgroup_writes_total{namespace="fuyao-system",pod="rel-qos-agent-k2",result="error"}':
                    "2x20",
                    'fuyao_qos_cgroup_writes_total{namespace="fuyao-system",pod="rel-qos-agent-k2",result="ok"}':
                    "0+30x20"},
             fired_at="12m", pending_at="10m",
             labels={"severity": "warning", "namespace": "fuyao-system", "pod": "rel-qos-agent-k2"},
             annotations={"summary": "the QoS agent rel-qos-agent-k2 fails to write cgroup limits",
                          "description": "BE pods run without their limits. Its log names the file; check the "
                                         "cgroup mount (cgroupRoot)."}),
    ],
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=120)


def rules_file(chart: str, directory: Path) -> tuple[Path, list[str]]:
    """The chart's PrometheusRule (default values, rules on) as a Prometheus rules file; and its alert names."""
    out = subprocess.run([binary("helm"), "template", RELEASE, str(CHARTS / chart), "--namespace", NAMESPACE,
                          "--api-versions", "monitoring.coreos.com/v1/PrometheusRule", "--set", RULE_VALUES[chart]],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    rules = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "PrometheusRule"]
    assert len(rules) == 1, f"{chart}: {len(rules)} PrometheusRules rendered"
    path = directory / f"{chart}-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}))
    alerts = [r["alert"] for g in rules[0]["spec"]["groups"] for r in g["rules"] if "alert" in r]
    return path, alerts


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    directory = tmp_path_factory.mktemp("rules")
    return {chart: rules_file(chart, directory) for chart in RULE_VALUES}


@pytest.mark.parametrize("chart", list(RULE_VALUES))
def test_promtool_accepts_the_rules(chart: str, rendered: dict[str, tuple[Path, list[str]]]) -> None:
    path, alerts = rendered[chart]
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts)} rules found" in result.stdout, result.stdout


@pytest.mark.parametrize("chart", list(RULE_VALUES))
def test_every_alert_fires_waits_and_stays_quiet_as_promtool_evaluates_it(
        chart: str, rendered: dict[str, tuple[Path, list[str]]], tmp_path: Path) -> None:
    path, alerts = rendered[chart]
    cases = CASES[chart]
    assert sorted(c.alert for c in cases) == sorted(alerts), "every alert of the chart needs a case, and only those"
    spec = {"rule_files": [str(path)], "evaluation_interval": "1m",
            "tests": [t for case in cases for t in case.tests()]}
    test_file = tmp_path / f"{chart}-test.yaml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False, width=1000))
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "SUCCESS" in result.stdout, result.stdout


def test_a_broken_case_is_caught(rendered: dict[str, tuple[Path, list[str]]], tmp_path: Path) -> None:
    """The harness can fail: a case expecting the wrong label is reported by promtool."""
    path, _ = rendered["qos-agent"]
    case = next(c for c in CASES["qos-agent"] if c.alert == "QosEvictionsFailing")
    wrong = Case(**{**case.__dict__, "labels": {**case.labels, "severity": "critical"}})
    test_file = tmp_path / "broken.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(path)], "evaluation_interval": "1m",
                                         "tests": wrong.tests()}, sort_keys=False, width=1000))
    result = promtool("test", "rules", str(test_file))
    assert result.returncode != 0
    assert "QosEvictionsFailing" in result.stdout + result.stderr


@pytest.mark.parametrize("chart", list(RULE_VALUES))
def test_every_alert_reads_series_fuyao_serves(chart: str, rendered: dict[str, tuple[Path, list[str]]]) -> None:
    from tests.charts.test_charts import exported_metrics, metrics_in

    exported = exported_metrics()
    path, _ = rendered[chart]
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            used = metrics_in(rule["expr"])
            assert used and used <= exported, (rule["alert"], used - exported)
