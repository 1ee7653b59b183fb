#!/usr/bin/env bash
# Build the upstream binaries a local-cluster test harness needs (etcd, kube-apiserver,
# kube-scheduler, kube-controller-manager, kubelet, helm) with Go, from the Go module proxy
# only (no git clones, no release downloads), and cache them under
#   ${FUYAO_CACHE:-$HOME/.cache/fuyao}/bin/<name>-<version>   plus a symlink bin/<name>.
#
# Usage: hack/build-upstream.sh [name...]
#   names: etcd kube-apiserver kube-scheduler kube-controller-manager kubelet helm (default: all
#          of these), kubectl, kube-proxy, coredns, kwok, prometheus-crds (CRD files), vc-scheduler (only when VOLCANO_VERSION is set; best effort).
# Idempotent: a cached binary that answers --version (helm: version) is not rebuilt.
# Builds run at nice 19 on one core (go build -p 1, GOMAXPROCS=1); full output goes to
# $CACHE/logs/build-<name>.log. See docs/upstream-binaries.md.
set -euo pipefail

# --- versions: hack/cluster/versions.env (an environment variable of the same name wins) -------
while IFS='=' read -r _name _value; do
  [[ $_name =~ ^[A-Z][A-Z0-9_]*$ ]] || continue
  [[ -n ${!_name+set} ]] || printf -v "$_name" '%s' "$_value"
done <"$(dirname "${BASH_SOURCE[0]}")/cluster/versions.env"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"   # go.etcd.io/etcd/server/v3 (its root package is main)
K8S_VERSION="${K8S_VERSION:-v1.34.4}"     # k8s.io/kubernetes; staging modules use v0.<minor>.<patch>
HELM_VERSION="${HELM_VERSION:-v3.22.0}"   # helm.sh/helm/v3 cmd/helm
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"     # sigs.k8s.io/kwok cmd/kwok (fake nodes for scale tests)
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}" # github.com/coredns/coredns (cluster DNS of the local cluster)
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}" # its CRDs only (prometheus-crds)
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
kwok_ldflags() { echo "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"; }

K8S_CMDS=(kube-apiserver kube-scheduler kube-controller-manager kubelet kubectl kube-proxy)
k8s_pkgs() { local c; for c in "${K8S_CMDS[@]}"; do echo "k8s.io/kubernetes/cmd/$c"; done; }

# spec NAME -> "key module version staging pkg ldflags-func version-args"
spec() {
  case $1 in
    etcd) echo "etcd go.etcd.io/etcd/server/v3 $ETCD_VERSION - go.etcd.io/etcd/server/v3 no_ldflags --version" ;;
    kube-apiserver | kube-scheduler | kube-controller-manager | kubelet | kubectl | kube-proxy)
      local s=v0.${K8S_VERSION#v1.} varg=--version
      [[ $1 == kubectl ]] && varg=version,--client  # kubectl has no --version flag
      echo "k8s k8s.io/kubernetes $K8S_VERSION $s k8s.io/kubernetes/cmd/$1 k8s_ldflags $varg" ;;
    helm) echo "helm helm.sh/helm/v3 $HELM_VERSION - helm.sh/helm/v3/cmd/helm helm_ldflags version" ;;
    coredns) echo "coredns github.com/coredns/coredns $COREDNS_VERSION - github.com/coredns/coredns no_ldflags -version" ;;
    kwok) echo "kwok sigs.k8s.io/kwok $KWOK_VERSION - sigs.k8s.io/kwok/cmd/kwok kwok_ldflags --version" ;;
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
  dir=$(cd "$SRC" && GOFLAGS=-mod=mod go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error","no Dir")))')
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

# Not a binary: the Prometheus Operator's ServiceMonitor and PrometheusRule CRDs, from the module's example/
# directory at a pinned version, into $BIN/prometheus-operator-crds-<version>/ (the e2e tests install them to check
# the charts' monitoring objects against the real CRD schemas).
prometheus_crds() {
  local dest="$BIN/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION" dir f
  if [[ -f $dest/.ready ]]; then
    echo "prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION: cached $dest"
    return 0
  fi
  dir=$(cd "$SRC" && GOFLAGS=-mod=mod go mod download -json \
      "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or sys.exit(d.get("Error","no Dir")))')
  rm -rf "$dest"
  mkdir -p "$dest"
  for f in servicemonitors prometheusrules; do
    cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$f.yaml" "$dest/"
  done
  chmod -R u+w "$dest"
  touch "$dest/.ready"
  echo "prometheus-operator CRDs $PROMETHEUS_OPERATOR_VERSION: $dest"
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
  local start=$SECONDS rc
  set +e
  (
    set -e
    echo "==> $name $ver ($pkg) $(date -u +%FT%TZ) go=$(go env GOVERSION) GOFLAGS=$GOFLAGS GOMAXPROCS=$GOMAXPROCS"
    prepare_src "$key" "$mod" "$ver" "$staging" "${pkgs[@]}"
    cd "$SRC/$key-$ver"
    flags="-s -w $($ldf)"
    echo "==> go build -ldflags '$flags' $pkg"
    nice -n "$BUILD_NICE" go build -p 1 -v -trimpath -ldflags "$flags" -o "$out.tmp" "$pkg"
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

names=("$@")
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
  build "$n"
done
echo "binaries in $BIN ($(du -sh "$BIN" | cut -f1))"
