"""A pod cgroup tree in a temp directory, laid out as the kubelet does (cgroup v1 or v2, cgroupfs or systemd driver)
with the real file names and formats, for the QoS agent's tests and benchmark."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal


class FakeCgroupTree:
    def __init__(self, root: Path, version: Literal[1, 2] = 2, driver: Literal["cgroupfs", "systemd"] = "cgroupfs",
                 kubelet_root: str = "", cpus: str = "0-7"):
        """``kubelet_root``: the kubelet's ``cgroupRoot`` (kind's nodes: ``kubelet``), one level above kubepods.
        ``cpus``: the node's CPUs, in every cgroup's cpuset as the kubelet leaves it."""
        self.cpus = cpus
        self.root = root
        self.kubelet_root = kubelet_root
        self.version = version
        self.driver = driver
        self.dirs: dict[str, Path] = {}  # uid → the pod directory under the cpu controller (v1) or the root (v2)
        if version == 2:
            root.mkdir(parents=True, exist_ok=True)
            (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
        else:
            (root / "cpu,cpuacct").mkdir(parents=True, exist_ok=True)
            (root / "memory").mkdir(exist_ok=True)
            for alias in ("cpu", "cpuacct"):
                if not (root / alias).exists():
                    os.symlink("cpu,cpuacct", root / alias)
        for controller in self._controllers():
            self._tier(controller, "guaranteed").mkdir(parents=True, exist_ok=True)
        for tier in ("guaranteed", "burstable", "besteffort"):
            directory = self._tier(self._cpuset_root(), tier)
            directory.mkdir(parents=True, exist_ok=True)
            self._cpuset_files(directory)

    def _cpuset_root(self) -> Path:
        return self.root if self.version == 2 else self.root / "cpuset"

    def _cpuset_files(self, directory: Path) -> None:
        """A new cgroup's cpuset as the kernel shows it: v1 copies its parent's list (the kubelet's hierarchy sets
        clone_children), v2 leaves its own list empty (inherited) with the effective one beside it."""
        if self.version == 2:
            (directory / "cpuset.cpus").write_text("\n")
            (directory / "cpuset.cpus.effective").write_text(f"{self.cpus}\n")
        else:
            (directory / "cpuset.cpus").write_text(f"{self.cpus}\n")

    def cpuset_dir(self, uid: str, container_id: str | None = None) -> Path:
        base = self.dirs[uid]
        if self.version == 1:
            base = self.root / "cpuset" / base.relative_to(self.root / "cpu,cpuacct")
        return base / self.container_name(container_id) if container_id else base

    def cpuset(self, uid: str, container_id: str | None = None) -> str:
        return (self.cpuset_dir(uid, container_id) / "cpuset.cpus").read_text().strip()

    def _controllers(self) -> list[Path]:
        return [self.root] if self.version == 2 else [self.root / "cpu,cpuacct", self.root / "memory"]

    @property
    def _slice(self) -> str:
        """The systemd name of the kubepods slice: named after its parents (``kubelet-kubepods``)."""
        return f"{self.kubelet_root}-kubepods" if self.kubelet_root else "kubepods"

    def _tier(self, base: Path, tier: str) -> Path:
        if self.driver == "systemd":
            parent = base / f"{self.kubelet_root}.slice" if self.kubelet_root else base
            top = parent / f"{self._slice}.slice"
            return top if tier == "guaranteed" else top / f"{self._slice}-{tier}.slice"
        top = base / self.kubelet_root / "kubepods" if self.kubelet_root else base / "kubepods"
        return top if tier == "guaranteed" else top / tier

    def _pod_name(self, uid: str, tier: str) -> str:
        if self.driver == "systemd":
            escaped = uid.replace("-", "_")
            return (f"{self._slice}-pod{escaped}.slice" if tier == "guaranteed"
                    else f"{self._slice}-{tier}-pod{escaped}.slice")
        return f"pod{uid}"

    def add_pod(self, uid: str, tier: str = "burstable", *, cpu_ns: int = 0, memory: int = 0, inactive_file: int = 0,
                quota_us: int | None = None, period_us: int = 100_000, shares: int = 1024) -> None:
        paths = []
        for base in self._controllers():
            directory = self._tier(base, tier) / self._pod_name(uid, tier)
            directory.mkdir(parents=True, exist_ok=True)
            paths.append(directory)
        self.dirs[uid] = paths[0]
        self._files(paths, shares, quota_us, period_us)
        self.cpuset_dir(uid).mkdir(parents=True, exist_ok=True)
        self._cpuset_files(self.cpuset_dir(uid))
        self.set_usage(uid, cpu_ns=cpu_ns, memory=memory, inactive_file=inactive_file)

    def _files(self, paths: list[Path], shares: int, quota_us: int | None, period_us: int) -> None:
        """A cgroup's CPU and memory limit files as the kernel shows a new one."""
        d = paths[0]
        if self.version == 2:
            (d / "cpu.weight").write_text(f"{1 + ((shares - 2) * 9999) // 262142}\n")
            (d / "cpu.max").write_text(f"{'max' if quota_us is None else quota_us} {period_us}\n")
            (d / "memory.max").write_text("max\n")
        else:
            (d / "cpu.shares").write_text(f"{shares}\n")
            (d / "cpu.cfs_quota_us").write_text(f"{-1 if quota_us is None else quota_us}\n")
            (d / "cpu.cfs_period_us").write_text(f"{period_us}\n")
            (paths[1] / "memory.limit_in_bytes").write_text("9223372036854771712\n")

    def container_name(self, container_id: str) -> str:
        """containerd's directory name for a container under its pod (cgroupfs: the ID; systemd: a scope)."""
        return f"cri-containerd-{container_id}.scope" if self.driver == "systemd" else container_id

    def add_container(self, uid: str, container_id: str, shares: int = 2) -> list[Path]:
        """A container cgroup under the pod (containerd's layout); returns its directories (cpu, memory)."""
        pod_dirs = [self.dirs[uid]] if self.version == 2 else [self.dirs[uid], self.memory_dir(uid)]
        paths = []
        for pod_dir in pod_dirs:
            directory = pod_dir / self.container_name(container_id)
            directory.mkdir(exist_ok=True)
            paths.append(directory)
        if self.version == 2:
            paths.append(paths[0])
        self._files(paths, shares, None, 100_000)
        self.cpuset_dir(uid, container_id).mkdir(exist_ok=True)
        self._cpuset_files(self.cpuset_dir(uid, container_id))
        return paths

    def file(self, uid: str, name: str, container_id: str | None = None) -> str:
        """A limit file of the pod (or of one of its containers), for either controller."""
        memory = name.startswith("memory.")
        base = self.memory_dir(uid) if memory else self.dirs[uid]
        if container_id:
            base = base / self.container_name(container_id)
        return (base / name).read_text().strip()

    def memory_dir(self, uid: str) -> Path:
        if self.version == 2:
            return self.dirs[uid]
        return self.root / "memory" / self.dirs[uid].relative_to(self.root / "cpu,cpuacct")

    def set_usage(self, uid: str, *, cpu_ns: int | None = None, memory: int | None = None,
                  inactive_file: int = 0) -> None:
        d, m = self.dirs[uid], self.memory_dir(uid)
        if cpu_ns is not None:
            if self.version == 2:
                usec = cpu_ns // 1000
                (d / "cpu.stat").write_text(f"usage_usec {usec}\nuser_usec {usec * 2 // 3}\nsystem_usec "
                                            f"{usec - usec * 2 // 3}\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n"
                                            "nr_bursts 0\nburst_usec 0\n")
            else:
                (d / "cpuacct.usage").write_text(f"{cpu_ns}\n")
        if memory is not None:
            if self.version == 2:
                (m / "memory.current").write_text(f"{memory}\n")
                (m / "memory.stat").write_text(
                    f"anon {memory - inactive_file}\nfile {inactive_file}\nkernel 0\nshmem 0\n"
                    f"inactive_anon {memory - inactive_file}\nactive_anon 0\ninactive_file {inactive_file}\n"
                    "active_file 0\nunevictable 0\n")
            else:
                (m / "memory.usage_in_bytes").write_text(f"{memory}\n")
                (m / "memory.stat").write_text(
                    f"cache {inactive_file}\nrss {memory - inactive_file}\nmapped_file 0\ninactive_file "
                    f"{inactive_file}\nactive_file 0\ntotal_cache {inactive_file}\ntotal_rss "
                    f"{memory - inactive_file}\ntotal_inactive_file {inactive_file}\ntotal_active_file 0\n")

    def cpu_file(self, uid: str, name: str) -> str:
        return (self.dirs[uid] / name).read_text().strip()

    def quota(self, uid: str) -> str:
        """The pod's CFS quota as the file holds it: ``cpu.max`` (v2) or ``cpu.cfs_quota_us`` (v1)."""
        return self.cpu_file(uid, "cpu.max" if self.version == 2 else "cpu.cfs_quota_us")

    def weight(self, uid: str) -> str:
        return self.cpu_file(uid, "cpu.weight" if self.version == 2 else "cpu.shares")
