"""Pod cgroups as the kubelet lays them out, read and written by file: cgroup v1 and v2, cgroupfs and systemd
drivers.

Layouts (``<root>`` is ``--cgroup-root``, default ``/sys/fs/cgroup``; ``<uid>`` the pod UID, with ``-`` as ``_``
under systemd):

==========  =========  =====================================================================================
version     driver     pod directory
==========  =========  =====================================================================================
v1          cgroupfs   ``<root>/<controller>/kubepods[/burstable|/besteffort]/pod<uid>``
v1          systemd    ``<root>/<controller>/kubepods.slice[/kubepods-<tier>.slice]/kubepods[-<tier>]-pod<uid>.slice``
v2          cgroupfs   ``<root>/kubepods[/burstable|/besteffort]/pod<uid>``
v2          systemd    ``<root>/kubepods.slice[/kubepods-<tier>.slice]/kubepods[-<tier>]-pod<uid>.slice``
==========  =========  =====================================================================================

v1 controllers: ``cpu`` (``cpu.shares``, ``cpu.cfs_quota_us``, ``cpu.cfs_period_us``), ``cpuacct``
(``cpuacct.usage``, ns), ``memory`` (``memory.usage_in_bytes``, ``memory.stat`` ``total_inactive_file``).
v2 files: ``cpu.stat`` (``usage_usec``), ``cpu.weight``, ``cpu.max`` (``max 100000`` or ``<quota> <period>``),
``memory.current``, ``memory.stat`` (``inactive_file``). Memory usage is the working set (usage - inactive file
pages), as the kubelet computes it for eviction.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fuyao.inventory import parse_cpu_list

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/fs/cgroup"
DEFAULT_PERIOD_US = 100_000
_POD_DIR = re.compile(r"^(?:(?:[a-z0-9_]+-)*kubepods(?:-[a-z]+)?-)?pod([0-9a-fA-F_-]{8,})(?:\.slice)?$")


def host_page_size() -> int:
    """The kernel's page size: 4 KiB on x86-64, 64 KiB on many aarch64 kernels (RHEL, Kylin). Memory limits are
    kept in whole pages."""
    return os.sysconf("SC_PAGE_SIZE")


class CgroupError(Exception):
    """A cgroup file is missing, unreadable or malformed; the message names the file."""


Driver = Literal["cgroupfs", "systemd"]


@dataclass(frozen=True)
class Layout:
    version: Literal[1, 2]
    driver: Driver
    root: Path
    kubepods: str = ""
    """The kubepods directory under a controller's root: ``kubepods.slice`` / ``kubepods``, or one level deeper when
    the kubelet has a ``cgroupRoot`` (kind's nodes: ``kubelet.slice/kubelet-kubepods.slice``)."""
    page_size: int = field(default_factory=host_page_size)
    """The kernel's page size (memory limits read back in whole pages; v1's "unlimited" depends on it)."""

    def __post_init__(self) -> None:
        if not self.kubepods:
            object.__setattr__(self, "kubepods", "kubepods.slice" if self.driver == "systemd" else "kubepods")

    def describe(self) -> str:
        return f"cgroup v{self.version}, {self.driver} driver, under {self.root / self.kubepods}"


Tier = Literal["guaranteed", "burstable", "besteffort"]
"""A pod's cgroup tier (its Kubernetes QoS class)."""


@dataclass(frozen=True)
class PodCgroup:
    uid: str
    tier: Tier
    cpu: Path  # the directory with the cpu controller's files
    cpuacct: Path
    memory: Path


def detect(root: str | Path = DEFAULT_ROOT) -> Layout:
    """The layout under ``root``: v2 when ``cgroup.controllers`` is there; the driver by which kubepods directory
    exists. Raises :class:`CgroupError` when there is no kubepods hierarchy."""
    base = Path(root)
    if (base / "cgroup.controllers").is_file():
        version: Literal[1, 2] = 2
        probe = base
    else:
        version = 1
        probe = base / "cpu"
    candidates: tuple[tuple[Driver, str, str], ...] = (("systemd", "kubepods.slice", "*.slice/*-kubepods.slice"),
                                                       ("cgroupfs", "kubepods", "*/kubepods"))
    for driver, top, nested in candidates:
        if (probe / top).is_dir():
            return Layout(version, driver, base, top)
        # the kubelet's cgroupRoot (one level): systemd names a slice after its parents (kubelet-kubepods.slice)
        found = sorted(str(p.relative_to(probe)) for p in probe.glob(nested) if p.is_dir()
                       and (driver == "cgroupfs" or p.name == f"{p.parent.name.removesuffix('.slice')}-kubepods.slice"))
        if len(found) == 1:
            return Layout(version, driver, base, found[0])
        if found:
            raise CgroupError(f"several kubepods cgroups under {probe}: {', '.join(found)}: which kubelet is this "
                              "node's?")
    raise CgroupError(f"no kubepods cgroup under {probe} (looked for kubepods.slice and kubepods, also under a "
                      f"kubelet cgroupRoot one level down): is --cgroup-root right, and is this a Kubernetes node?")


def _controller_root(layout: Layout, controller: str) -> Path:
    return layout.root if layout.version == 2 else layout.root / controller


def _tier_dirs(layout: Layout, controller: str) -> list[tuple[Tier, Path]]:
    base = _controller_root(layout, controller)
    top = base / layout.kubepods
    if layout.driver == "systemd":
        prefix = top.name.removesuffix(".slice")
        return [("guaranteed", top), ("burstable", top / f"{prefix}-burstable.slice"),
                ("besteffort", top / f"{prefix}-besteffort.slice")]
    return [("guaranteed", top), ("burstable", top / "burstable"), ("besteffort", top / "besteffort")]


def pod_cgroups(layout: Layout, errors: list[str] | None = None) -> dict[str, PodCgroup]:
    """Every pod cgroup on the node, by pod UID (dashes restored). A tier directory that cannot be listed is
    appended to ``errors`` (and logged without it), never taken for a tier without pods; only a burstable or
    besteffort tier that does not exist is (the kubelet creates them; an empty node may not have them yet)."""
    found: dict[str, PodCgroup] = {}
    for tier, directory in _tier_dirs(layout, "cpu"):
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            if tier == "guaranteed":  # kubepods itself is gone: every pod would be missed
                _tier_error(errors, f"cannot list {directory}: it is gone (kubelet restarted or reconfigured?)")
            continue
        except OSError as exc:
            _tier_error(errors, f"cannot list {directory}: {exc.strerror or exc}: its pods are missed this cycle")
            continue
        for entry in entries:
            match = _POD_DIR.match(entry.name)
            if not match or not entry.is_dir():
                continue
            uid = match.group(1).replace("_", "-")
            relative = entry.relative_to(_controller_root(layout, "cpu"))
            found[uid] = PodCgroup(uid=uid, tier=tier,
                                   cpu=entry, cpuacct=_controller_root(layout, "cpuacct") / relative,
                                   memory=_controller_root(layout, "memory") / relative)
    return found


def _tier_error(errors: list[str] | None, message: str) -> None:
    if errors is None:
        log.warning("%s", message)
    else:
        errors.append(message)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror or exc}") from None


