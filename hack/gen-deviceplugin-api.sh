#!/usr/bin/env bash
# Regenerate the Python stubs of the kubelet device-plugin API (deviceplugin/api/v1beta1/api.proto) with the
# grpcio-tools version pinned in pyproject.toml. The generated files are committed; tests check that running this
# script changes nothing. Usage: hack/gen-deviceplugin-api.sh [OUTPUT_ROOT]  (default: the repository)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/venv.sh"
ensure_venv test
OUT="${1:-$REPO_ROOT}"
PROTO=deviceplugin/api/v1beta1/api.proto
mkdir -p "$OUT/$(dirname "$PROTO")"
cd "$REPO_ROOT"
python -m grpc_tools.protoc -I . --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" "$PROTO"
echo "generated $(dirname "$PROTO")/api_pb2.py, api_pb2.pyi, api_pb2_grpc.py under $OUT"
