"""Prefill/decode affinity for disaggregated LLM serving: a prefill pod and the decode pods of its group
(``inference.openfuyao.com/pd-group``, else ``app``) exchange KV caches, so they should share a node, else a
topology domain (``topology_key``, default the zone); replicas of the same phase spread; and with a configured
``ratio`` (prefill:decode, e.g. ``1:2``) a domain short of one phase prefers that phase."""

from __future__ import annotations

from collections import Counter

from fuyao.contracts import Phase

from ..framework import Cycle, Rejection
from ..model import NodeInfo, PodInfo

_OTHER = {Phase.PREFILL: Phase.DECODE, Phase.DECODE: Phase.PREFILL}


class PdAffinityPlugin:
    name = "pd-affinity"

    def __init__(self, topology_key: str = "topology.kubernetes.io/zone", ratio: tuple[int, int] | None = None,
                 spread_penalty: float = 0.2):
        self.topology_key = topology_key
        self.ratio = ratio
        self.spread_penalty = spread_penalty

    def filter(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> Rejection | None:
        return None

    @staticmethod
    def _count(nodes: list[NodeInfo], group: str, phase: Phase, skip_uid: str) -> int:
        return sum(1 for n in nodes for p in n.pods if not p.terminal and p.pd_group == group and p.phase == phase
                   and p.uid != skip_uid)

    def score(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> float:
        if pod.phase not in _OTHER or pod.pd_group is None:
            return 0.5
        other = _OTHER[pod.phase]
        group = pod.pd_group
        domain = node.labels.get(self.topology_key)
        domain_nodes = [n for n in cycle.nodes.values() if domain is not None and n.labels.get(self.topology_key)
                        == domain] or [node]
        peers_here = self._count([node], group, other, pod.uid)
        peers_domain = self._count(domain_nodes, group, other, pod.uid)
        if peers_here:
            value = 1.0
        elif peers_domain:
            value = 0.7
        else:
            any_peer = self._count(list(cycle.nodes.values()), group, other, pod.uid)
            value = 0.3 if any_peer else 0.5
        same_here = self._count([node], group, pod.phase, pod.uid)
        value /= 1.0 + self.spread_penalty * same_here
        if self.ratio is not None:
            counts = Counter({p: self._count(domain_nodes, group, p, pod.uid) for p in _OTHER})
            want_p, want_d = self.ratio
            mine, theirs = (want_p, want_d) if pod.phase == Phase.PREFILL else (want_d, want_p)
            # after adding this pod, how far is the domain from mine:theirs?
            have_mine, have_theirs = counts[pod.phase] + 1, counts[other]
            if have_theirs and have_mine / have_theirs > mine / theirs:
                value *= 0.6  # the domain already has enough of this phase
        return value
