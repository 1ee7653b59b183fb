#!/usr/bin/env bash
# A local single-node Kubernetes cluster with fuyao, without Docker: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler (with fuyao's extender), a kubelet on containerd + runc (Debian), fuyao's device plugin on the fake
# npu-smi. Builds/reuses the upstream binaries (hack/build-upstream.sh) and installs the Debian packages it needs.
# Needs root (containerd, the kubelet, network namespaces, mknod). Idempotent: a running cluster is replaced.
#
# Usage: hack/local-up.sh [--state-dir DIR] [--preset 910b4-8|910a1-8|310p3-4|910c-8] [--nodes kwok=N]
#                         [--components host|chart] [--monitoring] [--ray]
# --monitoring: also the Prometheus Operator with a Prometheus, metrics-server and KEDA (as pods, from upstream's own
# manifests and locally built binaries: hack/build-upstream.sh monitoring; docs/monitoring.md).
# --ray: also KubeRay's operator (built from the Go module proxy: hack/build-upstream.sh ray) with its CRDs, and
# fuyao's Ray image (ray[serve]) imported into the node's containerd (docs/ray.md).
# Stop:  hack/local-down.sh [--state-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv test
[ "$(id -u)" = 0 ] || { echo "local-up: needs root (containerd, kubelet, network namespaces)" >&2; exit 1; }
source hack/lib/cluster-deps.sh
ensure_cluster_deps
hack/build-upstream.sh etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy coredns kwok
for arg in "$@"; do
  [ "$arg" = --monitoring ] && hack/build-upstream.sh monitoring
  [ "$arg" = --ray ] && hack/build-upstream.sh ray
done
exec "$VENV/bin/python" -m tests.support.cluster up "$@"
