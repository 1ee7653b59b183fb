#!/usr/bin/env bash
# Build the upstream binaries a local-cluster test harness needs (etcd, kube-apiserver,
# kube-scheduler, kube-controller-manager, kubelet, helm) with Go, from the Go module proxy
# only (no git clones, no release downloads), and cache them under
#   ${FUYAO_CACHE:-$HOME/.cache/fuyao}/bin/<name>-<version>   plus a symlink bin/<name>.
#
# Usage: hack/build-upstream.sh [name...]
#   names: etcd kube-apiserver kube-scheduler kube-controller-manager kubelet helm (default: all
#          of these), kubectl, kube-proxy, coredns, kwok, prometheus-crds (CRD files), vc-scheduler (only when
#          VOLCANO_VERSION is set; best effort), and for monitoring: prometheus promtool prometheus-operator
#          prometheus-config-reloader metrics-server keda-operator keda-adapter (the group name "monitoring" stands
#          for all of them, plus the manifests keda-config and metrics-server-config), and for Ray: kuberay-operator
#          and kuberay-crds (the group name "ray" stands for both), and for kind clusters (hack/kind-up.sh): kind and
#          kubeadm, and crictl for the node image (the group name "kind" stands for the three).
# Idempotent: a cached binary that answers --version (helm: version) is not rebuilt.
# Builds run at nice 19 on one core (go build -p 1, GOMAXPROCS=1); full output goes to
# $CACHE/logs/build-<name>.log. See docs/upstream-binaries.md.
set -euo pipefail

# --- versions: hack/cluster/versions.env (an environment variable of the same name wins) -------
source "$(dirname "${BASH_SOURCE[0]}")/lib/versions.sh"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"   # go.etcd.io/etcd/server/v3 (its root package is main)
K8S_VERSION="${K8S_VERSION:-v1.34.4}"     # k8s.io/kubernetes; staging modules use v0.<minor>.<patch>
HELM_VERSION="${HELM_VERSION:-v3.22.0}"   # helm.sh/helm/v3 cmd/helm
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"     # sigs.k8s.io/kwok cmd/kwok (fake nodes for scale tests)
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}" # github.com/coredns/coredns (cluster DNS of the local cluster)
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}" # CRDs, cmd/operator, cmd/prometheus-config-reloader
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}" # github.com/prometheus/prometheus: Prometheus 3.16.0 (v0.3MM.P = 3.MM.P)
METRICS_SERVER_VERSION="${METRICS_SERVER_VERSION:-v0.8.0}" # sigs.k8s.io/metrics-server cmd/metrics-server
KEDA_VERSION="${KEDA_VERSION:-v2.21.0}"   # github.com/kedacore/keda/v2 cmd/operator, cmd/adapter
KUBERAY_VERSION="${KUBERAY_VERSION:-v1.5.2}" # github.com/ray-project/kuberay/ray-operator (its root package is main)
KIND_VERSION="${KIND_VERSION:-v0.33.0}"   # sigs.k8s.io/kind (its root package is main): hack/kind-up.sh
CRICTL_VERSION="${CRICTL_VERSION:-v1.34.0}" # sigs.k8s.io/cri-tools cmd/crictl: in fuyao's kind node image
# volcano.sh/volcano is not served by the module proxy (403 "not available"), so it is off by
# default; set VOLCANO_VERSION to try anyway (a failure there only warns).
VOLCANO_VERSION="${VOLCANO_VERSION:-}"

CACHE="${FUYAO_CACHE:-$HOME/.cache/fuyao}"
BIN="$CACHE/bin"
LOGS="$CACHE/logs"
SRC="$CACHE/src"

export GOTOOLCHAIN=local
case " ${GOFLAGS:-} " in
  *" -buildvcs=false "*) ;;
  *) export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false" ;;
esac
# One core: -p 1 limits parallel packages, GOMAXPROCS=1 keeps compile/link single-threaded.
export GOMAXPROCS="${GOMAXPROCS:-1}"
BUILD_NICE="${BUILD_NICE:-19}"
BUILD_JOBS="${BUILD_JOBS:-1}"   # go build -p; CI's cold run (nothing else running) sets 2

