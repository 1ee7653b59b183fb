"""Leader election's decisions (fuyao.leader), as client-go makes them: who may take the Lease, and what is
written when taking, renewing and releasing it."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuyao.leader import MICRO_TIME, Record, Timing, claimed, held, may_acquire, released

WALL = dt.datetime(2026, 12, 5, 22, 0, 0, 123456, tzinfo=dt.UTC)
names = st.sampled_from(["a", "b", "c", ""])


@given(holder=names, me=names.filter(bool), duration=st.integers(1, 60), observed=st.floats(0, 1e6),
       elapsed=st.floats(0, 120))
def test_a_live_holder_is_never_displaced_and_an_expired_one_always_is(holder: str, me: str, duration: int,
                                                                       observed: float, elapsed: float) -> None:
    record = Record(holder=holder, duration_s=duration, resource_version="7")
    allowed = may_acquire(record, me, observed, observed + elapsed)
    if holder in ("", me):
        assert allowed  # free (released), or ours to renew
    else:
        assert allowed == (elapsed >= duration)  # only once it went a whole duration without a change
        assert held(record, observed, observed + elapsed) == (not allowed)


def test_the_records_written_to_take_renew_and_release_the_lease() -> None:
    assert may_acquire(None, "a", 0.0, 0.0)
    first = claimed(None, "a", "http://10.0.0.1:8888", 15, WALL)
    stamp = "2026-12-05T22:00:00.123456Z"
    assert dt.datetime.strptime(stamp, MICRO_TIME)
    assert first == Record(holder="a", duration_s=15, acquire_time=stamp, renew_time=stamp, transitions=0,
                           url="http://10.0.0.1:8888")
    lease = first.lease("ext", "kube-system")
    assert lease["spec"] == {"holderIdentity": "a", "leaseDurationSeconds": 15, "leaseTransitions": 0,
                             "acquireTime": stamp, "renewTime": stamp}
    assert "resourceVersion" not in lease["metadata"]  # a create
    stored = Record.of({**lease, "metadata": {**lease["metadata"], "resourceVersion": "41"}})
    later = WALL + dt.timedelta(seconds=2)
    renewed = claimed(stored, "a", stored.url, 15, later)
    assert (renewed.acquire_time, renewed.transitions, renewed.resource_version) == (stamp, 0, "41")
    assert renewed.renew_time == later.strftime(MICRO_TIME)
    taken = claimed(stored, "b", "http://10.0.0.2:8888", 15, later)  # after it expired
    assert (taken.holder, taken.transitions, taken.acquire_time) == ("b", 1, later.strftime(MICRO_TIME))
    assert taken.lease("ext", "kube-system")["metadata"]["resourceVersion"] == "41"  # the update's precondition
    gone = released(renewed, later)
    assert (gone.holder, gone.duration_s, gone.url) == ("", 1, "")
    assert claimed(gone, "b", "u", 15, later).transitions == 1  # taking a released lease counts, as in client-go


def test_timings_follow_client_gos_rule() -> None:
    Timing(15, 10, 2)
    for bad in ((10, 10, 2), (15, 10, 10), (15, 10, 0)):
        with pytest.raises(ValueError, match="retryPeriod < renewDeadline < leaseDuration"):
            Timing(*bad)


def test_a_fractional_lease_duration_is_written_rounded_up_never_down() -> None:
    """Followers take over ``leaseDurationSeconds`` after the last renewal they saw; rounding 10.9 s down to 10 would
    let them take it while the holder still counts itself leader."""
    assert claimed(None, "a", "", 10.9, WALL).duration_s == 11
    assert claimed(None, "a", "", 15, WALL).duration_s == 15
