#!/usr/bin/env bash
# Regenerate the Python stubs of the kubelet gRPC APIs we speak — the device-plugin API
# (kubeletapi/deviceplugin/v1beta1/api.proto) and the pod-resources API (kubeletapi/podresources/v1/api.proto), as
# fuyao.kubeletapi (the protos are compiled through the fuyao/kubeletapi symlink, so the stubs import that name) —
# with the grpcio-tools version pinned in pyproject.toml. The generated files are committed; tests check that
# running this script changes nothing. Usage: hack/gen-kubelet-api.sh [OUTPUT_ROOT]  (default: the repository)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/venv.sh"
ensure_venv test
OUT="${1:-$REPO_ROOT}"
cd "$REPO_ROOT"
for proto in fuyao/kubeletapi/deviceplugin/v1beta1/api.proto fuyao/kubeletapi/podresources/v1/api.proto; do
  mkdir -p "$OUT/$(dirname "$proto")"
  python -m grpc_tools.protoc -I . --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" "$proto"
  echo "generated $(dirname "$proto")/api_pb2.py, api_pb2.pyi, api_pb2_grpc.py under $OUT"
done
