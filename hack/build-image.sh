#!/usr/bin/env bash
# Build (or reuse) fuyao's runtime image as a docker-archive, without Docker or a registry: a Debian minbase root
# file system with python3 (debootstrap), the Python dependencies, helm, fuyao and its charts; layers cached by
# content hash under ~/.cache/fuyao/images. Prints {"archive": ..., "tag": ...}. With --import DIR, also loads it into the
# containerd of the local cluster in DIR (hack/local-up.sh's state directory, default /tmp/fuyao-cluster).
# Needs root the first time (debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv test
command -v debootstrap >/dev/null || { source hack/lib/cluster-deps.sh; ensure_cluster_deps; }
hack/build-upstream.sh helm >&2   # the image carries helm: the NPU operator renders the charts with it
state=""
if [[ ${1:-} == --import ]]; then state=${2:-/tmp/fuyao-cluster}; fi
out=$("$VENV/bin/python" -m tests.support.runtime_image)
echo "$out"
if [[ -n $state ]]; then
  archive=$("$VENV/bin/python" -c 'import json,sys; print(json.loads(sys.argv[1])["archive"])' "$out")
  ctr --address "$state/containerd/containerd.sock" -n k8s.io images import "$archive" >/dev/null
  echo "imported into $state's containerd"
fi
