"""kind without Docker: fuyao's node image's files against kind's contract (docs/facts/kind-node-image.md), the kind
configuration hack/kind-up.sh writes, the capability wrapper of fuyao's own dockerd, the CNI agent's configuration
file, and hack/kind-up.sh's refusals. The kind cluster itself: tests/e2e/test_charts_on_cluster.py --cluster=kind."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from fuyao.contracts import ACCELERATOR_ASCEND_NPU, LABEL_ACCELERATOR
from tests.support import kind_image
from tests.support.kind import EXTENDER_CLUSTER_IP, NODE_NPU_DIR, NPU_SMI_IN_NODE, KindCluster
from tests.support.versions import pinned_version

REPO = Path(__file__).resolve().parents[2]
KIND = REPO / "hack" / "kind"


def load(path: Path, name: str) -> ModuleType:
    """A script as a module (without a .py name it needs its loader named)."""
    spec = importlib.util.spec_from_file_location(name, path, loader=SourceFileLoader(name, str(path)))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_node_images_names_agree_with_its_containerd_and_cni_manifest() -> None:
    """containerd's sandbox image is the pause image the node preloads (kubeadm v1.34's PauseVersion), and kind's
    default CNI manifest runs the kindnet image the node preloads, with the markers kind looks for."""
    config = (KIND / "containerd.toml").read_text()
    sandbox = re.search(r'sandbox_image = "([^"]+)"', config)
    assert sandbox and sandbox.group(1) == f"{kind_image.IMAGE_REPOSITORY}/pause:{kind_image.PAUSE_VERSION}"
    assert re.search(r"^\s*SystemdCgroup = true", config, re.M)  # kind's kubelet runs the systemd driver
    text = (KIND / "default-cni.yaml").read_text()
    assert text.startswith("# would you kindly template this file\n# would you kindly patch this file\n")
    docs = list(yaml.safe_load_all(text.replace("{{ .PodSubnet }}", "10.245.0.0/16")))
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == kind_image.KINDNET_IMAGE and container["imagePullPolicy"] == "Never"
    assert {"name": "POD_SUBNET", "value": "10.245.0.0/16"} in container["env"]
    # the patch kind applies appends to this list
    assert isinstance(container["env"], list)


def test_the_node_layer_has_every_file_of_kinds_contract() -> None:
    files = kind_image._node_files()
    for path in ("usr/bin/kubeadm", "usr/bin/kubelet", "usr/bin/kubectl", "usr/local/bin/crictl",
                 "usr/local/bin/entrypoint", "etc/containerd/config.toml", "kind/manifests/default-cni.yaml",
                 "etc/systemd/system/kubelet.service", "etc/systemd/system/kubelet.service.d/10-kubeadm.conf",
                 "etc/systemd/system/multi-user.target.wants/kubelet.service", "opt/cni/bin"):
        assert path in files, path
    assert files["kind/version"][0] == pinned_version("K8S_VERSION").encode() + b"\n"  # `cat /kind/version`
    unit = (KIND / "10-kubeadm.conf").read_text()
    for variable in ("KUBELET_KUBECONFIG_ARGS", "KUBELET_CONFIG_ARGS", "KUBELET_KUBEADM_ARGS", "KUBELET_EXTRA_ARGS"):
        assert f"${variable}" in unit  # what kubeadm writes to kubeadm-flags.env and /etc/default/kubelet
    assert "EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env" in unit
    for script in ("entrypoint", "kubelet-cgroup-v2"):
        assert subprocess.run(["bash", "-n", str(KIND / script)]).returncode == 0
        assert os.access(KIND / script, os.X_OK)


def test_the_kind_configuration_simulates_npu_workers_and_points_kube_scheduler_at_the_extender(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUYAO_DOCKER_NETNS_IP", "10.250.0.2")
    cluster = KindCluster(tmp_path, name="t", workers=2, local_image=True)
    config = cluster.config("fuyao.local/kind-node:x")
    roles = [n["role"] for n in config["nodes"]]
    assert roles == ["control-plane", "worker", "worker"] and cluster.workers == ["t-worker", "t-worker2"]
    assert all(n["image"] == "fuyao.local/kind-node:x" for n in config["nodes"])
    for worker, node in zip(cluster.workers, config["nodes"][1:], strict=True):
        assert node["labels"] == {LABEL_ACCELERATOR: ACCELERATOR_ASCEND_NPU}
        mounts = {m["containerPath"]: m["hostPath"] for m in node["extraMounts"]}
        assert mounts[NPU_SMI_IN_NODE] == str(REPO / "hack" / "fake-npu-smi")
        assert mounts[NODE_NPU_DIR] == str(tmp_path / "nodes" / worker)  # each worker its own NPUs
    # fuyao's own dockerd: the API server on its namespace's address, at a fixed port (kind cannot bind there)
    assert config["networking"]["apiServerAddress"] == "10.250.0.2" and config["networking"]["apiServerPort"]
    # kubeadm: the scheduler's --config in both API versions (v1beta3: a map; v1beta4: a list), the local images
    patches = [yaml.safe_load(p) for p in config["kubeadmConfigPatches"]]
    by_version = {p["apiVersion"]: p for p in patches if "scheduler" in p}
    assert by_version["kubeadm.k8s.io/v1beta3"]["scheduler"]["extraArgs"]["config"].startswith("/etc/kubernetes/fuyao/")
    assert by_version["kubeadm.k8s.io/v1beta4"]["scheduler"]["extraArgs"][0]["name"] == "config"
    images = next(p for p in patches if "imageRepository" in p)
    assert images["imageRepository"] == kind_image.IMAGE_REPOSITORY
    assert images["etcd"]["local"]["imageTag"] == pinned_version("ETCD_VERSION").removeprefix("v") + "-0"
    scheduler = cluster.scheduler_config()
    assert scheduler["extenders"][0]["urlPrefix"] == f"http://{EXTENDER_CLUSTER_IP}:8888"
    assert scheduler["clientConnection"]["kubeconfig"] == "/etc/kubernetes/scheduler.conf"
    # kind's default image: no image named, no kubeadm image patch
    upstream = KindCluster(tmp_path, name="u").config(None)
    assert "image" not in upstream["nodes"][0]
    assert not [p for p in upstream["kubeadmConfigPatches"] if "imageRepository" in p]
    with pytest.raises(ValueError, match="at least one worker"):
        KindCluster(tmp_path, workers=0)


def fake_runc(tmp_path: Path) -> Path:
    """A runc that records its arguments and the capabilities it was given."""
    runc = tmp_path / "runc"
    runc.write_text("#!/bin/sh\necho \"$@\" > " + str(tmp_path / "args") + "\n")
    runc.chmod(0o755)
    return runc


def machine_caps() -> set[str]:
    wrapper = load(KIND / "runc-caps-wrapper", "runc_caps_wrapper")
    return wrapper.bounding()  # type: ignore[no-any-return]


def test_the_capability_wrapper_drops_only_what_the_machine_cannot_grant(tmp_path: Path) -> None:
    every = ["CAP_CHOWN", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN", "CAP_BPF", "CAP_NOT_A_CAP"]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    spec = {"ociVersion": "1.0.2", "process": {"args": ["/pause"], "capabilities": {
        kind: list(every) for kind in ("bounding", "effective", "permitted")}}, "root": {"path": "rootfs"}}
    (bundle / "config.json").write_text(json.dumps(spec))
    env = {**os.environ, "FUYAO_RUNC": str(fake_runc(tmp_path))}
    argv = ["--root", "/run/x", "create", "--bundle", str(bundle), "--pid-file", "p", "id1"]
    done = subprocess.run([sys.executable, str(KIND / "runc-caps-wrapper"), *argv], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "args").read_text().split() == argv  # runc gets the same arguments
    allowed = machine_caps()
    given = json.loads((bundle / "config.json").read_text())
    assert given["process"]["args"] == ["/pause"]  # nothing else changed
    for kind in ("bounding", "effective", "permitted"):
        assert given["process"]["capabilities"][kind] == [c for c in every if c in allowed]
    assert "CAP_CHOWN" in allowed and "CAP_NOT_A_CAP" not in given["process"]["capabilities"]["bounding"]
    # docker exec: the --process file, whose capabilities sit at the top
    process = tmp_path / "process.json"
    process.write_text(json.dumps({"args": ["sh"], "capabilities": {"bounding": list(every)}}))
    done = subprocess.run([sys.executable, str(KIND / "runc-caps-wrapper"), "exec", "--process", str(process), "id1"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(process.read_text())["capabilities"]["bounding"] == [c for c in every if c in allowed]


def test_the_cni_agent_writes_kindnetds_configuration_once_and_atomically(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    kindnet = load(KIND / "kindnet.py", "fuyao_kindnet")
    monkeypatch.setattr(kindnet, "CONFLIST", str(tmp_path / "10-kindnet.conflist"))
    assert kindnet.write_conflist("10.245.1.0/24") is True
    config = json.loads((tmp_path / "10-kindnet.conflist").read_text())
    assert [p["type"] for p in config["plugins"]] == ["ptp", "portmap"]
    assert config["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "10.245.1.0/24"}]]
    assert kindnet.write_conflist("10.245.1.0/24") is False  # unchanged: not rewritten
    assert kindnet.write_conflist("10.245.2.0/24") is True
    assert not list(tmp_path.glob("*.tmp"))
    node = {"status": {"addresses": [{"type": "Hostname", "address": "w"}, {"type": "InternalIP", "address": "fc00::2"},
                                     {"type": "InternalIP", "address": "172.19.0.2"}]}}
    assert kindnet.internal_ip(node) == "172.19.0.2"
    monkeypatch.delenv("NODE_NAME", raising=False)
    with pytest.raises(SystemExit, match="NODE_NAME and POD_SUBNET"):
        kindnet.main()


def test_kind_up_refuses_with_a_reason(tmp_path: Path) -> None:
    shown = subprocess.run(["bash", str(REPO / "hack" / "kind-up.sh"), "--help"], capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and "--private-docker" in shown.stdout and "--local-image" in shown.stdout
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    refused = subprocess.run(["bash", str(REPO / "hack" / "kind-up.sh")], capture_output=True, text=True,
                             timeout=120, env=env)
    assert refused.returncode == 1
    assert "Docker does not answer" in refused.stderr and "--private-docker" in refused.stderr
