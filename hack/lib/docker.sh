# shellcheck shell=bash
# fuyao's own Docker daemon, for kind clusters where the machine's Docker cannot serve them (hack/kind-up.sh
# --private-docker; hack/test.sh uses it for the kind suite). It never touches the system's Docker: its own
# configuration file, socket, exec root and data root, and its own network namespace, so its bridges, iptables
# rules and published ports stay out of the host's network. A veth pair links that namespace to the host
# (10.250.0.1 on the host, 10.250.0.2 inside), and the host routes the kind network's subnet through it.
#
# In a sandbox whose capability bounding set is not full (CapBnd in /proc/self/status), `docker run --privileged`
# (every kind node) fails with "unable to apply caps: operation not permitted". There the daemon's default runtime is
# hack/kind/runc-caps-wrapper, which drops the capabilities this machine cannot grant before it calls runc. On a
# normal machine runc is used as it is.
#
#   source hack/lib/docker.sh; ensure_private_docker   # exports DOCKER_HOST and FUYAO_DOCKER_NETNS_IP
#   stop_private_docker
#
# Needs root and Debian's docker.io (installed with apt-get when missing).

FUYAO_DOCKER_DIR="${FUYAO_DOCKER_DIR:-/tmp/fuyao-docker}"
FUYAO_DOCKER_DATA="${FUYAO_DOCKER_DATA:-${FUYAO_CACHE:-$HOME/.cache/fuyao}/docker}"
FUYAO_DOCKER_NETNS=fuyao-docker
FUYAO_DOCKER_HOST_IP=10.250.0.1
FUYAO_DOCKER_NETNS_IP=10.250.0.2
DOCKER_CLI=/usr/bin/docker   # Debian's client: another `docker` may come first on PATH

# 0 when this process may hold every capability the kernel has (runc can grant what --privileged asks)
full_capability_set() {
  local bnd last
  bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  last=$(cat /proc/sys/kernel/cap_last_cap 2>/dev/null || echo 40)
  [[ $((16#$bnd)) -eq $(((1 << (last + 1)) - 1)) ]]
}

private_docker_running() {
  [[ -S $FUYAO_DOCKER_DIR/docker.sock ]] &&
    DOCKER_HOST="unix://$FUYAO_DOCKER_DIR/docker.sock" timeout 10 "$DOCKER_CLI" info >/dev/null 2>&1
}

_private_docker_network() {
  ip netns list | grep -qw "$FUYAO_DOCKER_NETNS" || ip netns add "$FUYAO_DOCKER_NETNS"
  if ! ip link show fuyao-dk0 >/dev/null 2>&1; then
    ip link add fuyao-dk0 type veth peer name fuyao-dk1
    ip link set fuyao-dk1 netns "$FUYAO_DOCKER_NETNS"
    ip addr add "$FUYAO_DOCKER_HOST_IP/30" dev fuyao-dk0
    ip link set fuyao-dk0 up
    ip netns exec "$FUYAO_DOCKER_NETNS" ip addr add "$FUYAO_DOCKER_NETNS_IP/30" dev fuyao-dk1
    ip netns exec "$FUYAO_DOCKER_NETNS" ip link set fuyao-dk1 up
    ip netns exec "$FUYAO_DOCKER_NETNS" ip link set lo up
    ip netns exec "$FUYAO_DOCKER_NETNS" ip route add default via "$FUYAO_DOCKER_HOST_IP"
  fi
  ip netns exec "$FUYAO_DOCKER_NETNS" sysctl -qw net.ipv4.ip_forward=1
}

ensure_private_docker() {
  [[ $(id -u) == 0 ]] || { echo "private docker: needs root (its own dockerd and network namespace)" >&2; return 1; }
  if ! command -v dockerd >/dev/null || [[ ! -x $DOCKER_CLI ]]; then
    echo "==> apt-get install docker.io (Debian's Docker, for fuyao's own daemon)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null 2>&1 || {
      apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; }
  fi
  export DOCKER_HOST="unix://$FUYAO_DOCKER_DIR/docker.sock" FUYAO_DOCKER_NETNS_IP
  if private_docker_running; then
    return 0
  fi
  mkdir -p "$FUYAO_DOCKER_DIR" "$FUYAO_DOCKER_DATA"
  _private_docker_network
  local runtime=() wrapper
  wrapper="$(cd "$(dirname "${BASH_SOURCE[0]}")/../kind" && pwd)/runc-caps-wrapper"
  if ! full_capability_set; then
    echo "==> this machine's capability bounding set is not full ($(awk '/^CapBnd:/ {print $2}' /proc/self/status)):" \
      "fuyao's dockerd runs privileged containers through $wrapper (a sandbox workaround)" >&2
    runtime=(--add-runtime "fuyao-runc=$wrapper" --default-runtime fuyao-runc)
  fi
  echo '{}' >"$FUYAO_DOCKER_DIR/daemon.json"
  # its own mount namespace (slave: host mounts still reach it) keeps the containers' mounts out of the host's
  nsenter --net="/run/netns/$FUYAO_DOCKER_NETNS" unshare --mount --propagation slave \
    dockerd --config-file "$FUYAO_DOCKER_DIR/daemon.json" --host "$DOCKER_HOST" \
    --data-root "$FUYAO_DOCKER_DATA" --exec-root "$FUYAO_DOCKER_DIR/exec" --pidfile "$FUYAO_DOCKER_DIR/docker.pid" \
    --storage-driver overlay2 "${runtime[@]}" >"$FUYAO_DOCKER_DIR/dockerd.log" 2>&1 &
  local i
  for i in $(seq 60); do
    private_docker_running && { echo "==> fuyao's dockerd is up ($DOCKER_HOST)" >&2; return 0; }
    sleep 1
  done
  echo "private docker: dockerd did not answer within 60 s; last lines of $FUYAO_DOCKER_DIR/dockerd.log:" >&2
  tail -n 20 "$FUYAO_DOCKER_DIR/dockerd.log" >&2
  return 1
}

stop_private_docker() {
  local pid
  if [[ -f $FUYAO_DOCKER_DIR/docker.pid ]]; then
    pid=$(cat "$FUYAO_DOCKER_DIR/docker.pid")
    kill "$pid" 2>/dev/null && for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  ip link del fuyao-dk0 2>/dev/null || true
  ip netns del "$FUYAO_DOCKER_NETNS" 2>/dev/null || true
  rm -rf "$FUYAO_DOCKER_DIR"
}
