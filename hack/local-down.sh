#!/usr/bin/env bash
# Stop the cluster hack/local-up.sh started (the processes it recorded, its pods, its network namespaces).
# Usage: hack/local-down.sh [--state-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
exec "$VENV/bin/python" -m tests.support.cluster down "$@"
