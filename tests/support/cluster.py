"""A real single-node Kubernetes cluster on this machine without Docker, for end-to-end tests and the demo.

Upstream binaries built from source (``hack/build-upstream.sh``): etcd, kube-apiserver, kube-controller-manager,
kube-scheduler (configured with fuyao's extender), a kubelet; containerd and runc from Debian. Around them,
fuyao's device plugin on the fake npu-smi (device nodes ``davinci*`` made with ``mknod`` under a harness dev root),
the scheduler extender and the QoS agent (on the host's cgroups: the kubelet's ``kubepods`` tree). Facts this
relies on (checked on the project's machines, see ``../shared/reference/local-cluster-notes.md``):

- Images come from docker-archive tars imported with ``ctr`` (``tests.support.images``); pods use
  ``imagePullPolicy: Never``.
- containerd runs inside a network namespace the harness creates (``ip netns add``), entered with ``nsenter --net``
  only (``ip netns exec`` would remount /sys and hide the cgroup mounts from runc), so the CNI bridge, its veths
  and pod addresses (10.244.0.0/24) live there and never touch the host's network. The kubelet talks to containerd
  over its unix socket.
- AppArmor is disabled in containerd's CRI config (runc's init fails on this kernel with the default profile).
- The kubelet: cgroupfs driver, per-QoS cgroups (``kubepods``, for the QoS agent), ``failCgroupV1: false``
  (cgroup v1 is mounted), swap allowed. Its server listens on the harness link (``LINK_HOST``, also the node's
  InternalIP) with a serving certificate from the cluster CA (``tests.support.pki``), client-certificate and webhook
  (TokenReview) authentication, no anonymous access, and webhook (SubjectAccessReview) authorization, as kubeadm sets
  it up: the API server reaches it with its kubelet client certificate (``kubectl logs``, ``exec``), metrics-server
  with its service account's token. containerd's streaming server (``exec``, ``attach``, ``port-forward``) listens on
  ``LINK_NETNS`` so the kubelet on the host reaches it. Its device-plugin directory is the API's constant
  ``/var/lib/kubelet/device-plugins``.

State lives under one directory; ``state.json`` records every process started (pid, name, log), so
``hack/local-down.sh`` (``python -m tests.support.cluster down``) stops exactly those.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from .apiserver import LocalApiServer, binary, free_port
from .images import PAUSE_IMAGE, build_busybox, build_pause
from .kubectl import KubeCluster
from .kwok import KWOK_ANNOTATION, kwok_command
from .pki import ClusterPki
from .pki import make as make_pki
from .polling import wait_for

REPO = Path(__file__).resolve().parents[2]
NODE = "fuyao-node"
POD_SUBNET = "10.244.0.0/24"
LINK_HOST, LINK_NETNS = "10.243.0.1", "10.243.0.2"
"""The two ends of the host ↔ harness-namespace link (a private /30). The API server listens on ``LINK_HOST`` (pods
reach it through the ``kubernetes`` Service, which kube-proxy maps there); CoreDNS on ``LINK_NETNS``."""
SERVICE_CIDR = "10.96.0.0/16"
"""The API server's service range: kube-proxy (in the harness namespace) serves it; the host routes it over the
link, so tests, the demo and the host's kube-scheduler reach ClusterIPs."""
CLUSTER_DOMAIN = "cluster.local"
EXTENDER_CLUSTER_IP = "10.96.0.50"
"""With ``components="chart"`` the kube-scheduler calls the extender the chart installs, at this fixed ClusterIP
(the chart's ``service.clusterIP``) on port 8888."""
COMPONENTS = ("host", "chart")
DEVICE_PLUGIN_DIR = Path("/var/lib/kubelet/device-plugins")
"""The kubelet's device-plugin directory is a constant of the API (not under --root-dir): one cluster per host."""