def _int(path: Path) -> int:
    text = _read(path).strip()
    try:
        return int(text)
    except ValueError:
        raise CgroupError(f"{path}: expected an integer, got {text[:40]!r}") from None


def _stat(path: Path, key: str) -> int:
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value.strip())
            except ValueError:
                break
    raise CgroupError(f"{path}: no integer {key!r} line")


def cpu_usage_ns(layout: Layout, pod: PodCgroup) -> int:
    """Cumulative CPU time of the pod, nanoseconds."""
    if layout.version == 2:
        return _stat(pod.cpu / "cpu.stat", "usage_usec") * 1000
    return _int(pod.cpuacct / "cpuacct.usage")


def memory_working_set(layout: Layout, pod: PodCgroup) -> int:
    """Memory usage minus inactive file pages (what the kubelet evicts on), bytes."""
    if layout.version == 2:
        usage = _int(pod.memory / "memory.current")
        inactive = _stat(pod.memory / "memory.stat", "inactive_file")
    else:
        usage = _int(pod.memory / "memory.usage_in_bytes")
        inactive = _stat(pod.memory / "memory.stat", "total_inactive_file")
    return max(0, usage - inactive)


@dataclass(frozen=True)
class CpuLimit:
    """CFS bandwidth: ``quota_us`` per ``period_us``; None: unlimited."""

    quota_us: int | None
    period_us: int = DEFAULT_PERIOD_US

    @property
    def milli(self) -> int | None:
        return None if self.quota_us is None else self.quota_us * 1000 // self.period_us


