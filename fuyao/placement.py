"""Which devices to hand out together: one pure function shared by the device plugin (GetPreferredAllocation)
and the scheduler extender (choosing devices at bind time), so both always agree.

Devices that talk over the same HCCS fabric and sit on the same NUMA node as the CPUs feeding them run collective
operations and host transfers fastest, so a request is kept inside the smallest scope that fits it (best fit keeps
large free blocks intact for later, larger requests). Products with rules on which NPUs go together
(:mod:`fuyao.products`: 910 A1 rings of four, 910B x16 halves, A3 die pairs) get a set their rules allow whenever
the free devices hold one; their preferences come from Ascend's own scheduler.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .products import Product, shape_problem


@dataclass(frozen=True)
class Placement:
    """Where a device sits: its interconnect group, NUMA node, position (its physical id) and card."""

    group: str | None
    numa: int | None
    order: int
    card: int | None = None  # the NPU (npu-smi -i) of a die: two dies of one card are one chip on A3


# A1 ring rules: for a request of N cards, the free counts of the ring to take from, in order of preference.
# (1 card: a ring with exactly 1 free, then 3, then 2, then 4 — so a fully free ring stays whole for 4-card jobs.)
A1_RING_PREFERENCE: dict[int, tuple[int, ...]] = {1: (1, 3, 2, 4), 2: (2, 4, 3), 4: (4,)}

PlaceOf = Callable[[str], Placement]
Ordered = Callable[[Iterable[str]], list[str]]


def preferred_allocation(
    available: Iterable[str],
    must_include: Iterable[str],
    size: int,
    placement: Mapping[str, Placement],
    *,
    product: Product | None = None,
    scheduler_choices: Iterable[Sequence[str]] = (),
    single_only: Iterable[str] = (),
    node_size: int | None = None,
) -> list[str]:
    """The devices to suggest for one container, ``size`` of them (fewer only if fewer are available).

    Order of preference: a device set the scheduler already chose for a pending pod on this node (so the kubelet's
    accounting matches the scheduler's), then the ``product``'s rules (:func:`_product_pick`), then the smallest
    (group, NUMA) cell, group or NUMA node that holds the request and every ``must_include`` device, then a spread
    over as few groups and NUMA nodes as possible. ``must_include`` devices are always part of the result.
    ``single_only`` devices (an NPU whose RoCE link is down) are kept out of multi-device sets when a set of the
    right size that the product's rules allow exists without them; else they are used (a pod the node can take
    never fails admission for a soft preference). A one-device request takes one of them first: they serve nothing
    else, and a pod's later multi-device container (or the next pod) needs the linked ones. ``node_size``: the
    node's NPUs for those rules (default: the devices ``placement`` knows).
    """
    full = list(dict.fromkeys(available))

    def place(device: str) -> Placement:
        return placement.get(device) or Placement(None, None, 1 << 30)

    def ordered(devices: Iterable[str]) -> list[str]:
        return sorted(devices, key=lambda d: (place(d).order, d))

    if size <= 0:
        return []
    full_set = set(full)
    must = ordered(d for d in dict.fromkeys(must_include) if d in full_set)
    for choice in scheduler_choices:  # what the scheduler chose is checked against everything available
        chosen = set(choice)
        if len(chosen) == size and chosen <= full_set and set(must) <= chosen:
            return ordered(chosen)
    single = set(single_only)  # (once: an iterator would be spent by a second reading)
    if size == 1 and not must:
        down = [d for d in full if d in single]
        if down:
            return _pick(down, [], 1, place, ordered, product)
    excluded = single - set(must) if size > 1 else set()
    if excluded & full_set:
        def allowed(picked: list[str]) -> bool:
            return len(picked) == size and (product is None or shape_problem(
                product, picked, {d: place(d) for d in picked}, node_size or len(placement)) is None)

        rest = [d for d in full if d not in excluded]
        picked = _pick(rest, must, size, place, ordered, product)
        if allowed(picked):
            return picked
        if len(rest) < size:  # every device with its link up, and as few link-down ones as it takes
            picked = _pick(full, ordered(set(must) | set(rest)), size, place, ordered, product)
            if allowed(picked):
                return picked
    return _pick(full, must, size, place, ordered, product)


def _pick(avail: list[str], must: list[str], size: int, place: PlaceOf, ordered: Ordered,
          product: Product | None) -> list[str]:
    if len(must) >= size:
        return must[:size]
    if size >= len(avail):
        return ordered(avail)
    if product is not None:
        picked = _product_pick(product, avail, must, size, place, ordered)
        if picked is not None:
            return picked
    picked = _best_fit(avail, must, size, place, ordered)
    if picked is not None:
        return picked
    return _spread(avail, must, size, place)


def _product_pick(product: Product, avail: list[str], must: list[str], size: int, place: PlaceOf,
                  ordered: Ordered) -> list[str] | None:
    """A set the product's rules allow, or None (no rule applies to this size, or the free devices hold none)."""
    if product.ring:
        return _a1_ring_pick(avail, must, size, place, ordered)
    if product.halves:
        return _halves_pick(product.halves, avail, must, size, place, ordered)
    if product.die_pairs:
        return _die_pairs_pick(avail, must, size, place, ordered)
    return None


