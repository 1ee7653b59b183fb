"""Prefill/decode affinity for disaggregated LLM serving: a prefill pod and the decode pods of its group
(``inference.openfuyao.com/pd-group``, else ``app``) exchange KV caches, so they should share a node, else a
topology domain (``topology_key``, default the zone); replicas of the same phase spread; and with a configured
``ratio`` (prefill:decode, e.g. ``1:2``) a domain short of one phase prefers that phase."""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from fuyao.contracts import LABEL_PD_TOPOLOGY_DEFAULT, Phase

from ..features import NodeView
from ..framework import Cycle
from ..model import PodInfo
from .registry import PluginArgs, register

_OTHER = {Phase.PREFILL: Phase.DECODE, Phase.DECODE: Phase.PREFILL}


class PdAffinityArgs(PluginArgs):
    weight: float = Field(default=2.0, ge=0)
    topology_key: str = Field(default=LABEL_PD_TOPOLOGY_DEFAULT, min_length=1)
    ratio: str | None = Field(default=None, description="prefill:decode per topology domain, e.g. 1:2")
    spread_penalty: float = Field(default=0.2, ge=0)

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError("expected PREFILL:DECODE with positive integers, e.g. 1:2")
        return value

    @property
    def ratio_pair(self) -> tuple[int, int] | None:
        if self.ratio is None:
            return None
        p, d = self.ratio.split(":")
        return int(p), int(d)


@register("pd-affinity", PdAffinityArgs)
class PdAffinityPlugin:
    """Scores only."""

    name = "pd-affinity"

    def __init__(self, args: PdAffinityArgs | None = None):
        self.args = args or PdAffinityArgs()
        self.topology_key = self.args.topology_key
        self.ratio = self.args.ratio_pair
        self.spread_penalty = self.args.spread_penalty

    def row_local(self, pod: PodInfo) -> bool:
        """A pod of a prefill/decode group is scored by where the group's other pods are (cluster-wide)."""
        return pod.phase not in _OTHER or pod.pd_group is None

    def score(self, pod: PodInfo, view: NodeView, cycle: Cycle) -> np.ndarray | float:
        if pod.phase not in _OTHER or pod.pd_group is None:
            return 0.5
        group, mine, other = pod.pd_group, pod.phase.value, _OTHER[pod.phase].value
        peers_by_node = cycle.pd.on_nodes(group, other)
        same_by_node = cycle.pd.on_nodes(group, mine)
        domains = cycle.domains if cycle.domains is not None else view.table
        n = len(view)

        def per_node(counts: dict[str, int]) -> np.ndarray:
            out = np.zeros(n)
            at, names = view.positions(counts)
            out[at] = [counts[name] for name in names]
            return out

        # domains only when the tables were built for this plugin's topology key
        keyed = view.table.domain_key == self.topology_key and domains.domain_key == self.topology_key
        with_domain = (view.domain >= 0) if keyed else np.zeros(n, dtype=bool)

        def in_domain(phase: str, on_node: np.ndarray) -> np.ndarray:
            return np.where(with_domain, view.domain_values(cycle.pd.by_domain(group, phase, domains)), on_node)

        peers_node, same_node = per_node(peers_by_node), per_node(same_by_node)
        peers_domain = in_domain(other, peers_node)
        value = np.where(peers_node > 0, 1.0, np.where(peers_domain > 0, 0.7, 0.3 if peers_by_node else 0.5))
        value = value / (1.0 + self.spread_penalty * same_node)
        if self.ratio is not None:
            want_p, want_d = self.ratio
            mine_share, theirs_share = (want_p, want_d) if pod.phase == Phase.PREFILL else (want_d, want_p)
            have_mine = in_domain(mine, same_node) + 1
            crowded = (peers_domain > 0) & (have_mine / np.maximum(peers_domain, 1) > mine_share / theirs_share)
            value = np.where(crowded, value * 0.6, value)
        return value
