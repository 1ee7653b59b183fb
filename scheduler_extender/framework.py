"""The scheduling framework of the extender: plugins filter (with a reason for every rejection) and score in
[0, 1]; scores are combined as a weighted average (llm-d style profiles) and mapped to each scheduler's range.

Plugins answer for all candidate nodes of a request at once, over the columns of a :class:`NodeView` (see
``features``): ``filter`` returns a small integer per node (0 passes, k is the plugin's k-th kind of rejection),
``reasons`` writes the text for the rejected ones, ``score`` returns an array in [0, 1]. Everything here is pure:
a decision is a function of the pod, the candidates' features and the configuration, which is what makes it
testable and explainable (``/explain``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .features import NodeTable, NodeView, PdIndex
from .model import NodeInfo, PodInfo
from .row_cache import RowDecisions, decisions_for


@dataclass(frozen=True)
class RejectKind:
    """One way a plugin rejects a node. ``unresolvable``: evicting pods would not help (kube-scheduler then skips
    preemption on that node). ``code``: a short, fixed reason for metrics (the reason text carries numbers)."""

    code: str
    unresolvable: bool = False


@dataclass(frozen=True)
class Rejection:
    """One node's rejection, as the one-node verbs (Volcano predicate, preemption checks) report it."""

    reason: str
    unresolvable: bool = False
    code: str = "rejected"


@dataclass
class Cycle:
    """What a plugin may look at besides the pod and the candidates: the cluster-wide prefill/decode index and the
    table that knows every node's topology domain, and the time (staleness of measured usage)."""

    pd: PdIndex = field(default_factory=PdIndex)
    domains: NodeTable | None = None
    now: float = field(default_factory=time.time)