command -v go >/dev/null || { echo "build-upstream: go not found in PATH" >&2; exit 1; }
command -v python3 >/dev/null || { echo "build-upstream: python3 not found in PATH" >&2; exit 1; }
mkdir -p "$BIN" "$LOGS" "$SRC"

# Serialise concurrent runs (e.g. two test sessions warming the cache at once).
if command -v flock >/dev/null; then
  exec 9>"$CACHE/.build.lock"
  flock 9
fi

# prepare_src KEY MODULE VERSION STAGING_VERSION PKG...
# Creates a throwaway module $SRC/KEY-VERSION that requires MODULE@VERSION. Every replace in
# MODULE's own go.mod that points at a local directory (k8s staging, etcd's sibling modules) is
# re-pointed at the published module: at the version MODULE requires, or STAGING_VERSION when
# that is a v0.0.0 placeholder (k8s). Local replaces of modules it does not require (etcd's
# FORBIDDEN_DEPENDENCY guards) are dropped; non-local replaces are copied as they are.
# The binaries' packages are recorded as tool directives so go.sum covers exactly what we build.
# Must run in a set -e context (it is called from the build subshell).
prepare_src() {
  local key=$1 mod=$2 ver=$3 staging=$4
  shift 4
  local dir="$SRC/$key-$ver"
  local -a targets=()
  local p
  for p in "$@"; do targets+=("$p@$ver"); done
  if [[ -f $dir/.ready ]]; then
    # .ready lists the packages go.sum covers; a package added later (kube-proxy) is fetched into the same module
    [[ "$(cat "$dir/.ready")" == "$*" ]] && return 0
    echo "==> adding tools to $dir: $*"
    (cd "$dir" && go get -tool "${targets[@]}" && go mod download)
    echo "$*" >"$dir/.ready"
    return 0
  fi
  echo "==> preparing $dir"
  rm -rf "$dir"
  mkdir -p "$dir"
  cd "$dir"
  go mod init "fuyao.local/upstream/$key"
  local gomod
  gomod=$(go mod download -json "$mod@$ver" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("GoMod") or sys.exit(d.get("Error","no GoMod")))')
  echo "==> upstream go.mod: $gomod"
  local -a edits
  mapfile -t edits < <(go mod edit -json "$gomod" | python3 -c '
import json, sys
m = json.load(sys.stdin)
staging = sys.argv[1]
req = {r["Path"]: r["Version"] for r in (m.get("Require") or [])}
for r in m.get("Replace") or []:
    old, new = r["Old"], r["New"]
    if new["Path"].startswith((".", "/")):
        v = req.get(old["Path"])
        if v in (None, "v0.0.0") and staging and (v or old["Path"].startswith("k8s.io/")):
            v = staging
        if not v or v == "v0.0.0":
            print("dropping local replace of unrequired " + old["Path"], file=sys.stderr)
            continue
        print("-replace=%s=%s@%s" % (old["Path"], old["Path"], v))
    else:
        o = old["Path"] + ("@" + old["Version"] if old.get("Version") else "")
        print("-replace=%s=%s@%s" % (o, new["Path"], new["Version"]))
' "$staging")
  printf '    %s\n' "${edits[@]}"
  go mod edit -require="$mod@$ver" "${edits[@]}"
  go get -tool "${targets[@]}"
  go mod download
  echo "$*" >.ready
}

# Extra -ldflags per family (run inside the prepared module dir).
k8s_ldflags() {
  local ver=$K8S_VERSION minor
  minor=${ver#v1.}
  minor=${minor%%.*}
  local date
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local p out=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X $p.gitVersion=$ver -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    out+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  echo "$out"
}
helm_ldflags() {
  local cg maj min
  cg=$(go list -m -f '{{.Version}}' k8s.io/client-go)   # e.g. v0.35.1 -> k8s 1.35
  maj=1
  min=${cg#v0.}
  min=${min%%.*}
  echo "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "-X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
    "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$maj -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$min" \
    "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$maj -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$min"
}
no_ldflags() { :; }
# github.com/prometheus/common/version, which prometheus, promtool and the Prometheus Operator print
prom_version_ldflags() { # VERSION
  local p=github.com/prometheus/common/version
  echo "-X $p.Version=$1 -X $p.Branch=HEAD -X $p.BuildUser=fuyao -X $p.BuildDate=$(date -u +%Y%m%d-%H:%M:%S)"
}
prometheus_ldflags() { # v0.316.0 -> 3.16.0
  local v=${PROMETHEUS_VERSION#v0.}
  prom_version_ldflags "${v:0:1}.$((10#${v:1:2})).${v#*.}"
}
operator_ldflags() { prom_version_ldflags "${PROMETHEUS_OPERATOR_VERSION#v}"; }
metrics_server_ldflags() {
  local p=k8s.io/client-go/pkg/version   # what its Makefile sets (and --version prints)
  echo "-X $p.gitVersion=$METRICS_SERVER_VERSION -X $p.gitTreeState=clean"
}
keda_ldflags() { echo "-X github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v}"; }
# Go build tags: Prometheus with the Kubernetes service discovery only (what the Prometheus Operator's generated
# configuration uses; the other 25 mechanisms pull in every cloud SDK and double the build).
build_tags() {
  case $1 in
    prometheus | promtool) echo "remove_all_sd,enable_kubernetes_sd" ;;
    *) echo "" ;;
  esac
}
crictl_ldflags() { echo "-X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"; }
kwok_ldflags() { echo "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"; }

K8S_CMDS=(kube-apiserver kube-scheduler kube-controller-manager kubelet kubectl kube-proxy kubeadm)
k8s_pkgs() { local c; for c in "${K8S_CMDS[@]}"; do echo "k8s.io/kubernetes/cmd/$c"; done; }

# spec NAME -> "key module version staging pkg ldflags-func version-args"
spec() {
  case $1 in
    etcd) echo "etcd go.etcd.io/etcd/server/v3 $ETCD_VERSION - go.etcd.io/etcd/server/v3 no_ldflags --version" ;;
    kube-apiserver | kube-scheduler | kube-controller-manager | kubelet | kubectl | kube-proxy | kubeadm)
      local s=v0.${K8S_VERSION#v1.} varg=--version
      [[ $1 == kubectl ]] && varg=version,--client  # kubectl has no --version flag
      [[ $1 == kubeadm ]] && varg=version
      echo "k8s k8s.io/kubernetes $K8S_VERSION $s k8s.io/kubernetes/cmd/$1 k8s_ldflags $varg" ;;
    helm) echo "helm helm.sh/helm/v3 $HELM_VERSION - helm.sh/helm/v3/cmd/helm helm_ldflags version" ;;
    coredns) echo "coredns github.com/coredns/coredns $COREDNS_VERSION - github.com/coredns/coredns no_ldflags -version" ;;
    kwok) echo "kwok sigs.k8s.io/kwok $KWOK_VERSION - sigs.k8s.io/kwok/cmd/kwok kwok_ldflags --version" ;;
    prometheus | promtool)
      echo "prometheus github.com/prometheus/prometheus $PROMETHEUS_VERSION - github.com/prometheus/prometheus/cmd/$1 prometheus_ldflags --version" ;;
    prometheus-operator)
      echo "prometheus-operator github.com/prometheus-operator/prometheus-operator $PROMETHEUS_OPERATOR_VERSION - github.com/prometheus-operator/prometheus-operator/cmd/operator operator_ldflags --version" ;;
    prometheus-config-reloader)
      echo "prometheus-operator github.com/prometheus-operator/prometheus-operator $PROMETHEUS_OPERATOR_VERSION - github.com/prometheus-operator/prometheus-operator/cmd/prometheus-config-reloader operator_ldflags --version" ;;
    metrics-server) echo "metrics-server sigs.k8s.io/metrics-server $METRICS_SERVER_VERSION - sigs.k8s.io/metrics-server/cmd/metrics-server metrics_server_ldflags --version" ;;
    keda-operator | keda-adapter)
      echo "keda github.com/kedacore/keda/v2 $KEDA_VERSION - github.com/kedacore/keda/v2/cmd/${1#keda-} keda_ldflags --help" ;;
    kuberay-operator)
      echo "kuberay github.com/ray-project/kuberay/ray-operator $KUBERAY_VERSION - github.com/ray-project/kuberay/ray-operator no_ldflags --help" ;;
    kind) echo "kind sigs.k8s.io/kind $KIND_VERSION - sigs.k8s.io/kind no_ldflags version" ;;
    crictl) echo "cri-tools sigs.k8s.io/cri-tools $CRICTL_VERSION - sigs.k8s.io/cri-tools/cmd/crictl crictl_ldflags --version" ;;
    vc-scheduler) echo "volcano volcano.sh/volcano $VOLCANO_VERSION - volcano.sh/volcano/cmd/scheduler no_ldflags --version" ;;
    *) echo "build-upstream: unknown binary '$1'" >&2; return 1 ;;
  esac
}

