"""A kind node image built on this machine, for machines that cannot pull ``kindest/node`` (no registry here):
``fuyao.local/kind-node:<kubernetes version>-<hash>``, a docker-archive that ``docker load`` reads.

It follows kind's node-image contract (docs/facts/kind-node-image.md: kind v0.33's ``images/base`` and
``pkg/build/nodeimage``), with parts from this machine instead of a registry:

- a Debian root file system (``debootstrap``) with systemd, containerd and runc, iptables and the CNI plugins;
- our entrypoint (``hack/kind/entrypoint``: what a node needs before systemd starts), the kubelet unit with kubeadm's
  drop-in, containerd's configuration, ``/kind/version``;
- ``kubeadm``, ``kubelet``, ``kubectl`` and ``crictl`` built from the Go module proxy (``hack/build-upstream.sh``);
- the control plane's images, preloaded into the node's containerd (namespace ``k8s.io``, under
  ``/var/lib/containerd``, as ``kind build node-image`` does) and named ``fuyao.local/k8s/<name>`` — honest names for
  local builds; ``hack/kind/local-image-patches.yaml`` points kubeadm at them (``imageRepository`` and the etcd and
  CoreDNS tags of the binaries we build);
- kind's default CNI manifest (``/kind/manifests/default-cni.yaml``) with ``fuyao-kindnet``
  (``hack/kind/kindnet.py``): kindnetd's source is not on the Go module proxy, so this small agent does kindnetd's
  job here — each node's CNI configuration from its ``podCIDR`` (ptp + host-local + portmap), routes to the other
  nodes' pod ranges, masquerade for traffic leaving the pod network.

Each layer is cached under ``~/.cache/fuyao/images`` by what makes it. Needs root (debootstrap, and a throwaway
containerd that imports the control-plane images).

Usage: python -m tests.support.kind_image [--cache DIR]   (prints the archive path and the image tag)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .apiserver import binary
from .images import PAUSE_C, Image, compile_pause, write_images
from .runtime_image import CACHE, REPO, BinaryImage, _key, _log, _pack, base_layer, binary_images
from .versions import pinned_version

KIND_DIR = REPO / "hack" / "kind"
NODE_REPOSITORY = "fuyao.local/kind-node"
IMAGE_REPOSITORY = "fuyao.local/k8s"
"""Where the control plane's images are named (kubeadm's ``imageRepository``; hack/kind/local-image-patches.yaml)."""
NODE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "containerd", "runc", "containernetworking-plugins", "iptables",
                 "nftables", "iproute2", "conntrack", "ethtool", "socat", "mount", "util-linux", "kmod", "procps",
                 "ca-certificates", "libseccomp2", "python3")
"""kind's base image packages that a node uses (systemd as PID 1, containerd and runc, iptables for kube-proxy and
the CNI agent, the tools kind runs with ``docker exec``), plus python3 for ``fuyao-kindnet``. The control plane's
images share this layer (kube-proxy needs iptables)."""
PAUSE_VERSION = "3.10.1"
"""kubeadm v1.34's ``PauseVersion``; containerd's ``sandbox_image`` names the same image."""
KINDNET_IMAGE = f"{IMAGE_REPOSITORY}/kindnet:1"
"""hack/kind/default-cni.yaml runs it; the node image is rebuilt (a new tag) when the script changes."""
MASKED_UNITS = ("getty.target", "console-getty.service", "systemd-binfmt.service", "systemd-logind.service",
                "systemd-tmpfiles-setup.service", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                "fstrim.timer")
"""Units a node container must not run (kind removes or masks the same kind of units)."""


def kubernetes_version() -> str:
    return pinned_version("K8S_VERSION")


def etcd_tag() -> str:
    """kubeadm's etcd tags are ``<version>-0``."""
    return pinned_version("ETCD_VERSION").removeprefix("v") + "-0"


def coredns_tag() -> str:
    return pinned_version("COREDNS_VERSION")


def _built(name: str) -> Path:
    """The binary ``hack/build-upstream.sh`` built (the file itself, for its size and time in cache keys)."""
    return Path(os.path.realpath(binary(name)))


def _pause_binary(cache: Path) -> Path:
    out = cache / f"pause-{_key(PAUSE_C)}"
    if not out.exists():
        compile_pause(out.with_suffix(".tmp")).rename(out)
    return out


