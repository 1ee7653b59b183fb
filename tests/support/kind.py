"""A kind cluster whose workers simulate NPU servers, with fuyao's charts (hack/kind-up.sh, hack/kind-down.sh;
docs/kind.md).

- **Nodes.** One control plane and ``workers`` workers. Each worker simulates an NPU server of a fake npu-smi preset:
  the fake ``npu-smi`` (``hack/fake-npu-smi``) is mounted at ``/usr/local/bin/npu-smi`` (the chart's default path),
  its state (``<state>/nodes/<worker>/npu.json``) at ``/var/lib/fuyao-npu``, and the device nodes a real node has
  (``/dev/davinci<N>``, ``davinci_manager``, ``devmm_svm``, ``hisi_hdc``) are made in the node with ``mknod``, with
  the Ascend driver directories the chart mounts. Workers carry the accelerator label, as an administrator would set.
- **Scheduling.** kube-scheduler runs with docs/examples/kube-scheduler-config.yaml (mounted into the control plane,
  kubeadm's ``scheduler.extraArgs``/``extraVolumes``), whose extender is the chart's Service at a fixed ClusterIP.
- **Image.** Upstream ``kindest/node`` by default (``kind`` picks it); ``local_image``: fuyao's node image built on
  this machine (``tests.support.kind_image``), with kubeadm pointed at its control-plane images.
- **Docker.** The ``docker`` client at ``/usr/bin/docker`` and ``DOCKER_HOST`` as given. With fuyao's own dockerd
  (``hack/lib/docker.sh``: ``FUYAO_DOCKER_NETNS_IP`` set), the API server is published on that namespace's address,
  and the host routes the cluster's Service and pod ranges through it, so the host reaches ClusterIPs as it does on
  the Docker-free local cluster.

Service and pod ranges differ from the local cluster's (10.97.0.0/16, 10.245.0.0/16), so both can run at once.

Usage: python -m tests.support.kind up|down [--name fuyao] [--state-dir /tmp/fuyao-kind] [--nodes N]
       [--preset 910b4-8] [--local-image] [--no-charts]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fuyao.contracts import ACCELERATOR_ASCEND_NPU, LABEL_ACCELERATOR, RESOURCE_NPU

from .apiserver import binary
from .cluster import run_network_command
from .kubectl import KubeCluster
from .polling import wait_for

REPO = Path(__file__).resolve().parents[2]
DOCKER = "/usr/bin/docker"
"""Debian's docker client: another ``docker`` may come first on PATH (kind runs ``docker`` from PATH, so the
cluster's own bin directory comes first)."""
STATE_DIR = Path("/tmp/fuyao-kind")
SERVICE_SUBNET = "10.97.0.0/16"
POD_SUBNET = "10.245.0.0/16"
EXTENDER_CLUSTER_IP = "10.97.0.50"
"""The chart's extender Service (``service.clusterIP``), which the control plane's kube-scheduler calls."""
API_SERVER_PORT = 16443
"""With fuyao's own dockerd: the API server's port on that dockerd's namespace address."""
NODE_NPU_DIR = "/var/lib/fuyao-npu"
"""In each worker: the fake npu-smi's state (``npu.json``)."""
NPU_SMI_IN_NODE = "/usr/local/bin/npu-smi"
SCHEDULER_DIR_IN_NODE = "/etc/kubernetes/fuyao"
DRIVER_DIRS = ("/usr/local/Ascend/driver/lib64", "/usr/local/Ascend/driver/include", "/usr/local/dcmi")
"""The Ascend driver directories the device plugin chart mounts (``hostPaths.driver``), empty on a simulated node."""
DEVICE_NODES = 16


class KindError(RuntimeError):
    pass


