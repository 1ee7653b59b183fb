#!/usr/bin/env bash
# Build (or reuse) fuyao's kind node image on this machine, for machines that cannot pull kindest/node (no registry):
# fuyao.local/kind-node:<kubernetes version>-<hash>, a docker-archive under ~/.cache/fuyao/images, cached by
# content (tests/support/kind_image.py; what it holds and why: docs/kind.md). Prints {"archive": ..., "tag": ...}.
# With --load, also `docker load`s it into the Docker that DOCKER_HOST names (hack/kind-up.sh --local-image does both).
# Needs root the first time (debootstrap, and a throwaway containerd that preloads the control plane's images).
# Usage: hack/build-kind-node.sh [--load]
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv test
load=false
case "${1:-}" in
  --load) load=true ;;
  "") ;;
  -h | --help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: hack/build-kind-node.sh [--load]" >&2; exit 2 ;;
esac
source hack/lib/cluster-deps.sh
ensure_cluster_deps
hack/build-upstream.sh kind etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy \
  coredns >&2
out=$("$VENV/bin/python" -m tests.support.kind_image)
echo "$out"
if $load; then
  archive=$("$VENV/bin/python" -c 'import json,sys; print(json.loads(sys.argv[1])["archive"])' "$out")
  /usr/bin/docker load -i "$archive"
fi