def control_plane_images(cache: Path = CACHE) -> tuple[Path, list[str]]:
    """The images a kind node runs, as one docker-archive on the node's base layer: kubeadm's control plane
    (``fuyao.local/k8s/<name>:<tag>``, commands where kubeadm's manifests expect them), pause, and fuyao-kindnet."""
    version = kubernetes_version()
    images = [BinaryImage(f"{IMAGE_REPOSITORY}/{name}:{version}", {f"/usr/local/bin/{name}": _built(name)})
              for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy")]
    images += [
        BinaryImage(f"{IMAGE_REPOSITORY}/etcd:{etcd_tag()}", {"/usr/local/bin/etcd": _built("etcd")}),
        BinaryImage(f"{IMAGE_REPOSITORY}/coredns:{coredns_tag()}", {"/coredns": _built("coredns")},
                    entrypoint=["/coredns"]),
        BinaryImage(f"{IMAGE_REPOSITORY}/pause:{PAUSE_VERSION}", {"/pause": _pause_binary(cache)},
                    entrypoint=["/pause"]),
        BinaryImage(KINDNET_IMAGE, {"/usr/local/bin/fuyao-kindnet": KIND_DIR / "kindnet.py"},
                    entrypoint=["/usr/local/bin/fuyao-kindnet"]),
    ]
    return binary_images(images, "kind-images", cache, base=base_layer(cache, NODE_PACKAGES))


def containerd_layer(archive: Path, cache: Path = CACHE) -> Path:
    """``/var/lib/containerd`` with ``archive``'s images in namespace ``k8s.io``, content only (``--no-unpack``:
    the node unpacks on first use, as with kind's own images), made by a throwaway containerd of this machine's
    (the same Debian package as the node's)."""
    out = cache / f"kind-containerd-{_key(archive.name)}.tar"
    if out.exists():
        return out
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        raise RuntimeError("the node image's preloaded images need containerd: apt-get install containerd")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        root, state = Path(tmp) / "layer" / "var" / "lib" / "containerd", Path(tmp) / "state"
        sock = Path(tmp) / "containerd.sock"
        config = Path(tmp) / "config.toml"
        config.write_text(f'version = 2\nroot = "{root}"\nstate = "{state}"\n'
                          f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "{sock}"\n')
        log = open(Path(tmp) / "containerd.log", "wb")  # noqa: SIM115 - closed below
        daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError(f"a throwaway containerd did not start: {Path(tmp, 'containerd.log')}")
                time.sleep(0.2)
            subprocess.run(["ctr", "--address", str(sock), "-n", "k8s.io", "images", "import", "--all-platforms",
                            "--no-unpack", str(archive)], check=True, capture_output=True, timeout=600)
        finally:
            daemon.terminate()
            daemon.wait(30)
            log.close()
        _pack(Path(tmp) / "layer", out)
    _prune(cache, "kind-containerd-*.tar", out)
    _log(f"containerd layer (preloaded images) in {time.monotonic() - started:.0f} s: {out}")
    return out


def _prune(cache: Path, pattern: str, keep: Path) -> None:
    """Earlier versions of a layer (each is hundreds of MB; only the newest is used)."""
    for stale in cache.glob(pattern):
        if stale != keep:
            stale.unlink()


def _node_files() -> dict[str, tuple[Path | bytes | str, int]]:
    """Path in the image → (a file on this machine, bytes, or a symlink target given as str; mode)."""
    version = kubernetes_version()
    files: dict[str, tuple[Path | bytes | str, int]] = {
        "usr/bin/kubeadm": (_built("kubeadm"), 0o755),
        "usr/bin/kubelet": (_built("kubelet"), 0o755),
        "usr/bin/kubectl": (_built("kubectl"), 0o755),
        "usr/local/bin/crictl": (_built("crictl"), 0o755),
        "usr/local/bin/entrypoint": (KIND_DIR / "entrypoint", 0o755),
        "kind/bin/kubelet-cgroup-v2": (KIND_DIR / "kubelet-cgroup-v2", 0o755),
        "etc/containerd/config.toml": (KIND_DIR / "containerd.toml", 0o644),
        "etc/crictl.yaml": (b"runtime-endpoint: unix:///run/containerd/containerd.sock\n", 0o644),
        "etc/systemd/system/kubelet.service": (KIND_DIR / "kubelet.service", 0o644),
        "etc/systemd/system/kubelet.service.d/10-kubeadm.conf": (KIND_DIR / "10-kubeadm.conf", 0o644),
        "etc/systemd/system/kubelet.slice": (KIND_DIR / "kubelet.slice", 0o644),
        "etc/systemd/system/multi-user.target.wants/containerd.service": ("/lib/systemd/system/containerd.service",
                                                                           0o777),
        "etc/systemd/system/multi-user.target.wants/kubelet.service": ("/etc/systemd/system/kubelet.service", 0o777),
        "etc/systemd/journald.conf.d/10-kind.conf": (b"[Journal]\nReadKMsg=no\n", 0o644),
        "etc/default/kubelet": (b"KUBELET_EXTRA_ARGS=--runtime-cgroups=/system.slice/containerd.service\n", 0o644),
        "etc/sysctl.d/10-network-security.conf": (b"net.ipv4.conf.default.rp_filter=1\n"
                                                  b"net.ipv4.conf.all.rp_filter=1\n", 0o644),
        "etc/kubernetes/manifests/.keep": (b"", 0o644),
        "opt/cni/bin": ("/usr/lib/cni", 0o777),
        "kind/version": (version.encode() + b"\n", 0o644),
        "kind/manifests/default-cni.yaml": (KIND_DIR / "default-cni.yaml", 0o644),
        "etc/machine-id": (b"", 0o444),
    }
    for unit in MASKED_UNITS:
        files[f"etc/systemd/system/{unit}"] = ("/dev/null", 0o777)
    return files


def _stamp(src: Path | bytes | str) -> object:
    """What a file of the node layer is, for its cache key: a symlink's target, small files' content, big
    binaries' path, size and modification time."""
    if isinstance(src, str):
        return src
    if isinstance(src, bytes):
        return src.decode()
    stat = src.stat()
    if stat.st_size < 1 << 20:
        return src.read_text()
    return [str(src.resolve()), stat.st_size, stat.st_mtime_ns]


def node_layer(cache: Path = CACHE) -> Path:
    files = _node_files()
    stamp = [(dest, _stamp(src), mode) for dest, (src, mode) in sorted(files.items())]
    out = cache / f"kind-node-{_key(stamp)}.tar"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for dest, (src, mode) in files.items():
            target = Path(tmp) / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(src, str):
                target.symlink_to(src)
                continue
            if isinstance(src, Path):
                shutil.copyfile(src, target)
            else:
                target.write_bytes(src)
            target.chmod(mode)
        (Path(tmp) / "kind").chmod(0o755)
        _pack(Path(tmp), out)
    _prune(cache, f"kind-node-{'?' * 16}.tar", out)
    return out


def build(cache: Path = CACHE) -> tuple[Path, str]:
    """The node image's docker-archive (built or reused) and its tag."""
    cache.mkdir(parents=True, exist_ok=True)
    base = base_layer(cache, NODE_PACKAGES)
    images, _ = control_plane_images(cache)
    layers = [base, containerd_layer(images, cache), node_layer(cache)]
    tag = f"{NODE_REPOSITORY}:{kubernetes_version()}-{_key([p.name for p in layers])[:12]}"
    out = cache / f"kind-node-{tag.rsplit(':', 1)[1]}.docker.tar"
    if out.exists():
        return out, tag
    _prune(cache, "kind-node-v*.docker.tar", out)  # the newest archive only (its layers stay cached)
    tmp = out.with_suffix(".tmp")
    write_images(tmp, [Image(
        [tag], layers,
        {"Env": ["container=docker", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
         "Entrypoint": ["/usr/local/bin/entrypoint", "/sbin/init"], "StopSignal": "SIGRTMIN+3",
         "Labels": {"org.opencontainers.image.source": "fuyao (local build: tests/support/kind_image.py)"}},
        [f"debootstrap bookworm minbase + {' '.join(NODE_PACKAGES)}",
         "the control plane's images in containerd (k8s.io)",
         "kubeadm, kubelet, kubectl, crictl, units and kind's files (hack/kind/)"])])
    tmp.rename(out)
    return out, tag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.kind_image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    started = time.monotonic()
    path, tag = build(args.cache)
    print(json.dumps({"archive": str(path), "tag": tag, "seconds": round(time.monotonic() - started, 1)}))


if __name__ == "__main__":
    main()
