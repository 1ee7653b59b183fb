"""One QoS agent cycle: measure, decide (``policy``), then act — cgroup writes on BE pods, batch resources and
usage on the Node, evictions — or, in a dry run, only report what it would do. Every step that can fail (a cgroup
file, an API call) fails alone: logged, counted, retried next cycle; the daemon keeps running.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fuyao.contracts import RESOURCE_BATCH_CPU, RESOURCE_BATCH_MEMORY, NodeUsage, QoSClass

from . import cgroups, cpumanager, policy
from .collect import Collector, Measurement
from .config import AgentConfig
from .kube import Evictor, NodeState, Publisher
from .metrics import AgentMetrics

log = logging.getLogger(__name__)

EVICTION_RETRY_S = 60.0
DEFAULT_CONVERSION: cgroups.WeightConversion = "quadratic"
"""cgroup v2 containers' shares-to-weight conversion until one is detected (``cpuWeightConversion: auto``): current
runtimes' (runc >= 1.3.2, crun >= 1.23)."""


class PodLine(BaseModel):
    uid: str
    pod: str
    qos: str
    known: bool
    cpu_milli: int
    cpu_peak_milli: int
    memory_bytes: int


class WriteLine(BaseModel):
    path: str
    value: str
    reason: str
    error: str = ""


class EvictionLine(BaseModel):
    pod: str
    uid: str
    memory_bytes: int
    reason: str
    error: str = ""


class Report(BaseModel):
    """What one cycle measured, decided and did (``--once --dry-run`` prints it: did = would do)."""

    node: str
    at: float
    dry_run: bool
    cluster: bool
    cgroup: str
    notes: list[str]
    node_usage: dict[str, int]
    node_io_bytes_per_second: dict[str, int]
    usage_by_class: dict[str, dict[str, int]]
    pods: list[PodLine]
    batch: dict[str, int]
    batch_published: bool
    usage_published: bool
    suppress: dict[str, Any]
    cgroup_writes: list[WriteLine]
    evictions: list[EvictionLine]


