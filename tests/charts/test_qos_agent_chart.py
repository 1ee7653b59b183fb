"""The qos-agent chart's node-facing parts: the kubelet's root directory mounted read-only for its CPU manager
checkpoint (named in the agent's config), and the optional ValidatingAdmissionPolicy that limits the agent's service
account to its own Node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.charts.test_charts import K8S_VERSION, config_map, of_kind, render
from tests.support.apiserver import BIN

pytestmark = pytest.mark.skipif(not (BIN / "helm").exists(), reason="helm not built yet (hack/build-upstream.sh)")

NODE_NAME = "authentication.kubernetes.io/node-name"


def _agent(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (daemonset,) = of_kind(docs, "DaemonSet")
    return daemonset["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def test_the_kubelet_root_is_mounted_read_only_and_named_in_the_config(tmp_path: Path) -> None:
    from fuyao.qos.config import build_config

    # not under the default CFS quota policy: the directory holds the kubelet's credentials and pods' volumes
    assert not [v for v in _agent(render("qos-agent", "default", tmp_path))["volumes"] if v["name"] == "kubelet"]
    docs = render("qos-agent", "default", tmp_path, "--set", "config.cpuSuppress.policy=cpuset")
    spec = _agent(docs)
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "kubelet"]
    assert mount == {"name": "kubelet", "mountPath": "/host/var/lib/kubelet", "readOnly": True}
    (volume,) = [v for v in spec["volumes"] if v["name"] == "kubelet"]
    assert volume["hostPath"] == {"path": "/var/lib/kubelet", "type": "Directory"}
    config = build_config(config_map(docs, "config.yaml"))
    assert config.cpu_manager_state_file == "/host/var/lib/kubelet/cpu_manager_state"
    assert not of_kind(docs, "ValidatingAdmissionPolicy")  # off by default
    off = render("qos-agent", "default", tmp_path, "--set", "config.cpuSuppress.policy=cpuset", "--set",
                 "kubeletRootDir=")
    assert not [v for v in _agent(off)["volumes"] if v["name"] == "kubelet"]
    assert build_config(config_map(off, "config.yaml")).cpu_manager_state_file == ""


def test_the_node_restriction_policy_binds_the_agents_account_to_its_own_node(tmp_path: Path) -> None:
    docs = render("qos-agent", "default", tmp_path, "--set", "nodeRestriction.enabled=true")
    (policy,) = of_kind(docs, "ValidatingAdmissionPolicy")
    (binding,) = of_kind(docs, "ValidatingAdmissionPolicyBinding")
    for doc in (policy, binding):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["nodes", "nodes/status"] and rule["operations"] == ["UPDATE"]
    (condition,) = spec["matchConditions"]
    assert condition["expression"] == "request.userInfo.username == 'system:serviceaccount:fuyao-system:rel-qos-agent'"
    expressions = [v["expression"] for v in spec["validations"]]
    assert any(f"request.userInfo.extra['{NODE_NAME}'][0]" in e and "object.metadata.name" in e for e in expressions)
    assert f"'{NODE_NAME}' in request.userInfo.extra" in [v["expression"] for v in spec["variables"]]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
