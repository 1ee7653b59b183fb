"""Monitoring and autoscaling on the local cluster, from upstream's own manifests and locally built binaries
(``hack/build-upstream.sh monitoring``): the Prometheus Operator and a ``Prometheus`` that selects fuyao's
ServiceMonitors and PrometheusRules, metrics-server (``kubectl top``, the HPA's resource metrics) and KEDA (its
operator and external-metrics API server).

Everything runs as pods, as upstream ships it: the manifests are the modules' own (the Prometheus Operator's
``example/rbac``, metrics-server's ``manifests/base``, KEDA's ``config/``; the last two rendered with
``kubectl kustomize``), with only the images swapped for local ones (``binary_images``: each binary at the path
and with the entrypoint and user of its upstream image) and ``imagePullPolicy: Never``. Pods, not host processes,
because the pieces find each other by cluster DNS (KEDA's Prometheus scaler, its metrics server → its operator) and the
aggregation layer and the operator expect Services in front of them. The two changes to upstream's objects, each
because of this cluster: metrics-server verifies the kubelet's serving certificate against the local cluster CA
(mounted from a ConfigMap) and uses the node's InternalIP only; KEDA's admission webhooks are left out (their binary
is not built: they only validate ScaledObjects).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .apiserver import BIN, binary
from .polling import wait_for
from .runtime_image import BinaryImage, binary_images
from .versions import pinned_versions

NAMESPACE = "monitoring"
KEDA_NAMESPACE = "keda"
PROMETHEUS_NAME = "fuyao"
SELECTOR = {"app.kubernetes.io/part-of": "fuyao"}
"""What the Prometheus object selects: every ServiceMonitor and PrometheusRule fuyao's charts render."""
CLUSTER_CA_CONFIGMAP = "fuyao-cluster-ca"


@dataclass(frozen=True)
class Versions:
    prometheus: str  # the module's v0.316.0 is Prometheus v3.16.0
    operator: str
    metrics_server: str
    keda: str

    @classmethod
    def pinned(cls) -> Versions:
        v = pinned_versions()
        minor = v["PROMETHEUS_VERSION"].removeprefix("v0.")
        return cls(prometheus=f"v{minor[0]}.{int(minor[1:3])}.{minor.split('.', 1)[1]}",
                   operator=v["PROMETHEUS_OPERATOR_VERSION"], metrics_server=v["METRICS_SERVER_VERSION"],
                   keda=v["KEDA_VERSION"])


def images(versions: Versions | None = None) -> tuple[Path, dict[str, str]]:
    """The monitoring images in one docker-archive; returns it and the tag of each (key: the binary)."""
    v = versions or Versions.pinned()
    wanted = {
        "prometheus": BinaryImage(f"fuyao.local/prometheus:{v.prometheus}",
                                  {"/bin/prometheus": Path(binary("prometheus")),
                                   "/bin/promtool": Path(binary("promtool"))},
                                  entrypoint=["/bin/prometheus"], workdir="/prometheus", user="65534"),
        "prometheus-config-reloader": BinaryImage(
            f"fuyao.local/prometheus-config-reloader:{v.operator}",
            {"/bin/prometheus-config-reloader": Path(binary("prometheus-config-reloader"))},
            entrypoint=["/bin/prometheus-config-reloader"], user="65534"),
        "prometheus-operator": BinaryImage(f"fuyao.local/prometheus-operator:{v.operator}",
                                           {"/bin/operator": Path(binary("prometheus-operator"))},
                                           entrypoint=["/bin/operator"], user="65534"),
        "metrics-server": BinaryImage(f"fuyao.local/metrics-server:{v.metrics_server}",
                                      {"/metrics-server": Path(binary("metrics-server"))},
                                      entrypoint=["/metrics-server"], user="65534"),
        "keda-operator": BinaryImage(f"fuyao.local/keda:{v.keda}", {"/keda": Path(binary("keda-operator"))},
                                     entrypoint=["/keda", "--zap-log-level=info", "--zap-encoder=console"],
                                     user="65532:65532"),
        "keda-adapter": BinaryImage(f"fuyao.local/keda-metrics-apiserver:{v.keda}",
                                    {"/keda-adapter": Path(binary("keda-adapter"))},
                                    entrypoint=["/keda-adapter", "--secure-port=6443", "--zap-log-level=info",
                                                "--zap-encoder=console"], user="65532:65532"),
    }
    archive, _ = binary_images(list(wanted.values()), "monitoring")
    return archive, {name: image.tag for name, image in wanted.items()}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without its YAML 1.1 "value" tag: upstream CRDs list ``=`` as an enum value, which
    PyYAML would otherwise refuse to construct."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:value"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _parse(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=_Loader) if d]