QOS_AGENT_CONFIG = """version: v1
# The whole 2-core test machine runs this node: the control plane, the test harness and the tests' own processes
# are all the node's system usage, so the default 65 % would leave BE pods almost nothing while a test is busy.
batch: {cpuReclaimPercent: 100, minPublishInterval: 10s}
"""
"""The local cluster's QoS agent config (``<dir>/qos-agent.yaml``); tests that restart the agent with their own
settings start from it."""


class LocalCluster(KubeCluster):
    def __init__(self, state_dir: str | Path = "/tmp/fuyao-cluster", node: str = NODE, preset: str = "910b4-8",
                 kwok_nodes: int = 0, components: str = "host", monitoring: bool = False, ray: bool = False):
        """``components``: ``host`` runs fuyao's device plugin, extender and QoS agent as host processes (the e2e
        tests stop and restart them); ``chart`` runs none, for fuyao's Helm charts to install them as pods.
        ``monitoring``: also the Prometheus Operator and a Prometheus, metrics-server and KEDA
        (``tests.support.monitoring``). ``ray``: also KubeRay's operator with its CRDs and fuyao's Ray image
        (``tests.support.kuberay``)."""
        self.monitoring = monitoring
        self.ray = ray
        if components not in COMPONENTS:
            raise ValueError(f"components={components!r}: expected one of {', '.join(COMPONENTS)}")
        self.components = components
        self.kwok_nodes = kwok_nodes
        self.dir = Path(state_dir)
        self.node = node
        self.preset = preset
        self.netns = f"fuyao-{os.getpid()}"
        self.procs: list[dict[str, Any]] = []
        self.api: LocalApiServer | None = None
        self.pki: ClusterPki | None = None
        self.extender_url = ""
        self.extender_cluster_ip = EXTENDER_CLUSTER_IP
        self.link = ""
        self.npu_state = self.dir / "npu" / "npu.json"
        self.sysfs = self.dir / "sys"
        """A sysfs tree with the node's NPUs as PCI devices (vendor 0x19e5), for node feature discovery."""

    # Helpers -----------------------------------------------------------------------------------------------------
    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None,
               netns: bool = False) -> subprocess.Popen[bytes]:
        if netns:
            command = ["nsenter", f"--net=/var/run/netns/{self.netns}", *command]
        log_path = self.dir / "logs" / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(command, stdout=log, stderr=log, env={**os.environ, **(env or {})},
                                start_new_session=True)
        self.procs = [p for p in self.procs if p["name"] != name]
        self.procs.append({"name": name, "pid": proc.pid, "log": str(log_path), "command": command,
                           "env": env or {}})
        self._save()
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop one component (tests: a crashing device plugin, a restarting kubelet)."""
        record = next(p for p in self.procs if p["name"] == name)
        _kill(record["pid"], sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.waitpid(record["pid"], os.WNOHANG)
                os.kill(record["pid"], 0)
            except (ProcessLookupError, ChildProcessError):
                return
            time.sleep(0.1)
        _kill(record["pid"], signal.SIGKILL)

    def start(self, name: str, extra_args: tuple[str, ...] = ()) -> None:
        """Start a stopped component again, as it was started (plus ``extra_args``, kept for later restarts)."""
        record = next(p for p in self.procs if p["name"] == name)
        self._spawn(name, [*record["command"], *extra_args], record["env"])

    def fake_npu_smi(self, *args: str) -> str:
        return subprocess.run([sys.executable, str(REPO / "hack" / "fake-npu-smi"), *args], check=True,
                              capture_output=True, text=True,
                              env={**os.environ, "FAKE_NPU_SMI_STATE": str(self.npu_state)}).stdout

    def pod_log(self, namespace: str, pod: str, container: str = "main") -> str:
        """A container's log, from the kubelet's log directory (also after the pod is gone; ``kubectl logs``
        reads the same files through the kubelet while it exists)."""
        found = sorted((self.dir / "pod-logs").glob(f"{namespace}_{pod}_*/{container}/*.log"))
        return "".join(p.read_text(errors="replace") for p in found)

    @classmethod
    def running(cls, state_dir: str | Path) -> LocalCluster | None:
        """The cluster ``up`` started in ``state_dir`` (from its ``state.json``), or None when there is none."""
        record = Path(state_dir) / "state.json"
        if not record.exists():
            return None
        saved = json.loads(record.read_text())
        cluster = cls(state_dir, node=saved["node"], components=saved.get("components", "host"))
        cluster.procs, cluster.netns, cluster.link = saved["procs"], saved["netns"], saved["link"]
        cluster.extender_url = saved.get("extender") or ""
        return cluster

    def _save(self) -> None:
        state = {"procs": self.procs, "netns": self.netns, "components": self.components, "node": self.node,
                 "link": self.link,
                 "api_root": str(self.api.root) if self.api else None, "extender": self.extender_url,
                 "kubeconfig": str(self.dir / "admin.kubeconfig")}
        (self.dir / "state.json").write_text(json.dumps(state, indent=2))


    # Bring-up --------------------------------------------------------------------------------------------------
    def up(self) -> LocalCluster:
        started = time.monotonic()
        if (self.dir / "state.json").exists():
            down(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "logs").mkdir(parents=True)
        for tool in ("containerd", "runc", "ctr", "nsenter", "ip"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is missing: apt-get install containerd runc util-linux iproute2 "
                                   "containernetworking-plugins busybox-static gcc")
        self._network()
        self.pki = make_pki(self.dir / "pki", self.node, LINK_HOST)
        self.api = LocalApiServer(users={f"system:node:{self.node}": ["system:nodes"]}, bind_address=LINK_HOST,
                                  extra_args=("--kubelet-preferred-address-types=InternalIP",
                                              *self.pki.apiserver_args())).start()
        shutil.copy(self.api.kubeconfig_for("admin"), self.dir / "admin.kubeconfig")
        self._controller_manager()
        self._containerd()
        self._kube_proxy()
        self._cluster_dns()
        self._simulated_npus()
        if self.components == "host":
            self._device_plugin()
        self._kubelet()
        self._extender_and_scheduler()
        if self.components == "host":
            self._qos_agent()
        wait_for(self.node_ready, 90,
                 "the node to be Ready" + (" with NPUs" if self.components == "host" else ""))
        if self.kwok_nodes:
            self.add_kwok_nodes(self.kwok_nodes)
        if self.monitoring:
            from .monitoring import Monitoring

            Monitoring(self).install()
        if self.ray:
            from .kuberay import KubeRay

            KubeRay(self).install()
        (self.dir / "up-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
        return self

    def _controller_manager(self) -> None:
        assert self.api is not None
        self._spawn("kube-controller-manager", [
            binary("kube-controller-manager"), f"--kubeconfig={self.dir / 'admin.kubeconfig'}",
            "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0",
            f"--service-account-private-key-file={self.api.root / 'sa.key'}",
            f"--root-ca-file={self.api.root / 'certs' / 'apiserver.crt'}", "--use-service-account-credentials=false",
            "--controllers=*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle", "--v=1"])

    def _containerd(self) -> None:
        base = self.dir / "containerd"
        (base / "net.d").mkdir(parents=True)
        (base / "net.d" / "10-fuyao.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "fuyao-pods", "plugins": [
                {"type": "bridge", "bridge": "fuyao0", "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                          "routes": [{"dst": "0.0.0.0/0"}],  # via the bridge: pods reach the host over the link
                          "dataDir": str(base / "ipam")}},
                {"type": "loopback"}]}))
        cni_bin = next((d for d in ("/usr/lib/cni", "/opt/cni/bin") if Path(d, "bridge").exists()), None)
        if cni_bin is None:
            raise RuntimeError("CNI plugins missing: apt-get install containernetworking-plugins")
        (base / "config.toml").write_text(f"""version = 2