class Agent:
    def __init__(self, config: AgentConfig, collector: Collector, metrics: AgentMetrics,
                 state: NodeState | None = None, publisher: Publisher | None = None, evictor: Evictor | None = None):
        self.config = config
        self.collector = collector
        self.metrics = metrics
        self.state = state
        self.publisher = publisher
        self.evictor = evictor
        self.suppressed = False
        self._be_cpus: int | None = None  # how many CPUs the cpuset policy gave BE pods last cycle
        self._batch: tuple[int, int] | None = None
        self._batch_at = 0.0
        self._usage: NodeUsage | None = None
        self._usage_at = 0.0
        self._evicted: dict[str, float] = {}
        self._limited, self._pinned = _load_state(config.state_file)
        """``_limited``: pods whose cgroups hold BE limits the agent wrote; ``_pinned``: pods whose cpusets the
        cpuset policy narrowed. Kept in ``state_file``: a pod that turns LS, or a node whose policy changes, while
        the agent restarts still gets its own values (the tier's CPUs) back."""
        self._saved: tuple[set[str], set[str]] = (set(self._limited), set(self._pinned))
        self._restoring: dict[str, list[WriteLine]] = {}  # this cycle's restores of limits, per pod
        self._unpinning: dict[str, list[WriteLine]] = {}  # this cycle's restores of cpusets, per pod
        self._tier_cpus: frozenset[int] | None = None  # the CPUs BE pods may have, as last read
        self._state_error = ""  # the kubelet's CPU manager checkpoint's last error (logged once per change)
        self._conversion: cgroups.WeightConversion | None = (
            None if config.cpu_weight_conversion == "auto" else config.cpu_weight_conversion)

    # --------------------------------------------------------------------------------------------------------------
    def cycle(self, dry_run: bool = False) -> Report:
        started = time.perf_counter()
        notes: list[str] = []
        facts: dict[str, Any] = {}
        capacity = reserved = None
        if self.state is None:
            notes.append("no cluster configured: every pod counts as LS, nothing is published or evicted")
        elif not self.state.ready:
            notes.append("still listing this node and its pods: every pod counts as LS this cycle")
        else:
            facts = self.state.facts()
            found = self.state.capacity()
            if found is None:
                notes.append("the Node has no readable capacity: the host's CPUs and memory are used")
            else:
                capacity, reserved = found
        failing = dict(self.state.failing) if self.state is not None else {}  # a copy: the watches change it
        if failing:
            notes.append(f"API server watch failing, pod classes may be stale: {failing}")
        m = self.collector.sample(facts, capacity, reserved or (0, 0))
        if m.errors:
            self.metrics.cgroup_errors.inc(len(m.errors))
            notes.extend(f"skipped: {e}" for e in m.errors)
        if not m.warm:
            notes.append("first sample: CPU rates need a second one; no cgroup changes this cycle")
        batch = policy.batch_resources(m.node, m.pods, self.config, m.unsampled)
        node_cpus = self._node_cpus(notes)
        plan = policy.cpu_suppress(m.node, m.pods, self.config, self.suppressed, node_cpus, self._be_cpus)
        writes = self._writes(m, plan, notes, node_cpus) if m.warm else []
        clock = time.monotonic()
        self._evicted = {uid: at for uid, at in self._evicted.items() if clock - at <= EVICTION_RETRY_S}
        evictions = [e for e in policy.memory_evictions(m.node, m.pods, self.config) if e.pod.uid not in self._evicted]
        if evictions and "pods" in failing:
            notes.append("evictions held: the pod watch is failing, so which pods are BE may be stale")
            evictions = []
        now = time.time()
        usage = self._usage_value(m, now)
        batch_due = capacity is not None and self._batch_due(m, batch, now)  # from a full view of the node only
        usage_due = m.warm and self._usage_due(usage, now)
        if not dry_run:
            page_size = self.collector.layout.page_size
            for line in writes:
                try:
                    cgroups.apply(cgroups.Write(line.path, line.value), page_size)
                    self.metrics.cgroup_writes.labels("ok").inc()
                except cgroups.CgroupError as exc:
                    line.error = str(exc)
                    self.metrics.cgroup_writes.labels("error").inc()
                    log.warning("cgroup write failed: %s", exc)
            for uid, lines in self._restoring.items():
                if not any(line.error for line in lines):
                    self._limited.discard(uid)  # its own values are back: only then forgotten
            for uid, lines in self._unpinning.items():
                if not any(line.error for line in lines):
                    self._pinned.discard(uid)  # the tier's CPUs are back
            self._save_state()
            if m.warm:
                self.suppressed = plan.active
                self._be_cpus = len(plan.cpus) if plan.cpus is not None else None
            publisher = self.publisher  # due only with one (a cluster)
            batch_due = batch_due and publisher is not None and self._publish(
                "batch", lambda: publisher.batch_resources(batch.cpu_milli, batch.memory_bytes))
            if batch_due:
                self._batch, self._batch_at = (batch.cpu_milli, batch.memory_bytes), now
            usage_due = usage_due and publisher is not None and self._publish(
                "usage", lambda: publisher.usage(usage))
            if usage_due:
                self._usage, self._usage_at = usage, now
        eviction_lines = [self._evict(e, dry_run) for e in evictions]
        self._observe(m, batch, plan)
        self.metrics.cycle_seconds.observe(time.perf_counter() - started)
        return self._report(m, batch, plan, writes, eviction_lines, notes, dry_run, now, batch_due, usage_due)

    def run(self, stop: threading.Event, dry_run: bool = False) -> None:
        """Cycle every ``interval`` until ``stop``. A dry run logs what each cycle would do."""
        while not stop.is_set():
            began = time.monotonic()
            try:
                report = self.cycle(dry_run=dry_run)
                if dry_run and (report.cgroup_writes or report.evictions):
                    log.info("dry run: would make %d cgroup writes and %d evictions", len(report.cgroup_writes),
                             len(report.evictions), extra=report.model_dump())
            except Exception:  # a bug in one cycle must not end the agent
                log.exception("QoS cycle failed; next one in %gs", self.config.interval)
            stop.wait(max(0.0, self.config.interval - (time.monotonic() - began)))

    # Decisions → actions -----------------------------------------------------------------------------------------
    def _node_cpus(self, notes: list[str]) -> frozenset[int]:
        """The CPUs BE pods may have, for the cpuset policy (empty: not that policy, or unreadable; then the CFS
        quota policy stands in and the cycle's notes say why)."""
        if self.config.cpu_suppress.policy != "cpuset":
            return frozenset()
        try:
            cpus = self._read_tier_cpus()
        except cgroups.CgroupError as exc:
            self.metrics.cgroup_errors.inc()
            notes.append(f"cpuset policy: the BestEffort tier's CPUs are not readable ({exc}); CFS quotas this cycle")
            return frozenset()
        except cpumanager.StateError as exc:
            notes.append(f"cpuset policy: the kubelet's CPU manager state is not usable ({exc}); CFS quotas this "
                         "cycle (BE pods could otherwise land on CPUs the kubelet gave a container for its own)")
            self._state_failed(str(exc))
            return frozenset()
        self._state_failed("")
        return cpus

    def _writes(self, m: Measurement, plan: policy.SuppressPlan, notes: list[str],
                node_cpus: frozenset[int] = frozenset()) -> list[WriteLine]:
        """cgroup writes that make each BE pod, and each of its containers, hold what its batch resources and the
        suppression plan say (only where a file differs). A pod that stopped being BE gets its spec's values back.
        A container whose cgroup is not where its runtime puts it is reported, never guessed. A pod the cpuset policy
        narrowed gets the tier's CPUs back once no cpuset policy applies to it (not BE any more, ``cpuSuppress``
        disabled or ``cfsQuota``, the tier unreadable: Koordinator's recoverCPUSetIfNeed); pods it never narrowed
        keep whatever cpusets they have (the kubelet's static CPU manager writes them). Limits and cpusets fail
        alone: one that cannot be read or written does not hold the other back."""
        out: list[WriteLine] = []
        self._restoring, self._unpinning = {}, {}
        if self._conversion is None and self.collector.layout.version == 2:
            self._conversion = self._detect_conversion(m)
        present = {p.uid for p in m.pods} | set(m.groups)
        self._limited &= present  # a pod that went took its cgroups with it
        self._pinned &= present
        full: list[frozenset[int] | None] = []  # the tier's CPUs, looked up once, when a pod needs them back

        def tier_cpus() -> frozenset[int] | None:
            if not full:
                full.append(self._restore_cpus(node_cpus))
            return full[0]

        unknown: list[str] = []
        for pod in m.pods:
            group = m.groups.get(pod.uid)
            if group is None:
                continue
            targets: policy.PodTargets | None = None
            cpus: frozenset[int] | None = None
            unpin = False
            if pod.be:
                targets = policy.be_targets(pod, plan.limits.get(pod.uid, pod.cpu_limit_milli),
                                            self.config.be_cpu_shares, in_besteffort_tier=group.tier == "besteffort")
                cpus = plan.cpus
                if cpus is not None:
                    why = (f"BE pod {pod.key}: on CPUs {cgroups.format_cpus(cpus)} (budget {plan.be_allowed_milli}m: "
                           f"LS + system use {plan.ls_and_system_milli}m)")
                elif plan.active:
                    why = (f"BE pod {pod.key}: CPU suppressed to {plan.limits.get(pod.uid)}m (LS + system use "
                           f"{plan.ls_and_system_milli}m)")
                else:
                    why = f"BE pod {pod.key}: its batch resources"
                unpin = cpus is None and pod.uid in self._pinned
                cpus_why = f"BE pod {pod.key}: no cpuset policy applies now: the BestEffort tier's CPUs back"
            elif pod.known and (pod.uid in self._limited or pod.uid in self._pinned):
                targets = policy.spec_targets(pod) if pod.uid in self._limited else None
                # a pod limited under the cpuset policy was on its CPUs (also when a state file predates pinning)
                unpin = pod.uid in self._pinned or self.config.cpu_suppress.policy == "cpuset"
                why = cpus_why = f"pod {pod.key} is no longer BE: its spec's values back"
            else:
                continue
            if unpin:
                cpus = tier_cpus()
                if cpus is None:
                    unknown.append(pod.key)
                else:
                    self._pinned.add(pod.uid)  # until the tier's CPUs are back
            limit_lines: list[WriteLine] = []
            if targets is not None:
                try:
                    limit_lines = self._pod_writes(pod, group, targets, why, notes)
                except cgroups.CgroupError as exc:
                    self._left_as_is(pod, "limits", exc, notes)
                else:
                    if pod.be:
                        self._limited.add(pod.uid)
                    else:
                        self._restoring[pod.uid] = limit_lines  # forgotten once every one of them is written
            cpuset_lines: list[WriteLine] = []
            if cpus is not None:
                try:
                    cpuset_lines = self._cpuset_writes(group.cpu, cpus, cpus_why if unpin else why)
                except cgroups.CgroupError as exc:
                    self._left_as_is(pod, "CPUs", exc, notes)
                else:
                    if unpin:
                        self._unpinning[pod.uid] = cpuset_lines  # forgotten once every one of them is written
                    else:
                        self._pinned.add(pod.uid)
            out += cpuset_lines + limit_lines
        if unknown:
            self.metrics.cgroup_errors.inc()
            notes.append(f"cpusets of {', '.join(unknown)} left narrowed: the BestEffort tier's CPUs were never read "
                         "(they go back once it is readable)")
        return out

    def _detect_conversion(self, m: Measurement) -> cgroups.WeightConversion | None:
        """The runtime's shares-to-weight conversion, read off running LS containers with a CPU request (the agent
        never writes their weights): the kubelet gave the runtime the kubelet's MilliCPUToShares of it (of the limit
        without a request), the runtime wrote the cpu.weight it converted that to. None while no container tells
        (any with more than 2 shares does: the conversions differ for every such value)."""
        layout = self.collector.layout
        samples: list[tuple[int, int]] = []
        for pod in m.pods:
            group = m.groups.get(pod.uid)
            if pod.be or not pod.known or group is None:
                continue
            for container in pod.containers:
                milli = container.cpu_request_milli or container.cpu_limit_milli or 0
                directory = cgroups.container_dir(layout, group.cpu, container.container_id) if milli else None
                if directory is None:
                    continue
                try:
                    weight = cgroups.cpu_weight(layout, cgroups.PodCgroup(uid=pod.uid, tier=group.tier, cpu=directory,
                                                                          cpuacct=directory, memory=directory))
                except cgroups.CgroupError:
                    continue  # exiting: another container tells
                samples.append((policy.milli_to_shares(milli), weight))
        found = cgroups.detect_conversion(samples)
        if found is not None:
            log.info("the container runtime converts cpu.shares to cgroup v2 cpu.weight the %s way (read off %d LS "
                     "containers); BE containers' weights follow it", found, len(samples))
        return found

    def _left_as_is(self, pod: policy.PodSample, what: str, exc: cgroups.CgroupError, notes: list[str]) -> None:
        self.metrics.cgroup_errors.inc()
        notes.append(f"{'BE pod' if pod.be else 'pod'} {pod.key}: its {what} left as is this cycle: {exc}")
        log.warning("%s of pod %s left as is this cycle: %s", what, pod.key, exc)

    def _save_state(self) -> None:
        """Write the limited and pinned pods to ``state_file`` when they changed (atomically; a failure is logged
        and the write is tried again next cycle)."""
        path = self.config.state_file
        if not path or (self._limited, self._pinned) == self._saved:
            return
        try:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(json.dumps({"version": 1, "limited": sorted(self._limited),
                                       "pinned": sorted(self._pinned)}))
            os.replace(tmp, target)
            self._saved = (set(self._limited), set(self._pinned))
        except OSError as exc:
            log.warning("cannot save the QoS agent's state to %s (retried next cycle): %s", path, exc)

    def _read_tier_cpus(self) -> frozenset[int]:
        """The CPUs BE pods may have now: the BestEffort tier's, less those the kubelet's static CPU manager gave
        containers exclusively (``cpuManagerStateFile``; Koordinator's calcBECPUSet likewise leaves out exclusive
        CPUs). Remembered: a pod narrowed by the cpuset policy gets them back also when either turns unreadable.
        CgroupError when the tier is unreadable, cpumanager.StateError when the checkpoint is, or leaves no CPU."""
        tier = cgroups.tier_cpus(self.collector.layout)
        path = self.config.cpu_manager_state_file
        cpus = tier - cpumanager.read_exclusive_cpus(path)
        if not cpus:
            raise cpumanager.StateError(f"{path}: every CPU of the BestEffort tier ({cgroups.format_cpus(tier)}) is "
                                        "a container's own: none left for BE pods")
        self._tier_cpus = cpus
        return cpus

    def _state_failed(self, error: str) -> None:
        """Log the CPU manager checkpoint's error when it changes (an error each cycle would flood the log)."""
        if error and error != self._state_error:
            log.error("the kubelet's CPU manager state is not usable, the cpuset policy gives way to CFS quotas "
                      "until it is: %s", error)
        elif not error and self._state_error:
            log.info("the kubelet's CPU manager state is readable again: back to the cpuset policy")
        self._state_error = error

    def _restore_cpus(self, node_cpus: frozenset[int]) -> frozenset[int] | None:
        """The CPUs a narrowed pod gets back: the tier's, as read this cycle, else as last read (None: never)."""
        if node_cpus:
            return node_cpus
        if self.config.cpu_suppress.policy != "cpuset":  # not read this cycle yet
            try:
                return self._read_tier_cpus()
            except (cgroups.CgroupError, cpumanager.StateError):
                pass
        return self._tier_cpus

    def _pod_writes(self, pod: policy.PodSample, group: cgroups.PodCgroup, targets: policy.PodTargets, why: str,
                    notes: list[str]) -> list[WriteLine]:
        """The pod's and its containers' CPU weight, quota and memory limit writes."""
        layout = self.collector.layout
        pod_lines = self._target_writes(group, targets.pod, why, "linear")  # the kubelet's, for pod cgroups
        conversion = self._conversion or DEFAULT_CONVERSION  # the runtime's, for containers
        children: list[WriteLine] = []
        for container in pod.containers:
            target = targets.containers.get(container.name)
            if target is None:
                continue
            cpu_dir = cgroups.container_dir(layout, group.cpu, container.container_id)
            memory_dir = cgroups.container_dir(layout, group.memory, container.container_id)
            if cpu_dir is None or memory_dir is None:
                self.metrics.cgroup_errors.inc()
                notes.append(f"pod {pod.key} container {container.name}: no cgroup for {container.container_id} "
                             f"under {group.cpu} ({layout.describe()}); its limits wait for the next cycle")
                continue
            child = cgroups.PodCgroup(uid=pod.uid, tier=group.tier, cpu=cpu_dir,
                                      cpuacct=cgroups.controller_dir(layout, cpu_dir, "cpuacct"), memory=memory_dir)
            children += self._target_writes(child, target, f"{why} (container {container.name})", conversion)
        # cgroup v1 refuses a child CFS quota above its parent's: shrink children first, grow the pod first
        current = cgroups.cpu_limit(layout, group).milli
        shrinking = targets.pod.cpu_limit_milli is not None and (
            current is None or targets.pod.cpu_limit_milli < current)
        return children + pod_lines if shrinking else pod_lines + children

    def _cpuset_writes(self, pod_cpu_dir: Path, cpus: frozenset[int], why: str) -> list[WriteLine]:
        """The pod's cpuset, and every cgroup's under it (its containers and its sandbox), to ``cpus``. cgroup v1
        refuses a child's CPUs outside its parent's (EBUSY), so the pod first takes the union, then the children
        move, then the pod narrows."""
        layout = self.collector.layout
        pod_dir = cgroups.cpuset_dir(layout, pod_cpu_dir)
        current = cgroups.cpuset_at(layout, pod_dir)
        stale = [d for d in cgroups.cpuset_children(layout, pod_cpu_dir) if cgroups.cpuset_at(layout, d) != cpus]
        if current == cpus and not stale:
            return []
        reason = f"{why}: CPUs {cgroups.format_cpus(cpus)}"
        value = cgroups.format_cpus
        out: list[WriteLine] = []
        union = current | cpus
        if union != current:
            out.append(WriteLine(path=str(pod_dir / "cpuset.cpus"), value=value(union),
                                 reason=f"{reason} (the pod widens first)"))
        out += [WriteLine(path=str(d / "cpuset.cpus"), value=value(cpus), reason=f"{reason} ({d.name})")
                for d in stale]
        if union != cpus:
            out.append(WriteLine(path=str(pod_dir / "cpuset.cpus"), value=value(cpus), reason=reason))
        return out

    def _target_writes(self, group: cgroups.PodCgroup, target: policy.CgroupTarget, why: str,
                       conversion: cgroups.WeightConversion) -> list[WriteLine]:
        """``conversion``: of shares to a v2 weight, as whoever made the cgroup does (kubelet or runtime)."""
        layout = self.collector.layout
        out = []
        want_weight = target.cpu_shares if layout.version == 1 else cgroups.shares_to_weight(target.cpu_shares,
                                                                                              conversion)
        if cgroups.cpu_weight(layout, group) != want_weight:
            write = cgroups.cpu_weight_write(layout, group, target.cpu_shares, conversion)
            out.append(WriteLine(path=write.path, value=write.value, reason=f"{why}: CPU weight"))
        current = cgroups.cpu_limit(layout, group)
        quota = cgroups.CpuLimit(policy.quota_us(target.cpu_limit_milli, current.period_us), current.period_us)
        if quota.quota_us != current.quota_us:
            out.extend(WriteLine(path=w.path, value=w.value, reason=f"{why}: CPU limit {target.cpu_limit_milli}m")
                       for w in cgroups.cpu_limit_write(layout, group, quota))
        if not cgroups.same_memory(cgroups.memory_limit(layout, group.memory), target.memory_limit_bytes,
                                   layout.page_size):
            write = cgroups.memory_limit_write(layout, group.memory, target.memory_limit_bytes)
            out.append(WriteLine(path=write.path, value=write.value,
                                 reason=f"{why}: memory limit {target.memory_limit_bytes}"))
        return out

    def _evict(self, eviction: policy.Eviction, dry_run: bool) -> EvictionLine:
        pod = eviction.pod
        line = EvictionLine(pod=pod.key, uid=pod.uid, memory_bytes=pod.memory_bytes, reason=eviction.reason)
        if dry_run or self.evictor is None:
            return line
        line.error = self.evictor.evict(pod.namespace, pod.name, pod.uid)
        self.metrics.evictions.labels("error" if line.error else "ok").inc()
        if not line.error:
            self._evicted[pod.uid] = time.monotonic()
            log.warning("evicted %s: %s", pod.key, eviction.reason, extra={"pod": pod.key, "uid": pod.uid})
        else:
            log.warning("eviction of %s failed: %s", pod.key, line.error)
        return line

    def _usage_value(self, m: Measurement, now: float) -> NodeUsage:
        be = [p for p in m.pods if p.be]
        return NodeUsage(updated_at=now, cpu_capacity_milli=max(1, m.node.cpu_capacity_milli),
                         cpu_used_milli=m.node.cpu_used_milli,
                         memory_capacity_bytes=max(1, m.node.memory_capacity_bytes),
                         memory_used_bytes=m.node.memory_used_bytes,
                         be_cpu_used_milli=sum(p.cpu_milli for p in be),
                         be_memory_used_bytes=sum(p.memory_bytes for p in be))

    def _batch_due(self, m: Measurement, batch: policy.BatchResources, now: float) -> bool:
        if self.publisher is None or not m.warm:
            return False
        settings = self.config.batch
        old = self._batch
        if old is not None and self.state is not None and self.state.published_batch() != old:
            old = None  # the Node lost them or holds others (re-registered, edited): published again, paced
        moved = (policy.changed_enough(old and old[0], batch.cpu_milli, m.node.cpu_capacity_milli,
                                       settings.change_threshold_percent)
                 or policy.changed_enough(old and old[1], batch.memory_bytes, m.node.memory_capacity_bytes,
                                          settings.change_threshold_percent))
        return moved and (self._batch is None or now - self._batch_at >= settings.min_publish_interval)

    def _usage_due(self, usage: NodeUsage, now: float) -> bool:
        if self.publisher is None:
            return False
        old = self._usage
        if old is None or now - self._usage_at >= self.config.usage.publish_interval:
            return True
        jump = self.config.usage.jump_percent / 100
        return max(abs(usage.cpu_ratio - old.cpu_ratio), abs(usage.memory_ratio - old.memory_ratio),
                   abs(usage.be_pressure - old.be_pressure)) > jump

    def _publish(self, what: str, call: Any) -> bool:
        try:
            call()
        except Exception as exc:
            self.metrics.publishes.labels(what, "error").inc()
            log.warning("publishing %s failed (retried next cycle): %s", what, exc)
            return False
        self.metrics.publishes.labels(what, "ok").inc()
        return True

    # Reporting ---------------------------------------------------------------------------------------------------
    def _observe(self, m: Measurement, batch: policy.BatchResources, plan: policy.SuppressPlan) -> None:
        self.metrics.batch.labels(RESOURCE_BATCH_CPU).set(batch.cpu_milli)
        self.metrics.batch.labels(RESOURCE_BATCH_MEMORY).set(batch.memory_bytes)
        for name, used in _by_class(m).items():
            self.metrics.usage_cpu.labels(name).set(used["cpu_milli"])
            self.metrics.usage_memory.labels(name).set(used["memory_bytes"])
        for name, rate in m.io.items():
            self.metrics.io.labels(name).set(rate)
        self.metrics.suppressed.set(1 if plan.active else 0)
        self.metrics.be_allowed.set(plan.be_allowed_milli or 0)

    def _report(self, m: Measurement, batch: policy.BatchResources, plan: policy.SuppressPlan,
                writes: list[WriteLine], evictions: list[EvictionLine], notes: list[str], dry_run: bool, now: float,
                batch_due: bool, usage_due: bool) -> Report:
        n = m.node
        return Report(
            node=self.config.node_name, at=now, dry_run=dry_run, cluster=self.state is not None,
            cgroup=self.collector.layout.describe(), notes=notes,
            node_usage={"cpu_capacity_milli": n.cpu_capacity_milli, "cpu_used_milli": n.cpu_used_milli,
                        "cpu_reserved_milli": n.cpu_reserved_milli, "memory_capacity_bytes": n.memory_capacity_bytes,
                        "memory_used_bytes": n.memory_used_bytes, "memory_reserved_bytes": n.memory_reserved_bytes},
            node_io_bytes_per_second=m.io, usage_by_class=_by_class(m),
            pods=[PodLine(uid=p.uid, pod=p.key, qos=p.qos.value if p.known else QoSClass.LS.value, known=p.known,
                          cpu_milli=p.cpu_milli, cpu_peak_milli=p.cpu_peak_milli, memory_bytes=p.memory_bytes)
                  for p in m.pods],
            batch={RESOURCE_BATCH_CPU: batch.cpu_milli, RESOURCE_BATCH_MEMORY: batch.memory_bytes},
            batch_published=batch_due, usage_published=usage_due,
            suppress={"active": plan.active, "ls_and_system_cpu_milli": plan.ls_and_system_milli,
                      "be_cpu_allowed_milli": plan.be_allowed_milli},
            cgroup_writes=writes, evictions=evictions)


