#!/usr/bin/env bash
# Run one benchmark after installing what it needs (the test venv; upstream binaries, the local cluster's Debian
# packages, the vLLM or Ray venvs where the benchmark uses them). Method and figures: docs/benchmarks.md.
#
# Usage: hack/bench.sh NAME [ARGS...]     (ARGS go to the benchmark; hack/bench.sh NAME --help lists them)
#        hack/bench.sh --list
# NAME: colocation, cluster, qos-wakeup-probe (root), scheduling, extender, extender-cycle, extender-scale, router,
#       kv-tier, kvcache, qos, deviceplugin, ray-serve.
# Example: sudo hack/bench.sh colocation --agent-config my-agent.yaml --burner-milli 332
set -euo pipefail
cd "$(dirname "$0")/.."
NAMES="colocation cluster qos-wakeup-probe scheduling extender extender-cycle extender-scale router kv-tier kvcache qos deviceplugin ray-serve"
name=${1:-}
if [ -z "$name" ] || [ "$name" = --help ] || [ "$name" = -h ] || [ "$name" = --list ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  [ -n "$name" ] && exit 0 || exit 2
fi
shift
case " $NAMES " in
  *" $name "*) ;;
  *) echo "bench: unknown benchmark '$name'; known: $NAMES" >&2; exit 2 ;;
esac
script=bench/${name//-/_}_bench.py
[ "$name" = qos-wakeup-probe ] && script=bench/qos_wakeup_probe.py
[ "$name" = extender-scale ] && script=bench/extender_scale.py
needs_root() { [ "$(id -u)" = 0 ] || { echo "bench $name: needs root ($1)" >&2; exit 1; }; }
source hack/lib/venv.sh
ensure_venv test
case "$name" in
  colocation|cluster)
    needs_root "a local cluster: containerd, the kubelet, cgroups"
    source hack/lib/cluster-deps.sh
    ensure_cluster_deps
    hack/build-upstream.sh etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy coredns kwok ;;
  qos-wakeup-probe) needs_root "cgroups and sched_setattr on other processes" ;;
  scheduling|extender-scale|extender-cycle) hack/build-upstream.sh etcd kube-apiserver kube-scheduler kwok ;;
  router|kv-tier) hack/build-vllm.sh >/dev/null ;;  # the real-vLLM rows (vllm-router comes from PyPI on first use)
  ray-serve) hack/build-ray.sh >/dev/null ;;
esac
exec "$VENV/bin/python" "$script" "$@"
