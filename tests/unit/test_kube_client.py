"""fuyao.kube_client.RestEndpoint: auth headers read per call, or reused on a hot path for a bounded time."""

from __future__ import annotations

from fuyao import kube_client
from fuyao.kube_client import RestEndpoint
from tests.support.apiserver import RotatingToken


def test_headers_are_read_per_call_unless_a_max_age_is_given(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    now = [100.0]
    monkeypatch.setattr(kube_client.time, "monotonic", lambda: now[0])
    conf = RotatingToken()
    endpoint = RestEndpoint("https://api", None, conf)
    assert endpoint.headers() == {"Authorization": "Bearer t1"}
    assert endpoint.headers() == {"Authorization": "Bearer t2"}  # no max age: read again
    assert endpoint.headers(10.0) == {"Authorization": "Bearer t2"}  # just read: reused
    now[0] += 9.9
    kept = endpoint.headers(10.0)
    assert kept == {"Authorization": "Bearer t2"} and conf.reads == 2
    kept["Authorization"] = "tampered"  # a caller's copy, not the kept one
    now[0] += 0.2
    assert endpoint.headers(10.0) == {"Authorization": "Bearer t3"}  # older than 10 s: read again
    assert endpoint.headers(10.0) == {"Authorization": "Bearer t3"} and conf.reads == 3
