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

    def score(self, pod: PodInfo, node: NodeInfo, cycle: Cycle) -> float:
        if pod.phase not in _OTHER or pod.pd_group is None:
            return 0.5
        other = _OTHER[pod.phase]
        index = cycle.pd_pods
        peers = index.get((pod.pd_group, other.value), Counter())
        same = index.get((pod.pd_group, pod.phase.value), Counter())
        domain = node.labels.get(self.topology_key)

        def in_domain(phase: Phase, counts: Counter[str]) -> int:
            if domain is None:
                return counts.get(node.name, 0)
            return cycle.pd_by_domain(self.topology_key, pod.pd_group or "", phase.value).get(domain, 0)

        peers_domain = in_domain(other, peers)
        if peers.get(node.name, 0):
            value = 1.0
        elif peers_domain:
            value = 0.7
        else:
            value = 0.3 if peers else 0.5
        value /= 1.0 + self.spread_penalty * same.get(node.name, 0)
        if self.ratio is not None:
            want_p, want_d = self.ratio
            mine, theirs = (want_p, want_d) if pod.phase == Phase.PREFILL else (want_d, want_p)
            have_mine, have_theirs = in_domain(pod.phase, same) + 1, peers_domain
            if have_theirs and have_mine / have_theirs > mine / theirs:
                value *= 0.6  # the domain already has enough of this phase
        return value
