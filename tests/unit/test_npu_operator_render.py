"""The NPU operator's pure parts beyond the status: chart values from a policy, ownership of rendered objects,
validation pod names, node feature discovery's label patches, the validation check against the fake npu-smi,
and reading workloads and validation pods."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuyao.contracts import (
    ANNOTATION_NFD_LABELS,
    LABEL_ACCELERATE_TYPE,
    LABEL_ACCELERATOR,
    LABEL_MANAGED_BY,
    LABEL_NPU_DRIVER,
    LABEL_OPERATOR_COMPONENT,
)
from fuyao.npu_operator import agents, controller, render
from fuyao.npu_operator.api import Component, PolicySpec
from fuyao.npu_operator.render import RenderError, Settings
from tests.support.apiserver import binary

REPO = Path(__file__).resolve().parents[2]
FAKE = str(REPO / "hack" / "fake-npu-smi")
POLICY = {"metadata": {"name": "cluster", "uid": "u-1"}}


def test_chart_values_follow_the_policy_and_its_free_form_values_win() -> None:
    spec = PolicySpec.model_validate({
        "devicePlugin": {"healthInterval": "2s", "image": "reg.example/fuyao:9",
                         "values": {"health": {"failureThreshold": 7}, "tolerations": [{"operator": "Exists"}],
                                    "nodeSelector": {"pool": "npu"}}},
        "vnpu": {"enabled": True, "mode": "static", "config": {"devices": [{"device_id": "0", "vnpu_count": 2}]}},
        "exporter": {"serviceMonitor": True}})
    values = render.chart_values(spec, Component.DEVICE_PLUGIN, Settings(image="fuyao.local/fuyao:abc"))
    assert values["image"] == {"repository": "reg.example/fuyao", "tag": "9", "pullPolicy": "IfNotPresent"}
    assert values["health"] == {"interval": "2s", "failureThreshold": 7}  # maps merge
    assert values["tolerations"] == [{"operator": "Exists"}]  # lists are replaced
    assert values["nodeSelector"] == {"accelerator": "huawei-ascend-npu", "pool": "npu"}
    assert values["vnpu"] == {"mode": "static", "config": {"devices": [{"device_id": "0", "vnpu_count": 2}]}}
    assert values["metrics"] == {"enabled": True, "serviceMonitor": {"enabled": True}}
    off = render.chart_values(PolicySpec.model_validate({"exporter": {"enabled": False}}), Component.DEVICE_PLUGIN,
                              Settings(image="localhost:5000/fuyao"))
    assert off["vnpu"] == {"mode": "off"} and off["metrics"]["enabled"] is False
    assert off["image"]["repository"] == "localhost:5000/fuyao" and off["image"]["tag"] == "latest"
    with pytest.raises(ValueError, match="validator"):
        render.chart_values(PolicySpec(), Component.VALIDATOR, Settings())


def test_rendered_objects_are_owned_by_the_policy() -> None:
    objects = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "labels": {"helm.sh/chart": "x-1"}}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "b", "namespace": "oops"}},
    ]
    owned = render.owned(objects, POLICY, Component.DEVICE_PLUGIN, "npu-operator")
    assert owned[0]["metadata"]["namespace"] == "npu-operator" and "namespace" not in owned[1]["metadata"]
    for obj in owned:
        meta = obj["metadata"]
        assert meta["ownerReferences"] == [{"apiVersion": "npu.openfuyao.com/v1alpha1", "kind": "NPUClusterPolicy",
                                            "name": "cluster", "uid": "u-1", "controller": True,
                                            "blockOwnerDeletion": True}]
        assert meta["labels"][LABEL_OPERATOR_COMPONENT] == "devicePlugin"
        assert meta["labels"][LABEL_MANAGED_BY] == "fuyao-npu-operator" and "helm.sh/chart" not in meta["labels"]
    assert "ownerReferences" not in objects[0]["metadata"]  # copies


def test_helm_errors_name_the_chart_and_the_key() -> None:
    with pytest.raises(RenderError, match="/vnpu/mode"):
        render.helm_template(REPO / "charts" / "npu-device-plugin", "npu-device-plugin", "ns",
                             {"vnpu": {"mode": "sometimes"}}, helm=binary("helm"))
    with pytest.raises(RenderError, match="not found"):
        render.helm_template(REPO / "charts" / "nope", "x", "ns", {}, helm=binary("helm"))
    with pytest.raises(RenderError, match="helm not found"):
        render.helm_template(REPO / "charts" / "qos-agent", "x", "ns", {}, helm="/nonexistent/helm")


def test_a_policy_asking_for_the_qos_agents_admission_policy_is_refused_naming_the_key() -> None:
    # the chart renders a ValidatingAdmissionPolicy and its binding, kinds the operator may not write: every
    # apply failed mid-way (400) and the component stayed ApplyFailed
    spec = PolicySpec.model_validate({"qosAgent": {"enabled": True, "values": {"nodeRestriction": {"enabled": True}}}})
    with pytest.raises(RenderError, match=r"qosAgent\.values\.nodeRestriction\.enabled"):
        render.chart_values(spec, Component.QOS_AGENT, Settings())
    off = PolicySpec.model_validate({"qosAgent": {"enabled": True, "values": {"nodeRestriction": {"enabled": False}}}})
    assert render.chart_values(off, Component.QOS_AGENT, Settings())["nodeRestriction"] == {"enabled": False}


def test_a_policy_may_not_rename_the_components_cluster_objects(tmp_path: Path) -> None:
    # the operator's ClusterRole writes only the ClusterRoles/Bindings named after the charts (resourceNames): a
    # renamed one would be refused by the API server mid-apply, so the policy is refused first, naming the key
    spec = PolicySpec.model_validate({"qosAgent": {"enabled": True, "values": {"fullnameOverride": "my-qos"}}})
    with pytest.raises(RenderError, match=r"qosAgent\.values\.fullnameOverride"):
        render.chart_values(spec, Component.QOS_AGENT, Settings())
    spec = PolicySpec.model_validate({"devicePlugin": {"values": {"nameOverride": "dp"}}})
    with pytest.raises(RenderError, match=r"devicePlugin\.values\.nameOverride"):
        render.chart_values(spec, Component.DEVICE_PLUGIN, Settings())
    # the names rendered with the operator's own values are exactly those its chart's RBAC lists
    rbac = render.helm_template(REPO / "charts" / "npu-operator", "npu-operator", "ns", {}, helm=binary("helm"))
    named = next(rule["resourceNames"] for doc in rbac if doc.get("kind") == "ClusterRole"
                 for rule in doc["rules"] if "clusterroles" in rule["resources"] and rule.get("resourceNames"))
    rendered = {render.NFD_NAME}
    for component, chart in render.CHARTS.items():
        values = render.chart_values(PolicySpec.model_validate({}), component, Settings())
        docs = render.helm_template(REPO / "charts" / chart, chart, "ns", values, helm=binary("helm"))
        rendered |= {d["metadata"]["name"] for d in docs if d.get("kind") in ("ClusterRole", "ClusterRoleBinding")}
    assert set(named) == rendered


def test_validation_pod_names_fit_and_differ() -> None:
    long_a, long_b = "n" * 200 + ".a", "n" * 200 + ".b"
    names = {render.validator_name(n) for n in ("npu-0", "NPU-0.example.com", long_a, long_b)}
    assert len(names) == 4 and all(len(n) <= 63 and n == n.lower() for n in names)
    pod = render.validator_pod("npu-0", Settings(image="img:1"), "rev1")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["npu.huawei.com/NPU"] == "1"
    assert pod["spec"]["automountServiceAccountToken"] is False and pod["spec"]["restartPolicy"] == "Never"


def test_discovery_labels_exactly_what_it_records(tmp_path: Path) -> None:
    devices = (("0000:c1:00.0", "910B"),)
    found = agents.Discovered(devices=devices, chip_model="910B4", driver_version="24.1.rc3")
    patch = agents.label_patch(found, {"labels": {"team": "a"}})
    assert patch == {"metadata": {"labels": {LABEL_ACCELERATOR: "huawei-ascend-npu", LABEL_ACCELERATE_TYPE: "910B4",
                                             LABEL_NPU_DRIVER: "24.1.rc3"},
                                  "annotations": {ANNOTATION_NFD_LABELS: ",".join(sorted(
                                      [LABEL_ACCELERATOR, LABEL_ACCELERATE_TYPE, LABEL_NPU_DRIVER]))}}}
    labelled = {"labels": {"team": "a", **patch["metadata"]["labels"]}, "annotations": patch["metadata"]["annotations"]}
    assert agents.label_patch(found, labelled) is None
    # the driver version file goes away and npu-smi too: its label goes, nothing else
    fewer = agents.label_patch(agents.Discovered(devices=devices, chip_model="910B4"), labelled)
    assert fewer is not None and fewer["metadata"]["labels"][LABEL_NPU_DRIVER] is None
    # a node without NPUs that discovery never labelled: untouched, whatever its labels
    assert agents.label_patch(agents.Discovered(devices=()), {"labels": {LABEL_ACCELERATOR: "x"}}) is None


def test_discovery_reads_sysfs_npu_smi_and_the_version_file(tmp_path: Path) -> None:
    from fuyao.npu_sim import state as st

    state = tmp_path / "npu.json"
    subprocess.run([sys.executable, FAKE, "fake", "init", "--preset", "310p3-duo-4"], check=True,
                   env={**os.environ, "FAKE_NPU_SMI_STATE": str(state)})
    st.write_sysfs(st.expand({"preset": "310p3-duo-4"}), tmp_path / "sys")
    os.environ["FAKE_NPU_SMI_STATE"] = str(state)
    try:
        found = agents.discover(str(tmp_path / "sys"), FAKE, "/nonexistent")
    finally:
        del os.environ["FAKE_NPU_SMI_STATE"]
    assert {family for _, family in found.devices} == {"310P"} and found.chip_model == "310P3"
    assert found.driver_version and found.firmware_version == "7.5.0.1.220"
    assert agents.label_patch(found, {})["metadata"]["labels"]["npu.openfuyao.com/firmware-version"] == "7.5.0.1.220"
    (tmp_path / "version.info").write_text("Version=23.0.5\nascendhal_version=7.35.19\n")
    only_file = agents.discover(str(tmp_path / "sys"), str(tmp_path / "no-npu-smi"), str(tmp_path / "version.info"))
    assert only_file.driver_version == "23.0.5" and only_file.chip_model is None
    assert agents.discover(str(tmp_path / "empty"), FAKE, "/nonexistent").devices == ()


@pytest.fixture
def npu_node(tmp_path: Path) -> dict[str, str]:
    state = tmp_path / "npu.json"
    env = {**os.environ, "FAKE_NPU_SMI_STATE": str(state)}
    subprocess.run([sys.executable, FAKE, "fake", "init", "--preset", "910b4-8"], check=True, env=env)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "davinci3").touch()
    return env


def test_validation_passes_with_an_npu_and_npu_smi(npu_node: dict[str, str], tmp_path: Path) -> None:
    env = {**npu_node, "ASCEND_VISIBLE_DEVICES": "3"}
    os.environ["FAKE_NPU_SMI_STATE"] = npu_node["FAKE_NPU_SMI_STATE"]
    try:
        passed, report = agents.validate(FAKE, env=env, dev_root=str(tmp_path / "dev"))
        assert passed, report
        assert report.startswith("npu-smi info lists 8 NPU chip(s) (910B4), driver 24.1.rc3")
        assert "ASCEND_VISIBLE_DEVICES=3" in report and report.count("910B4") >= 9
        # every way it can fail says why
        assert agents.validate(FAKE, env={}, dev_root=str(tmp_path / "dev"))[1].startswith(
            "no ASCEND_VISIBLE_DEVICES")
        missing = agents.validate(FAKE, env={"ASCEND_VISIBLE_DEVICES": "4"}, dev_root=str(tmp_path / "dev"))
        assert not missing[0] and "davinci4 missing" in missing[1]
        assert "not in the container" in agents.validate("/nonexistent/npu-smi", env=env,
                                                         dev_root=str(tmp_path / "dev"))[1]
        subprocess.run([sys.executable, FAKE, "fake", "inject", "info", "garbage"], check=True, env=npu_node)
        garbage = agents.validate(FAKE, env=env, dev_root=str(tmp_path / "dev"))
        assert not garbage[0] and "unreadable" in garbage[1]
        subprocess.run([sys.executable, FAKE, "fake", "clear-faults"], check=True, env=npu_node)
        subprocess.run([sys.executable, FAKE, "fake", "inject", "info", "fail"], check=True, env=npu_node)
        failed = agents.validate(FAKE, env=env, dev_root=str(tmp_path / "dev"))
        assert not failed[0] and "npu-smi info exited" in failed[1]
    finally:
        del os.environ["FAKE_NPU_SMI_STATE"]


def test_the_termination_message_fits_what_the_kubelet_keeps(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    agents.write_termination_message("x" * 10_000, str(path))
    assert len(path.read_bytes()) < agents.TERMINATION_LIMIT
    agents.write_termination_message("ok", str(tmp_path / "missing" / "log"))  # logged, not raised


def test_workloads_and_validation_pods_are_read_from_their_status() -> None:
    ds = {"kind": "DaemonSet", "metadata": {"generation": 2},
          "spec": {"selector": {"matchLabels": {"app": "dp"}},
                   "template": {"spec": {"containers": [{"image": "fuyao:7", "ports": [
                       {"name": "metrics", "containerPort": 9400}]}]}}},
          "status": {"observedGeneration": 2, "desiredNumberScheduled": 2, "numberReady": 2,
                     "updatedNumberScheduled": 2}}
    ready = {"type": "Ready", "status": "True"}
    pods = [{"metadata": {"name": "p0", "labels": {"app": "dp"}}, "spec": {"nodeName": "n0"},
             "status": {"podIP": "10.0.0.5", "conditions": [ready]}},
            {"metadata": {"name": "p1", "labels": {"app": "dp"}}, "spec": {"nodeName": "n1"},
             "status": {"conditions": [{"type": "Ready", "status": "False"}]}},
            {"metadata": {"name": "other", "labels": {"app": "x"}}, "spec": {"nodeName": "n1"}, "status": {}},
            {"metadata": {"name": "p2", "labels": {"app": "dp"}}, "spec": {"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchFields": [
                    {"key": "metadata.name", "operator": "In", "values": ["n2"]}]}]}}}}, "status": {}}]
    w = controller._workload(ds, pods)
    assert (w.desired, w.ready, w.updated, w.not_ready_nodes, w.version) == (2, 2, 2, ("n1", "n2"), "7")
    assert controller._metrics_urls(ds, pods) == {"n0": "http://10.0.0.5:9400/metrics"}
    # The pod on n1 was deleted and its replacement is not created yet: the DaemonSet counts one not ready, and the
    # node it selects without a pod is the one named (a node it does not select is not).
    gap = {**ds, "spec": {**ds["spec"], "template": {"spec": {**ds["spec"]["template"]["spec"],
                                                              "nodeSelector": {"npu": "yes"}}}},
           "status": {**ds["status"], "desiredNumberScheduled": 2, "numberReady": 1}}
    nodes = [{"metadata": {"name": n, "labels": {"npu": "yes"}}} for n in ("n0", "n1")] + \
        [{"metadata": {"name": "cpu-0", "labels": {}}}]
    w = controller._workload(gap, pods[:1], nodes)
    assert (w.ready, w.not_ready_nodes) == (1, ("n1",))
    terminating = {**pods[1], "metadata": {**pods[1]["metadata"], "deletionTimestamp": "2026-12-05T00:00:00Z"}}
    assert controller._workload(gap, [pods[0], terminating], nodes).not_ready_nodes == ("n1",)
    pending = {"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "message": "0/1 nodes are available: Insufficient NPU"}]}}
    assert controller._validation_result(pending) == (None, "pending: 0/1 nodes are available: Insufficient NPU")
    done = {"status": {"phase": "Succeeded", "containerStatuses": [
        {"state": {"terminated": {"message": "npu-smi info lists 8 NPU chip(s)\n"}}}]}}
    assert controller._validation_result(done) == (True, "npu-smi info lists 8 NPU chip(s)")
    assert controller._service_url({"spec": {"clusterIP": "fd00::5", "ports": [{"port": 8888}]}}) == \
        "http://[fd00::5]:8888"
    assert controller._service_url({"spec": {"clusterIP": "None", "ports": [{"port": 1}]}}) == ""


def test_the_cli_prints_the_crd_and_refuses_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fuyao.npu_operator.api import crd
    from fuyao.npu_operator.cli import main

    with pytest.raises(SystemExit) as done:
        main(["crd", "-o", "json"])
    assert done.value.code == 0 and json.loads(capsys.readouterr().out) == crd()
    with pytest.raises(SystemExit) as done:
        main(["run", "--resync", "soon"])
    assert done.value.code == 2 and "--resync" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["run", "--nfd-env", "NOVALUE"])
    assert done.value.code == 2 and "NAME=VALUE" in capsys.readouterr().err
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    out = subprocess.run([sys.executable, "-m", "fuyao.npu_operator.cli", "run"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=60)
    assert out.returncode != 0 and "no cluster" in out.stderr
