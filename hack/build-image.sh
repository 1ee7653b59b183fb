#!/usr/bin/env bash
# Build (or reuse) fuyao's runtime image as a docker-archive, without Docker or a registry: a Debian minbase root
# file system with python3 (debootstrap), the Python dependencies, helm, fuyao and its charts; layers cached by
# content hash under ~/.cache/fuyao/images. Prints {"archive": ..., "tag": ...}. With --import DIR, also loads it into the
# containerd of the local cluster in DIR (hack/local-up.sh's state directory, default /tmp/fuyao-cluster).
# With --ray, the Ray image fuyao.local/fuyao-ray instead (the same layers plus ray[serve]; docs/ray.md).
# Needs root the first time (debootstrap).
# Usage: hack/build-image.sh [--ray] [--import [DIR]]
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv test
command -v debootstrap >/dev/null || { source hack/lib/cluster-deps.sh; ensure_cluster_deps; }
hack/build-upstream.sh helm >&2   # the image carries helm: the NPU operator renders the charts with it
state="" ray=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --ray) ray=(--ray); shift ;;
    --import) state=/tmp/fuyao-cluster; shift
              if [[ $# -gt 0 && $1 != --* ]]; then state=$1; shift; fi ;;
    *) echo "usage: hack/build-image.sh [--ray] [--import [DIR]]" >&2; exit 2 ;;
  esac
done
out=$("$VENV/bin/python" -m tests.support.runtime_image "${ray[@]}")
echo "$out"
if [[ -n $state ]]; then
  archive=$("$VENV/bin/python" -c 'import json,sys; print(json.loads(sys.argv[1])["archive"])' "$out")
  ctr --address "$state/containerd/containerd.sock" -n k8s.io images import "$archive" >/dev/null
  echo "imported into $state's containerd"
fi