def _load(path: Path) -> list[dict[str, Any]]:
    return _parse(path.read_text())


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([binary("kubectl"), "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {out.stderr.strip()}")
    return _parse(out.stdout)


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _local_image(obj: dict[str, Any], tag: str) -> None:
    for container in _containers(obj):
        container["image"], container["imagePullPolicy"] = tag, "Never"


def _in_namespace(objs: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """Upstream's example objects (namespace ``default``) moved to ``namespace``, with the subjects of their
    bindings."""
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "Namespace", "CustomResourceDefinition", "APIService"}
    for obj in objs:
        if obj["kind"] not in cluster_scoped:
            obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects", []):
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace
    return objs


def operator_objects(tags: dict[str, str], versions: Versions) -> list[dict[str, Any]]:
    """The Prometheus Operator (upstream's example Deployment and RBAC) and a Prometheus selecting fuyao's monitoring
    objects in every namespace, with its RBAC."""
    crds = BIN / f"prometheus-operator-crds-{versions.operator}"
    rbac = crds / "rbac"
    objs: list[dict[str, Any]] = []
    for path in sorted((rbac / "prometheus-operator").glob("*.yaml")):
        if path.name.endswith("service-monitor.yaml"):
            continue  # the operator's own ServiceMonitor: not one of fuyao's
        objs += _load(path)
    for obj in objs:
        if obj["kind"] == "Deployment":
            _local_image(obj, tags["prometheus-operator"])
            container = obj["spec"]["template"]["spec"]["containers"][0]
            container["args"] = [a for a in container["args"] if not a.startswith("--prometheus-config-reloader=")]
            container["args"].append(f"--prometheus-config-reloader={tags['prometheus-config-reloader']}")
    for path in sorted((rbac / "prometheus").glob("*.yaml")):
        objs += [o for o in _load(path) if o["kind"] != "Prometheus"]
    objs.append({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
        "metadata": {"name": PROMETHEUS_NAME, "labels": {"prometheus": PROMETHEUS_NAME}},
        "spec": {"replicas": 1, "serviceAccountName": "prometheus", "image": tags["prometheus"],
                 "version": versions.prometheus, "imagePullPolicy": "Never",
                 "serviceMonitorSelector": {"matchLabels": SELECTOR}, "serviceMonitorNamespaceSelector": {},
                 "podMonitorSelector": {"matchLabels": SELECTOR}, "podMonitorNamespaceSelector": {},
                 "ruleSelector": {"matchLabels": SELECTOR}, "ruleNamespaceSelector": {},
                 "scrapeInterval": "5s", "evaluationInterval": "5s", "retention": "1d",
                 "resources": {"requests": {"memory": "100Mi"}}}})
    return _in_namespace(objs, NAMESPACE)


def metrics_server_objects(tags: dict[str, str], versions: Versions, cluster_ca: str) -> list[dict[str, Any]]:
    objs = _kustomize(BIN / f"metrics-server-config-{versions.metrics_server}")
    for obj in objs:
        if obj["kind"] != "Deployment":
            continue
        _local_image(obj, tags["metrics-server"])
        pod = obj["spec"]["template"]["spec"]
        container = pod["containers"][0]
        args = [a for a in container["args"] if not a.startswith("--kubelet-preferred-address-types=")]
        container["args"] = [*args, "--kubelet-preferred-address-types=InternalIP",
                             "--kubelet-certificate-authority=/etc/fuyao-cluster-ca/ca.crt"]
        container.setdefault("volumeMounts", []).append(
            {"name": "cluster-ca", "mountPath": "/etc/fuyao-cluster-ca", "readOnly": True})
        pod.setdefault("volumes", []).append({"name": "cluster-ca", "configMap": {"name": CLUSTER_CA_CONFIGMAP}})
    objs.append({"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": CLUSTER_CA_CONFIGMAP, "namespace": "kube-system"},
                 "data": {"ca.crt": cluster_ca}})
    return objs