def _halves_pick(half: int, avail: list[str], must: list[str], size: int, place: PlaceOf,
                 ordered: Ordered) -> list[str] | None:
    """910B x16: up to ``half`` inside the half with the fewest free that fits (best fit); more as matched pairs
    (NPU i with NPU i+half), lowest first."""
    first = [d for d in avail if place(d).order < half]
    second = [d for d in avail if place(d).order >= half]
    if size <= half:
        fitting = [(len(side), side) for side in (first, second)
                   if len(side) >= size and set(must) <= set(side)]
        if not fitting:
            return None
        _, side = min(fitting, key=lambda t: t[0])
        return _best_fit(side, must, size, place, ordered) or _spread(ordered(side), must, size, place)
    if size % 2:
        return None
    high = {place(d).order - half: d for d in second}
    pairs = [(d, high[place(d).order]) for d in ordered(first) if place(d).order in high]
    must_set = set(must)
    pairs.sort(key=lambda p: (not (set(p) & must_set), place(p[0]).order))
    chosen = [d for pair in pairs[: size // 2] for d in pair]
    return ordered(chosen) if len(chosen) == size and must_set <= set(chosen) else None


def _die_pairs_pick(avail: list[str], must: list[str], size: int, place: PlaceOf,
                    ordered: Ordered) -> list[str] | None:
    """A3: one die: a lone die first (its chip's other die is taken), keeping whole chips for larger pods; more:
    whole chips (both dies free), compact by the usual best fit over the chips."""
    cards: dict[int | None, list[str]] = {}
    for device in avail:
        cards.setdefault(place(device).card, []).append(device)
    if size == 1:
        lone = [d for d in avail if len(cards[place(d).card]) == 1]
        pool = lone if lone and not must else avail
        return _best_fit(pool, must, 1, place, ordered) or ordered(pool)[:1]
    if size % 2:
        return None
    whole = {card: devs for card, devs in cards.items() if len(devs) >= 2}
    heads = {ordered(devs)[0]: card for card, devs in whole.items()}
    must_heads = [h for h, card in heads.items() if any(place(m).card == card for m in must)]
    if len(heads) < size // 2 or len(must_heads) < len({place(m).card for m in must}) or len(must_heads) > size // 2:
        return None  # too few whole chips, a must-include die without its pair, or must-includes on too many chips
    picked = _best_fit(list(heads), must_heads, size // 2, place, ordered) or _spread(
        ordered(heads), must_heads, size // 2, place)
    return ordered(d for head in picked for d in whole[heads[head]])


def _a1_ring_pick(avail: list[str], must: list[str], size: int, place: PlaceOf, ordered: Ordered) -> list[str] | None:
    preference = A1_RING_PREFERENCE.get(size)
    if preference is None:
        return None
    rings: dict[str | None, list[str]] = {}
    for device in avail:
        rings.setdefault(place(device).group, []).append(device)
    ring_order = sorted(rings, key=lambda g: min(place(d).order for d in rings[g]))
    for free in preference:
        for ring in ring_order:
            members = rings[ring]
            if ring is not None and len(members) == free and set(must) <= set(members):
                return ordered(must + [d for d in ordered(members) if d not in must][: size - len(must)])
    return None


def _best_fit(avail: list[str], must: list[str], size: int, place: PlaceOf, ordered: Ordered) -> list[str] | None:
    """The smallest scope (cell, then group, then NUMA node) that holds the request and all must devices; inside
    it, the fewest NUMA cells (see :func:`_spread`)."""
    scopes: tuple[Callable[[str], object], ...] = (
        lambda d: (place(d).group, place(d).numa),
        lambda d: place(d).group,
        lambda d: place(d).numa,
    )
    for scope_of in scopes:
        members: dict[object, list[str]] = {}
        for device in avail:
            members.setdefault(scope_of(device), []).append(device)
        fitting = [
            (len(devs), min(place(d).order for d in devs), key)
            for key, devs in members.items()
            if len(devs) >= size and all(scope_of(m) == key for m in must)
        ]
        if fitting:
            _, _, key = min(fitting, key=lambda t: (t[0], t[1]))
            return _spread(ordered(members[key]), must, size, place)
    return None


def _spread(avail: list[str], must: list[str], size: int, place: PlaceOf) -> list[str]:
    """Fill whole groups (largest first, those of the must devices first), and inside a group whole NUMA cells
    (largest first), so the result spans as few groups and NUMA nodes as the free devices allow."""
    group_free = Counter(place(d).group for d in avail)
    cell_free = Counter((place(d).group, place(d).numa) for d in avail)
    group_first: dict[str | None, int] = {}
    for device in avail:
        g = place(device).group
        group_first[g] = min(group_first.get(g, 1 << 31), place(device).order)
    must_groups = {place(d).group for d in must}
    must_numas = {place(d).numa for d in must}

    def key(device: str) -> tuple[object, ...]:
        p = place(device)
        return (p.group not in must_groups, -group_free[p.group], group_first[p.group],
                p.numa not in must_numas, -cell_free[(p.group, p.numa)], p.order, device)

    rest = sorted((d for d in avail if d not in must), key=key)
    chosen = must + rest[: max(0, size - len(must))]
    return sorted(chosen, key=lambda d: (place(d).order, d))