@dataclass(frozen=True)
class Write:
    """One file write the agent makes (or, in a dry run, would make)."""

    path: str
    value: str


def cpu_limit(layout: Layout, pod: PodCgroup) -> CpuLimit:
    if layout.version == 2:
        text = _read(pod.cpu / "cpu.max").split()
        if len(text) != 2:
            raise CgroupError(f"{pod.cpu / 'cpu.max'}: expected '<quota|max> <period>'")
        try:
            period = int(text[1])
            return CpuLimit(None if text[0] == "max" else int(text[0]), period)
        except ValueError:
            raise CgroupError(f"{pod.cpu / 'cpu.max'}: expected '<quota|max> <period>', got {' '.join(text)!r}") \
                from None
    quota = _int(pod.cpu / "cpu.cfs_quota_us")
    return CpuLimit(None if quota < 0 else quota, _int(pod.cpu / "cpu.cfs_period_us"))


def cpu_limit_write(layout: Layout, pod: PodCgroup, limit: CpuLimit) -> list[Write]:
    """The writes that set ``limit`` (the period is left as it is on v1)."""
    if layout.version == 2:
        quota = "max" if limit.quota_us is None else str(limit.quota_us)
        return [Write(str(pod.cpu / "cpu.max"), f"{quota} {limit.period_us}")]
    return [Write(str(pod.cpu / "cpu.cfs_quota_us"), "-1" if limit.quota_us is None else str(limit.quota_us))]


def cpu_weight(layout: Layout, pod: PodCgroup) -> int:
    """v2 ``cpu.weight`` (1..10000) or v1 ``cpu.shares`` (2..262144), as the file says."""
    return _int(pod.cpu / ("cpu.weight" if layout.version == 2 else "cpu.shares"))


WeightConversion = Literal["linear", "quadratic"]
"""How cgroup v1 cpu.shares [2, 262144] become v2 cpu.weight [1, 10000]. ``linear``: KEP-2254's, which the kubelet
uses for the pod and QoS cgroups it writes (``getCPUWeight``) and runtimes used before runc 1.3.2 / crun 1.23;
``quadratic``: opencontainers/cgroups' ``ConvertCPUSharesToCgroupV2Value`` since v0.0.3 (runc >= 1.3.2) and crun
>= 1.23 (``convert_shares_to_weight``), for the containers they create (kubernetes/kubernetes#131216)."""


def cpu_weight_write(layout: Layout, pod: PodCgroup, shares: int, conversion: WeightConversion = "linear") -> Write:
    """Set the CPU weight given in v1 shares; on v2 converted the way whoever owns the cgroup converts it (a pod's:
    the kubelet, ``linear``; a container's: its runtime, :func:`shares_to_weight`)."""
    if layout.version == 2:
        return Write(str(pod.cpu / "cpu.weight"), str(shares_to_weight(shares, conversion)))
    return Write(str(pod.cpu / "cpu.shares"), str(shares))


def shares_to_weight(shares: int, conversion: WeightConversion = "linear") -> int:
    """cgroup v1 cpu.shares to v2 cpu.weight (:data:`WeightConversion`); shares outside [2, 262144] are clamped.
    ``quadratic``: ceil(10^((L² + 125L)/612 - 7/34)) with L = log2(shares), through (2, 1), (1024, 100) and
    (262144, 10000)."""
    if conversion == "quadratic":
        if shares <= 2:
            return 1
        if shares >= 262144:
            return 10000
        level = math.log2(shares)
        return math.ceil(10 ** ((level * level + 125 * level) / 612.0 - 7.0 / 34.0))
    shares = max(2, min(262144, shares))
    return 1 + ((shares - 2) * 9999) // 262142


