"""fuyao's Helm charts on the local cluster: the values that fit it, install in the documented order, uninstall.

The charts are installed as a platform engineer would (``helm install`` of each chart into one namespace, in the
order of docs/install.md); only the values differ from a real cluster: the locally built image (no registry), the
harness's host paths (fake npu-smi, its state, device nodes, the kubelet's pod-resources directory) and the fixed
ClusterIP the host's kube-scheduler calls the extender at.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from fuyao.contracts import ACCELERATOR_ASCEND_NPU, LABEL_ACCELERATOR

from .apiserver import binary
from .cluster import EXTENDER_CLUSTER_IP, REPO, LocalCluster
from .kind import KindCluster

CHARTS = REPO / "charts"
INSTALL_ORDER = ("npu-device-plugin", "scheduler-extender", "qos-agent", "ai-inference-optimization")
"""docs/install.md's order: NPUs advertised, then the scheduler that places NPU pods, then the node agent and the
inference workloads."""
NAMESPACE = "fuyao-system"
PART_OF = "app.kubernetes.io/part-of=fuyao"


def helm(*args: str, kubeconfig: Path | None = None, timeout: float = 600) -> str:
    command = [binary("helm"), *args]
    if kubeconfig is not None:
        command += ["--kubeconfig", str(kubeconfig)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def local_values(cluster: LocalCluster, image: str) -> dict[str, dict[str, Any]]:
    """Per chart, the values for the local cluster (``image``: ``repository:tag`` imported into its containerd)."""
    repository, _, tag = image.rpartition(":")
    common = {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"}}
    npu_dir = str(cluster.npu_state.parent)
    return {
        "npu-device-plugin": {
            **common,
            "npuSmi": {"path": str(REPO / "hack" / "fake-npu-smi")},
            "hostPaths": {"dev": str(cluster.dir / "dev"), "state": str(cluster.dir / "fuyao-state"), "driver": [],
                          "podResources": str(cluster.dir / "kubelet" / "pod-resources")},
            "health": {"interval": "1s"},
            # the simulated driver makes vdavinci<id> under the dev root with a vNPU, as the real one does in /dev
            "extraEnv": [{"name": "FAKE_NPU_SMI_STATE", "value": str(cluster.npu_state)},
                         {"name": "FAKE_NPU_SMI_DEV", "value": str(cluster.dir / "dev")}],
            "extraVolumes": [{"name": "fake-npu", "hostPath": {"path": npu_dir, "type": "Directory"}}],
            "extraVolumeMounts": [{"name": "fake-npu", "mountPath": npu_dir}],
        },
        "scheduler-extender": {**common, "service": {"clusterIP": EXTENDER_CLUSTER_IP}},
        "qos-agent": {**common, "tolerations": [], "interval": "2s"},
        "ai-inference-optimization": {**common, "router": {"replicas": 1, "pdSeparation": {"enabled": True}},
                                      "kvCache": {"size": "256Mi", "blockSize": 16}},  # the engine simulator's blocks
    }


def monitoring_values(interval: str = "5s") -> dict[str, dict[str, Any]]:
    """Per chart, what ``--monitoring`` adds: its ServiceMonitors (scraped every ``interval``), PrometheusRules and the
    dashboard ConfigMap."""
    on = {"enabled": True, "interval": interval}
    return {
        "npu-device-plugin": {"metrics": {"serviceMonitor": on, "prometheusRule": {"enabled": True}}},
        "scheduler-extender": {"metrics": {"serviceMonitor": on, "prometheusRule": {"enabled": True}}},
        "qos-agent": {"metrics": {"serviceMonitor": on, "prometheusRule": {"enabled": True}}},
        "ai-inference-optimization": {"monitoring": {"serviceMonitor": on, "prometheusRule": {"enabled": True},
                                                     "grafanaDashboard": {"enabled": True}}},
    }


def merge_values(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, mappings merged key by key (as Helm merges values files)."""
    out = dict(base)
    for key, value in extra.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_values(out[key], value) if nested else value
    return out


