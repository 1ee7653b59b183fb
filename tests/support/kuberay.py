"""KubeRay on the local cluster (``hack/local-up.sh --ray``): the operator built from the Go module proxy
(``hack/build-upstream.sh ray``: ``github.com/ray-project/kuberay/ray-operator`` at ``KUBERAY_VERSION``), its
CRDs from the same module, and fuyao's Ray image (``fuyao.local/fuyao-ray``: the runtime image with ``ray[serve]``)
imported into the node's containerd.

The operator runs as a host process with the admin kubeconfig, as the e2e tests run fuyao's own components in
``host`` mode: it reaches the Ray head's dashboard through the API server's service proxy
(``--use-kubernetes-proxy``), since the host does not resolve cluster DNS names. Leader election is off (one
operator) and its metrics and probe servers are off (nothing scrapes them here). RayCluster pods themselves are
scheduled by the cluster's kube-scheduler, which calls fuyao's extender for NPU pods.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .apiserver import BIN, binary
from .polling import wait_for
from .runtime_image import build
from .versions import pinned_version

if TYPE_CHECKING:
    from .cluster import LocalCluster

CRDS = ("rayclusters", "rayjobs", "rayservices")


def crd_dir() -> Path:
    path = BIN / f"kuberay-crds-{pinned_version('KUBERAY_VERSION')}"
    if not (path / ".ready").exists():
        raise RuntimeError(f"{path} missing: run hack/build-upstream.sh ray")
    return path


class KubeRay:
    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster

    def install(self) -> None:
        """CRDs, the operator (waits until it serves), and the Ray image."""
        crds = crd_dir()
        # server-side: each CRD is ~1 MB, beyond client-side apply's last-applied annotation
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts",
                             *[a for name in CRDS for a in ("-f", str(crds / f"ray.io_{name}.yaml"))])
        self.cluster.wait_established(*[f"{name}.ray.io" for name in CRDS])
        self.cluster._spawn("kuberay-operator", [
            binary("kuberay-operator"), "--enable-leader-election=false", "--metrics-addr=0",
            "--health-probe-bind-address=0", "--use-kubernetes-proxy", "--log-stdout-encoder=console"],
            env={"KUBECONFIG": str(self.cluster.dir / "admin.kubeconfig")})
        log = self.cluster.dir / "logs" / "kuberay-operator.log"
        wait_for(lambda: "Starting workers" in log.read_text(errors="replace"), 60,
                 f"KubeRay's operator to start its controllers (log: {log})")
        self.cluster.import_image(build(ray=True)[0])
