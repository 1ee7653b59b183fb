"""kubectl against a test cluster: what the local cluster (``tests.support.cluster``) and a kind cluster
(``tests.support.kind``) share, so the chart e2e tests run on either."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from .apiserver import binary
from .polling import wait_for


class KubeCluster:
    """A cluster whose admin kubeconfig is ``<dir>/admin.kubeconfig``; ``node``: its (first) NPU node."""

    dir: Path
    node: str

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        result = subprocess.run([binary("kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def get_json(self, *args: str, check: bool = True) -> dict[str, Any]:
        """``kubectl get <args> -o json``, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json", check=check))  # type: ignore[no-any-return]

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Until every CRD named (``rayclusters.ray.io``...) reports ``Established``. Polled here rather than with
        ``kubectl wait --for=condition=Established``, which fails instead of waiting while a CRD just created has no
        ``status.conditions`` yet."""
        def established(name: str) -> bool:
            out = self.kubectl("get", "crd", name, "-o", "json", check=False)
            if not out.strip():  # not there yet
                return False
            conditions = (json.loads(out).get("status") or {}).get("conditions") or []
            return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

        wait_for(lambda: all(established(name) for name in crds), timeout, f"CRDs {', '.join(crds)} Established")

    def node_json(self) -> dict[str, Any]:
        return self.get_json("node", self.node)

    def apply(self, obj: dict[str, Any], name: str = "") -> Path:
        """``kubectl apply`` of one object or a List, written to ``<dir>/<name>.json`` (default: the object's
        name); that file, for a later ``kubectl delete -f``."""
        name = name or (obj.get("metadata") or {}).get("name") or f"list-{time.monotonic_ns()}"
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps(obj))
        self.kubectl("apply", "-f", str(path))
        return path
