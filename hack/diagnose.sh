#!/usr/bin/env bash
# fuyao diagnosis: a read-only health report of a cluster running fuyao (the design doc's diagnosis script, made
# real for our stack). Only reads: kubectl get / logs / API-server proxy GETs; changes nothing.
#
#   1. cluster: versions, nodes
#   2. NPUs per node: capacity vs allocatable (a gap = unhealthy or carved devices), vNPUs, batch resources,
#      the contract labels and the topology annotation
#   3. fuyao components: workloads, pods, restarts
#   4. recent logs of each component pod (errors and warnings first)
#   5. metrics excerpts: device health, extender decisions, router requests/TTFT, KV-cache hit ratio
#   6. pods waiting for NPUs: their scheduling events and the extender's explanation
#   7. recent warning events in the fuyao namespace
#
# Usage: hack/diagnose.sh [--kubeconfig FILE] [--namespace fuyao-system] [--tail N] [--output DIR]
#   --output DIR also writes every section to DIR/<n>-<section>.txt (a bundle to attach to an issue).
# Needs kubectl (PATH or ~/.cache/fuyao/bin/kubectl). Secrets are never read.
set -uo pipefail

namespace=fuyao-system
tail_lines=40
output=""
kubeconfig="${KUBECONFIG:-}"
while [ $# -gt 0 ]; do
  case $1 in
    --kubeconfig) kubeconfig=$2; shift 2 ;;
    --namespace | -n) namespace=$2; shift 2 ;;
    --tail) tail_lines=$2; shift 2 ;;
    --output) output=$2; shift 2 ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "diagnose: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $tail_lines =~ ^[0-9]+$ ]] || { echo "diagnose: --tail expects a number, got '$tail_lines'" >&2; exit 2; }

KUBECTL=$(command -v kubectl || echo "$HOME/.cache/fuyao/bin/kubectl")
[ -x "$KUBECTL" ] || { echo "diagnose: kubectl not found (PATH or ~/.cache/fuyao/bin/kubectl)" >&2; exit 2; }
k() { if [ -n "$kubeconfig" ]; then "$KUBECTL" --kubeconfig "$kubeconfig" "$@"; else "$KUBECTL" "$@"; fi; }
k version --request-timeout=10s >/dev/null 2>&1 || {
  echo "diagnose: cannot reach the API server (kubeconfig: ${kubeconfig:-default}):" >&2
  k version --request-timeout=10s 2>&1 | tail -2 >&2
  exit 1
}
[ -z "$output" ] || mkdir -p "$output"

section_no=0
section() { # TITLE FUNCTION
  section_no=$((section_no + 1))
  local title=$1 fn=$2 file=""
  [ -z "$output" ] || file="$output/$section_no-$fn.txt"
  {
    printf '\n=== %d. %s ===\n' "$section_no" "$title"
    "$fn" 2>&1
  } | if [ -n "$file" ]; then tee "$file"; else cat; fi
}

proxy_get() { # PATH: a GET through the API server (services/pods proxy)
  k get --raw "$1" --request-timeout=10s
}

cluster_info() {
  k version 2>&1 | sed 's/^/  /'
  echo
  k get nodes -o wide
}

npus_per_node() {
  k get nodes -o custom-columns='NODE:.metadata.name,NPU-CAP:.status.capacity.npu\.huawei\.com/NPU,NPU-ALLOC:.status.allocatable.npu\.huawei\.com/NPU,VNPU:.status.allocatable.npu\.huawei\.com/vNPU,BATCH-CPU:.status.allocatable.kubernetes\.io/batch-cpu,ACCEL:.metadata.labels.accelerator,TYPE:.metadata.labels.accelerate-type,COUNT:.metadata.labels.npu\.openfuyao\.com/device-count'
  echo
  echo "NPUs the device plugin reports unhealthy (capacity - allocatable) and topology annotations:"
  k get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\t"}{.status.capacity.npu\.huawei\.com/NPU}{"\t"}{.status.allocatable.npu\.huawei\.com/NPU}{"\t"}{.metadata.annotations.npu\.openfuyao\.com/topology}{"\n"}{end}' |
    while IFS=$'\t' read -r node cap alloc topo; do
      [ -n "$cap" ] || continue
      gap=$(( ${cap:-0} - ${alloc:-0} ))
      state="ok"
      [ "$gap" -gt 0 ] && state="$gap NPU(s) not allocatable (unhealthy?)"
      [ -n "$topo" ] || state="$state; NO topology annotation (device plugin not publishing?)"
      printf '  %-20s %s\n' "$node" "$state"
    done
  echo
  echo "NPU faults (annotation npu.openfuyao.com/faults: codes, level, what the device plugin does) and their events:"
  k get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\t"}{.metadata.annotations.npu\.openfuyao\.com/faults}{"\n"}{end}' |
    while IFS=$'\t' read -r node faults; do
      [ -n "$faults" ] || continue
      case "$faults" in *'"devices":{}'*) continue ;; esac
      printf '  %-20s %s\n' "$node" "$faults"
    done
  k get events -A --field-selector involvedObject.kind=Node -o jsonpath='{range .items[?(@.source.component=="fuyao-device-plugin")]}{.lastTimestamp}{"  "}{.involvedObject.name}{"  "}{.reason}{"  "}{.message}{"\n"}{end}' 2>/dev/null |
    tail -n 20 | sed 's/^/  /'
}

