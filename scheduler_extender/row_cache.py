"""Per-row decisions kept between requests: the verdict of every filter plugin and the score parts of one node
for one *pod shape* (everything about a pod except who it is) stay valid while the node's row is unchanged and its
measured usage does not go stale. Replicas of one workload share a shape, and between two of their requests only
the rows of the nodes that changed (one bind: one node) need computing again; the others are gathered. At 1,000
nodes that turns ~100 numpy operations over every candidate into a gather and a comparison.

Only for the cluster cache's table (``NodeTable.long_lived``) and for pods whose every plugin decides node by node
(``row_local``: the prefill/decode score of a pod in a group reads the whole cluster's pods, so it is not).
Results are identical to computing afresh (tests/unit/test_extender_row_cache.py checks that under random
changes).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from .features import NodeTable, NodeView
from .model import USAGE_STALE_S, PodInfo

SHAPES_KEPT = 32  # per table and framework: the workloads being scheduled at the same time

_IDENTITY = frozenset({"namespace", "name", "uid", "resource_version", "creation", "problems"})
"""PodInfo fields that say which pod it is, not what it asks for: every other field is part of the shape (a field
added later is part of it unless listed here)."""
_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(PodInfo) if f.name not in _IDENTITY)


def _hashable(value: Any) -> Hashable:
    try:
        hash(value)
        return value  # type: ignore[no-any-return]
    except TypeError:
        pass
    if isinstance(value, (tuple, list)):
        return tuple(_hashable(v) for v in value)
    items = getattr(value, "items", None)
    if items is not None:
        return frozenset((k, _hashable(v)) for k, v in items())
    return repr(value)


def pod_shape(pod: PodInfo) -> Hashable:
    """What the plugins can read from a pod, as a key: two pods with the same shape get the same per-node
    verdicts and scores."""
    return tuple(_hashable(getattr(pod, name)) for name in _SHAPE_FIELDS)


def valid_until(view: NodeView, now: float) -> np.ndarray:
    """Per candidate: until when a result computed ``now`` holds, as far as time goes — the moment a fresh usage
    report goes stale (plugins look at time only through that); never for a node without a fresh report."""
    usage_at = view.usage_at
    return np.where(usage_at >= now - USAGE_STALE_S, usage_at + USAGE_STALE_S, np.inf)


class RowDecisions:
    """The verdicts (which filter rejected, and how) and score parts of one shape, per table row."""

    def __init__(self, plugins: int) -> None:
        self.plugins = plugins
        self.filter_stamp = np.zeros(0, dtype=np.int64)
        self.filter_span = np.zeros((0, 2))  # computed at, valid until
        self.by = np.zeros(0, dtype=np.int16)
        self.kind = np.zeros(0, dtype=np.int16)
        self.score_stamp = np.zeros(0, dtype=np.int64)
        self.score_span = np.zeros((0, 2))
        self.parts = np.zeros((plugins, 0))
        self.total = np.zeros(0)

    def _fit(self, capacity: int) -> None:
        """Room for every row of the table (it grows)."""
        if capacity <= len(self.by):
            return

        def grown(old: np.ndarray, fill: Any) -> np.ndarray:  # rows on the first axis
            new = np.full((capacity, *old.shape[1:]), fill, dtype=old.dtype)
            new[: len(old)] = old
            return new

        self.filter_stamp, self.score_stamp = grown(self.filter_stamp, -1), grown(self.score_stamp, -1)
        self.filter_span, self.score_span = grown(self.filter_span, 0.0), grown(self.score_span, 0.0)
        self.by, self.kind, self.total = grown(self.by, -1), grown(self.kind, 0), grown(self.total, 0.0)
        self.parts = grown(self.parts.T, 0.0).T.copy()

    @staticmethod
    def _stale(view: NodeView, stamp: np.ndarray, span: np.ndarray, now: float) -> np.ndarray:
        rows = view.rows
        return np.flatnonzero((stamp[rows] != view.table.stamps[rows]) | (span[rows, 0] > now)
                              | (span[rows, 1] < now))

    def filters(self, view: NodeView, now: float,
                compute: Callable[[NodeView], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """(by, kind) per candidate: ``compute`` runs on the candidates whose rows changed since."""
        self._fit(len(view.table.stamps))
        at = self._stale(view, self.filter_stamp, self.filter_span, now)
        if len(at):
            sub = view if len(at) == len(view) else view.take(at)
            by, kind = compute(sub)
            rows = sub.rows
            self.by[rows], self.kind[rows] = by, kind
            self.filter_stamp[rows] = view.table.stamps[rows]
            self.filter_span[rows, 0], self.filter_span[rows, 1] = now, valid_until(sub, now)
        rows = view.rows
        return self.by[rows], self.kind[rows]

    def scores(self, view: NodeView, now: float,
               compute: Callable[[NodeView], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """(parts [plugin, candidate], totals) per candidate, computing only the changed rows."""
        self._fit(len(view.table.stamps))
        at = self._stale(view, self.score_stamp, self.score_span, now)
        if len(at):
            sub = view if len(at) == len(view) else view.take(at)
            parts, total = compute(sub)
            rows = sub.rows
            self.parts[:, rows], self.total[rows] = parts, total
            self.score_stamp[rows] = view.table.stamps[rows]
            self.score_span[rows, 0], self.score_span[rows, 1] = now, valid_until(sub, now)
        rows = view.rows
        return self.parts[:, rows], self.total[rows]


def decisions_for(table: NodeTable, owner: object, pod: PodInfo, plugins: int) -> RowDecisions:
    """The kept decisions of ``owner`` (a framework: its plugins and weights made them) for this pod's shape in
    this table; least recently used shapes are dropped."""
    kept: OrderedDict[Hashable, RowDecisions] = table.decisions.setdefault(owner, OrderedDict())
    shape = pod_shape(pod)
    found = kept.get(shape)
    if found is None:
        found = kept[shape] = RowDecisions(plugins)
        while len(kept) > SHAPES_KEPT:
            kept.popitem(last=False)
    else:
        kept.move_to_end(shape)
    return found