root = "{base / 'root'}"
state = "{base / 'state'}"
[grpc]
  address = "{base / 'containerd.sock'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "{LINK_NETNS}"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{base / 'net.d'}"
""")
        self._spawn("containerd", ["containerd", "--config", str(base / "config.toml")], netns=True)
        sock = base / "containerd.sock"
        wait_for(sock.exists, 30, "containerd")
        images = self.dir / "images"
        images.mkdir()
        for archive in (build_pause(images), build_busybox(images)):
            self.import_image(archive)

    def _network(self) -> None:
        """The harness's network namespace, and a veth pair between it and this host with private addresses
        (``LINK_HOST``/``LINK_NETNS``) and host routes to the pod subnet and the service range through it: pods
        reach the API server, tests and the demo reach pod IPs and ClusterIPs from the host. Nothing else on the
        host changes (no forwarding, no NAT); deleting the namespace deletes the pair and the routes."""
        self.link = f"fyh{os.getpid() % 100000}"
        run = run_network_command
        swept = _sweep_stale_networks("fuyao-")
        deadline, taken = time.monotonic() + (15 if swept else 0), "?"
        while taken:  # the kernel drops a deleted namespace's links asynchronously
            taken = subprocess.run(["ip", "route", "show", POD_SUBNET], capture_output=True, text=True).stdout.strip()
            if not taken or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        if taken:
            raise RuntimeError(f"the pod subnet {POD_SUBNET} is routed already ({taken}): another local cluster is "
                               "up; stop it first (hack/local-up.sh down, or python -m tests.support.cluster down "
                               "--state-dir <its state directory>)")
        _sweep_stale_networks("cni-")  # no other cluster is up: its pods' namespaces, if any, are left over
        run("ip", "netns", "add", self.netns)
        self._save()
        run("ip", "-n", self.netns, "link", "set", "lo", "up")
        run("ip", "link", "add", self.link, "type", "veth", "peer", "name", "fyn0", "netns", self.netns)
        run("ip", "addr", "add", f"{LINK_HOST}/30", "dev", self.link)
        run("ip", "link", "set", self.link, "up")
        run("ip", "-n", self.netns, "addr", "add", f"{LINK_NETNS}/30", "dev", "fyn0")
        run("ip", "-n", self.netns, "link", "set", "fyn0", "up")
        run("nsenter", f"--net=/var/run/netns/{self.netns}", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        run("ip", "route", "add", POD_SUBNET, "via", LINK_NETNS, "dev", self.link)
        run("ip", "route", "add", SERVICE_CIDR, "via", LINK_NETNS, "dev", self.link)
        self._save()

    def _kube_proxy(self) -> None:
        """The real kube-proxy (iptables mode) in the harness namespace, where the pods' traffic is routed: Services
        work for pods (the ``kubernetes`` Service reaches the API server on the link) and, through the host route,
        for the host. Its conntrack sysctls are left alone (not settable in a namespace)."""
        config = self.dir / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.dir / "admin.kubeconfig")},
            "hostnameOverride": self.node, "clusterCIDR": POD_SUBNET, "mode": "iptables",
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "metricsBindAddress": "127.0.0.1:10249", "healthzBindAddress": "127.0.0.1:10256"}))
        self._spawn("kube-proxy", [binary("kube-proxy"), f"--config={config}", "--v=1"], netns=True)

    def _cluster_dns(self) -> None:
        """CoreDNS (its ``kubernetes`` plugin) on ``LINK_NETNS``:53 in the harness namespace, the kubelet's
        ``clusterDNS``: pods resolve ``<service>.<namespace>.svc``. No forwarding: nothing outside the cluster."""
        corefile = self.dir / "Corefile"
        corefile.write_text(f""".:53 {{
    bind {LINK_NETNS}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.dir / 'admin.kubeconfig'}
        pods insecure
    }}
    cache 10
}}
""")
        self._spawn("coredns", [binary("coredns"), "-conf", str(corefile)], netns=True)

    def chart_values(self, image: str) -> dict[str, dict[str, Any]]:
        """Per chart, the values for this cluster (``tests.support.charts.local_values``)."""
        from .charts import local_values

        return local_values(self, image)

    def import_image(self, archive: Path) -> None:
        """Load a docker-archive into the node's containerd (pods use it with ``imagePullPolicy: Never``)."""
        sock = self.dir / "containerd" / "containerd.sock"
        subprocess.run(["ctr", "--address", str(sock), "-n", "k8s.io", "images", "import", str(archive)],
                       check=True, capture_output=True, timeout=600)

    def _simulated_npus(self) -> None:
        """The node's NPUs: the fake npu-smi's state (``npu/npu.json``, in a directory of its own: a device plugin pod
        mounts it, and the state is replaced by rename), device nodes under ``dev/`` and PCI devices under
        ``sys/``."""
        self.npu_state.parent.mkdir()
        env = {**os.environ, "FAKE_NPU_SMI_STATE": str(self.npu_state)}
        for args in (("init", "--preset", self.preset), ("sysfs", "--root", str(self.sysfs))):
            subprocess.run([sys.executable, str(REPO / "hack" / "fake-npu-smi"), "fake", *args], check=True,
                           capture_output=True, env=env)
        dev = self.dir / "dev"
        dev.mkdir()
        for name in [f"davinci{i}" for i in range(16)] + ["davinci_manager", "devmm_svm", "hisi_hdc"]:
            os.mknod(dev / name, 0o666 | 0o020000, os.makedev(1, 3))  # a char device with /dev/null's numbers
        DEVICE_PLUGIN_DIR.mkdir(parents=True, exist_ok=True)

    def _device_plugin(self) -> None:
        dev = self.dir / "dev"
        env = {"FAKE_NPU_SMI_STATE": str(self.npu_state), "FAKE_NPU_SMI_DEV": str(dev)}
        kubelet_root = self.dir / "kubelet"
        self._spawn("fuyao-device-plugin", [
            sys.executable, "-m", "fuyao.deviceplugin.cli", "--npu-smi", str(REPO / "hack" / "fake-npu-smi"),
            "--device-plugin-dir", str(DEVICE_PLUGIN_DIR), "--dev-root", str(dev),
            "--node-name", self.node, "--kubeconfig", str(self.dir / "admin.kubeconfig"),
            "--pod-resources-socket", str(kubelet_root / "pod-resources" / "kubelet.sock"),
            "--vnpu-ledger", str(self.dir / "vnpu-ledger.json"), "--metrics-address", "127.0.0.1:0",
            "--isolation-state", str(self.dir / "npu-isolated.json"),
            "--hccn-tool", str(REPO / "hack" / "fake-hccn-tool"),
            "--health-interval", "1s"], env=env)

    def _kubelet(self) -> None:
        assert self.api is not None and self.pki is not None
        port, healthz = free_port(), free_port()
        config = self.dir / "kubelet.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True, "cacheTTL": "30s"},
                               "x509": {"clientCAFile": str(self.pki.ca.cert)}},
            "authorization": {"mode": "Webhook", "webhook": {"cacheAuthorizedTTL": "30s",
                                                             "cacheUnauthorizedTTL": "10s"}},
            "tlsCertFile": str(self.pki.kubelet.cert), "tlsPrivateKeyFile": str(self.pki.kubelet.key),
            "address": LINK_HOST, "port": port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz, "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": True, "enforceNodeAllocatable": ["pods"], "failSwapOn": False, "failCgroupV1": False,
            "resolvConf": "", "containerRuntimeEndpoint": f"unix://{self.dir / 'containerd' / 'containerd.sock'}",
            "imageGCHighThresholdPercent": 100, "evictionHard": {}, "serializeImagePulls": False,
            "podLogsDir": str(self.dir / "pod-logs"), "clusterDNS": [LINK_NETNS], "clusterDomain": CLUSTER_DOMAIN}))
        self._spawn("kubelet", [
            binary("kubelet"), f"--config={config}",
            f"--kubeconfig={self.api.kubeconfig_for(f'system:node:{self.node}')}",
            f"--root-dir={self.dir / 'kubelet'}", f"--hostname-override={self.node}", f"--node-ip={LINK_HOST}",
            "--v=1"])
        self.kubectl("create", "clusterrolebinding", "fuyao-kubelet", "--clusterrole=system:node",
                     f"--user=system:node:{self.node}")

    def _extender_and_scheduler(self) -> None:
        assert self.api is not None
        if self.components == "host":
            port = free_port()
            self.extender_url = f"http://127.0.0.1:{port}"
            self._spawn("fuyao-scheduler-extender", [
                sys.executable, "-m", "fuyao.scheduler_extender.cli", "--listen", f"127.0.0.1:{port}",
                "--kubeconfig", str(self.dir / "admin.kubeconfig")])
        else:
            self.extender_url = f"http://{EXTENDER_CLUSTER_IP}:8888"
        self.scheduler("kube-scheduler")

    def scheduler(self, name: str, scheduler_name: str | None = None, **entry: Any) -> None:
        """Run a kube-scheduler (process ``name``) configured with docs/examples/kube-scheduler-config.yaml: its
        extender entry pointed at this cluster's extender and updated with ``entry`` (e.g. ``ignorable=True``);
        ``scheduler_name``: a profile of that name (pods opt in with spec.schedulerName) instead of the default."""
        example = yaml.safe_load((REPO / "docs" / "examples" / "kube-scheduler-config.yaml").read_text())
        example["clientConnection"]["kubeconfig"] = str(self.dir / "admin.kubeconfig")
        example["leaderElection"]["leaderElect"] = False
        example["extenders"][0].update(urlPrefix=self.extender_url, **entry)
        if scheduler_name:
            example["profiles"] = [{"schedulerName": scheduler_name}]
        config = self.dir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(example))
        self._spawn(name, [binary("kube-scheduler"), f"--config={config}", "--secure-port=0", "--v=1"])

    def _qos_agent(self) -> None:
        config = self.dir / "qos-agent.yaml"
        config.write_text(QOS_AGENT_CONFIG)
        self._spawn("fuyao-qos-agent", [
            sys.executable, "-m", "fuyao.qos.cli", "--node-name", self.node, "--kubeconfig",
            str(self.dir / "admin.kubeconfig"), "--cgroup-root", "/sys/fs/cgroup", "--interval", "2s",
            "--metrics-address", "", "--config", str(config)])

    def add_kwok_nodes(self, count: int, zones: int = 2) -> list[str]:
        """``count`` fake nodes run by KWOK (its controller keeps them Ready and moves their pods to Running): NPU
        capacity, labels and topology annotation copied from the real node as its device plugin published them,
        ``topology.kubernetes.io/zone`` = ``zone-<i mod zones>``, and the taint ``kwok.x-k8s.io/node=fake:NoSchedule``
        so only pods that tolerate it land there. For scale and placement tests; nothing runs in their pods."""
        real = self.node_json()
        names = [f"kwok-{i:04d}" for i in range(count)]
        carried = {k: v for k, v in real["metadata"].get("labels", {}).items()
                   if not k.startswith(("kubernetes.io/", "node.kubernetes.io/", "beta.kubernetes.io/"))}
        from fuyao.contracts import (
            ANNOTATION_NODE_TOPOLOGY,
            RESOURCE_NPU,
            DeviceHealth,
            NodeTopology,
            dump_annotation,
        )

        # the hardware as published, without the real node's state (allocations, carved vNPUs, a sick chip)
        topology = NodeTopology.model_validate_json(real["metadata"]["annotations"][ANNOTATION_NODE_TOPOLOGY])
        clean = topology.model_copy(update={"devices": {
            key: device.model_copy(update={"allocated": False, "vnpus": (), "health": DeviceHealth.HEALTHY})
            for key, device in topology.devices.items()}})
        annotations = {ANNOTATION_NODE_TOPOLOGY: dump_annotation(clean)}
        resources = {k: v for k, v in real["status"]["capacity"].items() if k in ("cpu", "memory", "pods")}
        resources[RESOURCE_NPU] = str(len(clean.devices))
        status = {"capacity": resources, "allocatable": resources}
        items = [{"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "annotations": {**annotations, KWOK_ANNOTATION: "fake"},
            "labels": {**carried, "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "type": "kwok",
                       "topology.kubernetes.io/zone": f"zone-{i % zones}"}},
            "spec": {"taints": [{"key": KWOK_ANNOTATION, "value": "fake", "effect": "NoSchedule"}]},
            "status": status} for i, name in enumerate(names)]
        self.apply({"apiVersion": "v1", "kind": "List", "items": items}, "kwok-nodes")
        if not any(p["name"] == "kwok" for p in self.procs):
            self._spawn("kwok", kwok_command(self.dir / "admin.kubeconfig"))

        def ready() -> bool:
            listed = self.get_json("nodes", "-l", "type=kwok")["items"]
            return sum(any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
                       for n in listed) >= len(names)

        wait_for(ready, 60, f"{count} KWOK nodes to be Ready")
        return names

    def node_ready(self) -> bool:
        try:
            node = self.get_json("node", self.node)
        except RuntimeError:
            return False
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
        if self.components == "chart":
            return ready
        return ready and int(node["status"].get("allocatable", {}).get("npu.huawei.com/NPU", "0")) > 0