class KindCluster(KubeCluster):
    def __init__(self, state_dir: str | Path = STATE_DIR, name: str = "fuyao", workers: int = 1,
                 preset: str = "910b4-8", local_image: bool = False):
        if workers < 1:
            raise ValueError(f"workers={workers}: a kind cluster with simulated NPUs needs at least one worker")
        self.dir = Path(state_dir)
        self.name = name
        self.workers = [f"{name}-worker" + (str(i + 1) if i else "") for i in range(workers)]
        self.node = self.workers[0]
        self.control_plane = f"{name}-control-plane"
        self.preset = preset
        self.local_image = local_image
        self.extender_cluster_ip = EXTENDER_CLUSTER_IP
        self.procs: list[dict[str, Any]] = []  # no fuyao host process: the charts run everything
        self.netns_ip = os.environ.get("FUYAO_DOCKER_NETNS_IP", "")
        """Set when fuyao's own dockerd serves this cluster (hack/lib/docker.sh): its network namespace's address."""

    # Tools -------------------------------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """kind runs ``docker`` from PATH: the cluster's bin directory has it pointing at Debian's client."""
        shim = self.dir / "bin"
        shim.mkdir(parents=True, exist_ok=True)
        if not (shim / "docker").exists():
            (shim / "docker").symlink_to(DOCKER)
        return {**os.environ, "PATH": f"{shim}:{os.environ.get('PATH', '')}"}

    def kind(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run([binary("kind"), *args], capture_output=True, text=True, timeout=timeout,
                                env=self.env())
        if result.returncode != 0:
            raise KindError(f"kind {' '.join(args)}: {(result.stderr or result.stdout).strip()[-3000:]}")
        return result.stdout + result.stderr

    def docker(self, *args: str, check: bool = True, timeout: float = 300, input: bytes | None = None) -> str:
        result = subprocess.run([DOCKER, *args], capture_output=True, timeout=timeout, env=self.env(), input=input)
        if check and result.returncode != 0:
            raise KindError(f"docker {' '.join(args[:3])}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout.decode(errors="replace")

    def exists(self) -> bool:
        return self.name in self.kind("get", "clusters").split()

    # Configuration -------------------------------------------------------------------------------------------
    def scheduler_config(self) -> dict[str, Any]:
        """docs/examples/kube-scheduler-config.yaml as kubeadm's kube-scheduler runs it: its kubeconfig, and the
        extender at the chart's Service."""
        example = yaml.safe_load((REPO / "docs" / "examples" / "kube-scheduler-config.yaml").read_text())
        example["clientConnection"]["kubeconfig"] = "/etc/kubernetes/scheduler.conf"
        example["extenders"][0]["urlPrefix"] = f"http://{EXTENDER_CLUSTER_IP}:8888"
        return example  # type: ignore[no-any-return]

    def config(self, image: str | None) -> dict[str, Any]:
        """The kind ``Cluster`` (kind.x-k8s.io/v1alpha4; hack/kind/cluster.yaml plus the nodes)."""
        config = yaml.safe_load((REPO / "hack" / "kind" / "cluster.yaml").read_text())
        config["networking"].update(podSubnet=POD_SUBNET, serviceSubnet=SERVICE_SUBNET)
        if self.netns_ip:
            # kind picks a free port by binding one on this host, where that namespace's address is not: a fixed one
            config["networking"].update(apiServerAddress=self.netns_ip, apiServerPort=API_SERVER_PORT)
        control = {"role": "control-plane", "extraMounts": [
            {"hostPath": str(self.dir / "scheduler"), "containerPath": SCHEDULER_DIR_IN_NODE, "readOnly": True}]}
        nodes = [control]
        for worker in self.workers:
            nodes.append({"role": "worker", "labels": {LABEL_ACCELERATOR: ACCELERATOR_ASCEND_NPU},
                          "extraMounts": [
                              {"hostPath": str(REPO / "hack" / "fake-npu-smi"), "containerPath": NPU_SMI_IN_NODE,
                               "readOnly": True},
                              {"hostPath": str(self.dir / "nodes" / worker), "containerPath": NODE_NPU_DIR}]})
        if image:
            for node in nodes:
                node["image"] = image
        config["nodes"] = nodes
        if self.local_image:
            from .kind_image import IMAGE_REPOSITORY, coredns_tag, etcd_tag

            config["kubeadmConfigPatches"].append(yaml.safe_dump({
                "kind": "ClusterConfiguration", "apiVersion": "kubeadm.k8s.io/v1beta3",
                "imageRepository": IMAGE_REPOSITORY, "etcd": {"local": {"imageTag": etcd_tag()}},
                "dns": {"imageTag": coredns_tag()}}))
        return config  # type: ignore[no-any-return]

    def chart_values(self, image: str) -> dict[str, dict[str, Any]]:
        """Per chart, the values for this cluster: the image loaded into the nodes, the fake npu-smi's state; every
        host path at the chart's default (the nodes have them, as a real NPU node does)."""
        repository, _, tag = image.rpartition(":")
        common = {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"}}
        return {
            "npu-device-plugin": {
                **common, "health": {"interval": "1s"},
                "extraEnv": [{"name": "FAKE_NPU_SMI_STATE", "value": f"{NODE_NPU_DIR}/npu.json"},
                             {"name": "FAKE_NPU_SMI_DEV", "value": "/dev"}],
                "extraVolumes": [{"name": "fake-npu", "hostPath": {"path": NODE_NPU_DIR, "type": "Directory"}}],
                "extraVolumeMounts": [{"name": "fake-npu", "mountPath": NODE_NPU_DIR}],
            },
            "scheduler-extender": {**common, "service": {"clusterIP": EXTENDER_CLUSTER_IP}},
            "qos-agent": {**common, "interval": "2s"},
            "ai-inference-optimization": {**common, "router": {"replicas": 1, "pdSeparation": {"enabled": True}},
                                          "kvCache": {"size": "256Mi", "blockSize": 16}},  # the simulator's blocks
        }

    # Bring-up --------------------------------------------------------------------------------------------------
    def node_image(self, log: Any = print) -> str | None:
        """The node image: None for kind's default (upstream), or fuyao's local one, built and loaded into Docker."""
        if not self.local_image:
            return None
        from .kind_image import NODE_REPOSITORY, build

        archive, tag = build()
        if self.docker("image", "inspect", tag, check=False).strip() in ("", "[]"):
            log(f"==> docker load {archive.name}")
            with open(archive, "rb") as stream:
                self.docker("load", timeout=900, input=stream.read())
            # earlier builds (1.4 GB each); one a container still uses stays
            for old in self.docker("images", "--format", "{{.Repository}}:{{.Tag}}", NODE_REPOSITORY).split():
                if old != tag:
                    self.docker("image", "rm", old, check=False)
        return tag

    def _simulated_npus(self) -> None:
        for worker in self.workers:
            state = self.dir / "nodes" / worker
            state.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(REPO / "hack" / "fake-npu-smi"), "fake", "init", "--preset",
                            self.preset], check=True, capture_output=True,
                           env={**os.environ, "FAKE_NPU_SMI_STATE": str(state / "npu.json")})

    def _device_nodes(self, worker: str) -> None:
        """The device nodes and driver directories of an NPU server, in the node (char devices with /dev/null's
        numbers: containers that are given them can open them)."""
        names = [f"davinci{i}" for i in range(DEVICE_NODES)] + ["davinci_manager", "devmm_svm", "hisi_hdc"]
        script = " && ".join([f"mkdir -p {' '.join(DRIVER_DIRS)}"] +
                             [f"{{ [ -e /dev/{n} ] || mknod -m 666 /dev/{n} c 1 3; }}" for n in names])
        self.docker("exec", "--privileged", worker, "sh", "-c", script)

    def _routes(self) -> None:
        """With fuyao's own dockerd: the host reaches the Service and pod ranges through its network namespace and
        the control-plane node (kube-proxy masquerades what comes from outside the pod range)."""
        if not self.netns_ip:
            return
        from_docker = json.loads(self.docker("inspect", self.control_plane))[0]["NetworkSettings"]["Networks"]
        node_ip = from_docker["kind"]["IPAddress"]
        ipaddress.ip_address(node_ip)
        netns = ["ip", "netns", "exec", "fuyao-docker"]
        commands = [
            [*netns, "ip", "route", "replace", SERVICE_SUBNET, "via", node_ip],
            [*netns, "ip", "route", "replace", POD_SUBNET, "via", node_ip],
            # Docker drops forwarded traffic into its networks unless a rule lets it in (DOCKER-USER is for that)
            [*netns, "sh", "-c", "iptables -C DOCKER-USER -i fuyao-dk1 -j ACCEPT 2>/dev/null || "
                                 "iptables -I DOCKER-USER -i fuyao-dk1 -j ACCEPT"],
            ["ip", "route", "replace", SERVICE_SUBNET, "via", self.netns_ip],
            ["ip", "route", "replace", POD_SUBNET, "via", self.netns_ip],
        ]
        for command in commands:
            run_network_command(*command)

    def up(self, log: Any = print) -> KindCluster:
        started = time.monotonic()
        if self.exists():
            log(f"==> deleting the running kind cluster {self.name}")
            self.kind("delete", "cluster", "--name", self.name)
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "scheduler").mkdir(parents=True)
        (self.dir / "scheduler" / "kube-scheduler-config.yaml").write_text(yaml.safe_dump(self.scheduler_config()))
        self._simulated_npus()
        image = self.node_image(log)
        config = self.dir / "kind-config.yaml"
        config.write_text(yaml.safe_dump(self.config(image), sort_keys=False))
        log(f"==> kind create cluster --name {self.name} ({len(self.workers)} NPU worker(s), "
            f"node image {image or 'kind default'})")
        self.kind("create", "cluster", "--name", self.name, "--config", str(config), "--kubeconfig",
                  str(self.kubeconfig), "--wait", "180s", timeout=900)
        for worker in self.workers:
            self._device_nodes(worker)
        self._routes()
        wait_for(lambda: all(c["status"] == "True" for n in self.get_json("nodes")["items"]
                             for c in n["status"]["conditions"] if c["type"] == "Ready"), 180, "every node Ready")
        self._save()
        (self.dir / "up-seconds").write_text(f"{time.monotonic() - started:.1f}\n")
        return self

    def _save(self) -> None:
        (self.dir / "state.json").write_text(json.dumps({
            "name": self.name, "workers": self.workers, "preset": self.preset, "local_image": self.local_image,
            "netns_ip": self.netns_ip, "kubeconfig": str(self.kubeconfig)}, indent=2))

    @classmethod
    def running(cls, state_dir: str | Path = STATE_DIR) -> KindCluster | None:
        record = Path(state_dir) / "state.json"
        if not record.exists():
            return None
        saved = json.loads(record.read_text())
        cluster = cls(state_dir, name=saved["name"], workers=len(saved["workers"]), preset=saved["preset"],
                      local_image=saved["local_image"])
        cluster.netns_ip = saved["netns_ip"]
        return cluster

    def down(self) -> None:
        if self.exists():
            self.kind("delete", "cluster", "--name", self.name)
        if self.netns_ip:
            for subnet in (SERVICE_SUBNET, POD_SUBNET):
                subprocess.run(["ip", "route", "del", subnet, "via", self.netns_ip], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    # What the e2e tests use ------------------------------------------------------------------------------------
    def import_image(self, archive: Path) -> None:
        """``kind load image-archive`` into every node (pods use it with ``imagePullPolicy: Never``)."""
        self.kind("load", "image-archive", str(archive), "--name", self.name, timeout=900)

    def load_images(self, archive: Path) -> None:
        """fuyao's image (``archive``) and the busybox the tests' pods run, into every node."""
        from .images import build_busybox

        self.import_image(archive)
        self.import_image(build_busybox(self.dir))

    def pod_log(self, namespace: str, pod: str, container: str = "main") -> str:
        return self.kubectl("logs", "-n", namespace, pod, "-c", container, check=False)

    def npus_advertised(self) -> dict[str, str]:
        return {n["metadata"]["name"]: n["status"]["allocatable"].get(RESOURCE_NPU, "0")
                for n in self.get_json("nodes")["items"] if n["metadata"]["name"] in self.workers}


def install(cluster: KindCluster, log: Any = print) -> dict[str, float]:
    """fuyao's image and the test images loaded into the nodes, then the four charts (tests.support.charts)."""
    from .charts import install_stack
    from .runtime_image import build

    archive, tag = build()
    log(f"==> kind load image-archive {archive.name} (and busybox)")
    cluster.load_images(archive)
    took = install_stack(cluster, tag, log=log)
    wait_for(lambda: all(v != "0" for v in cluster.npus_advertised().values()), 120,
             f"{RESOURCE_NPU} allocatable on every worker")
    return took


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.kind", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--name", default="fuyao", help="the kind cluster's name")
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    parser.add_argument("--nodes", type=int, default=1, help="NPU worker nodes (besides the control plane)")
    parser.add_argument("--preset", default="910b4-8", help="the fake npu-smi preset of every worker")
    parser.add_argument("--local-image", action="store_true",
                        help="fuyao's node image built on this machine instead of kind's default kindest/node")
    parser.add_argument("--no-charts", action="store_true", help="only the cluster, without fuyao's charts")
    args = parser.parse_args(argv)
    if args.action == "down":
        running = KindCluster.running(args.state_dir) or KindCluster(args.state_dir, name=args.name)
        running.down()
        print(f"kind cluster {running.name} deleted")
        return
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    cluster = KindCluster(args.state_dir, args.name, args.nodes, args.preset, args.local_image)
    try:
        cluster.up()
        if not args.no_charts:
            install(cluster)
    except (KindError, RuntimeError, subprocess.CalledProcessError) as exc:
        sys.exit(f"kind-up: {exc}")
    took = (cluster.dir / "up-seconds").read_text().strip()
    print(f"""
kind cluster {cluster.name} is up ({took} s), {len(cluster.workers)} NPU worker(s): {cluster.npus_advertised()}
  export KUBECONFIG={cluster.kubeconfig}{'' if not cluster.netns_ip else f'''
  export DOCKER_HOST={os.environ.get("DOCKER_HOST", "")}   # fuyao's own dockerd'''}
  kubectl get nodes -o custom-columns=NAME:.metadata.name,NPU:.status.allocatable.npu\\.huawei\\.com/NPU
  kubectl apply -f docs/examples/npu-pod.yaml     # an NPU pod, placed by fuyao's extender
  hack/kind-down.sh                               # delete it
""")


if __name__ == "__main__":
    main()
