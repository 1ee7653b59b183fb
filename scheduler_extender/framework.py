"""The scheduling framework of the extender: plugins filter (with a reason for every rejection) and score in
[0, 1]; scores are combined as a weighted average (llm-d style profiles) and mapped to each scheduler's range.

Everything here is pure: a decision is a function of the pod, the candidate nodes and the configuration, which is
what makes it testable and explainable (``/explain``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from .model import NodeInfo, PodInfo


@dataclass(frozen=True)
class Rejection:
    """Why a node cannot take the pod. ``unresolvable``: evicting pods would not help (kube-scheduler then
    skips preemption on that node)."""

    reason: str
    unresolvable: bool = False
    code: str = "rejected"
    """A short, fixed reason for metrics (the reason text carries numbers)."""


_CYCLES = itertools.count()


@dataclass(frozen=True)
class Cycle:
    """What a plugin may look at besides the pod and the node: every node the extender knows (for
    topology-domain questions such as prefill/decode balance), with indexes built once per request."""

    nodes: Mapping[str, NodeInfo]
    serial: int = field(default_factory=lambda: next(_CYCLES))
    """Unique per cycle (unlike id(), never reused): keys the node memos of cluster-wide scores."""

    @cached_property
    def pd_pods(self) -> dict[tuple[str, str], Counter[str]]:
        """(pd group, phase) → node name → running pods of that group and phase."""
        index: dict[tuple[str, str], Counter[str]] = {}
        for node in self.nodes.values():
            for pod in node.pods:
                if pod.phase is not None and pod.pd_group is not None and not pod.terminal:
                    index.setdefault((pod.pd_group, pod.phase.value), Counter())[node.name] += 1
        return index

    def pd_by_domain(self, key: str, group: str, phase: str) -> Counter[str | None]:
        """Pods of (group, phase) per value of label ``key``."""
        cache = self.__dict__.setdefault("_pd_domain", {})
        if (key, group, phase) not in cache:
            domains = self.domain_of(key)
            counts: Counter[str | None] = Counter()
            for name, n in self.pd_pods.get((group, phase), Counter()).items():
                counts[domains.get(name)] += n
            cache[(key, group, phase)] = counts
        return cache[(key, group, phase)]

    def domain_of(self, key: str) -> dict[str, str | None]:
        """node name → value of label ``key`` (its topology domain)."""
        cache = self.__dict__.setdefault("_domains", {})
        if key not in cache:
            cache[key] = {name: n.labels.get(key) for name, n in self.nodes.items()}
        return cache[key]


class Plugin(Protocol):
    name: str

    def filter(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> Rejection | None: ...

    def score(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> float: ...


@dataclass
class Explanation:
    """One decision, for ``GET /explain/<namespace>/<pod>``."""

    pod: str
    verb: str
    rejected: dict[str, str] = field(default_factory=dict)  # node → "plugin: reason"
    codes: dict[str, str] = field(default_factory=dict)  # node → "plugin/code", for metrics
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # node → plugin → [0, 1]
    totals: dict[str, float] = field(default_factory=dict)  # node → weighted [0, 1]

    def as_dict(self) -> dict[str, object]:
        return {"pod": self.pod, "verb": self.verb, "rejected": self.rejected, "scores": self.scores,
                "totals": self.totals}


@dataclass
class FilterOutcome:
    passed: list[str]
    failed: dict[str, str]
    unresolvable: dict[str, str]
    explanation: Explanation


class Framework:
    """Runs the enabled plugins with their weights."""

    def __init__(self, plugins: Sequence[tuple[Plugin, float]]):
        self.plugins = [(p, w) for p, w in plugins if w > 0]
        self.filters = [p for p, _ in plugins]  # a plugin with weight 0 still filters
        self.total_weight = sum(w for _, w in self.plugins) or 1.0

    def filter(self, pod: PodInfo, nodes: Sequence[NodeInfo], cycle: Cycle) -> FilterOutcome:
        explanation = Explanation(pod=pod.key, verb="filter")
        passed: list[str] = []
        failed: dict[str, str] = {}
        unresolvable: dict[str, str] = {}
        for node in nodes:
            rejection = self.check(pod, node, cycle)
            if rejection is None:
                passed.append(node.name)
                continue
            plugin, why = rejection
            text = f"{plugin}: {why.reason}"
            (unresolvable if why.unresolvable else failed)[node.name] = text
            explanation.rejected[node.name] = text
            explanation.codes[node.name] = f"{plugin}/{why.code}"
        return FilterOutcome(passed, failed, unresolvable, explanation)

    def check(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> tuple[str, Rejection] | None:
        # filters read only the pod and the node — and the clock, through the staleness of measured usage
        key = ("filter", pod.shape, node.fresh_usage() is not None)
        if key in node.memo:
            return node.memo[key]  # type: ignore[no-any-return]
        result = None
        for plugin in self.filters:
            rejection = plugin.filter(pod, node, cycle)
            if rejection is not None:
                result = plugin.name, rejection
                break
        node.memo[key] = result
        return result

    def score(self, pod: PodInfo, nodes: Sequence[NodeInfo], cycle: Cycle) -> Explanation:
        """Scores per node; reused for pods of the same shape while the node and the cycle are unchanged (node
        memos die with the node's state; a cycle lives as long as the cache generation)."""
        explanation = Explanation(pod=pod.key, verb="prioritize")
        for node in nodes:
            key = ("score", pod.shape, node.fresh_usage() is not None)
            slot = node.memo.get(key)  # one slot per shape: (cycle serial, parts); a newer cycle replaces it
            if slot is not None and slot[0] == cycle.serial:
                parts = slot[1]
            else:
                parts = {p.name: _clamp(p.score(pod, node, cycle)) for p, _ in self.plugins}
                node.memo[key] = (cycle.serial, parts)
            explanation.scores[node.name] = parts
            explanation.totals[node.name] = sum(parts[p.name] * w for p, w in self.plugins) / self.total_weight
        return explanation


def _clamp(value: float) -> float:
    return 0.0 if value != value else min(1.0, max(0.0, value))  # NaN → 0


def to_extender_score(total: float, max_score: int = 10) -> int:
    """kube-scheduler extenders answer integers 0..MaxExtenderPriority (10)."""
    return round(_clamp(total) * max_score)
