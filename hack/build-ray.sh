#!/usr/bin/env bash
# Build (once) the cached virtualenv of Ray with Serve that the Ray tests and benchmarks run on this host:
#   ${FUYAO_CACHE:-$HOME/.cache/fuyao}/ray-<version>/   (prints its python on the last line)
# It holds PyPI's ray[serve]==RAY_VERSION and fuyao's runtime dependencies (pyproject.toml), resolved together, so
# Ray workers started from it import fuyao from the checkout with PYTHONPATH=<repo>. Idempotent: a venv whose stamp
# names the version and the dependency list is reused. pip's output goes to $CACHE/logs/build-ray.log. RAY_VERSION
# comes from hack/cluster/versions.env (an environment variable wins).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib/versions.sh"
RAY_VERSION="${RAY_VERSION:?RAY_VERSION is not set in hack/cluster/versions.env}"
source "$HERE/lib/venv.sh"  # pick_python (it also sets REPO_ROOT and the project's VENV, replaced below)
CACHE="${FUYAO_CACHE:-$HOME/.cache/fuyao}"
VENV="$CACHE/ray-$RAY_VERSION"
LOG="$CACHE/logs/build-ray.log"
mkdir -p "$CACHE/logs"
PY="$(pick_python)"
REQS="$("$PY" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
  "$REPO_ROOT/pyproject.toml")"
KEY="$(printf '%s\n%s\n' "$RAY_VERSION" "$REQS" | sha256sum | cut -c1-12)"
STAMP="$VENV/.fuyao-ray-$KEY"

if [ -f "$STAMP" ] && "$VENV/bin/python" -c 'import ray, ray.serve' 2>/dev/null; then
  echo "$VENV/bin/python"
  exit 0
fi
started=$SECONDS
echo "==> building the Ray venv $VENV (ray[serve] $RAY_VERSION; pip output in $LOG)" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
mapfile -t DEPS <<<"$REQS"
{
  "${PIP[@]}" install -q --upgrade pip
  "${PIP[@]}" install -q --only-binary=:all: "ray[serve]==$RAY_VERSION" "${DEPS[@]}"
} >>"$LOG" 2>&1 || { echo "pip could not install Ray; the end of $LOG:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
"$VENV/bin/python" -c 'import ray, ray.serve, ray.serve.request_router' >>"$LOG" 2>&1 || {
  echo "Ray does not import; the end of $LOG:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
touch "$STAMP"
echo "    built in $((SECONDS - started)) s ($(du -sh "$VENV" | cut -f1))" >&2
echo "$VENV/bin/python"
