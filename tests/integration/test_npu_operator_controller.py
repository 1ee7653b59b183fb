"""The NPU operator's controller on a real kube-apiserver, run as a user holding exactly the RBAC its chart grants
(so the API server's escalation check proves the operator may create its components' ClusterRoles): a policy
installs the components from fuyao's charts, owned by the policy; drift is corrected; a disabled component is
removed; the status reports driver mismatches and validation results with the node's name; deleting the policy
removes the node labels discovery set and nothing an administrator set. No kubelet runs here, so workloads stay
unready (the e2e test runs them)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fuyao.contracts import (
    ANNOTATION_NFD_LABELS,
    ANNOTATION_NODE_USAGE,
    LABEL_ACCELERATE_TYPE,
    LABEL_ACCELERATOR,
    LABEL_NPU_DRIVER,
    LABEL_OPERATOR_COMPONENT,
    RESOURCE_BATCH_CPU,
    RESOURCE_BATCH_MEMORY,
    RESOURCE_NPU,
)
from fuyao.npu_operator import agents
from fuyao.npu_operator.api import GROUP, PLURAL, VERSION, crd
from fuyao.npu_operator.controller import FINALIZER, Controller
from fuyao.npu_operator.kube import Rest
from fuyao.npu_operator.render import Settings, validator_name
from tests.support.apiserver import LocalApiServer, binary
from tests.support.k8s_objects import node
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NS = "npu-operator"
USER = "npu-operator"


def _chart_rbac() -> list[dict[str, Any]]:
    """The npu-operator chart's ClusterRole and Role, bound to USER instead of the chart's ServiceAccount (not the
    hooks' own: the CRD upgrade Job's account is another)."""
    out = subprocess.run([binary("helm"), "template", "npu-operator", str(REPO / "charts" / "npu-operator"),
                          "--namespace", NS], capture_output=True, text=True, check=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] in ("ClusterRole", "Role",
                                                                       "ClusterRoleBinding", "RoleBinding")
            and "helm.sh/hook" not in (d["metadata"].get("annotations") or {})]
    for doc in docs:
        doc["metadata"].pop("labels", None)
        if doc["kind"].endswith("Binding"):
            doc["subjects"] = [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]
    return docs


@pytest.fixture(scope="module")
def server() -> Iterator[LocalApiServer]:
    from kubernetes import client, config

    srv = LocalApiServer(users={USER: []}).start()
    try:
        admin = config.new_client_from_config(config_file=srv.kubeconfig_for("admin"))
        ext = client.ApiextensionsV1Api(admin)
        ext.create_custom_resource_definition(crd())
        wait_for(lambda: any(c.type == "Established" and c.status == "True" for c in
                             ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status.conditions or ()),
                 30, "the CRD established")
        srv.create([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": NS}},
                    *_chart_rbac()])
        srv.add_node(node("npu-0", labels={LABEL_ACCELERATOR: "huawei-ascend-npu", LABEL_NPU_DRIVER: "24.1.rc3"}))
        srv.add_node(node("cpu-0", npus=0, labels={"team": "infra"}))
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def controller(server: LocalApiServer) -> Controller:
    from kubernetes import config

    rest = Rest(config.new_client_from_config(config_file=server.kubeconfig_for(USER)))
    settings = Settings(namespace=NS, image="fuyao.local/fuyao:test", charts_dir=REPO / "charts",
                        helm=binary("helm"))
    return Controller(rest, settings, probe=lambda url, timeout: True)


def admin(server: LocalApiServer) -> Rest:
    from kubernetes import config

    return Rest(config.new_client_from_config(config_file=server.kubeconfig_for("admin")))


POLICY = f"/apis/{GROUP}/{VERSION}/{PLURAL}/cluster"


def states(status: Any) -> dict[str, tuple[str, str]]:
    return {s.name.value: (s.state.type.value, s.state.message) for s in status.component_statuses}


def test_a_policy_installs_its_components_owned_by_it(server: LocalApiServer, controller: Controller) -> None:
    rest = admin(server)
    rest.request("POST", f"/apis/{GROUP}/{VERSION}/{PLURAL}", body={
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "NPUClusterPolicy", "metadata": {"name": "cluster"},
        "spec": {"driver": {"version": "24.1.rc3"}}})
    status = controller.reconcile()
    assert status is not None
    policy = rest.get(POLICY)
    assert FINALIZER in policy["metadata"]["finalizers"]
    uid = policy["metadata"]["uid"]
    expected = {("DaemonSet", "npu-device-plugin"), ("DaemonSet", "npu-node-feature-discovery"),
                ("Deployment", "scheduler-extender"), ("ConfigMap", "scheduler-extender"),
                ("ClusterRole", "npu-device-plugin"), ("ClusterRole", "scheduler-extender"),
                ("ClusterRoleBinding", "npu-node-feature-discovery")}
    for kind, name in expected:
        path = {"DaemonSet": f"/apis/apps/v1/namespaces/{NS}/daemonsets/{name}",
                "Deployment": f"/apis/apps/v1/namespaces/{NS}/deployments/{name}",
                "ConfigMap": f"/api/v1/namespaces/{NS}/configmaps/{name}",
                "ClusterRole": f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{name}",
                "ClusterRoleBinding": f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{name}"}[kind]
        obj = rest.get(path)
        assert obj is not None, f"{kind} {name} was not applied"
        ref = obj["metadata"]["ownerReferences"][0]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("NPUClusterPolicy", "cluster", uid, True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "fuyao-npu-operator"
    assert rest.get("/apis/apps/v1/namespaces/npu-operator/daemonsets/qos-agent") is None  # disabled by default
    plugin = rest.get(f"/apis/apps/v1/namespaces/{NS}/daemonsets/npu-device-plugin")
    assert plugin["spec"]["template"]["spec"]["containers"][0]["image"] == "fuyao.local/fuyao:test"
    # one validation pod per NPU node, asking for one NPU through the scheduler
    pods = rest.list(f"/api/v1/namespaces/{NS}/pods")
    assert [p["metadata"]["name"] for p in pods] == [validator_name("npu-0")]
    container = pods[0]["spec"]["containers"][0]
    assert container["resources"]["limits"][RESOURCE_NPU] == "1"
    assert pods[0]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "npu-0"}
    got = states(status)
    assert got["driver"][0] == "running" and got["qosAgent"][0] == "disabled"
    assert got["devicePlugin"][0] == "pending" and got["validator"][0] == "pending"
    stored = rest.get(POLICY)["status"]
    assert stored["observedGeneration"] == policy["metadata"]["generation"]
    ready = next(c for c in stored["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "devicePlugin" in ready["message"]


def test_drift_is_corrected(server: LocalApiServer, controller: Controller) -> None:
    rest = admin(server)
    ds = f"/apis/apps/v1/namespaces/{NS}/daemonsets/npu-device-plugin"
    rest.request("PATCH", ds, body=[{"op": "replace", "path": "/spec/template/spec/containers/0/image",
                                     "value": "evil.example/fuyao:1"}], content_type="application/json-patch+json")
    rest.request("DELETE", f"/api/v1/namespaces/{NS}/configmaps/scheduler-extender")
    controller.reconcile()
    assert rest.get(ds)["spec"]["template"]["spec"]["containers"][0]["image"] == "fuyao.local/fuyao:test"
    assert rest.get(f"/api/v1/namespaces/{NS}/configmaps/scheduler-extender") is not None


def test_bad_chart_values_fail_the_component_and_keep_what_runs(server: LocalApiServer,
                                                               controller: Controller) -> None:
    rest = admin(server)
    rest.merge_patch(POLICY, {"spec": {"devicePlugin": {"values": {"vnpu": {"mode": "sometimes"}}},
                                       "schedulerExtender": {"values": {"scheduler": {"enabled": True}}}}})
    try:
        got = states(controller.reconcile())
        assert got["devicePlugin"][0] == "failed" and "/vnpu/mode" in got["devicePlugin"][1]
        assert got["schedulerExtender"][0] == "failed" and "second kube-scheduler" in got["schedulerExtender"][1]
        assert rest.get(f"/apis/apps/v1/namespaces/{NS}/daemonsets/npu-device-plugin") is not None
        assert rest.get(f"/apis/apps/v1/namespaces/{NS}/deployments/scheduler-extender") is not None
    finally:
        rest.merge_patch(POLICY, {"spec": {"devicePlugin": {"values": None}, "schedulerExtender": {"values": None}}})
    got = states(controller.reconcile())
    assert got["devicePlugin"][0] == "pending" and got["schedulerExtender"][0] == "pending"


def test_a_disabled_component_is_removed(server: LocalApiServer, controller: Controller) -> None:
    rest = admin(server)
    rest.merge_patch(POLICY, {"spec": {"schedulerExtender": {"enabled": False}}})
    status = controller.reconcile()
    assert rest.get(f"/apis/apps/v1/namespaces/{NS}/deployments/scheduler-extender") is None
    assert rest.get("/apis/rbac.authorization.k8s.io/v1/clusterroles/scheduler-extender") is None
    assert states(status)["schedulerExtender"][0] == "disabled"
    left = rest.list(f"/api/v1/namespaces/{NS}/configmaps", f"{LABEL_OPERATOR_COMPONENT}=schedulerExtender")
    assert left == []
    rest.merge_patch(POLICY, {"spec": {"schedulerExtender": {"enabled": True}}})
    controller.reconcile()
    assert rest.get(f"/apis/apps/v1/namespaces/{NS}/deployments/scheduler-extender") is not None


def _batch_resources(rest: Rest, name: str) -> dict[str, set[str]]:
    status = rest.get(f"/api/v1/nodes/{name}")["status"]
    return {field: {k for k in status.get(field) or {} if k in (RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY)}
            for field in ("capacity", "allocatable")}


def _as_the_qos_agent(rest: Rest, name: str) -> None:
    """What the QoS agent writes on a node (no kubelet runs its pods here)."""
    values = {RESOURCE_BATCH_CPU: "12000", RESOURCE_BATCH_MEMORY: "1073741824"}
    rest.merge_patch(f"/api/v1/nodes/{name}/status", {"status": {"capacity": values, "allocatable": values}})
    rest.merge_patch(f"/api/v1/nodes/{name}", {"metadata": {"annotations": {ANNOTATION_NODE_USAGE: "{}"}}})


def test_a_disabled_qos_agent_leaves_no_extended_resources(server: LocalApiServer, controller: Controller) -> None:
    rest = admin(server)
    rest.merge_patch(POLICY, {"spec": {"qosAgent": {"enabled": True}}})
    controller.reconcile()
    assert rest.get(f"/apis/apps/v1/namespaces/{NS}/daemonsets/qos-agent") is not None
    _as_the_qos_agent(rest, "npu-0")
    controller.reconcile()  # enabled: the agent's resources are its own
    assert _batch_resources(rest, "npu-0") == {"capacity": {RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY},
                                               "allocatable": {RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY}}
    rest.merge_patch(POLICY, {"spec": {"qosAgent": {"enabled": False}}})
    status = controller.reconcile()  # no pod of it runs (no kubelet): removed at once
    assert states(status)["qosAgent"][0] == "disabled"
    assert rest.get(f"/apis/apps/v1/namespaces/{NS}/daemonsets/qos-agent") is None
    assert _batch_resources(rest, "npu-0") == {"capacity": set(), "allocatable": set()}
    node0 = rest.get("/api/v1/nodes/npu-0")
    assert ANNOTATION_NODE_USAGE not in (node0["metadata"].get("annotations") or {})
    assert node0["status"]["allocatable"][RESOURCE_NPU] == "8"  # nothing else goes
    _as_the_qos_agent(rest, "npu-0")  # an agent installed otherwise while the policy's is off: left alone
    controller.reconcile()
    assert _batch_resources(rest, "npu-0")["allocatable"] == {RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY}
    rest.merge_patch("/api/v1/nodes/npu-0/status", {"status": {
        "capacity": {RESOURCE_BATCH_CPU: None, RESOURCE_BATCH_MEMORY: None},
        "allocatable": {RESOURCE_BATCH_CPU: None, RESOURCE_BATCH_MEMORY: None}}})
    rest.merge_patch("/api/v1/nodes/npu-0", {"metadata": {"annotations": {ANNOTATION_NODE_USAGE: None}}})


def test_the_operators_own_status_write_is_not_repeated(server: LocalApiServer, controller: Controller) -> None:
    rest = admin(server)
    controller.reconcile()
    # a key a newer operator's status carries (its CRD, which Helm never downgrades, keeps it) is read past
    rest.request("PATCH", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PLURAL}.{GROUP}", body=[
        {"op": "add", "path": "/spec/versions/0/schema/openAPIV3Schema/properties/status/properties/upgradeState",
         "value": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}],
        content_type="application/json-patch+json")
    try:
        wait_for(lambda: _with_upgrade_state(rest), 30, "the CRD keeping status.upgradeState")
        before = rest.get(POLICY)
        controller.reconcile()
        after = rest.get(POLICY)
        assert after["status"]["upgradeState"] == {"phase": "idle"}
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # nothing written
    finally:
        rest.request("PATCH", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PLURAL}.{GROUP}",
                     body=crd(), content_type="application/merge-patch+json")


def _with_upgrade_state(rest: Rest) -> bool:
    rest.merge_patch(POLICY + "/status", {"status": {"upgradeState": {"phase": "idle"}}})
    return (rest.get(POLICY).get("status") or {}).get("upgradeState") == {"phase": "idle"}


def test_a_driver_mismatch_names_the_node(server: LocalApiServer, controller: Controller) -> None:
    rest = admin(server)
    rest.merge_patch("/api/v1/nodes/npu-0", {"metadata": {"labels": {LABEL_NPU_DRIVER: "23.0.5"}}})
    try:
        driver = states(controller.reconcile())["driver"]
        assert driver[0] == "degraded" and "expected driver 24.1.rc3, found 23.0.5 on npu-0" in driver[1]
    finally:
        rest.merge_patch("/api/v1/nodes/npu-0", {"metadata": {"labels": {LABEL_NPU_DRIVER: "24.1.rc3"}}})


def test_the_validation_result_reaches_the_status(server: LocalApiServer, controller: Controller) -> None:
    rest = admin(server)
    pod = f"/api/v1/namespaces/{NS}/pods/{validator_name('npu-0')}"

    def finish(phase: str, message: str) -> None:
        rest.merge_patch(pod + "/status", {"status": {"phase": phase, "containerStatuses": [{
            "name": "validator", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0 if phase == "Succeeded" else 1, "message": message,
                                     "finishedAt": "2026-12-05T00:00:00Z", "startedAt": "2026-12-05T00:00:00Z"}},
        }]}})

    finish("Failed", "npu-smi info exited 2: dcmi module initialize failed")
    controller.validator_retry_s = 1e9  # keep the failed pod for this check
    validator = states(controller.reconcile())["validator"]
    assert validator[0] == "failed" and "npu-0" in validator[1] and "dcmi module initialize failed" in validator[1]
    controller.validator_retry_s = 0.0  # a failed validation is retried: a new pod replaces it
    controller.reconcile()
    wait_for(lambda: (rest.get(pod) or {}).get("status", {}).get("phase") in (None, "Pending"), 30,
             "a new validation pod")
    controller.reconcile()
    finish("Succeeded", "npu-smi info lists 8 NPU chip(s) (910B4)")
    validator = states(controller.reconcile())["validator"]
    assert validator == ("running", "a one-NPU pod ran npu-smi info on 1 node(s)")


def test_a_node_labelled_later_is_served_without_touching_the_policy(server: LocalApiServer,
                                                                    controller: Controller) -> None:
    rest = admin(server)
    generation = rest.get(POLICY)["metadata"]["generation"]
    server.add_node(node("npu-1", labels={LABEL_NPU_DRIVER: "24.1.rc3"}))
    controller.reconcile()
    assert rest.get(f"/api/v1/namespaces/{NS}/pods/{validator_name('npu-1')}") is None  # not an NPU node yet
    rest.merge_patch("/api/v1/nodes/npu-1", {"metadata": {"labels": {LABEL_ACCELERATOR: "huawei-ascend-npu"}}})
    status = controller.reconcile()
    assert rest.get(f"/api/v1/namespaces/{NS}/pods/{validator_name('npu-1')}") is not None
    assert status is not None and status.observed_generation == generation
    driver = next(s for s in status.component_statuses if s.name.value == "driver")
    assert driver.nodes.desired == 2
    validator = states(status)["validator"]
    assert validator[0] == "pending" and "npu-1" in validator[1]


def test_deleting_the_policy_removes_discovery_labels_only(server: LocalApiServer, controller: Controller,
                                                           tmp_path: Path) -> None:
    from fuyao.npu_sim import state as st

    rest = admin(server)
    _as_the_qos_agent(rest, "cpu-0")
    sysfs = tmp_path / "sys"
    st.write_sysfs(st.expand({"preset": "910b4-8"}), sysfs)
    found = agents.discover(str(sysfs), str(tmp_path / "no-npu-smi"), str(tmp_path / "no-version.info"))
    assert len(found.devices) == 8 and found.chip_model is None
    # discovery on cpu-0 (pretend it has NPUs): it records exactly the keys it set; team=infra is the admin's
    meta = rest.get("/api/v1/nodes/cpu-0")["metadata"]
    patch = agents.label_patch(found, meta)
    assert patch is not None
    rest.merge_patch("/api/v1/nodes/cpu-0", patch)
    labelled = rest.get("/api/v1/nodes/cpu-0")["metadata"]
    assert labelled["labels"][LABEL_ACCELERATOR] == "huawei-ascend-npu"
    assert labelled["labels"][LABEL_ACCELERATE_TYPE] == "910B"
    assert agents.label_patch(found, labelled) is None  # idempotent
    rest.request("DELETE", POLICY)
    assert controller.reconcile() is None
    wait_for(lambda: rest.get(POLICY) is None, 30, "the policy gone once its finalizer ran")
    after = rest.get("/api/v1/nodes/cpu-0")["metadata"]
    assert LABEL_ACCELERATOR not in after["labels"] and LABEL_ACCELERATE_TYPE not in after["labels"]
    assert ANNOTATION_NFD_LABELS not in (after.get("annotations") or {})
    assert after["labels"]["team"] == "infra"
    assert _batch_resources(rest, "cpu-0") == {"capacity": set(), "allocatable": set()}  # the QoS agent's went too
    assert ANNOTATION_NODE_USAGE not in (after.get("annotations") or {})
    npu0 = rest.get("/api/v1/nodes/npu-0")["metadata"]["labels"]
    assert npu0[LABEL_ACCELERATOR] == "huawei-ascend-npu"  # set by the administrator, never recorded: kept
    assert rest.list(f"/api/v1/namespaces/{NS}/pods", f"{LABEL_OPERATOR_COMPONENT}=validator") == [] or all(
        p["metadata"].get("deletionTimestamp") for p in rest.list(f"/api/v1/namespaces/{NS}/pods"))
