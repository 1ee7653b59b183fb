#!/usr/bin/env bash
# fuyao node demo (no root, no cluster): discover the NPUs of a simulated node (the fake npu-smi), print inventory and topology, then run the
# device plugin against a kubelet stand-in.
# Usage: hack/demo-node.sh [PRESET]   presets: 910b4-8 (default), 910a1-8, 310p3-4, 910c-8
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/venv.sh"
ensure_venv
cd "$REPO_ROOT"
preset="${1:-910b4-8}"
state="$(mktemp -d)/npu-state.json"
trap 'rm -rf "$(dirname "$state")"' EXIT
export FAKE_NPU_SMI_STATE="$state"
hack/fake-npu-smi fake init --preset "$preset"

echo "==> simulated node: preset $preset (fake npu-smi, state $state)"
echo
echo "==> npu-smi info (as the real tool prints it)"
hack/fake-npu-smi info | head -14
echo "   ..."
echo
echo "==> fuyao inventory: what the device plugin will advertise"
fuyao --log-format text inventory --npu-smi hack/fake-npu-smi
echo
echo "==> a chip fails: npu-smi reports NPU 1 Critical (error code 80E01801)"
hack/fake-npu-smi fake set-health -i 1 Critical --code 80E01801
fuyao --log-format text inventory --npu-smi hack/fake-npu-smi | sed -n '3,6p'
echo
echo "==> node annotation npu.openfuyao.com/topology (what the scheduler extender reads)"
fuyao --log-level warning inventory --npu-smi hack/fake-npu-smi --json | head -30
echo "   ..."
echo
if [ "$preset" = "910b4-8" ] || [ "$preset" = "310p3-4" ]; then
  echo "==> vNPUs: split NPU 0 into four slices (fuyao-vnpu, the design doc's vnpu-config.json)"
  cfg="$(dirname "$state")/vnpu-config.json"
  echo '{"devices": [{"device_id": "0", "vnpu_count": 4, "vnpu_memory": "3GB"}]}' > "$cfg"
  vnpu() { fuyao-vnpu "$1" --log-level warning --npu-smi hack/fake-npu-smi --ledger "$(dirname "$state")/ledger.json" "${@:2}"; }
  vnpu plan --config "$cfg"
  vnpu apply --config "$cfg" --no-kubelet | grep -E '^created'
  hack/fake-npu-smi info -t info-vnpu -i 0 -c 0 | sed -n '7,13p'
  echo '{"devices": [{"device_id": "0", "vnpu_count": 9, "vnpu_memory": "8GB"}]}' > "$cfg"
  echo "   an impossible plan is rejected as a whole:"
  vnpu plan --config "$cfg" || true
  echo '{"devices": []}' > "$cfg"
  vnpu apply --config "$cfg" --no-kubelet | grep -E '^destroyed'
  echo
fi
echo "==> fuyao-device-plugin serving a kubelet stand-in (real gRPC v1beta1 over unix sockets)"
python hack/demo_deviceplugin.py "$preset"
echo
echo "Next: hack/test.sh runs the test suite; docs/architecture.md shows how the components fit together."
