"""The npu-operator chart's CRD hook: Helm installs ``crds/`` once and never upgrades them, so ``helm install`` and
``helm upgrade`` run a pre-install/pre-upgrade Job (the GPU Operator's ``operator.upgradeCRD``) that applies the CRD
with the operator's own image, as a ServiceAccount that may touch that one CRD only; ``operator.upgradeCRD=false``
leaves it out."""

from __future__ import annotations

from pathlib import Path

from fuyao.npu_operator.api import CRD_NAME
from fuyao.npu_operator.cli import build_parser
from tests.charts.test_charts import of_kind, render

HOOK_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Job")


def hooks(docs: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    return [d for d in docs if "pre-install" in (d["metadata"].get("annotations") or {}).get("helm.sh/hook", "")]


def test_a_pre_install_and_pre_upgrade_job_applies_the_crd_with_least_privilege(tmp_path: Path) -> None:
    docs = render("npu-operator", "custom", tmp_path)
    found = hooks(docs)
    assert sorted(d["kind"] for d in found) == sorted(HOOK_KINDS)
    for doc in found:
        notes = doc["metadata"]["annotations"]
        assert set(notes["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
        # its cluster-wide RBAC goes also when the Job failed (hooks are no release's objects: helm uninstall
        # would never remove them); the Job stays then, for its logs
        assert set(notes["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"} | (
            set() if doc["kind"] == "Job" else {"hook-failed"})
    weight = {d["kind"]: int(d["metadata"]["annotations"]["helm.sh/hook-weight"]) for d in found}
    assert max(weight[k] for k in HOOK_KINDS[:3]) < weight["Job"]  # its RBAC exists before the Job runs

    role = next(d for d in found if d["kind"] == "ClusterRole")
    assert role["rules"] == [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                              "resourceNames": [CRD_NAME], "verbs": ["get", "create", "patch", "update"]}]
    binding = next(d for d in found if d["kind"] == "ClusterRoleBinding")
    account = next(d for d in found if d["kind"] == "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "fuyao-system"}]
    operator_sa = {d["metadata"]["name"] for d in of_kind(docs, "ServiceAccount") if d not in found}
    assert account["metadata"]["name"] not in operator_sa  # its own account, not the operator's

    job = next(d for d in found if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    deployment = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    container = pod["containers"][0]
    assert container["image"] == deployment["image"] == "registry.example.com/fuyao:1.2.3"  # the operator's image
    args = build_parser().parse_args(container["command"][1:])  # a subcommand the operator has
    assert container["command"][0] == "fuyao-npu-operator" and args.command == "apply-crd"


def test_the_hook_can_be_turned_off(tmp_path: Path) -> None:
    assert hooks(render("npu-operator", "default", tmp_path, "--set", "operator.upgradeCRD=false")) == []
    assert len(hooks(render("npu-operator", "default", tmp_path))) == len(HOOK_KINDS)  # on by default