def keda_objects(tags: dict[str, str], versions: Versions) -> list[dict[str, Any]]:
    objs = _kustomize(BIN / f"keda-config-{versions.keda}" / "default")
    kept = []
    for obj in objs:
        name = obj["metadata"]["name"]
        if obj["kind"] in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration") or \
                "admission" in name or "webhook" in name:
            continue
        if obj["kind"] == "Deployment":
            _local_image(obj, tags["keda-adapter" if "metrics-apiserver" in name else "keda-operator"])
        kept.append(obj)
    return kept


class Monitoring:
    """Installs the monitoring stack on a running ``LocalCluster`` and answers queries against its Prometheus."""

    def __init__(self, cluster: Any, versions: Versions | None = None):
        self.cluster = cluster
        self.versions = versions or Versions.pinned()

    def _apply(self, objs: list[dict[str, Any]], name: str) -> None:
        path = self.cluster.dir / f"{name}.json"
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))

    def install(self, timeout: float = 300) -> Monitoring:
        started = time.monotonic()
        archive, tags = images(self.versions)
        self.cluster.import_image(archive)
        crds = BIN / f"prometheus-operator-crds-{self.versions.operator}"
        crd_objs = [o for p in sorted(crds.glob("monitoring.coreos.com_*.yaml")) for o in _load(p)]
        self._apply(crd_objs, "monitoring-crds")
        self.cluster.wait_established(*[crd["metadata"]["name"] for crd in crd_objs])
        self.cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        self._apply(operator_objects(tags, self.versions), "monitoring-operator")
        ca = (self.cluster.dir / "pki" / "ca.crt").read_text()  # tests.support.pki, written at bring-up
        self._apply(metrics_server_objects(tags, self.versions, ca), "monitoring-metrics-server")
        self._apply(keda_objects(tags, self.versions), "monitoring-keda")
        wait_for(lambda: self.ready() or time.sleep(2), timeout,
                 "the monitoring stack (Prometheus, metrics-server, KEDA) to be ready")
        (self.cluster.dir / "monitoring-up-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
        return self

    def ready(self) -> bool:
        api = self.cluster.kubectl("get", "apiservices", "-o", "json", check=False)
        if not api:
            return False
        available = {a["metadata"]["name"]: any(c["type"] == "Available" and c["status"] == "True"
                                                for c in a.get("status", {}).get("conditions", []))
                     for a in json.loads(api)["items"]}
        if not (available.get("v1beta1.metrics.k8s.io") and available.get("v1beta1.external.metrics.k8s.io")):
            return False
        return bool(self.prometheus_url()) and self._prometheus_ready()

    def prometheus_url(self) -> str:
        """``http://<pod IP>:9090`` of the Prometheus the operator runs (the host routes to pod IPs)."""
        pods = self.cluster.get_json("pods", "-n", NAMESPACE, "-l", f"prometheus={PROMETHEUS_NAME}",
                                     check=False).get("items", [])
        ip = next((p["status"].get("podIP") for p in pods if p["status"].get("phase") == "Running"), None)
        return f"http://{ip}:9090" if ip else ""

    def _prometheus_ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.prometheus_url() + "/-/ready", timeout=3) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """A Prometheus HTTP API call (``/api/v1/<path>``); its ``data``, or RuntimeError naming the error."""
        url = f"{self.prometheus_url()}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]  # type: ignore[no-any-return]

    def query_range(self, expr: str, start: float, end: float, step: float = 5) -> list[dict[str, Any]]:
        """Each series as ``{"metric": labels, "values": [[unix time, "value"], …]}``."""
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",  # type: ignore[no-any-return]
                        step=f"{step:g}")["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]  # type: ignore[no-any-return]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]  # type: ignore[no-any-return]
