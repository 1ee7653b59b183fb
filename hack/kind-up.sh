#!/usr/bin/env bash
# A kind cluster whose workers simulate NPU servers, with fuyao's charts installed (docs/kind.md):
#   hack/kind-up.sh [--nodes N] [--preset 910b4-8|910a1-8|310p3-4|910c-8] [--local-image] [--private-docker]
#                   [--name fuyao] [--state-dir /tmp/fuyao-kind] [--no-charts]
# --local-image: fuyao's node image built on this machine (no registry needed) instead of kind's kindest/node.
# --private-docker: fuyao's own dockerd (its own data root, socket and network namespace; never the system's Docker
#   or its configuration), for machines whose Docker cannot run kind's privileged nodes (sandboxes; hack/test.sh
#   uses it). Without it, your Docker ($DOCKER_HOST) is used, and checked first.
# Builds kind, kubeadm, crictl and what the cluster runs (hack/build-upstream.sh), and fuyao's image.
# Delete it with hack/kind-down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv test
source hack/lib/docker.sh
private=false local_image=false
args=()
for arg in "$@"; do
  case $arg in
    --private-docker) private=true ;;
    --local-image) local_image=true; args+=("$arg") ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done
if $private; then
  local_image=true args+=(--local-image)   # fuyao's dockerd has no registry to pull kindest/node from
  ensure_private_docker
else
  if ! timeout 20 "$DOCKER_CLI" info >/dev/null 2>&1; then
    echo "kind-up: Docker does not answer ($DOCKER_CLI info${DOCKER_HOST:+, DOCKER_HOST=$DOCKER_HOST})." >&2
    echo "  Start your Docker, or run with --private-docker (needs root: fuyao starts a dockerd of its own)." >&2
    exit 1
  fi
  if ! full_capability_set; then
    echo "kind-up: this machine cannot grant every capability (CapBnd $(awk '/^CapBnd:/ {print $2}' /proc/self/status))," >&2
    echo "  so Docker's --privileged, which every kind node needs, fails here with 'unable to apply caps'." >&2
    echo "  Run with --private-docker: fuyao starts its own dockerd with a runtime wrapper that drops the" >&2
    echo "  capabilities this machine lacks (a sandbox workaround; your Docker and its configuration stay as they are)." >&2
    exit 1
  fi
fi
source hack/lib/cluster-deps.sh
ensure_cluster_deps
upstream=(kind kubectl helm)
$local_image && upstream+=(kubeadm crictl etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy coredns)
hack/build-upstream.sh "${upstream[@]}"
exec "$VENV/bin/python" -m tests.support.kind up "${args[@]}"
