"""Per-row decisions kept between requests: the verdict of every filter plugin and the score parts of one node
for one *pod shape* (everything about a pod except who it is) stay valid while the node's row is unchanged and its
measured usage does not go stale. Replicas of one workload share a shape, and between two of their requests only
the rows of the nodes that changed (one bind: one node) need computing again; the others are gathered. At 1,000
nodes that turns ~100 numpy operations over every candidate into a gather and a comparison.

Decisions are kept per *class* of rows (``NodeTable.classes``): rows whose columns hold the same values are decided
alike by plugins that read only the row, so a node that changes into a state another node was already decided in
(like nodes filling up one die at a time) costs a lookup, not the ~100 numpy operations of a one-row decision.

Only for the cluster cache's table (``NodeTable.long_lived``) and for pods whose every plugin decides node by node
(``row_local``: the prefill/decode score of a pod in a group reads the whole cluster's pods, so it is not).
Results are identical to computing afresh (tests/unit/test_extender_row_cache.py checks that under random
changes).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from .features import NodeTable, NodeView
from .model import USAGE_STALE_S, PodInfo

SHAPES_KEPT = 32  # per table and framework: the workloads being scheduled at the same time

def pod_shape(pod: PodInfo) -> Hashable:
    """What the plugins can read from a pod, as a key: two pods with the same shape get the same per-node
    verdicts and scores (:attr:`PodInfo.shape`, computed once per pod object)."""
    return pod.shape


def valid_until(view: NodeView, now: float) -> np.ndarray:
    """Per candidate: until when a result computed ``now`` holds, as far as time goes — the moment a fresh usage
    report goes stale (plugins look at time only through that); never for a node without a fresh report."""
    usage_at = view.usage_at
    return np.where(usage_at >= now - USAGE_STALE_S, usage_at + USAGE_STALE_S, np.inf)


class KeptRows:
    """Named per-class values (classes on the first axis: rows whose columns hold the same values share one, see
    ``NodeTable.classes``) with, per class, the table's class stamp and the time span they were computed for."""

    def __init__(self, columns: dict[str, tuple[tuple[int, ...], Any, Any]]) -> None:
        """``columns``: name → (shape after the class axis, dtype, fill)."""
        self.stamp = np.zeros(0, dtype=np.int64)
        self.span = np.zeros((0, 2))  # computed at, valid until
        self.values = {name: np.full((0, *tail), fill, dtype=dtype) for name, (tail, dtype, fill) in columns.items()}
        self._fills = {name: fill for name, (_tail, _dtype, fill) in columns.items()}

    def _fit(self, capacity: int) -> None:
        """Room for every class of the table (their number grows)."""
        if capacity <= len(self.stamp):
            return

        def grown(old: np.ndarray, fill: Any) -> np.ndarray:
            new = np.full((capacity, *old.shape[1:]), fill, dtype=old.dtype)
            new[: len(old)] = old
            return new

        self.stamp, self.span = grown(self.stamp, -1), grown(self.span, 0.0)
        self.values = {name: grown(old, self._fills[name]) for name, old in self.values.items()}

    def get(self, view: NodeView, now: float,
            compute: Callable[[NodeView], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The values of the candidates; ``compute`` runs on one candidate of each class that changed since (or
        whose results expired), and its answers are kept for the class."""
        table = view.table
        self._fit(len(table.class_stamps))
        ids = table.classes[view.rows]
        at = np.flatnonzero((self.stamp[ids] != table.class_stamps[ids]) | (self.span[ids, 0] > now)
                            | (self.span[ids, 1] < now))
        if len(at):
            fresh, first = np.unique(ids[at], return_index=True)  # one candidate per class
            order = np.argsort(first)
            at, fresh = at[first[order]], fresh[order]  # in request order (all of them: ``view`` itself)
            sub = view if len(at) == len(view) else view.take(at)
            for name, value in compute(sub).items():
                if name not in self.values:  # a column computed only for some pod shapes (a filter's detail)
                    self.values[name] = np.zeros((len(self.stamp), *value.shape[1:]), dtype=value.dtype)
                    self._fills[name] = 0
                self.values[name][fresh] = value
            self.stamp[fresh] = table.class_stamps[fresh]
            self.span[fresh, 0], self.span[fresh, 1] = now, valid_until(sub, now)
        return {name: values[ids] for name, values in self.values.items()}


class RowDecisions:
    """The verdicts (which filter rejected, and how) and score parts of one shape, per class of table rows."""

    def __init__(self, plugins: int) -> None:
        self.verdicts = KeptRows({"by": ((), np.int16, -1), "kind": ((), np.int16, 0)})  # + "detail" when noted
        self.scores = KeptRows({"parts": ((plugins,), np.float64, 0.0), "total": ((), np.float64, 0.0)})


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