def _load_state(path: str) -> tuple[set[str], set[str]]:
    """The pods a previous run of the agent left with BE limits, and those it left on the cpuset policy's CPUs
    (``state_file``; a file from before pinning was kept has no ``pinned``); none when there is no file, and none
    (with a warning naming the file) when it is unreadable or not the agent's."""
    if not path:
        return set(), set()
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("limited"), list) \
                or not isinstance(data.get("pinned", []), list):
            raise ValueError('not {"version": 1, "limited": [...], "pinned": [...]}')
        return {str(uid) for uid in data["limited"]}, {str(uid) for uid in data.get("pinned", [])}
    except FileNotFoundError:
        return set(), set()
    except (OSError, ValueError) as exc:
        log.warning("ignoring the QoS agent's state file %s: %s", path, exc)
        return set(), set()


def _by_class(m: Measurement) -> dict[str, dict[str, int]]:
    out = {c: {"cpu_milli": 0, "memory_bytes": 0} for c in ("LS", "BE", "system")}
    for p in m.pods:
        bucket = out["BE" if p.be else "LS"]
        bucket["cpu_milli"] += p.cpu_milli
        bucket["memory_bytes"] += p.memory_bytes
    out["system"]["cpu_milli"] = max(0, m.node.cpu_used_milli - sum(p.cpu_milli for p in m.pods))
    out["system"]["memory_bytes"] = max(0, m.node.memory_used_bytes - sum(p.memory_bytes for p in m.pods))
    return out
