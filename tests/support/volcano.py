"""Volcano's scheduler objects as its extender plugin sends them (``json.Marshal`` of ``pkg/scheduler/api`` types at
master ``ed72c7c8``; no JSON tags, so PascalCase Go field names, every field present, nil as null). Field lists:
``TaskInfo`` and ``TransactionContext`` (job_info.go), ``NodeInfo`` (node_info.go), ``JobInfo`` (job_info.go),
``QueueInfo`` (queue_info.go), ``Resource`` (resource_info.go); see docs/extender-protocols.md §3.5."""

from __future__ import annotations

from typing import Any

from fuyao.scheduler_extender.volcano_protocol import TaskStatus


def _scalar(requests: dict[str, str]) -> dict[str, float]:
    out: dict[str, float] = {"pods": 1}
    for name, value in requests.items():
        if name not in ("cpu", "memory"):
            out[name] = float(value) * 1000  # Resource.ScalarResources holds MilliValue()
    return out


def resource(requests: dict[str, str] | None = None) -> dict[str, Any]:
    requests = requests or {}
    return {"MilliCPU": 0.0, "Memory": 0.0, "ScalarResources": _scalar(requests), "MaxTaskNum": 0}


def task(pod: dict[str, Any], status: TaskStatus = TaskStatus.PENDING, node: str = "",
         job: str = "") -> dict[str, Any]:
    meta = pod["metadata"]
    requests: dict[str, str] = {}
    for container in pod["spec"].get("containers", []):
        requests.update((container.get("resources") or {}).get("requests") or {})
    return {
        "UID": meta.get("uid", ""), "Job": job, "Name": meta["name"], "Namespace": meta.get("namespace", "default"),
        "TaskRole": "", "Resreq": resource(requests), "InitResreq": resource(requests), "DRAResreq": None,
        "ResourceClaimKeys": None, "ResourceClaimDRAResreq": None,
        # TransactionContext, embedded without a tag: flattened
        "NodeName": node, "EvictionOccurred": status == TaskStatus.RELEASING, "JobAllocatedHyperNode": "",
        "Status": int(status), "LastTransaction": None,
        "Priority": 1, "VolumeReady": False, "Preemptable": True, "BestEffort": False,
        "HasRestartableInitContainer": False, "SchGated": False, "RevocableZone": "",
        "NumaInfo": {"Policy": "", "ResMap": {}}, "Pod": pod, "PodAnnotations": meta.get("annotations"),
        "CustomBindErrHandlerSucceeded": False,
    }


def node_info(node: dict[str, Any], *tasks: dict[str, Any]) -> dict[str, Any]:
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    empty = resource()
    return {
        "Name": node["metadata"]["name"], "Node": node, "State": {"Phase": 1, "Reason": ""},
        "Releasing": empty, "Pipelined": empty, "Idle": resource(allocatable), "Used": empty,
        "Allocatable": resource(allocatable), "Capacity": resource(allocatable), "ResourceUsage": None,
        "Tasks": {f"{t['Namespace']}/{t['Name']}": t for t in tasks},
        "NumaInfo": None, "NumaSchedulerInfo": None, "UnassignedNumaPods": None, "RevocableZone": "",
        "Others": {}, "OversubscriptionNode": False, "OfflineJobEvicting": False, "OversubscriptionResource": None,
        "ImageStates": {}, "Generation": 1, "BindGeneration": 0,
    }


def job_info(name: str, tasks: list[dict[str, Any]], min_available: int = 0, namespace: str = "default",
             min_resources: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"minMember": min_available, "queue": "default"}
    if min_resources is not None:
        spec["minResources"] = min_resources
    by_status: dict[str, dict[str, Any]] = {}
    for t in tasks:
        by_status.setdefault(str(t["Status"]), {})[t["UID"]] = t
    return {
        "UID": f"{namespace}/{name}", "PgUID": f"pg-{name}", "Name": name, "Namespace": namespace, "Queue": "default",
        "Priority": 0, "MinAvailable": min_available, "WaitingTime": None, "JobFitErrors": "",
        "NodesFitErrors": {}, "AllocatedHyperNode": "", "NetworkTopology": None, "SubJobs": {}, "TaskToSubJob": {},
        "MinSubJobs": {}, "TaskStatusIndex": by_status, "Tasks": {t["UID"]: t for t in tasks},
        "TaskMinAvailable": {}, "TaskMinAvailableTotal": 0, "Allocated": resource(), "TotalRequest": resource(),
        "CreationTimestamp": "2026-12-05T00:00:00Z",
        # PodGroup embeds scheduling.PodGroup without a tag: its own keys, flattened next to Version
        "PodGroup": {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup",
                     "metadata": {"name": name, "namespace": namespace}, "spec": spec,
                     "status": {"phase": "Pending"}, "Version": "v1beta1"},
        "ScheduleStartTimestamp": None, "Preemptable": False, "RevocableZone": "", "Budget": None,
    }


def queue_info(name: str = "default") -> dict[str, Any]:
    return {"UID": name, "Name": name, "Weight": 1, "Weights": "", "Hierarchy": "",
            "Queue": {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "Queue", "metadata": {"name": name},
                      "spec": {"weight": 1}, "status": {"state": "Open"}}}
