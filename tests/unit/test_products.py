"""Per-product allocation rules (fuyao.products) over every product preset of the fake npu-smi: the node's product,
and for any free dies and count, the placement function finds a set the rules allow exactly when one exists."""

from __future__ import annotations

import itertools
import os
import random
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuyao.contracts import NodeTopology
from fuyao.inventory import discover
from fuyao.npu_sim.state import preset_names
from fuyao.npusmi import NpuSmi
from fuyao.placement import Placement, preferred_allocation
from fuyao.products import PRODUCTS, count_problem, free_problem, product_of, shape_problem
from tests.support.deviceplugin import FAKE_NPU_SMI

EXPECTED = {"910a1-8": "910-a1-module", "910b3-8": "910b-x8", "910b4-8": "910b-x8", "910b3-16": "910b-x16",
            "910c-8": "910c-a3", "310p3-4": "generic", "310p3-duo-4": "310p-duo"}


@cache
def topology(preset: str) -> NodeTopology:
    old = os.environ.get("FAKE_NPU_SMI_PRESET")
    os.environ["FAKE_NPU_SMI_PRESET"] = preset
    try:
        return discover(NpuSmi(str(FAKE_NPU_SMI)), "/nonexistent").to_topology()
    finally:
        if old is None:
            os.environ.pop("FAKE_NPU_SMI_PRESET", None)
        else:
            os.environ["FAKE_NPU_SMI_PRESET"] = old


def placements(topo: NodeTopology) -> dict[str, Placement]:
    return {i: Placement(group=d.group, numa=d.numa_node, order=d.physical_id, card=d.npu_id)
            for i, d in topo.devices.items()}


def test_every_preset_has_its_product() -> None:
    assert set(preset_names()) == set(EXPECTED), "classify the new preset here"
    for preset, name in EXPECTED.items():
        assert product_of(topology(preset)).name == name, preset


def test_a_first_generation_910b_is_an_a1_module_not_an_a2() -> None:
    """npu-smi names some first-generation 910 chips "910B" (no digit): their rings are the A1's (the 910B1..B4 of
    an Atlas 800 A2 always carry a digit)."""
    a1 = topology("910a1-8")
    named = a1.model_copy(update={"chip_model": "910B", "devices": {
        i: d.model_copy(update={"chip_model": "910B"}) for i, d in a1.devices.items()}})
    assert product_of(named).name == "910-a1-module"
    assert product_of(topology("910b4-8").model_copy(update={"chip_model": "910B4"})).name == "910b-x8"


def test_counts_each_product_takes() -> None:
    a1, x16, a3 = PRODUCTS["910-a1-module"], PRODUCTS["910b-x16"], PRODUCTS["910c-a3"]
    assert [k for k in range(1, 9) if count_problem(a1, k, 8) is None] == [1, 2, 4, 8]
    assert [k for k in range(1, 17) if count_problem(x16, k, 16) is None] == [*range(1, 9), 10, 12, 14, 16]
    assert [k for k in range(1, 17) if count_problem(a3, k, 16) is None] == [1, *range(2, 17, 2)]
    assert "rule 910c-a3/counts" in (count_problem(a3, 3, 16) or "")
    assert count_problem(PRODUCTS["910b-x8"], 5, 8) is None and count_problem(PRODUCTS["generic"], 9, 8)


def test_shapes_name_their_rule() -> None:
    a3 = topology("910c-8")
    place = placements(a3)
    ids = list(a3.devices)
    assert shape_problem(PRODUCTS["910c-a3"], ids[0:2], place, 16) is None  # both dies of chip 0
    assert "rule 910c-a3/die-pairs" in (shape_problem(PRODUCTS["910c-a3"], ids[1:3], place, 16) or "")
    x16 = topology("910b3-16")
    place = placements(x16)
    ids = list(x16.devices)
    assert "rule 910b-x16/halves" in (shape_problem(PRODUCTS["910b-x16"], ids[6:10], place, 16) or "")
    matched = ids[0:5] + ids[8:13]
    assert shape_problem(PRODUCTS["910b-x16"], matched, place, 16) is None
    assert "matched pairs" in (shape_problem(PRODUCTS["910b-x16"], ids[0:5] + ids[9:14], place, 16) or "")
    a1 = topology("910a1-8")
    place = placements(a1)
    ids = list(a1.devices)
    assert "rule 910-a1-module/ring" in (shape_problem(PRODUCTS["910-a1-module"], [ids[0], ids[4]], place, 8) or "")


def _any_valid(product, free: list[str], k: int, place, n: int, rng: random.Random) -> bool:  # type: ignore[no-untyped-def]
    """Whether some k of ``free`` make a set the product allows: every subset when few, else a large sample."""
    combos = itertools.combinations(free, k)
    total = 1
    for i in range(k):
        total = total * (len(free) - i) // (i + 1)
    if total <= 3000:
        return any(shape_problem(product, list(c), place, n) is None for c in combos)
    return any(shape_problem(product, rng.sample(free, k), place, n) is None for _ in range(3000))


@pytest.mark.parametrize("preset", sorted(EXPECTED))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_placement_finds_an_allowed_set_exactly_when_one_exists(preset: str, data: st.DataObject) -> None:
    topo = topology(preset)
    product = product_of(topo)
    place = placements(topo)
    ids = list(topo.devices)
    n = len(ids)
    free = sorted(data.draw(st.sets(st.sampled_from(ids))), key=ids.index)
    k = data.draw(st.integers(1, n))
    picked = preferred_allocation(free, [], k, place, product=product)
    assert set(picked) <= set(free) and len(picked) == min(k, len(free))
    why_not = free_problem(product, free, k, place, n)
    if why_not is None:
        assert shape_problem(product, picked, place, n) is None, (free, k, picked)
    else:
        assert product.name in why_not or "free" in why_not or "node has" in why_not
        if shape_problem(product, picked, place, n) is None and len(picked) == k:
            raise AssertionError(f"free_problem says no ({why_not}) but {picked} is allowed")
        if len(free) >= k and count_problem(product, k, n) is None:
            assert not _any_valid(product, free, k, place, n, random.Random(k)), (free, k, why_not)
