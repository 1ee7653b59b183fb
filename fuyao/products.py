"""Per-product NPU allocation rules, kept as data: which NPU counts a pod may ask for and which NPUs must go
together. One table, read by the device plugin (GetPreferredAllocation, Allocate) and the scheduler extender
(Filter, the devices chosen at bind time), so both agree.

The rules are ascend-for-volcano's (MindCluster's Volcano plugin; facts in docs/facts/ascend-for-volcano-rules.md):

| product | node | counts per pod | must go together |
| --- | --- | --- | --- |
| ``910-a1-module`` (Atlas 800 training, 910 A1) | 8 | 1, 2, 4, 8 | 1, 2, 4 inside one HCCS ring of 4; 8 = the node |
| ``910-a1-half`` | 4 | 1, 2, 4 | |
| ``910b-x8`` (Atlas 800 A2) | 8 | 1-8 | |
| ``910b-x16`` (A2 Box16) | 16 | 1-8, 10, 12, 14, 16 | ≤ 8 in one half (0-7, 8-15); 10-14: pairs i, i+8 |
| ``910c-a3`` (Atlas 800 A3, 2 dies per chip) | 16 | 1 or even | above 1: both dies of each chip |
| ``310p-duo`` (Atlas 300I Duo, 2 chips per card) | 2 per card | any | (prefers whole cards; no rule) |
| ``generic`` (anything else: 910 cards, 310P, GPUs' peers) | any | any | |

A rule names itself in every refusal (``rule 910b-x16/halves``). The product of a node is a pure function of its
topology (:func:`product_of`), the same ``NodeTopology`` the device plugin publishes and the extender reads.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .contracts import InterconnectKind, NodeTopology


class Placed(Protocol):
    """Where a device sits (``fuyao.placement.Placement``)."""

    @property
    def group(self) -> str | None: ...
    @property
    def order(self) -> int: ...
    @property
    def card(self) -> int | None: ...


@dataclass(frozen=True)
class Product:
    name: str
    description: str
    counts: frozenset[int] | None = None  # counts a pod may ask for; None: 1 .. the node's size
    ring: int | None = None  # requests below the node's size stay inside one interconnect group of this size
    halves: int | None = None  # ≤ halves inside one half (by physical id); between halves: matched pairs
    die_pairs: bool = False  # a request above 1 takes both dies of each chip (card)

    @property
    def shaped(self) -> bool:
        """Whether which NPUs go together is a rule (not only a preference)."""
        return bool(self.ring or self.halves or self.die_pairs)

    def rule(self, part: str) -> str:
        return f"rule {self.name}/{part}"


GENERIC = Product("generic", "no product rule: any count, any NPUs")
PRODUCTS: dict[str, Product] = {p.name: p for p in (
    Product("910-a1-module", "910 A1 module (Atlas 800 training): 8 NPUs in two HCCS rings of 4",
            counts=frozenset({1, 2, 4, 8}), ring=4),
    Product("910-a1-half", "910 A1 half: 4 NPUs in one HCCS ring", counts=frozenset({1, 2, 4})),
    Product("910b-x8", "910B x8 (Atlas 800 A2): 8 NPUs, full HCCS mesh"),
    Product("910b-x16", "910B x16 (Box16): 16 NPUs in two HCCS halves of 8",
            counts=frozenset({*range(1, 9), 10, 12, 14, 16}), halves=8),
    Product("910c-a3", "910C A3: two dies per chip joined by SIO; chips joined by HCCS",
            counts=frozenset({1, *range(2, 17, 2)}), die_pairs=True),
    Product("310p-duo", "310P Duo cards: two chips per card"),
    GENERIC,
)}


def product_of(topology: NodeTopology) -> Product:
    """The product of a node, from its published topology (chip model, dies per card, interconnect groups)."""
    model = topology.chip_model.upper().removeprefix("ASCEND")
    n = len(topology.devices)
    dies_per_card = max(Counter(d.npu_id for d in topology.devices.values()).values(), default=1)
    rings = [g for g in topology.groups if g.kind == InterconnectKind.HCCS_RING]
    if model.startswith("910C") or (model.startswith("910") and dies_per_card == 2):
        return PRODUCTS["910c-a3"]
    if re.match(r"910B\d", model):  # 910B1..B4 (Atlas 800 A2); a bare "910B" is a first-generation 910 (A1)
        hccs = any(g.kind in (InterconnectKind.HCCS_MESH, InterconnectKind.HCCS_RING) for g in topology.groups)
        if n == 16 and hccs:
            return PRODUCTS["910b-x16"]
        if n == 8 and hccs:
            return PRODUCTS["910b-x8"]
        return GENERIC
    if model.startswith("910") and rings and len(rings) == len(topology.groups) and all(
            len(g.devices) == 4 for g in rings):
        return PRODUCTS["910-a1-module"] if n == 8 else PRODUCTS["910-a1-half"] if n == 4 else GENERIC
    if model.startswith("310P") and dies_per_card == 2:
        return PRODUCTS["310p-duo"]
    return GENERIC


def count_problem(product: Product, count: int, node_size: int) -> str | None:
    """Why ``product`` never takes ``count`` NPUs in one pod (None: it may)."""
    if count <= 0:
        return None
    if count > node_size:
        return f"{count} NPUs requested, the node has {node_size}"
    if product.counts is not None and count not in product.counts and count != node_size:
        allowed = ", ".join(str(c) for c in sorted(c for c in product.counts if c <= node_size))
        return f"{product.description} takes {allowed} NPUs per pod, not {count} ({product.rule('counts')})"
    return None


def _halves(devices: Iterable[str], place: Mapping[str, Placed], size: int) -> tuple[list[str], list[str]]:
    ordered = sorted(devices, key=lambda d: place[d].order)
    first = [d for d in ordered if place[d].order < size]
    return first, [d for d in ordered if place[d].order >= size]


def shape_problem(product: Product, chosen: Sequence[str], place: Mapping[str, Placed],
                  node_size: int) -> str | None:
    """Why this set of NPUs may not go to one pod on a ``product`` node (None: it may)."""
    n = len(chosen)
    problem = count_problem(product, n, node_size)
    if problem or n <= 1 or n == node_size:
        return problem
    if product.ring:
        groups = {place[d].group for d in chosen}
        if len(groups) > 1:
            return (f"{n} NPUs must sit in one HCCS ring of {product.ring}, these span {len(groups)} "
                    f"({product.rule('ring')})")
    if product.halves:
        first, second = _halves(chosen, place, product.halves)
        if n <= product.halves and first and second:
            return f"{n} NPUs must sit in one half of the node (0-7 or 8-15) ({product.rule('halves')})"
        if n > product.halves:
            low = {place[d].order for d in first}
            high = {place[d].order - product.halves for d in second}
            if low != high:
                return (f"{n} NPUs must be matched pairs across the halves (NPU i with NPU i+{product.halves}) "
                        f"({product.rule('halves')})")
    if product.die_pairs:
        per_card = Counter(place[d].card for d in chosen)
        lone = sorted(str(c) for c, k in per_card.items() if k != 2)
        if lone:
            return (f"{n} NPUs must be whole chips (both dies); chips {', '.join(lone)} give one die "
                    f"({product.rule('die-pairs')})")
    return None


def free_problem(product: Product, free: Sequence[str], count: int, place: Mapping[str, Placed],
                 node_size: int) -> str | None:
    """Why no set of ``count`` of the ``free`` NPUs may go to one pod now (None: one may)."""
    problem = count_problem(product, count, node_size)
    if problem or count <= 0:
        return problem
    if len(free) < count:
        return f"{len(free)} NPUs free, {count} requested"
    if count == node_size:
        return None if len(free) == node_size else f"{count} NPUs take the whole node ({len(free)} free)"
    if count == 1:
        return None
    if product.ring:
        per = Counter(place[d].group for d in free)
        if max(per.values(), default=0) < count:
            return (f"{count} NPUs need one HCCS ring with {count} free (free per ring: "
                    f"{[per[g] for g in sorted(per, key=str)]}) ({product.rule('ring')})")
    if product.halves:
        first, second = _halves(free, place, product.halves)
        if count <= product.halves and max(len(first), len(second)) < count:
            return (f"{count} NPUs need one half with {count} free (free: {len(first)} and {len(second)}) "
                    f"({product.rule('halves')})")
        if count > product.halves:
            pairs = len({place[d].order for d in first} & {place[d].order - product.halves for d in second})
            if 2 * pairs < count:
                return (f"{count} NPUs need {count // 2} matched free pairs across the halves, {pairs} are "
                        f"({product.rule('halves')})")
    if product.die_pairs:
        per_card = Counter(place[d].card for d in free)
        whole = sum(1 for k in per_card.values() if k >= 2)
        if 2 * whole < count:
            return (f"{count} NPUs need {count // 2} chips with both dies free, {whole} are "
                    f"({product.rule('die-pairs')})")
    return None