# KWOK reads its behaviour (node and pod "stages") from config files that the binary does not embed: take the
# upstream defaults (node-initialize, node-heartbeat-with-lease, pod-ready/complete/delete) from the very module
# the binary was built from, into $BIN/kwok-stages-<version>/ (tests.support.cluster passes them with --config).
kwok_stages() {
  local dest="$BIN/kwok-stages-$KWOK_VERSION" dir f
  [[ -f $dest/.ready ]] && return 0
  dir=$(module_dir "sigs.k8s.io/kwok@$KWOK_VERSION")
  rm -rf "$dest"
  mkdir -p "$dest"
  for f in "$dir"/kustomize/stage/node/fast/*.yaml "$dir"/kustomize/stage/node/heartbeat-with-lease/*.yaml \
           "$dir"/kustomize/stage/pod/fast/*.yaml; do
    [[ $(basename "$f") == kustomization.yaml ]] && continue
    cp "$f" "$dest/"
  done
  chmod -R u+w "$dest"
  touch "$dest/.ready"
  echo "kwok stages: $dest ($(ls "$dest" | tr '\n' ' '))"
}

# Not binaries: upstream manifests, copied from the very module a binary is built from at its pinned version into
# $BIN/<name>-<version>/ (marked complete by .ready holding what was copied):
# - prometheus-crds: the Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule, Prometheus and the rest) at the
#   top (e2e tests check the charts' monitoring objects against them) and its example RBAC and Deployment under
#   rbac/ (tests.support.monitoring installs the operator and a Prometheus from them);
# - keda-config: KEDA's kustomize tree (config/: CRDs, RBAC, the operator's and metrics API server's Deployments,
#   the APIService);
# - metrics-server-config: metrics-server's kustomize base (manifests/base);
# - kuberay-crds: KubeRay's CRDs (config/crd/bases of the ray-operator module).
upstream_files() { # DEST-NAME MODULE@VERSION SRC:DST...
  local name=$1 dest="$BIN/$1" module=$2 dir pair want
  shift 2
  want="$*"
  if [[ -f $dest/.ready && $(cat "$dest/.ready") == "$want" ]]; then
    echo "$name: cached $dest"
    return 0
  fi
  dir=$(module_dir "$module")
  rm -rf "$dest"
  mkdir -p "$dest"
  for pair in "$@"; do
    mkdir -p "$dest/${pair#*:}"
    cp -r "$dir/${pair%%:*}"/. "$dest/${pair#*:}/"
  done
  chmod -R u+w "$dest"
  echo "$want" >"$dest/.ready"
  echo "$name: $dest"
}
prometheus_crds() {
  upstream_files "prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION" \
    "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    example/prometheus-operator-crd:. example/rbac:rbac
}
keda_config() {
  upstream_files "keda-config-$KEDA_VERSION" "github.com/kedacore/keda/v2@$KEDA_VERSION" config:.
}
kuberay_crds() {  # RayCluster, RayJob, RayService (and the rest of the version's CRDs)
  upstream_files "kuberay-crds-$KUBERAY_VERSION" "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" \
    config/crd/bases:.
}
metrics_server_config() {
  upstream_files "metrics-server-config-$METRICS_SERVER_VERSION" "sigs.k8s.io/metrics-server@$METRICS_SERVER_VERSION" \
    manifests/base:.
}

module_dir() { # MODULE@VERSION -> its directory in the module cache (downloaded if needed)
  (cd "$SRC" && GOFLAGS=-mod=mod go mod download -json "$1") |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error","no Dir")))'
}

runs_ok() { # BINARY VERSION-ARGS (comma-separated)
  local -a args
  IFS=, read -r -a args <<<"$2"
  timeout 30 "$1" "${args[@]}" >/dev/null 2>&1
}

build() { # NAME
  local name=$1 key mod ver staging pkg ldf varg s
  s=$(spec "$name") || return 1
  read -r key mod ver staging pkg ldf varg <<<"$s"
  [[ $staging == - ]] && staging=""
  local out="$BIN/$name-$ver" log="$LOGS/build-$name.log"
  if [[ -x $out ]] && runs_ok "$out" "$varg"; then
    ln -sfn "$name-$ver" "$BIN/$name"
    echo "$name $ver: cached $out"
    [[ $name == kwok ]] && kwok_stages
    return 0
  fi
  local -a pkgs=("$pkg")
  [[ $key == k8s ]] && mapfile -t pkgs < <(k8s_pkgs)
  # every binary of a module is recorded at once, so building a second one never re-resolves the first
  case $key in
    prometheus) pkgs=(github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool) ;;
    prometheus-operator) pkgs=(github.com/prometheus-operator/prometheus-operator/cmd/operator
                               github.com/prometheus-operator/prometheus-operator/cmd/prometheus-config-reloader) ;;
    keda) pkgs=(github.com/kedacore/keda/v2/cmd/operator github.com/kedacore/keda/v2/cmd/adapter) ;;
  esac
  local start=$SECONDS rc
  set +e
  (
    set -e
    echo "==> $name $ver ($pkg) $(date -u +%FT%TZ) go=$(go env GOVERSION) GOFLAGS=$GOFLAGS GOMAXPROCS=$GOMAXPROCS"
    prepare_src "$key" "$mod" "$ver" "$staging" "${pkgs[@]}"
    cd "$SRC/$key-$ver"
    flags="-s -w $($ldf)"
    echo "==> go build -ldflags '$flags' $pkg"
    nice -n "$BUILD_NICE" go build -p "$BUILD_JOBS" -v -trimpath -tags "$(build_tags "$name")" -ldflags "$flags" \
      -o "$out.tmp" "$pkg"
    echo "==> $out.tmp ${varg//,/ }"
    local -a vargs
    IFS=, read -r -a vargs <<<"$varg"
    timeout 30 "$out.tmp" "${vargs[@]}"
    mv -f "$out.tmp" "$out"
  ) >"$log" 2>&1
  rc=$?
  set -e
  local took=$((SECONDS - start))
  if [[ $rc -ne 0 ]]; then
    rm -f "$out.tmp"
    echo "$name $ver: FAILED after ${took}s (exit $rc); last lines of $log:" >&2
    tail -n 40 "$log" >&2
    echo "full log: $log" >&2
    return 1
  fi
  ln -sfn "$name-$ver" "$BIN/$name"
  echo "$name $ver: built in ${took}s -> $out"
  [[ $name == kwok ]] && kwok_stages
  return 0
}

names=()
for n in "$@"; do
  if [[ $n == monitoring ]]; then
    names+=(prometheus-crds prometheus promtool prometheus-operator prometheus-config-reloader metrics-server
            metrics-server-config keda-config keda-operator keda-adapter)
  elif [[ $n == ray ]]; then
    names+=(kuberay-crds kuberay-operator)
  elif [[ $n == kind ]]; then
    names+=(kind kubeadm crictl)
  else
    names+=("$n")
  fi
done
if [[ ${#names[@]} -eq 0 ]]; then
  names=(etcd kube-apiserver kube-scheduler kube-controller-manager kubelet helm)
  [[ -n $VOLCANO_VERSION ]] && names+=(vc-scheduler)
fi
for n in "${names[@]}"; do
  if [[ $n == vc-scheduler ]]; then
    if [[ -z $VOLCANO_VERSION ]]; then
      echo "vc-scheduler: skipped (VOLCANO_VERSION unset; volcano.sh/volcano is not on the module proxy)"
    else
      # Not "if ! build": that would switch off set -e inside the build subshell.
      set +e
      (build "$n")
      rc=$?
      set -e
      [[ $rc -eq 0 ]] || echo "vc-scheduler: WARNING build failed (optional, continuing)" >&2
    fi
    continue
  fi
  if [[ $n == prometheus-crds ]]; then
    prometheus_crds
    continue
  fi
  case $n in
    keda-config | metrics-server-config | kuberay-crds) "${n//-/_}"; continue ;;
  esac
  build "$n"
done
echo "binaries in $BIN ($(du -sh "$BIN" | cut -f1))"
