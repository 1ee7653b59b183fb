"""KWOK (built by hack/build-upstream.sh): fake nodes that are Ready and whose pods go Running, without kubelets.
Nodes annotated ``kwok.x-k8s.io/node: fake`` are KWOK's."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .apiserver import LocalApiServer, binary

KWOK_ANNOTATION = "kwok.x-k8s.io/node"


def kwok_command(kubeconfig: str | Path) -> list[str]:
    """The kwok controller for the cluster of ``kubeconfig``, with the stages that make pods Running."""
    kwok = Path(binary("kwok")).resolve()  # kwok-<version>; its stages sit beside it (hack/build-upstream.sh)
    stages = sorted((kwok.parent / kwok.name.replace("kwok-", "kwok-stages-", 1)).glob("*.yaml"))
    if not stages:
        raise RuntimeError(f"no KWOK stages beside {kwok}: run hack/build-upstream.sh kwok")
    return [str(kwok), f"--kubeconfig={kubeconfig}", *(f"--config={stage}" for stage in stages),
            "--node-lease-duration-seconds=40", f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            "--cidr=10.245.0.0/16", "--node-ip=127.0.0.1", "--server-address="]


def start_kwok(server: LocalApiServer) -> subprocess.Popen[bytes]:
    """KWOK's controller for a :class:`LocalApiServer`'s nodes (as ``hack/local-up.sh --nodes kwok=N`` runs it):
    node heartbeats and leases, and every bound pod moved to Running with an IP. The caller stops it."""
    log = open(server.root / "kwok.log", "wb")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(kwok_command(server.kubeconfig_for("admin")), stdout=log, stderr=log)
