# Sourced by hack/*.sh: make sure the Debian packages the local cluster needs are installed (root only).
# Usage: ensure_cluster_deps
ensure_cluster_deps() {
  local missing=() tool
  for tool in containerd runc ctr nsenter ip gcc busybox debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ -e /usr/lib/cni/bridge ] || [ -e /opt/cni/bin/bridge ] || missing+=(cni-plugins)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "local cluster: missing ${missing[*]} and not root to install them" >&2
    return 1
  fi
  echo "==> installing ${missing[*]} (apt: containerd runc containernetworking-plugins busybox-static gcc debootstrap)"
  local pkgs=(containerd runc util-linux iproute2 containernetworking-plugins busybox-static gcc libc6-dev debootstrap)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${pkgs[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${pkgs[@]}" >/dev/null; }
}
