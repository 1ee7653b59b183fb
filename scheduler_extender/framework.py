"""The scheduling framework of the extender: plugins filter (with a reason for every rejection) and score in
[0, 1]; scores are combined as a weighted average (llm-d style profiles) and mapped to each scheduler's range.

Plugins answer for all candidate nodes of a request at once, over the columns of a :class:`NodeView` (see
``features``). A plugin is a :class:`FilterPlugin`, a :class:`ScorePlugin` or both, and implements only what it
does (after kube-scheduler's framework): ``filter`` returns :class:`Verdicts` (per node 0 passes, k is the k-th
member of the plugin's :class:`Reject` enum, plus what it found that the reason needs), ``reasons`` writes the text
for the rejected ones from that, ``score`` returns an array in [0, 1]. Plugins are registered by name with their
args (``plugins.registry``). Everything here is pure: a decision is a function of the pod, the candidates'
features and the configuration, which is what makes it testable and explainable (``/explain``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .features import NodeTable, NodeView, PdIndex
from .model import NodeInfo, PodInfo
from .row_cache import RowDecisions, decisions_for


class Reject(IntEnum):
    """Base of a plugin's ways to reject a node: an enum whose members are ``NAME = k, code[, unresolvable]``
    with k = 1, 2, ... (0 is "passes"). ``code``: a short, fixed reason for metrics (the reason text carries
    numbers). ``unresolvable``: evicting pods would not help (kube-scheduler then skips preemption on that node)."""

    code: str
    unresolvable: bool

    def __new__(cls, value: int, code: str, unresolvable: bool = False) -> Reject:
        member = int.__new__(cls, value)
        member._value_ = value
        member.code = code
        member.unresolvable = unresolvable
        return member


DETAIL_WIDTH = 3
"""Integers per node a filter may note for its reasons (:attr:`Verdicts.detail`)."""


@dataclass(frozen=True)
class Verdicts:
    """A filter's answer for the candidates: ``kinds`` (int16 per node: 0 passes, k is ``Reject`` member k) and,
    where its reasons need them, up to ``DETAIL_WIDTH`` integers per node of what it found (which request failed,
    how many NUMA nodes it needs...), so that reasons never work out again what the filter found."""

    kinds: np.ndarray
    detail: np.ndarray | None = None


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


@runtime_checkable
class FilterPlugin(Protocol):
    """Rejects nodes, each with a reason."""

    name: str
    kinds: type[Reject]
    """The plugin's :class:`Reject` enum."""

    def filter(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> Verdicts | None:
        """Per candidate: 0 passes, k > 0 is rejected by ``kinds(k)``; None: every candidate passes."""

    def reasons(self, kind: Reject, pod: PodInfo, view: NodeView, at: np.ndarray, detail: np.ndarray,
                cycle: Cycle) -> list[str]:
        """The reason texts of the candidates at positions ``at``, all rejected with ``kind``; ``detail``: the
        rows of :attr:`Verdicts.detail` the filter noted for them (zeros if it noted none)."""

    def row_local(self, pod: PodInfo) -> bool:
        """Whether ``filter`` decides each candidate from the values of its own row alone — not from which node
        it is, nor from other rows — and the time only through the staleness of measured usage, so results may be
        kept per class of equal rows (``row_cache``)."""


@runtime_checkable
class ScorePlugin(Protocol):
    """Scores nodes in [0, 1]."""

    name: str

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | float:
        """Per candidate, in [0, 1] (a scalar: the same for all)."""

    def row_local(self, pod: PodInfo) -> bool:
        """Whether ``score`` decides each candidate from its own row alone (see :class:`FilterPlugin`)."""


Plugin = FilterPlugin | ScorePlugin


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
    """Runs the plugins: every filter in order (the first that rejects a node gives its reason), and the scorers
    with a weight above 0, as a weighted average."""

    def __init__(self, plugins: Sequence[tuple[Plugin, float]]):
        self.plugins: list[tuple[ScorePlugin, float]] = [(p, w) for p, w in plugins
                                                         if w > 0 and isinstance(p, ScorePlugin)]
        self.filters: list[FilterPlugin] = [p for p, _ in plugins if isinstance(p, FilterPlugin)]
        """A plugin with weight 0 still filters."""
        self.total_weight = sum(w for _, w in self.plugins) or 1.0
        self._last_kept: tuple[PodInfo, NodeTable, RowDecisions | None] | None = None

    def _kept(self, pod: PodInfo, view: NodeView) -> RowDecisions | None:
        """The per-row decisions kept for this pod's shape, when they can be (see ``row_cache``)."""
        if not view.table.long_lived:
            return None
        last = self._last_kept
        if last is not None and last[0] is pod and last[1] is view.table:  # filter, then shortlist's score
            return last[2]
        local = all(p.row_local(pod) for p in self.filters) and all(s.row_local(pod) for s, _ in self.plugins)
        kept = decisions_for(view.table, self, pod, len(self.plugins)) if local else None
        self._last_kept = (pod, view.table, kept)
        return kept

    def _verdicts(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> dict[str, np.ndarray]:
        """Per candidate: which filter rejected it (``by``, -1: none), with which of its kinds, and what it noted."""
        n = len(view)
        by = np.full(n, -1, dtype=np.int16)
        kind = np.zeros(n, dtype=np.int16)
        detail: np.ndarray | None = None  # made only when a filter notes something (most pods: none does)
        for i, plugin in enumerate(self.filters):
            found = plugin.filter(pod, view, cycle)
            if found is None:
                continue
            hit = (by < 0) & (found.kinds > 0)
            by[hit] = i
            kind[hit] = found.kinds[hit]
            if found.detail is not None:
                if detail is None:
                    detail = np.zeros((n, DETAIL_WIDTH), dtype=np.int64)
                noted = found.detail if found.detail.ndim == 2 else found.detail[:, None]
                detail[hit, : noted.shape[1]] = noted[hit]
        return {"by": by, "kind": kind} if detail is None else {"by": by, "kind": kind, "detail": detail}

    def filter(self, pod: PodInfo, view: NodeView, cycle: Cycle | None = None) -> FilterOutcome:
        """The first plugin (in order) that rejects a node gives its reason."""
        cycle = cycle or Cycle()
        n = len(view)
        kept = self._kept(pod, view)
        found = kept.verdicts.get(view, cycle.now, lambda sub: self._verdicts(pod, sub, cycle)) \
            if kept is not None else self._verdicts(pod, view, cycle)
        by, kind, detail = found["by"], found["kind"], found.get("detail")
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
                    what = plugin.kinds(k)
                    target = unresolvable if what.unresolvable else failed
                    prefix = f"{plugin.name}: "
                    noted = detail[at] if detail is not None else np.zeros((len(at), DETAIL_WIDTH), dtype=np.int64)
                    texts = plugin.reasons(what, pod, view, at, noted, cycle)
                    for position, text in zip(at.tolist(), texts, strict=True):
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

    # One node that is not in a table (the request carried it, or a what-if copy) ---------------------------------
    def check(self, pod: PodInfo, node: NodeInfo, cycle: Cycle | None = None) -> tuple[str, Rejection] | None:
        """One node: None if it passes every filter, else (plugin, rejection). The node's one-row table is kept in
        its memo (cleared whenever the node changes), so a node asked about again is not tabulated again; that table
        lives as long as the node object, so its verdicts are kept per pod shape (``row_cache``) like the cluster
        table's: Volcano asks about the same NodeInfo for every task of every session."""
        view = node.memo.get("one-node-view")
        if view is None:
            view = node.memo["one-node-view"] = NodeTable.of([node], "", capacity=1, long_lived=True).view_all()
        outcome = self.filter(pod, view, cycle)
        if outcome.passed:
            return None
        text = outcome.explanation.rejected[node.name]
        plugin, _, reason = text.partition(": ")
        code = next(iter(outcome.rejections))[1]
        return plugin, Rejection(reason, unresolvable=node.name in outcome.unresolvable, code=code)


def to_extender_scores(totals: np.ndarray, max_score: int = 10) -> list[int]:
    """kube-scheduler extenders answer integers 0..MaxExtenderPriority (10); NaN counts as 0 (``fmax`` takes the
    number), and ±inf clamp to the ends."""
    scores: list[int] = np.rint(np.fmin(np.fmax(totals, 0.0), 1.0) * max_score).astype(np.int64).tolist()
    return scores


def to_extender_score(total: float, max_score: int = 10) -> int:
    return to_extender_scores(np.asarray([total]), max_score)[0]