class Plugin(Protocol):
    name: str
    kinds: Sequence[RejectKind]
    """``filter`` returns k for ``kinds[k - 1]``."""

    def filter(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | None:
        """Per candidate: 0 passes, k > 0 is rejected by ``kinds[k - 1]``; None: every candidate passes."""

    def reasons(self, kind: int, pod: PodInfo, view: NodeView, at: np.ndarray, cycle: Cycle) -> list[str]:
        """The reason texts of the candidates at positions ``at``, all rejected with ``kind``."""

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | float:
        """Per candidate, in [0, 1] (a scalar: the same for all)."""

    def row_local(self, pod: PodInfo) -> bool:
        """Whether ``filter`` and ``score`` decide each candidate from its own row alone (and the time, only
        through the staleness of measured usage), so per-row results may be kept (``row_cache``)."""


class Explanation:
    """One decision, for ``GET /explain/<namespace>/<pod>``. Holds the arrays of the decision; the per-node JSON
    is built only when someone asks."""

    def __init__(self, pod: str, verb: str, names: Sequence[str] = (),
                 rejected: dict[str, str] | None = None, parts: dict[str, np.ndarray] | None = None,
                 totals: np.ndarray | None = None, note: str = ""):
        self.note = note
        self.pod = pod
        self.verb = verb
        self.names = names
        self.rejected = rejected if rejected is not None else {}
        self.parts = parts or {}
        self.totals = totals

    @property
    def size(self) -> int:
        """Node entries held (what bounds the memory of kept explanations)."""
        return len(self.rejected) + (len(self.names) if self.totals is not None else 0)

    def total_of(self) -> dict[str, float]:
        if self.totals is None:
            return {}
        return dict(zip(self.names, self.totals.tolist(), strict=True))

    def scores_of(self) -> dict[str, dict[str, float]]:
        if self.totals is None:
            return {}
        columns = {p: v.tolist() for p, v in self.parts.items()}
        return {name: {p: round(v[i], 4) for p, v in columns.items()} for i, name in enumerate(self.names)}

    def as_dict(self) -> dict[str, Any]:
        found = {"pod": self.pod, "verb": self.verb, "rejected": self.rejected, "scores": self.scores_of(),
                 "totals": {n: round(t, 4) for n, t in self.total_of().items()}}
        if self.note:
            found["note"] = self.note
        return found


@dataclass
class FilterOutcome:
    passed: list[str]
    failed: dict[str, str]
    unresolvable: dict[str, str]
    explanation: Explanation
    rejections: dict[tuple[str, str], int] = field(default_factory=dict)  # (plugin, code) → nodes, for metrics
    passed_at: np.ndarray | None = None  # positions of ``passed`` in the view


class Framework:
    """Runs the enabled plugins with their weights."""

    def __init__(self, plugins: Sequence[tuple[Plugin, float]]):
        self.plugins = [(p, w) for p, w in plugins if w > 0]
        self.filters = [p for p, _ in plugins]  # a plugin with weight 0 still filters
        self.total_weight = sum(w for _, w in self.plugins) or 1.0
        self._last_kept: tuple[PodInfo, NodeTable, RowDecisions | None] | None = None

    def _kept(self, pod: PodInfo, view: NodeView) -> RowDecisions | None:
        """The per-row decisions kept for this pod's shape, when they can be (see ``row_cache``)."""
        if not view.table.long_lived:
            return None
        last = self._last_kept
        if last is not None and last[0] is pod and last[1] is view.table:  # filter, then shortlist's score
            return last[2]
        kept = decisions_for(view.table, self, pod, len(self.plugins)) \
            if all(p.row_local(pod) for p in self.filters) else None
        self._last_kept = (pod, view.table, kept)
        return kept

    def _verdicts(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> tuple[np.ndarray, np.ndarray]:
        """Per candidate: which filter rejected it (-1: none) and with which of its kinds."""
        n = len(view)
        by = np.full(n, -1, dtype=np.int16)
        kind = np.zeros(n, dtype=np.int16)
        for i, plugin in enumerate(self.filters):
            kinds = plugin.filter(pod, view, cycle)
            if kinds is None:
                continue
            hit = (by < 0) & (kinds > 0)
            by[hit] = i
            kind[hit] = kinds[hit]
        return by, kind

    def filter(self, pod: PodInfo, view: NodeView, cycle: Cycle | None = None) -> FilterOutcome:
        """The first plugin (in order) that rejects a node gives its reason."""
        cycle = cycle or Cycle()
        n = len(view)
        kept = self._kept(pod, view)
        if kept is not None:
            found = kept.verdicts.get(view, cycle.now, lambda sub: dict(zip(
                ("by", "kind"), self._verdicts(pod, sub, cycle), strict=True)))
            by, kind = found["by"], found["kind"]
        else:
            by, kind = self._verdicts(pod, view, cycle)
        names = view.names
        passed_at = np.flatnonzero(by < 0)
        passed = names if len(passed_at) == n else [names[i] for i in passed_at.tolist()]
        failed: dict[str, str] = {}
        unresolvable: dict[str, str] = {}
        rejected: dict[str, str] = {}
        counts: dict[tuple[str, str], int] = {}
        if len(passed_at) < n:
            for i in np.unique(by[by >= 0]).tolist():
                plugin = self.filters[i]
                mine = by == i
                for k in np.unique(kind[mine]).tolist():
                    at = np.flatnonzero(mine & (kind == k))
                    what = plugin.kinds[k - 1]
                    target = unresolvable if what.unresolvable else failed
                    prefix = f"{plugin.name}: "
                    for position, text in zip(at.tolist(), plugin.reasons(k, pod, view, at, cycle), strict=True):
                        target[names[position]] = rejected[names[position]] = prefix + text
                    key = (plugin.name, what.code)
                    counts[key] = counts.get(key, 0) + len(at)
        explanation = Explanation(pod=pod.key, verb="filter", rejected=rejected)
        return FilterOutcome(passed, failed, unresolvable, explanation, counts, passed_at)

    def _scores(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> tuple[np.ndarray, np.ndarray]:
        """Per candidate: each plugin's part (rows of a [plugin, candidate] array) and the weighted total."""
        n = len(view)
        parts = np.empty((len(self.plugins), n))
        for i, (plugin, _weight) in enumerate(self.plugins):
            raw = plugin.score(pod, view, cycle)
            if np.ndim(raw) == 0:
                parts[i] = min(max(float(raw), 0.0), 1.0) if raw == raw else 0.0  # NaN → 0, as fmax does
            else:
                np.fmin(np.fmax(np.asarray(raw, dtype=np.float64), 0.0), 1.0, out=parts[i])  # clamp; NaN → 0
        total = np.zeros(n)
        for i, (_plugin, weight) in enumerate(self.plugins):
            total += parts[i] * weight  # element by element: a node's total never depends on its neighbours
        return parts, total / self.total_weight

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle | None = None) -> Explanation:
        """Weighted [0, 1] totals per candidate, with each plugin's part."""
        cycle = cycle or Cycle()
        kept = self._kept(pod, view)
        if kept is not None:
            def compute(sub: NodeView) -> dict[str, np.ndarray]:
                parts, total = self._scores(pod, sub, cycle)
                return {"parts": parts.T, "total": total}  # kept with rows first

            found = kept.scores.get(view, cycle.now, compute)
            parts, totals = found["parts"].T, found["total"]
        else:
            parts, totals = self._scores(pod, view, cycle)
        return Explanation(pod=pod.key, verb="prioritize", names=view.names,
                           parts={p.name: parts[i] for i, (p, _w) in enumerate(self.plugins)}, totals=totals)

    def shortlist(self, pod: PodInfo, view: NodeView, outcome: FilterOutcome, keep: int,
                  cycle: Cycle | None = None) -> Explanation | None:
        """Narrow ``outcome.passed`` to the ``keep`` best-scoring feasible nodes (ties: request order), and return
        the score explanation of those (what prioritize answers). None when no more than ``keep`` passed: nothing
        to narrow."""
        if keep <= 0 or len(outcome.passed) <= keep or outcome.passed_at is None:
            return None
        feasible = view if len(outcome.passed_at) == len(view) else view.take(outcome.passed_at)
        scored = self.score(pod, feasible, cycle)
        assert scored.totals is not None
        best = np.sort(np.argsort(-scored.totals, kind="stable")[:keep])  # the top ``keep``, back in request order
        names = feasible.names
        outcome.explanation.note = (f"shortlist: the {keep} best-scoring of {len(names)} feasible nodes passed; "
                                    "the others were not rejected, only not needed")
        outcome.passed = [names[i] for i in best.tolist()]
        return Explanation(pod=pod.key, verb="prioritize", names=outcome.passed,
                           parts={p: v[best] for p, v in scored.parts.items()}, totals=scored.totals[best])

    # Conveniences for nodes that are not in a table (the request carried them, or a what-if copy) -------------------
    def table_of(self, nodes: Sequence[NodeInfo], domain_key: str = "") -> NodeView:
        return NodeTable.of(nodes, domain_key).view_all()

    def check(self, pod: PodInfo, node: NodeInfo, cycle: Cycle | None = None) -> tuple[str, Rejection] | None:
        """One node: None if it passes every filter, else (plugin, rejection). The node's one-row table is kept in
        its memo (cleared whenever the node changes), so a node asked about again is not tabulated again."""
        view = node.memo.get("one-node-view")
        if view is None:
            view = node.memo["one-node-view"] = NodeTable.of([node], "").view_all()
        outcome = self.filter(pod, view, cycle)
        if outcome.passed:
            return None
        text = outcome.explanation.rejected[node.name]
        plugin, _, reason = text.partition(": ")
        code = next(iter(outcome.rejections))[1]
        return plugin, Rejection(reason, unresolvable=node.name in outcome.unresolvable, code=code)


def to_extender_scores(totals: np.ndarray, max_score: int = 10) -> list[int]:
    """kube-scheduler extenders answer integers 0..MaxExtenderPriority (10)."""
    return np.rint(np.clip(np.nan_to_num(totals, nan=0.0), 0.0, 1.0) * max_score).astype(np.int64).tolist()


def to_extender_score(total: float, max_score: int = 10) -> int:
    return to_extender_scores(np.asarray([total]), max_score)[0]
