"""Preferred allocation: A1 ring rules, best fit by group and NUMA, must_include, scheduler choices; properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuyao.placement import Placement, preferred_allocation
from fuyao.products import PRODUCTS

# An 8-card 910 A1 board: rings 0-3 and 4-7, two NUMA nodes (one per ring).
A1 = {f"Ascend910-{i}": Placement(group=f"hccs-ring-{i // 4}", numa=i // 4, order=i) for i in range(8)}
# A 910B board: one HCCS mesh of 8, four NUMA nodes of two cards.
MESH = {f"Ascend910-{i}": Placement(group="hccs-mesh-0", numa=i // 2, order=i) for i in range(8)}


def ids(*numbers: int) -> list[str]:
    return [f"Ascend910-{n}" for n in numbers]


def a1(available: list[str], size: int, must: list[str] | None = None) -> list[str]:
    return preferred_allocation(available, must or [], size, A1, product=PRODUCTS["910-a1-module"])


@pytest.mark.parametrize(("free", "size", "expected"), [
    # 1 card: the ring with exactly 1 free, then 3, then 2, then 4
    (ids(0, 4, 5, 6), 1, ids(0)),
    (ids(0, 1, 2, 4, 5, 6, 7), 1, ids(0)),
    (ids(0, 1, 4, 5, 6, 7), 1, ids(0)),
    (ids(0, 1, 2, 3, 4, 5, 6), 1, ids(4)),
    (ids(0, 1, 2, 3, 4, 5), 1, ids(4)),
    (ids(*range(8)), 1, ids(0)),
    # 2 cards: a ring with 2 free, then 4, then 3
    (ids(0, 1, 2, 3, 4, 5), 2, ids(4, 5)),
    (ids(0, 1, 2, 3, 4, 5, 6), 2, ids(0, 1)),
    (ids(0, 1, 2, 4, 5, 6), 2, ids(0, 1)),
    (ids(0, 4, 5, 6), 2, ids(4, 5)),
    # 4 cards: a whole ring
    (ids(0, 1, 2, 4, 5, 6, 7), 4, ids(4, 5, 6, 7)),
    (ids(*range(8)), 4, ids(0, 1, 2, 3)),
    # 8 cards: everything
    (ids(*range(8)), 8, ids(*range(8))),
])
def test_a1_ring_rules(free: list[str], size: int, expected: list[str]) -> None:
    assert a1(free, size) == expected


def test_a1_ring_rules_keep_a_ring_whole_for_a_later_4_card_job() -> None:
    free = ids(*range(8))
    taken: list[list[str]] = []
    for size in (1, 1, 2, 4):
        got = a1(free, size)
        taken.append(got)
        free = [d for d in free if d not in got]
    assert taken == [ids(0), ids(1), ids(2, 3), ids(4, 5, 6, 7)]


def test_a1_must_include_picks_the_ring_that_holds_it() -> None:
    assert a1(ids(*range(8)), 2, must=ids(5)) == ids(4, 5)
    assert a1(ids(*range(8)), 4, must=ids(6)) == ids(4, 5, 6, 7)


def test_a1_unusual_sizes_still_stay_compact() -> None:
    got = a1(ids(*range(8)), 3)
    assert len(got) == 3 and len({A1[d].group for d in got}) == 1
    got = a1(ids(0, 1, 2, 4, 5, 6), 4)  # no whole ring free: 3 from one ring + 1
    assert len(got) == 4 and sorted(A1[d].group for d in got).count("hccs-ring-0") in (1, 3)


def test_mesh_prefers_one_numa_node_then_fewest_numa_nodes() -> None:
    all8 = ids(*range(8))
    got = preferred_allocation(all8, [], 2, MESH)
    assert len({MESH[d].numa for d in got}) == 1
    got = preferred_allocation(all8, [], 4, MESH)
    assert len({MESH[d].numa for d in got}) == 2
    # best fit: a NUMA node with exactly two free beats a fully free one
    got = preferred_allocation(ids(0, 2, 3, 4, 5, 6, 7), [], 1, MESH)
    assert got == ids(0)
    got = preferred_allocation(ids(1, 2, 3, 4, 5, 6), [], 2, MESH)
    assert got == ids(2, 3)


def test_must_include_is_kept_and_neighbours_are_added() -> None:
    got = preferred_allocation(ids(*range(8)), ids(5), 2, MESH)
    assert got == ids(4, 5)


def test_scheduler_choice_wins_when_it_fits() -> None:
    choice = ids(1, 6)
    assert preferred_allocation(ids(*range(8)), [], 2, MESH, scheduler_choices=[ids(0, 1, 2), choice]) == choice
    # a choice that is not fully available, or misses a must device, is ignored
    assert preferred_allocation(ids(0, 2, 3, 4, 5, 7), [], 2, MESH, scheduler_choices=[choice]) == ids(2, 3)
    assert preferred_allocation(ids(*range(8)), ids(0), 2, MESH, scheduler_choices=[choice]) == ids(0, 1)


def test_degenerate_requests() -> None:
    assert preferred_allocation(ids(0, 1), [], 0, MESH) == []
    assert preferred_allocation(ids(1, 0), [], 5, MESH) == ids(0, 1)
    assert preferred_allocation(ids(0, 1, 2), ids(2, 1), 1, MESH) == ids(1)
    # devices without placement (unknown topology) still get picked, in a stable order
    assert preferred_allocation(["x", "y", "z"], [], 2, {}) == ["x", "y"]


# --- properties ---------------------------------------------------------------------------------------------------
@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, Placement], list[str], list[str], int]:
    n = draw(st.integers(1, 16))
    groups = draw(st.integers(1, 4))
    numas = draw(st.integers(1, 4))
    known_numa = draw(st.booleans())
    placement = {
        f"d{i}": Placement(group=f"g{draw(st.integers(0, groups - 1))}",
                           numa=draw(st.integers(0, numas - 1)) if known_numa else None, order=i)
        for i in range(n)
    }
    available = draw(st.lists(st.sampled_from(sorted(placement)), min_size=1, unique=True))
    must = draw(st.lists(st.sampled_from(available), unique=True, max_size=len(available)))
    size = draw(st.integers(len(must), len(available)))
    return placement, available, must, size


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_result_is_a_valid_allocation(case: tuple[dict[str, Placement], list[str], list[str], int]) -> None:
    placement, available, must, size = case
    got = preferred_allocation(available, must, size, placement)
    assert len(got) == size
    assert len(set(got)) == size
    assert set(got) <= set(available)
    assert set(must) <= set(got)


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_stays_inside_one_group_when_some_group_can_hold_it(
        case: tuple[dict[str, Placement], list[str], list[str], int]) -> None:
    placement, available, must, size = case
    fits = any(
        sum(1 for d in available if placement[d].group == g) >= size and all(placement[m].group == g for m in must)
        for g in {p.group for p in placement.values()})
    got = preferred_allocation(available, must, size, placement)
    if fits and 0 < size < len(available):
        assert len({placement[d].group for d in got}) == 1


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(0, 7), min_size=1), st.sampled_from([1, 2, 4]))
def test_a1_whole_ring_or_single_ring_when_the_rules_apply(free_ids: set[int], size: int) -> None:
    free = ids(*sorted(free_ids))
    if size > len(free):
        return
    got = a1(free, size)
    assert len(got) == size and set(got) <= set(free)
    ring_free = [sum(1 for d in free if A1[d].group == g) for g in ("hccs-ring-0", "hccs-ring-1")]
    preferred = {1: (1, 3, 2, 4), 2: (2, 4, 3), 4: (4,)}[size]
    if any(count in preferred for count in ring_free):
        assert len({A1[d].group for d in got}) == 1
        best = next(c for c in preferred if c in ring_free)
        assert ring_free[int(A1[got[0]].group[-1])] == best


@settings(max_examples=200, deadline=None)
@given(scenarios(), st.data())
def test_a_fitting_scheduler_choice_is_returned_exactly(
        case: tuple[dict[str, Placement], list[str], list[str], int], data: st.DataObject) -> None:
    placement, available, must, size = case
    rest = [d for d in available if d not in must]
    extra = data.draw(st.lists(st.sampled_from(rest), unique=True, min_size=size - len(must),
                               max_size=size - len(must))) if rest and size > len(must) else []
    choice = must + extra
    if len(choice) != size or size in (0, len(available)):
        return
    got = preferred_allocation(available, must, size, placement, scheduler_choices=[choice])
    assert set(got) == set(choice)


def test_single_only_devices_serve_one_device_requests_only() -> None:
    down = ids(0, 1)
    assert set(preferred_allocation(ids(0, 1, 2, 3), [], 2, MESH, single_only=down)) == set(ids(2, 3))
    assert preferred_allocation(ids(0, 1, 2), [], 1, MESH, single_only=down)[0] in ids(0, 1, 2)
    # too few others: a link-down device rather than fewer than asked (the kubelet would fill in its own order)
    got = preferred_allocation(ids(0, 1, 2), [], 2, MESH, single_only=down)
    assert len(got) == 2 and ids(2)[0] in got
    # a device the kubelet must include stays in
    assert ids(0)[0] in preferred_allocation(ids(0, 1, 2, 3), ids(0), 2, MESH, single_only=down)


A3 = {f"d{i}": Placement(group="mesh", numa=i // 8, order=i, card=i // 2) for i in range(16)}
"""An A3 (die pairs) board: 8 chips of 2 dies."""


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(A3)), min_size=1, unique=True), st.data())
def test_die_pairs_never_answer_more_dies_than_asked(available: list[str], data: st.DataObject) -> None:
    """Whatever the must-includes (also on more chips than the request has pairs), the answer holds at most
    ``size`` distinct available dies (a preference the kubelet may complete; never more than the pod asked)."""
    must = data.draw(st.lists(st.sampled_from(available), unique=True, max_size=4))
    size = data.draw(st.integers(0, len(A3)))
    got = preferred_allocation(available, must, size, A3, product=PRODUCTS["910c-a3"]) or []
    assert len(got) <= size and len(set(got)) == len(got) and set(got) <= set(available), (must, size, got)


def test_die_pairs_with_must_includes_on_more_chips_than_pairs_asked() -> None:
    got = preferred_allocation(sorted(A3), ["d3", "d10", "d14"], 4, A3, product=PRODUCTS["910c-a3"]) or []
    assert len(got) <= 4  # it was 14


def test_a_link_down_die_is_used_when_the_products_rules_leave_no_set_without_it() -> None:
    # 910B x16: free dies 0-3 and 10-12, die 2's link down, 4 asked: without die 2 the only 4 cross the halves
    # (refused at Allocate by rule 910b-x16/halves); with it, 0-3 is a set the rules allow
    x16 = {f"Ascend910-{i}": Placement(group=f"half-{i // 8}", numa=i // 4, order=i) for i in range(16)}
    free = ids(0, 1, 2, 3, 10, 11, 12)
    got = preferred_allocation(free, [], 4, x16, product=PRODUCTS["910b-x16"], single_only=ids(2))
    assert sorted(got) == sorted(ids(0, 1, 2, 3))
    # and when a set without it exists, it stays out
    got = preferred_allocation(free, [], 3, x16, product=PRODUCTS["910b-x16"], single_only=ids(2))
    assert ids(2)[0] not in got and len(got) == 3
    # a scheduler's choice holding a link-down die is still the answer (checked against all available)
    assert sorted(preferred_allocation(free, [], 2, x16, product=PRODUCTS["910b-x16"], single_only=ids(2),
                                       scheduler_choices=[ids(2, 3)])) == sorted(ids(2, 3))


def test_a_one_device_request_takes_a_link_down_device_first() -> None:
    # it serves single-device requests only: taking a linked one leaves the next multi-device set short
    x8 = {f"Ascend910-{i}": Placement(group="mesh", numa=i // 4, order=i) for i in range(8)}
    assert preferred_allocation(ids(0, 1, 4, 5), [], 1, x8) == ids(0)
    assert preferred_allocation(ids(0, 1, 4, 5), [], 1, x8, single_only=ids(1)) == ids(1)
    assert preferred_allocation(ids(0, 1, 4, 5), ids(4), 1, x8, single_only=ids(1)) == ids(4)  # must-include wins
    assert preferred_allocation(ids(0, 4, 5), [], 1, x8, single_only=ids(1)) == ids(0)  # none free: as before
