"""The test clusters' ``get_json`` reads plain gets from the API server and leaves anything else to kubectl
(``tests.support.kubectl.rest_path``)."""

from __future__ import annotations

import pytest

from tests.support.kubectl import rest_path


@pytest.mark.parametrize(("args", "path"), [
    (("pod", "x"), "/api/v1/namespaces/default/pods/x"),
    (("pods", "-n", "kube-system", "-l", "app=a,b in (c)"),
     "/api/v1/namespaces/kube-system/pods?labelSelector=app%3Da%2Cb+in+%28c%29"),
    (("pods", "-A", "--field-selector", "spec.nodeName=n1"), "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1"),
    (("node", "n1"), "/api/v1/nodes/n1"),
    (("nodes", "-n", "ignored"), "/api/v1/nodes"),  # kubectl ignores a namespace for cluster-scoped kinds too
    (("lease", "-n", "ns", "extender"), "/apis/coordination.k8s.io/v1/namespaces/ns/leases/extender"),
    (("crd", "rayclusters.ray.io"), "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/rayclusters.ray.io"),
    (("events", "--field-selector", "involvedObject.name=w"),
     "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dw"),
])
def test_plain_gets_become_api_paths(args: tuple[str, ...], path: str) -> None:
    assert rest_path(args) == path


@pytest.mark.parametrize("args", [
    (),
    ("rayservice", "x"),  # a kind the table does not know
    ("pods,services",),  # several kinds
    ("pod", "x", "-o", "wide"),  # an option it does not read
    ("pod", "x", "y"),  # two names
    ("pod", "x", "-A"),  # a name across namespaces: kubectl's error
    ("pod", "-n"),  # a flag without its value
])
def test_anything_else_is_left_to_kubectl(args: tuple[str, ...]) -> None:
    assert rest_path(args) is None
