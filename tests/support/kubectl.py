"""kubectl against a test cluster: what the local cluster (``tests.support.cluster``) and a kind cluster
(``tests.support.kind``) share, so the chart e2e tests run on either."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from .apiserver import binary
from .polling import wait_for

# kubectl's resource names that get_json reads straight from the API: (API group path, plural, namespaced)
_RESOURCES: dict[str, tuple[str, str, bool]] = {}
for _names, _where in ((("pod", "pods", "po"), ("api/v1", "pods", True)),
                       (("node", "nodes", "no"), ("api/v1", "nodes", False)),
                       (("service", "services", "svc"), ("api/v1", "services", True)),
                       (("event", "events", "ev"), ("api/v1", "events", True)),
                       (("pvc", "persistentvolumeclaim", "persistentvolumeclaims"),
                        ("api/v1", "persistentvolumeclaims", True)),
                       (("lease", "leases"), ("apis/coordination.k8s.io/v1", "leases", True)),
                       (("deployment", "deployments", "deploy"), ("apis/apps/v1", "deployments", True)),
                       (("daemonset", "daemonsets", "ds"), ("apis/apps/v1", "daemonsets", True)),
                       (("crd", "crds", "customresourcedefinition", "customresourcedefinitions"),
                        ("apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False))):
    for _name in _names:
        _RESOURCES[_name] = _where


def rest_path(args: tuple[str, ...]) -> str | None:
    """The API path (with query) of ``kubectl get <args>`` when it is a plain read of one resource kind get_json
    knows (a name or none; ``-n``, ``-A``, ``-l``, ``--field-selector``), else None (kubectl reads it)."""
    if not args or args[0] not in _RESOURCES:
        return None
    group, plural, namespaced = _RESOURCES[args[0]]
    name, namespace, every, query = "", "default", False, {}
    rest = list(args[1:])
    while rest:
        arg = rest.pop(0)
        if arg in ("-n", "--namespace", "-l", "--selector", "--field-selector") and rest:
            value = rest.pop(0)
            if arg in ("-n", "--namespace"):
                namespace = value
            else:
                query["labelSelector" if arg in ("-l", "--selector") else "fieldSelector"] = value
        elif arg in ("-A", "--all-namespaces"):
            every = True
        elif not arg.startswith("-") and not name:
            name = arg
        else:
            return None
    if name and (every or query):
        return None
    path = f"/{group}/" + (f"namespaces/{namespace}/" if namespaced and not every else "") + plural
    return path + (f"/{name}" if name else "") + (f"?{urllib.parse.urlencode(query)}" if query else "")


class KubeCluster:
    """A cluster whose admin kubeconfig is ``<dir>/admin.kubeconfig``; ``node``: its (first) NPU node.

    ``get_json`` reads the common kinds straight from the API server over a kept connection: a test polling
    ``kubectl get`` ten times a second spent most of a CPU starting kubectl, which the QoS agent rightly counted
    as the node's system usage (the batch resources BE pods need went with it), and slowed everything else."""

    dir: Path
    node: str
    _local = threading.local()

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
        """``kubectl get <args> -o json``, parsed: from the API for the kinds :func:`rest_path` knows (anything
        but a 200 goes to kubectl, so errors read as kubectl's), else from kubectl."""
        path = rest_path(args)
        if path is not None:
            got = self._rest_get(path)
            if got is not None:
                return got
        return json.loads(self.kubectl("get", *args, "-o", "json", check=check))  # type: ignore[no-any-return]

    def _rest_get(self, path: str) -> dict[str, Any] | None:
        """GET ``path`` on the API server, parsed; None on anything but a 200 (or no connection)."""
        from fuyao.kube_client import connect, rest_endpoint

        try:  # per kubeconfig as written now (a cluster brought up again in the same directory: a new server)
            state = self._local.__dict__.setdefault(f"{self.kubeconfig}@{self.kubeconfig.stat().st_mtime_ns}", {})
        except OSError:
            return None
        try:
            if "endpoint" not in state:
                state["endpoint"] = rest_endpoint(connect(str(self.kubeconfig)))
            endpoint = state["endpoint"]
            url = urllib.parse.urlsplit(endpoint.base_url)
            for attempt in range(2):  # a kept connection the server closed: once more on a new one
                if state.get("connection") is None:
                    state["connection"] = (
                        http.client.HTTPSConnection(url.hostname or "", url.port or 443, timeout=30,
                                                    context=endpoint.ssl_context)
                        if url.scheme == "https" else
                        http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=30))
                connection = state["connection"]
                try:
                    connection.request("GET", url.path.rstrip("/") + path,
                                       headers={**endpoint.headers(max_age_s=10), "Accept": "application/json"})
                    response = connection.getresponse()
                    body = response.read()
                except (OSError, http.client.HTTPException):
                    connection.close()
                    state["connection"] = None
                    if attempt:
                        return None
                    continue
                return json.loads(body) if response.status == 200 else None
        except Exception:  # a kubeconfig this reader cannot use: kubectl reads it
            state.clear()
        return None

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Until every CRD named (``rayclusters.ray.io``...) reports ``Established``. Polled here rather than with
        ``kubectl wait --for=condition=Established``, which fails instead of waiting while a CRD just created has no
        ``status.conditions`` yet."""
        def established(name: str) -> bool:
            path = rest_path(("crd", name))
            got = self._rest_get(path) if path else None
            if got is None:  # not there yet (404), or not readable here: kubectl says which
                out = self.kubectl("get", "crd", name, "-o", "json", check=False)
                if not out.strip():
                    return False
                got = json.loads(out)
            conditions = (got.get("status") or {}).get("conditions") or []
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
