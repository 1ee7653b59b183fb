"""The one way fuyao's daemons reach the API server: a kubeconfig when given, else the in-cluster service account
when running in a pod, else no cluster at all (every daemon has a mode that works without one)."""

from __future__ import annotations

import os
from typing import Any


def connect(kubeconfig: str | None) -> Any | None:
    """A ``CoreV1Api`` from ``kubeconfig``, else from the in-cluster service account, else None (no cluster).
    The ``kubernetes`` package is imported only here, when a cluster is configured (it is slow to import)."""
    if not kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    from kubernetes import client, config

    if kubeconfig:
        return client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    config.load_incluster_config()
    return client.CoreV1Api(client.ApiClient())
