"""fuyao.backoff.Backoff, the one retry delay of every loop (client-go's ``wait.Backoff``): grows by its factor to its
cap, jitters on top, counts failures in a row, starts over after a success, and refuses a config that makes no sense;
and the loops that used to double by hand now take their delays from it."""

from __future__ import annotations

import ast

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from fuyao.backoff import Backoff
from tests.conftest import REPO


def test_delays_grow_by_the_factor_up_to_the_cap() -> None:
    backoff = Backoff(initial=0.5, factor=2.0, cap=3.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert backoff.failures == 6


def test_a_success_starts_over() -> None:
    backoff = Backoff(initial=1.0, factor=3.0, cap=100.0)
    backoff.next()
    backoff.next()
    assert backoff.current == 9.0
    backoff.reset()
    assert backoff.failures == 0 and backoff.current == 1.0 and backoff.next() == 1.0


def test_jitter_is_added_on_top_of_the_delay() -> None:
    backoff = Backoff(initial=2.0, factor=2.0, cap=8.0, jitter=0.5, rand=lambda: 0.5)
    assert backoff.next() == pytest.approx(2.0 * 1.25)
    assert backoff.next() == pytest.approx(4.0 * 1.25)
    assert backoff.current == 8.0  # the schedule itself is not jittered


@given(initial=hs.floats(0.001, 10), factor=hs.floats(1, 4), cap_ratio=hs.floats(1, 100), jitter=hs.floats(0, 1),
       draws=hs.lists(hs.floats(0, 0.999), min_size=1, max_size=40))
def test_every_delay_stays_between_initial_and_jittered_cap(initial: float, factor: float, cap_ratio: float,
                                                           jitter: float, draws: list[float]) -> None:
    it = iter(draws)
    backoff = Backoff(initial=initial, factor=factor, cap=initial * cap_ratio, jitter=jitter, rand=lambda: next(it))
    previous = 0.0
    for _ in draws:
        base = backoff.current
        delay = backoff.next()
        assert base >= previous  # never shrinks without a reset
        assert initial <= base <= backoff.cap and base <= delay <= base * (1 + jitter) + 1e-9
        previous = base


@pytest.mark.parametrize("kwargs,fragment", [({"initial": 0}, "initial"), ({"initial": 1, "factor": 0.5}, "factor"),
                                             ({"initial": 2, "cap": 1}, "cap"),
                                             ({"initial": 1, "jitter": -0.1}, "jitter")])
def test_a_senseless_backoff_is_refused(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Backoff(**kwargs)


@pytest.mark.parametrize("path", ["deviceplugin/cluster.py", "deviceplugin/daemon.py", "fuyao/kube_watch.py"])
def test_the_retry_loops_use_it_and_double_nothing_by_hand(path: str) -> None:
    source = (REPO / path).read_text()
    assert "Backoff(" in source
    for node in ast.walk(ast.parse(source)):  # no `x = min(x * 2, cap)` left
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "min":
            assert not any(isinstance(a, ast.BinOp) and isinstance(a.op, ast.Mult) for a in node.args), \
                f"{path}:{node.lineno} doubles a delay by hand"