def _remove_kubepods_cgroups(root: Path = Path("/sys/fs/cgroup")) -> None:
    """The kubelet leaves its (empty) kubepods cgroups behind: remove them, deepest first."""
    for top in [*root.glob("*/kubepods"), root / "kubepods"]:
        if not top.is_dir():
            continue
        for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def run_network_command(*args: str) -> None:
    """One network command of the bring-up; a failure names the command and what it printed."""
    result = subprocess.run(list(args), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")


def _netns_names() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _sweep_stale_networks(prefix: str) -> int:
    """Delete the network namespaces named ``prefix*`` with no process left in them: those of harness clusters that
    died without ``down`` (a killed test run, a machine restored from a snapshot) (``fuyao-*``), and of their pods
    (containerd's ``cni-*``). Deleting the harness's deletes its veth pair and so the host routes through it, which
    would block the next bring-up. A live cluster's namespace always holds its containerd: it is never touched. Returns
    how many were deleted."""
    deleted = 0
    for name in _netns_names():
        if not name.startswith(prefix):
            continue
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        if pids.returncode == 0 and not pids.stdout.strip():
            deleted += subprocess.run(["ip", "netns", "delete", name], capture_output=True).returncode == 0
    return deleted


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def down(state_dir: str | Path = "/tmp/fuyao-cluster") -> None:
    """Stop everything ``up`` started: the pods' containers (through containerd), the recorded processes, the API
    server and etcd, the network namespaces (the harness's and its pods'), mounts under the state directory."""
    root = Path(state_dir)
    path = root / "state.json"
    if not path.exists():
        return
    state = json.loads(path.read_text())
    sock = root / "containerd" / "containerd.sock"
    if sock.exists():  # containers first: they outlive their shim otherwise
        ctr = ["ctr", "--address", str(sock), "-n", "k8s.io"]
        tasks = subprocess.run([*ctr, "tasks", "ls", "-q"], capture_output=True, text=True, timeout=30).stdout
        for task in tasks.split():
            subprocess.run([*ctr, "tasks", "kill", "-s", "SIGKILL", task], capture_output=True, timeout=30)
    for proc in reversed(state.get("procs", [])):
        _kill(proc["pid"], signal.SIGTERM)
    patterns = [f"containerd-shim-runc-v2.*{root}"]
    if state.get("api_root"):
        patterns += [f"kube-apiserver.*{state['api_root']}", f"etcd.*{state['api_root']}"]
    for pattern in patterns:
        subprocess.run(["pkill", "-f", pattern], capture_output=True)
    deadline = time.monotonic() + 10
    for proc in state.get("procs", []):
        while time.monotonic() < deadline:
            try:
                os.kill(proc["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            _kill(proc["pid"], signal.SIGKILL)
    for pattern in patterns:
        subprocess.run(["pkill", "-9", "-f", pattern], capture_output=True)
    if state.get("link"):  # gone with the namespace already, normally
        subprocess.run(["ip", "link", "delete", state["link"]], capture_output=True)
    for name in _netns_names():
        if name == state.get("netns") or name.startswith("cni-"):  # ours, and our pods' (containerd's CNI)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    _remove_kubepods_cgroups()
    for mount in reversed(Path("/proc/mounts").read_text().splitlines()):
        target = mount.split()[1]
        if target.startswith(str(root)) or target.startswith(str(DEVICE_PLUGIN_DIR)):
            subprocess.run(["umount", "-l", target], capture_output=True)
    path.unlink()


@contextlib.contextmanager
def running(state_dir: str | Path, image: Path | None = None, **options: Any) -> Iterator[LocalCluster]:
    """A cluster brought up in ``state_dir`` (``LocalCluster`` options), with ``image`` (a docker-archive) imported,
    stopped afterwards whatever happens: the e2e suites' module fixture."""
    local = LocalCluster(state_dir, **options)
    try:
        local.up()
        if image is not None:
            local.import_image(image)
        yield local
    finally:
        down(state_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.cluster",
                                     description="A local single-node Kubernetes cluster with fuyao (hack/local-up.sh)")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state-dir", default="/tmp/fuyao-cluster")
    parser.add_argument("--preset", default="910b4-8", help="the fake npu-smi preset of the node")
    parser.add_argument("--components", choices=COMPONENTS, default="host",
                        help="host: fuyao's device plugin, extender and QoS agent as host processes; chart: none "
                             "(the Helm charts install them as pods, as hack/demo.sh does)")
    parser.add_argument("--monitoring", action="store_true",
                        help="also the Prometheus Operator with a Prometheus, metrics-server (kubectl top) and KEDA, "
                             "as pods from upstream's manifests (hack/build-upstream.sh monitoring)")
    parser.add_argument("--ray", action="store_true",
                        help="also KubeRay's operator with its CRDs and fuyao's Ray image (hack/build-upstream.sh ray; "
                             "docs/ray.md)")
    parser.add_argument("--nodes", default="", metavar="kwok=N",
                        help="also N fake NPU nodes run by KWOK (placement and scale; nothing runs in their pods)")
    args = parser.parse_args(argv)
    kwok = 0
    if args.nodes:
        kind, _, count = args.nodes.partition("=")
        if kind != "kwok" or not count.isdigit():
            parser.error(f"--nodes {args.nodes!r}: expected kwok=N (N fake nodes)")
        kwok = int(count)
    if args.action == "down":
        down(args.state_dir)
        print(f"stopped the cluster in {args.state_dir}")
        return
    cluster = LocalCluster(args.state_dir, preset=args.preset, kwok_nodes=kwok, components=args.components,
                           monitoring=args.monitoring, ray=args.ray)
    try:
        cluster.up()
    except Exception:
        down(args.state_dir)
        raise
    if args.monitoring:
        from .monitoring import Monitoring

        print(f"Prometheus: {Monitoring(cluster).prometheus_url()}  (kubectl top nodes; kubectl get scaledobjects -A)")
    print(f"cluster up in {(Path(args.state_dir) / 'up-seconds').read_text().strip()} s\n"
          f"  export KUBECONFIG={args.state_dir}/admin.kubeconfig\n"
          f"  kubectl get nodes   ({binary('kubectl')})\n"
          f"  logs: {args.state_dir}/logs/   stop: hack/local-down.sh")


if __name__ == "__main__":
    main()
