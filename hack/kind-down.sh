#!/usr/bin/env bash
# Delete the kind cluster hack/kind-up.sh made (docs/kind.md).
#   hack/kind-down.sh [--state-dir /tmp/fuyao-kind] [--name fuyao] [--stop-private-docker]
# --stop-private-docker: also stop fuyao's own dockerd (hack/kind-up.sh --private-docker); its images stay cached.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/lib/venv.sh
ensure_venv test
source hack/lib/docker.sh
stop=false
args=()
for arg in "$@"; do
  case $arg in
    --stop-private-docker) stop=true ;;
    *) args+=("$arg") ;;
  esac
done
private_docker_running && export DOCKER_HOST="unix://$FUYAO_DOCKER_DIR/docker.sock"
"$VENV/bin/python" -m tests.support.kind down "${args[@]}"
if $stop; then
  stop_private_docker
  echo "fuyao's dockerd stopped"
fi
