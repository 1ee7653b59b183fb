#!/usr/bin/python3
"""fuyao-kindnet: the pod network of fuyao's locally built kind node image (tests/support/kind_image.py).

kind's own CNI agent, kindnetd, cannot be built here (its module is not on the Go module proxy), so this agent does
the part of its job a kind cluster needs, on every node (a DaemonSet, host network, NET_ADMIN):
- writes the node's CNI configuration (``/etc/cni/net.d/10-kindnet.conflist``: ptp with host-local addresses from
  the node's ``spec.podCIDR``, and portmap), as kindnetd does;
- keeps a route to every other node's pod range via that node's InternalIP (all nodes share kind's Docker network);
- masquerades traffic from pods to addresses outside the pod network (``POD_SUBNET``) that are not on the node.
No network policies. With the upstream ``kindest/node`` image, kind runs kindnetd itself and this is not used.

Standard library only; reads nodes from the API server with the pod's ServiceAccount (``CONTROL_PLANE_ENDPOINT``,
which kind adds to the manifest, avoids depending on Services before the network is up). Logs one JSON line per
change or error; never exits on an error (retries every ``INTERVAL`` seconds).
"""
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request

SA = "/var/run/secrets/kubernetes.io/serviceaccount"
CONFLIST = "/etc/cni/net.d/10-kindnet.conflist"
INTERVAL = float(os.environ.get("INTERVAL", "5"))


def log(event: str, **fields: object) -> None:
    print(json.dumps({"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}),
          flush=True)


def api_server() -> str:
    endpoint = os.environ.get("CONTROL_PLANE_ENDPOINT")
    if not endpoint:
        endpoint = f"{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
    return f"https://{endpoint}"


def nodes(server: str, context: ssl.SSLContext) -> list[dict]:
    with open(f"{SA}/token") as f:
        token = f.read().strip()
    request = urllib.request.Request(f"{server}/api/v1/nodes", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, context=context, timeout=10) as response:
        return json.load(response)["items"]


def internal_ip(node: dict) -> str | None:
    return next((a["address"] for a in node.get("status", {}).get("addresses", []) if a["type"] == "InternalIP"
                 and ":" not in a["address"]), None)


def mtu() -> int:
    try:
        with open("/sys/class/net/eth0/mtu") as f:
            return int(f.read())
    except OSError:
        return 1500


def write_conflist(pod_cidr: str) -> bool:
    config = {"cniVersion": "0.3.1", "name": "kindnet", "plugins": [
        {"type": "ptp", "ipMasq": False, "mtu": mtu(),
         "ipam": {"type": "host-local", "dataDir": "/run/cni-ipam-state", "routes": [{"dst": "0.0.0.0/0"}],
                  "ranges": [[{"subnet": pod_cidr}]]}},
        {"type": "portmap", "capabilities": {"portMappings": True}}]}
    text = json.dumps(config, indent=2) + "\n"
    try:
        with open(CONFLIST) as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    tmp = CONFLIST + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, CONFLIST)
    return True


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True)


def ensure_masquerade(pod_subnet: str) -> bool:
    rule = ["-s", pod_subnet, "!", "-d", pod_subnet, "-m", "addrtype", "!", "--dst-type", "LOCAL",
            "-j", "MASQUERADE", "-m", "comment", "--comment", "fuyao-kindnet"]
    if run("iptables", "-t", "nat", "-C", "POSTROUTING", *rule).returncode == 0:
        return False
    added = run("iptables", "-t", "nat", "-A", "POSTROUTING", *rule)
    if added.returncode != 0:
        raise RuntimeError(f"iptables: {added.stderr.strip()}")
    return True


def sync(me: str, pod_subnet: str, server: str, context: ssl.SSLContext, routes: dict[str, str]) -> None:
    items = nodes(server, context)
    mine = next((n for n in items if n["metadata"]["name"] == me), None)
    if mine is None or not mine["spec"].get("podCIDR"):
        log("waiting", reason=f"node {me} has no podCIDR yet")
        return
    if write_conflist(mine["spec"]["podCIDR"]):
        log("cni-config-written", path=CONFLIST, podCIDR=mine["spec"]["podCIDR"])
    if ensure_masquerade(pod_subnet):
        log("masquerade-added", podSubnet=pod_subnet)
    for node in items:
        cidr, via = node["spec"].get("podCIDR"), internal_ip(node)
        if node["metadata"]["name"] == me or not cidr or not via or routes.get(cidr) == via:
            continue
        replaced = run("ip", "route", "replace", cidr, "via", via)
        if replaced.returncode != 0:
            log("route-error", podCIDR=cidr, via=via, error=replaced.stderr.strip())
            continue
        routes[cidr] = via
        log("route", podCIDR=cidr, via=via, node=node["metadata"]["name"])


def main() -> None:
    me, pod_subnet = os.environ.get("NODE_NAME"), os.environ.get("POD_SUBNET")
    if not me or not pod_subnet:
        sys.exit("fuyao-kindnet: NODE_NAME and POD_SUBNET must be set (the DaemonSet sets both)")
    server = api_server()
    context = ssl.create_default_context(cafile=f"{SA}/ca.crt")
    log("start", node=me, podSubnet=pod_subnet, apiServer=server)
    routes: dict[str, str] = {}
    while True:
        try:
            sync(me, pod_subnet, server, context, routes)
        except Exception as exc:  # logged; the next round retries
            log("error", error=f"{type(exc).__name__}: {exc}")
        time.sleep(INTERVAL)


if __name__ == "__main__":
    main()