components() {
  k get daemonsets,deployments -n "$namespace" -l app.kubernetes.io/part-of=fuyao -o wide
  echo
  k get pods -n "$namespace" -l app.kubernetes.io/part-of=fuyao -o wide
  echo
  echo "containers that restarted:"
  k get pods -n "$namespace" -l app.kubernetes.io/part-of=fuyao -o jsonpath='{range .items[*]}{.metadata.name}{"\t"}{range .status.containerStatuses[*]}{.name}={.restartCount} last={.lastState.terminated.reason}{" "}{end}{"\n"}{end}' |
    awk -F'\t' '$2 !~ /=0 last= *$/ {print "  " $0}'
}

recent_logs() {
  local pod
  for pod in $(k get pods -n "$namespace" -l app.kubernetes.io/part-of=fuyao -o name); do
    echo "--- $pod (errors/warnings, then the last lines)"
    if ! logs=$(k logs -n "$namespace" "$pod" --all-containers --tail="$tail_lines" --request-timeout=15s 2>&1); then
      echo "  logs unavailable: $(echo "$logs" | tail -1)"
      continue
    fi
    echo "$logs" | grep -E '"level": "(error|warning|critical)"|ERROR|WARNING|Traceback' | tail -10 | sed 's/^/  ! /'
    echo "$logs" | tail -8 | sed 's/^/    /'
  done
}

metrics_excerpts() {
  local pod name port
  while IFS=$'\t' read -r pod name port; do
    [ -n "$pod" ] || continue
    [ -n "$port" ] || continue
    echo "--- $name ($pod:$port)"
    proxy_get "/api/v1/namespaces/$namespace/pods/$pod:$port/proxy/metrics" 2>&1 |
      grep -E '^(fuyao_deviceplugin_devices|npu_health|npu_utilization|fuyao_extender_decisions_total|fuyao_extender_rejections_total|fuyao_qos_batch_resource|fuyao_qos_evictions_total|inference_requests_total|inference_errors_total|inference_ttft_seconds_(sum|count)|fuyao_kvcache_(hits|requests)_total|fuyao_kvcache_event_lag_seconds)' |
      head -24 | sed 's/^/  /'
  done < <(k get pods -n "$namespace" -l app.kubernetes.io/part-of=fuyao -o jsonpath='{range .items[*]}{.metadata.name}{"\t"}{.metadata.labels.app\.kubernetes\.io/name}{"/"}{.metadata.labels.app\.kubernetes\.io/component}{"\t"}{.spec.containers[0].ports[0].containerPort}{"\n"}{end}')
}

waiting_for_npus() {
  local extender
  extender=$(k get services -n "$namespace" -l app.kubernetes.io/name=scheduler-extender -o jsonpath='{.items[0].metadata.name}:{.items[0].spec.ports[0].port}' 2>/dev/null)
  local found=0 ns pod
  while IFS=$'\t' read -r ns pod; do
    [ -n "$pod" ] || continue
    found=1
    echo "--- $ns/$pod"
    k get events -n "$ns" --field-selector "involvedObject.name=$pod" -o custom-columns='LAST:.lastTimestamp,REASON:.reason,MESSAGE:.message' --no-headers 2>&1 | tail -4 | sed 's/^/  /'
    if [ -n "$extender" ] && [ "$extender" != ":" ]; then
      echo "  extender: $(proxy_get "/api/v1/namespaces/$namespace/services/$extender/proxy/explain/$ns/$pod" 2>&1 | cut -c1-600)"
    fi
  done < <(k get pods -A --field-selector=status.phase=Pending -o jsonpath='{range .items[*]}{.metadata.namespace}{"\t"}{.metadata.name}{"\t"}{.spec.containers[*].resources.limits}{"\n"}{end}' |
    grep -E 'npu\.huawei\.com' | cut -f1,2)
  [ "$found" = 1 ] || echo "  none: no Pending pod requests NPUs"
}

warning_events() {
  k get events -n "$namespace" --field-selector type=Warning --sort-by=.lastTimestamp 2>&1 | tail -20
}

echo "fuyao diagnose $(date -u +%FT%TZ) namespace=$namespace kubeconfig=${kubeconfig:-default}"
section "cluster" cluster_info
section "NPUs per node" npus_per_node
section "fuyao components" components
section "recent logs" recent_logs
section "metrics excerpts" metrics_excerpts
section "pods waiting for NPUs" waiting_for_npus
section "warning events in $namespace" warning_events
[ -z "$output" ] || echo -e "\nreport written to $output/"