def detect_conversion(samples: Iterable[tuple[int, int]]) -> WeightConversion | None:
    """Which conversion the runtime used, from (shares it was given, cpu.weight it wrote) of containers: the one that
    explains more of them, counting only those where the two conversions differ (None: no such container, or a
    tie)."""
    votes = {"linear": 0, "quadratic": 0}
    for shares, weight in samples:
        linear, quadratic = shares_to_weight(shares, "linear"), shares_to_weight(shares, "quadratic")
        if linear != quadratic and weight in (linear, quadratic):
            votes["linear" if weight == linear else "quadratic"] += 1
    if votes["linear"] == votes["quadratic"]:
        return None
    return "linear" if votes["linear"] > votes["quadratic"] else "quadratic"


LONG_MAX = 2**63 - 1


def unlimited_memory(page_size: int) -> int:
    """What v1's ``memory.limit_in_bytes`` reads when unlimited: PAGE_COUNTER_MAX (LONG_MAX / PAGE_SIZE) pages, in
    bytes (9223372036854771712 with 4 KiB pages, 9223372036854710272 with 64 KiB ones)."""
    return LONG_MAX // page_size * page_size


def _memory_bytes(text: str, page_size: int) -> int | None:
    """A memory limit file's value (``max``, ``-1`` or v1's page-counter maximum: unlimited, None); ValueError when
    it is not a number."""
    text = text.strip()
    if text == "max":
        return None
    value = int(text)
    return None if value < 0 or value >= unlimited_memory(page_size) else value


def memory_limit(layout: Layout, directory: Path) -> int | None:
    """``memory.max`` (v2) or ``memory.limit_in_bytes`` (v1) of a cgroup directory, bytes; None: unlimited."""
    path = directory / ("memory.max" if layout.version == 2 else "memory.limit_in_bytes")
    text = _read(path)
    try:
        return _memory_bytes(text, layout.page_size)
    except ValueError:
        raise CgroupError(f"{path}: expected 'max' or bytes, got {text.strip()[:40]!r}") from None


def memory_limit_write(layout: Layout, directory: Path, limit: int | None) -> Write:
    if layout.version == 2:
        return Write(str(directory / "memory.max"), "max" if limit is None else str(limit))
    return Write(str(directory / "memory.limit_in_bytes"), "-1" if limit is None else str(limit))


def same_memory(current: int | None, want: int | None, page_size: int | None = None) -> bool:
    """Whether a limit that reads ``current`` is ``want``: the kernel stores a memory limit rounded down to whole
    pages (``page_size``, default this host's)."""
    if current is None or want is None:
        return current is None and want is None
    page = page_size or host_page_size()
    return current // page == want // page


# Container cgroups: the runtime names them after the container ID, below the pod's directory. Only these layouts
# (the ones containerd, CRI-O and cri-dockerd create) are tried; nothing else is guessed.
_CONTAINER_DIRS = {
    ("containerd", "cgroupfs"): ("{id}",), ("containerd", "systemd"): ("cri-containerd-{id}.scope",),
    ("cri-o", "cgroupfs"): ("crio-{id}",), ("cri-o", "systemd"): ("crio-{id}.scope",),
    ("docker", "cgroupfs"): ("{id}",), ("docker", "systemd"): ("docker-{id}.scope",),
}


def split_container_id(raw: str) -> tuple[str, str] | None:
    """``containerd://<id>`` (a pod status's containerID) → (runtime, id); None when it is not one."""
    runtime, sep, cid = raw.partition("://")
    if not sep or not re.fullmatch(r"[0-9a-f]{12,128}", cid):
        return None
    return runtime, cid


def parse_cpus(text: str) -> frozenset[int]:
    """A kernel CPU list (``0-3,6``) as a set; raises ValueError on anything else."""
    return frozenset(parse_cpu_list(text))


