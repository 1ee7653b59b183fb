"""Checks shared by the end-to-end modules."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from fuyao.contracts import ANNOTATION_POD_ASSIGNED, RESOURCE_NPU, PodAssignment, parse_annotation
from tests.support.cluster import LocalCluster
from tests.support.polling import wait_for


def planned_and_visible_npus(cluster: LocalCluster, pod: dict[str, Any], container: str = "main"
                             ) -> tuple[PodAssignment, list[str], str]:
    """The extender's assignment of a running pod that prints ``ASCEND_VISIBLE_DEVICES=…``, the physical ids its
    container really sees, and its log."""
    meta = pod["metadata"]
    assignment = parse_annotation(ANNOTATION_POD_ASSIGNED, meta["annotations"][ANNOTATION_POD_ASSIGNED],
                                  PodAssignment)  # written by the extender's bind
    log = wait_for(lambda: "ASCEND_VISIBLE_DEVICES=" in (text := cluster.pod_log(meta["namespace"], meta["name"],
                                                                                container)) and text,
                   30, f"the log of {meta['name']}")
    visible = log.split("ASCEND_VISIBLE_DEVICES=", 1)[1].split()[0].split(",")
    return assignment, visible, log


def npu_pod(name: str, npus: int, scheduler_name: str | None = None) -> dict[str, Any]:
    """A busybox pod asking for ``npus`` NPUs that prints its environment (``ASCEND_VISIBLE_DEVICES``)."""
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
        "containers": [{"name": "main", "image": "fuyao.local/busybox:1", "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "env; sleep 3600"],
                        "resources": {"limits": {RESOURCE_NPU: str(npus)}}}]}
    if scheduler_name:
        spec["schedulerName"] = scheduler_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"}, "spec": spec}



def explain(cluster: LocalCluster, name: str) -> dict[str, Any]:
    """The host extender's /explain of pod ``default/<name>`` (its filter and prioritize decisions)."""
    with urllib.request.urlopen(f"{cluster.extender_url}/explain/default/{name}", timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]
