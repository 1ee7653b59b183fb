#!/usr/bin/env bash
# The fuyao demo: the whole stack on a local single-node Kubernetes cluster with 8 simulated Ascend NPUs, without
# Docker or a registry. Brings up the cluster (or reuses the running one), builds fuyao's image, installs the four
# Helm charts, deploys a prefill/decode-disaggregated inference service of engine-simulator pods that request NPUs,
# shows where each pod landed and why, and compares TTFT of prefix-aware routing against round-robin.
# Installs what it needs (Python venv, Debian packages, upstream binaries built once into ~/.cache/fuyao).
# Needs root (containerd, the kubelet, network namespaces).
#
# Usage: hack/demo.sh [--state-dir DIR] [--fresh] [--rate R] [--duration S]   (hack/demo.sh --help)
#        hack/demo.sh --mode operator   the design doc's path, timed: helm install npu-operator on an empty cluster
#        hack/demo.sh --engine vllm [--rate R] [--duration S]   two real vLLM CPU engines behind fuyao-router, as host
#                                   processes (no cluster, no root; hack/demo.sh --engine vllm --help)
# Stop:  hack/local-down.sh --state-dir /tmp/fuyao-demo
# Without root: hack/demo-node.sh (one simulated node: npu-smi, inventory, the device plugin's gRPC API).
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv test
engine=sim
for arg in "$@"; do
  case $arg in --engine=vllm | vllm) engine=vllm ;; esac
done
if [ "$engine" = vllm ]; then
  # real vLLM engines as host processes (the venv is too big for an image): no cluster, no root
  exec "$VENV/bin/python" hack/demo_vllm.py "$@"
fi
for arg in "$@"; do
  case $arg in -h | --help) exec "$VENV/bin/python" hack/demo.py --help ;; esac
done
[ "$(id -u)" = 0 ] || { echo "demo: needs root (containerd, kubelet, network namespaces); try hack/demo-node.sh" >&2; exit 1; }
started=$SECONDS
echo "==> prerequisites: Debian packages, upstream binaries (built once, cached in ~/.cache/fuyao/bin)"
source hack/lib/cluster-deps.sh
ensure_cluster_deps
# nothing else runs yet: a cold build may use both cores
BUILD_JOBS="${BUILD_JOBS:-2}" GOMAXPROCS="${GOMAXPROCS:-2}" hack/build-upstream.sh etcd kube-apiserver \
  kube-controller-manager kube-scheduler kubelet kubectl kube-proxy coredns helm monitoring \
  | sed -u 's/^/    /'
echo "    prerequisites ready after $((SECONDS - started)) s"
exec "$VENV/bin/python" hack/demo.py "$@"
