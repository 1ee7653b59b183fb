"""The NPUClusterPolicy CRD (generated from fuyao.npu_operator.api) on a real kube-apiserver: accepted as structural,
the policy must be named ``cluster``, unknown and invalid fields are refused, status is a subresource, and
``kubectl get npuclusterpolicy`` shows each component's state."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from fuyao.npu_operator.api import GROUP, PLURAL, VERSION, PolicySpec, crd
from fuyao.npu_operator.status import Observed, policy_status
from tests.support.apiserver import LocalApiServer, binary, control_plane
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalApiServer]:
    from kubernetes import client, config

    with control_plane() as server:
        api = config.new_client_from_config(config_file=server.kubeconfig_for("admin"))
        ext = client.ApiextensionsV1Api(api)
        ext.create_custom_resource_definition(crd())

        def established() -> bool:
            got = ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
            return any(c.type == "Established" and c.status == "True" for c in got.status.conditions or ())

        wait_for(established, 30, "the CRD established")
        yield server


def objects(server: LocalApiServer):  # type: ignore[no-untyped-def]
    from kubernetes import client, config

    return client.CustomObjectsApi(config.new_client_from_config(config_file=server.kubeconfig_for("admin")))


def policy(name: str = "cluster", spec: dict | None = None) -> dict:  # type: ignore[type-arg]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NPUClusterPolicy", "metadata": {"name": name},
            "spec": spec if spec is not None else {"driver": {"version": "24.1.rc2"}, "vnpu": {"enabled": True}}}


def test_the_crd_validates_policies(cluster: LocalApiServer) -> None:
    from kubernetes.client.exceptions import ApiException

    api = objects(cluster)
    created = api.create_cluster_custom_object(GROUP, VERSION, PLURAL, policy())
    assert PolicySpec.model_validate(created["spec"]).driver.version == "24.1.rc2"
    with pytest.raises(ApiException) as err:
        api.create_cluster_custom_object(GROUP, VERSION, PLURAL, policy("second"))
    assert err.value.status == 422 and "must be named cluster" in err.value.body
    for bad, fragment in (({"devicePlugin": {"enabeld": True}}, "enabeld"),
                          ({"vnpu": {"mode": "sometimes"}}, "sometimes"),
                          ({"devicePlugin": {"healthInterval": "soon"}}, "healthInterval")):
        with pytest.raises(ApiException) as err:
            api.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "cluster", {"spec": bad},
                                            field_validation="Strict")
        assert err.value.status in (400, 422) and fragment in err.value.body, err.value.body


def test_status_is_a_subresource_and_kubectl_shows_the_states(cluster: LocalApiServer) -> None:
    api = objects(cluster)
    current = api.get_cluster_custom_object(GROUP, VERSION, PLURAL, "cluster")
    spec = PolicySpec.model_validate(current["spec"])
    status = policy_status(spec, Observed(npu_nodes=("npu-0",)), current["metadata"]["generation"])
    body = {"status": status.model_dump(mode="json", by_alias=True, exclude_none=True)}
    api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, "cluster", body)
    # a status in the main resource is ignored (the subresource owns it)
    api.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "cluster", {"status": {"observedGeneration": 99}})
    stored = api.get_cluster_custom_object(GROUP, VERSION, PLURAL, "cluster")
    assert stored["status"]["observedGeneration"] == current["metadata"]["generation"]
    assert PolicySpec.model_validate(stored["spec"]) == spec
    out = subprocess.run([binary("kubectl"), f"--kubeconfig={cluster.kubeconfig_for('admin')}", "get",
                          "npuclusterpolicy", "cluster"], capture_output=True, text=True, timeout=30, check=True).stdout
    header, row = out.splitlines()[:2]
    assert header.split()[:6] == ["NAME", "READY", "DEVICEPLUGIN", "SCHEDULEREXTENDER", "VALIDATOR", "DRIVER"]
    assert row.split()[:6] == ["cluster", "False", "pending", "pending", "pending", "pending"]