def install_stack(cluster: LocalCluster | KindCluster, image: str, namespace: str = NAMESPACE, timeout: str = "240s",
                  log: Any = print, monitoring: bool = False,
                  extra: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """Label the NPU node as an administrator would, then ``helm install --wait`` every chart in order (``monitoring``:
    with their ServiceMonitors, PrometheusRules and dashboard; ``extra``: more values per chart). Returns the seconds
    each install took (until its pods were Ready)."""
    cluster.kubectl("label", "node", cluster.node, f"{LABEL_ACCELERATOR}={ACCELERATOR_ASCEND_NPU}", "--overwrite")
    kubeconfig = cluster.dir / "admin.kubeconfig"
    values = cluster.chart_values(image)
    if monitoring:
        values = {chart: merge_values(v, monitoring_values()[chart]) for chart, v in values.items()}
    for chart, more in (extra or {}).items():
        values[chart] = merge_values(values[chart], more)
    took: dict[str, float] = {}
    for chart in INSTALL_ORDER:
        path = cluster.dir / f"values-{chart}.yaml"
        path.write_text(yaml.safe_dump(values[chart]))
        started = time.monotonic()
        log(f"    helm install {chart} (namespace {namespace}) ...")
        helm("upgrade", "--install", chart, str(CHARTS / chart), "--namespace", namespace, "--create-namespace",
             "--values", str(path), "--wait", "--timeout", timeout, kubeconfig=kubeconfig)
        took[chart] = time.monotonic() - started
    return took


def uninstall_stack(cluster: LocalCluster | KindCluster, namespace: str = NAMESPACE) -> None:
    kubeconfig = cluster.dir / "admin.kubeconfig"
    for chart in reversed(INSTALL_ORDER):
        helm("uninstall", chart, "--namespace", namespace, "--wait", "--timeout", "120s", kubeconfig=kubeconfig)


def leftovers(cluster: LocalCluster | KindCluster) -> list[str]:
    """Every object labelled part-of=fuyao that still exists (namespaced or not), as ``kind/name``."""
    kinds = ("all,configmaps,secrets,serviceaccounts,roles,rolebindings,endpointslices,"
             "clusterroles,clusterrolebindings")
    listed = cluster.get_json(kinds, "-A", "-l", PART_OF)
    return [f"{item['kind']}/{item['metadata'].get('namespace', '')}/{item['metadata']['name']}"
            for item in listed["items"]]


# ---------------------------------------------------------------------------------------------------------------
# The NPU operator (issue 21): the design doc's path, one chart
# ---------------------------------------------------------------------------------------------------------------
OPERATOR = "npu-operator"
OPERATOR_NAMESPACE = "npu-operator"
POLICY = "npuclusterpolicy/cluster"


def design_doc_flags(driver_version: str) -> list[str]:
    """The design doc's ``helm install npu-operator`` flags."""
    return ["--set", "driver.enabled=true", "--set", f"driver.version={driver_version}",
            "--set", "devicePlugin.enabled=true", "--set", "nfd.enabled=true"]


def operator_values(cluster: LocalCluster, image: str) -> dict[str, Any]:
    """Where the local cluster differs from an Atlas server, and nothing else: the locally built image, and the fake
    npu-smi with its state, sysfs tree and device nodes under the harness's directory instead of Ascend's paths;
    the extender at the fixed ClusterIP the host's kube-scheduler calls."""
    repository, _, tag = image.rpartition(":")
    fake = str(REPO / "hack" / "fake-npu-smi")
    npu_dir = str(cluster.npu_state.parent)
    plugin = {k: v for k, v in local_values(cluster, image)["npu-device-plugin"].items() if k != "image"}
    plugin["containerEnv"] = {"FAKE_NPU_SMI_STATE": str(cluster.npu_state),
                              "FAKE_NPU_SMI_DEV": str(cluster.dir / "dev")}
    # NPU containers get the fake npu-smi at /usr/local/bin/npu-smi and its state (read-only), as a real node's
    # containers get npu-smi and the driver's files
    plugin["config"] = {"driverMounts": [{"hostPath": npu_dir},
                                         {"hostPath": fake, "containerPath": "/usr/local/bin/npu-smi"}]}
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {"npuSmi": fake, "sysfsRoot": str(cluster.sysfs), "nfdInterval": "5s", "resync": "10s",
                     "nfdEnv": {"FAKE_NPU_SMI_STATE": str(cluster.npu_state)}, "nfdHostDirs": [npu_dir]},
        "devicePlugin": {"healthInterval": "1s", "values": plugin},
        "schedulerExtender": {"values": {"service": {"clusterIP": EXTENDER_CLUSTER_IP}}},
    }


def policy_states(cluster: LocalCluster) -> dict[str, tuple[str, str]]:
    """Component → (state, message) from the policy's status (empty before the operator wrote one)."""
    try:
        got = cluster.get_json(POLICY, check=False)
    except json.JSONDecodeError:  # no policy (yet)
        return {}
    return {s["name"]: (s["state"]["type"], s["state"].get("message", ""))
            for s in (got.get("status") or {}).get("componentStatuses") or []}


def all_running(cluster: LocalCluster) -> bool:
    got = policy_states(cluster)
    return bool(got) and all(state in ("running", "disabled") for state, _ in got.values())


