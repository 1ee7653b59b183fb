#!/usr/bin/env bash
# Install (or uninstall) fuyao's four Helm charts on the local cluster started with
# `hack/local-up.sh --components chart`, with the values that fit it (the locally built image, the fake npu-smi's
# paths, the extender's fixed ClusterIP), in the order of docs/install.md. hack/demo.sh does this and more.
# `operator` takes the design doc's path instead: `helm install npu-operator` with its flags, and the operator
# installs, validates and reports the rest (`operator-uninstall` removes it).
# Usage: hack/install-charts.sh [install|uninstall|operator|operator-uninstall] [--state-dir DIR]
#        [--namespace fuyao-system] [--monitoring] [--ray]
# --monitoring (install): with the charts' ServiceMonitors, PrometheusRules and dashboard, for the Prometheus that
# `hack/local-up.sh --components chart --monitoring` runs.
# --ray: also imports fuyao's Ray image (fuyao.local/fuyao-ray:dev), which docs/examples/ray/ use (docs/ray.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv test
action="${1:-install}"
[ $# -gt 0 ] && shift
exec "$VENV/bin/python" -m tests.support.charts "$action" "$@"
