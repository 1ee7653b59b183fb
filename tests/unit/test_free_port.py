"""The test harness's port picker: a daemon started later must still find its port free, so the picker never
hands out a port the kernel gives to port-0 binds and outgoing connections, nor one it handed out before."""

from __future__ import annotations

import socket

import pytest

from tests.support import apiserver
from tests.support.apiserver import free_port


def test_ports_are_outside_the_ephemeral_range_and_never_repeated() -> None:
    low, high = apiserver._ephemeral_range()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not [port for port in ports if low <= port <= high]


def test_a_run_of_ports_is_free_and_not_handed_out_again() -> None:
    base = free_port(4)
    run = set(range(base, base + 4))
    for port in run:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
    assert not run.intersection(free_port() for _ in range(200))


def test_a_held_port_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(apiserver, "_PORT_RANGES", ((taken, taken + 1),))
        monkeypatch.setattr(apiserver, "_ephemeral_range", lambda: (1, 2))
        assert free_port() == taken + 1