def format_cpus(cpus: frozenset[int]) -> str:
    """The kernel's own form of a CPU list (ranges, ascending), so a write reads back as written."""
    ordered = sorted(cpus)
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def cpuset_dir(layout: Layout, cpu_dir: Path) -> Path:
    return controller_dir(layout, cpu_dir, "cpuset")


def cpuset(layout: Layout, cpu_dir: Path) -> frozenset[int]:
    """The CPUs the cgroup may run on (v2: the effective set when its own list is empty, i.e. inherited)."""
    return cpuset_at(layout, cpuset_dir(layout, cpu_dir))


def cpuset_children(layout: Layout, cpu_dir: Path) -> list[Path]:
    """Every cgroup right under the pod's in the cpuset hierarchy: its containers, and the sandbox (pause) one the
    pod's status does not list, whose CPUs must also fit the pod's on v1."""
    try:
        return sorted(d for d in cpuset_dir(layout, cpu_dir).iterdir() if d.is_dir())
    except OSError as exc:
        raise CgroupError(f"cannot list {cpuset_dir(layout, cpu_dir)}: {exc.strerror or exc}") from None


def cpuset_at(layout: Layout, d: Path) -> frozenset[int]:
    """:func:`cpuset` of the cpuset hierarchy's directory ``d``."""
    text = _read(d / "cpuset.cpus").strip()
    if not text and layout.version == 2:
        text = _read(d / "cpuset.cpus.effective").strip()
    try:
        return parse_cpus(text)
    except ValueError:
        raise CgroupError(f"{d / 'cpuset.cpus'}: not a CPU list: {text[:40]!r}") from None



def tier_cpus(layout: Layout, tier: Tier = "besteffort") -> frozenset[int]:
    """The CPUs a QoS tier's pods may use at most (the kubelet's cpuset for the tier: every CPU it allots pods)."""
    return cpuset(layout, dict(_tier_dirs(layout, "cpu"))[tier])


def container_dir(layout: Layout, pod_dir: Path, container_id: str) -> Path | None:
    """The directory of a container's cgroup under ``pod_dir`` (one controller's pod directory), or None when the
    runtime's layout for it does not exist there (not started yet, gone, or an unknown runtime)."""
    found = split_container_id(container_id)
    if found is None:
        return None
    runtime, cid = found
    for pattern in _CONTAINER_DIRS.get((runtime, layout.driver), ()):
        candidate = pod_dir / pattern.format(id=cid)
        if candidate.is_dir():
            return candidate
    return None


def controller_dir(layout: Layout, cpu_dir: Path, controller: str) -> Path:
    """The same cgroup under another controller (v1: ``memory``...; v2: the same directory)."""
    if layout.version == 2:
        return cpu_dir
    return _controller_root(layout, controller) / cpu_dir.relative_to(_controller_root(layout, "cpu"))


def reads_as(write: Write, shown: str, page_size: int) -> bool:
    """Whether a file that shows ``shown`` holds what ``write`` wrote (memory limits: to the page, and v1's
    "unlimited" as the kernel shows it with pages of ``page_size``); ValueError when a memory limit is no number."""
    if Path(write.path).name in ("memory.max", "memory.limit_in_bytes"):
        return same_memory(_memory_bytes(shown, page_size), _memory_bytes(write.value, page_size), page_size)
    return shown.split() == write.value.split()


def apply(write: Write, page_size: int | None = None) -> None:
    """Write one cgroup file (the value is one line, as the kernel expects), then read it back: a value the kernel
    did not take (clamped, refused silently) is an error naming the file. ``page_size``: the kernel's (default this
    host's; :attr:`Layout.page_size`)."""
    try:
        with open(write.path, "w") as handle:
            handle.write(write.value)
        ok = reads_as(write, Path(write.path).read_text(), page_size or host_page_size())
    except OSError as exc:
        raise CgroupError(f"cannot write {write.value!r} to {write.path}: {exc.strerror or exc}") from None
    except ValueError:
        ok = False
    if not ok:
        try:
            now = repr(Path(write.path).read_text().strip()[:40])
        except OSError as exc:
            now = f"unreadable ({exc.strerror or exc})"
        raise CgroupError(f"wrote {write.value!r} to {write.path} but it reads {now}")