def install_operator(cluster: LocalCluster, image: str, namespace: str = OPERATOR_NAMESPACE, timeout: float = 300,
                     log: Any = print) -> dict[str, float]:
    """``helm install npu-operator`` with the design doc's flags on an empty cluster, then wait for each step of
    the design doc's path. Returns the seconds from the start to each step."""
    from fuyao.contracts import RESOURCE_NPU

    from .polling import wait_for

    kubeconfig = cluster.dir / "admin.kubeconfig"
    values = cluster.dir / "values-npu-operator.yaml"
    values.write_text(yaml.safe_dump(operator_values(cluster, image)))
    driver = json.loads(cluster.fake_npu_smi("fake", "show"))["driver_version"]
    started = time.monotonic()
    took: dict[str, float] = {}
    log(f"    helm install {OPERATOR} (namespace {namespace}) {' '.join(design_doc_flags(driver))}")
    helm("install", OPERATOR, str(CHARTS / OPERATOR), "--namespace", namespace, "--create-namespace",
         "--values", str(values), *design_doc_flags(driver), "--wait", "--timeout", f"{timeout:.0f}s",
         kubeconfig=kubeconfig)
    took["operator ready"] = time.monotonic() - started

    def labelled() -> bool:
        return cluster.node_json()["metadata"].get("labels", {}).get(LABEL_ACCELERATOR) == ACCELERATOR_ASCEND_NPU

    def allocatable() -> bool:
        return int(cluster.node_json()["status"].get("allocatable", {}).get(RESOURCE_NPU, "0")) > 0

    def validated() -> bool:
        return policy_states(cluster).get("validator", ("", ""))[0] == "running"

    for step, check in (("node labelled", labelled), ("NPUs allocatable", allocatable),
                        ("validation pod passed", validated), ("every component running", lambda: all_running(
                            cluster))):
        wait_for(check, timeout, f"{step} (policy: {policy_states(cluster)})")
        took[step] = time.monotonic() - started
        log(f"    {step}: {took[step]:.1f} s")
    return took


def uninstall_operator(cluster: LocalCluster, namespace: str = OPERATOR_NAMESPACE) -> None:
    helm("uninstall", OPERATOR, "--namespace", namespace, "--wait", "--timeout", "180s",
         kubeconfig=cluster.dir / "admin.kubeconfig")


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.support.charts install|uninstall``: the charts on a running ``--components chart`` cluster."""
    import argparse

    from .runtime_image import build

    parser = argparse.ArgumentParser(prog="python -m tests.support.charts",
                                     description="fuyao's charts on the local cluster (hack/local-up.sh "
                                                 "--components chart), in the order of docs/install.md")
    parser.add_argument("action", choices=["install", "uninstall", "operator", "operator-uninstall"],
                        help="install/uninstall: the four charts; operator: helm install npu-operator with the design "
                             "doc's flags (the operator installs the rest); operator-uninstall: helm uninstall it")
    parser.add_argument("--state-dir", default="/tmp/fuyao-cluster", type=Path)
    parser.add_argument("--namespace", default=NAMESPACE)
    parser.add_argument("--monitoring", action="store_true",
                        help="install: with the charts' ServiceMonitors, PrometheusRules and dashboard (the cluster "
                             "runs Prometheus: hack/local-up.sh --monitoring)")
    parser.add_argument("--ray", action="store_true",
                        help="install: also import fuyao's Ray image (fuyao.local/fuyao-ray:dev, what "
                             "docs/examples/ray/ use; hack/local-up.sh --ray imports it too)")
    args = parser.parse_args(argv)
    cluster = LocalCluster.running(args.state_dir)
    if cluster is None:
        parser.error(f"no cluster in {args.state_dir}: start one with hack/local-up.sh --components chart")
    if cluster.components != "chart":
        parser.error(f"the cluster in {args.state_dir} runs fuyao as host processes; start it with "
                     "hack/local-up.sh --components chart")
    if args.action == "operator-uninstall":
        uninstall_operator(cluster, OPERATOR_NAMESPACE)
        print(f"uninstalled {OPERATOR}")
        return
    if args.action == "uninstall":
        uninstall_stack(cluster, args.namespace)
        print(f"uninstalled {', '.join(reversed(INSTALL_ORDER))} from {args.namespace}")
        return
    archive, tag = build()
    cluster.import_image(archive)
    if args.ray:
        ray_archive, ray_tag = build(ray=True)
        cluster.import_image(ray_archive)
        print(f"imported {ray_tag} (also tagged :dev)")
    if args.action == "operator":
        took = install_operator(cluster, tag)
        print("Ready: " + ", ".join(f"{step} at {seconds:.0f} s" for step, seconds in took.items()))
        return
    took = install_stack(cluster, tag, args.namespace, monitoring=args.monitoring)
    print("Ready: " + ", ".join(f"{chart} {seconds:.0f} s" for chart, seconds in took.items()))


if __name__ == "__main__":
    main()
