"""The pure parts of fuyao's Ray Serve application: the request the routers read, the ranking of replicas from the
KV index's answer, and the application's validated arguments (no Ray needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuyao.config_files import ConfigError
from fuyao.ray_serve.ranking import OpenAiRequest, hit_scores, rank, request_of
from fuyao.ray_serve.settings import ROUTER_CLASSES, app_settings, router_config


def test_the_request_exposes_prompt_and_messages_and_builds_the_lookup() -> None:
    chat = OpenAiRequest("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.messages == [{"role": "user", "content": "hi"}] and not hasattr(chat, "prompt")  # what it carries
    assert chat.lookup_query() == {"messages": [{"role": "user", "content": "hi"}], "model": "m"}
    assert OpenAiRequest("/v1/completions", {"prompt": "abc"}).lookup_query() == {"prompt": "abc"}
    assert OpenAiRequest("/v1/completions", {"prompt": [1, 2, 3]}).lookup_query() == {"token_ids": [1, 2, 3]}
    assert OpenAiRequest("/v1/completions", {"prompt": {"bad": 1}}).lookup_query() is None
    assert OpenAiRequest("/v1/completions", {"prompt": "x"}).lookup_query("served") == {"prompt": "x",
                                                                                         "model": "served"}
    assert request_of(("x", chat), {}) is chat and request_of((), {"r": chat}) is chat
    assert request_of(("x", {"prompt": "p"}), {}) is None


def test_the_replicas_holding_the_most_come_first() -> None:
    engines = ["http://a", "http://b", None, "http://c"]
    assert rank(engines, {"http://b": 8, "http://c": 3}, 10) == [[1], [0, 2, 3]]
    assert rank(engines, {"http://b": 8, "http://c": 8}, 10) == [[1, 3], [0, 2]]
    # within tolerance of the best: same rank
    assert rank(engines, {"http://b": 8, "http://c": 7}, 10, tolerance_blocks=1) == [[1, 3], [0, 2]]
    # nobody holds anything, or not enough: one rank (load alone)
    assert rank(engines, {}, 10) == [[0, 1, 2, 3]]
    assert rank(engines, {"http://a": 1}, 10, min_hit=0.5) == [[0, 1, 2, 3]]
    assert rank(engines, {"http://a": 5}, 0) == [[0, 1, 2, 3]]
    assert rank([], {"http://a": 5}, 10) == []
    assert hit_scores(engines, {"http://a": 20, "http://b": -1}, 10) == [1.0, 0.0, 0.0, 0.0]


@given(st.lists(st.sampled_from(["a", "b", "c", "d", None]), min_size=1, max_size=6),
       st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 40)),
       st.integers(0, 40), st.floats(0, 1), st.integers(0, 5))
def test_ranks_partition_the_candidates_and_lead_with_the_best(engines, cached, blocks, min_hit, tolerance) -> None:  # type: ignore[no-untyped-def]
    ranks = rank(engines, cached, blocks, min_hit=min_hit, tolerance_blocks=tolerance)
    flat = [i for group in ranks for i in group]
    assert sorted(flat) == list(range(len(engines)))  # every replica exactly once: none is ever unreachable
    assert all(group for group in ranks) and len(ranks) <= 2
    scores = hit_scores(engines, cached, blocks)
    if len(ranks) == 2:
        assert min(scores[i] for i in ranks[0]) >= max(scores[i] for i in ranks[1]) - tolerance / max(blocks, 1)
        assert max(scores) in [scores[i] for i in ranks[0]]


def test_app_settings_are_validated_and_name_the_bad_field() -> None:
    settings = app_settings({"replicas": 3, "router": {"policy": "kv-index", "kvIndexUrl": "http://kv:8100"}})
    assert settings.replicas == 3 and settings.engine.module == "fuyao.engine_sim.cli"
    assert router_config(settings.router) == {
        "request_router_class": ROUTER_CLASSES["kv-index"],
        "request_router_kwargs": {"kv_index_url": "http://kv:8100", "lookup_timeout": 0.2, "min_hit": 0.0,
                                  "tolerance_blocks": 0, "index_failure_threshold": 3, "index_cool_down": 10.0}}
    assert app_settings(None).router.policy == "power-of-two"
    # a router section that does not name a policy keeps the default one (it did switch to kv-index)
    assert app_settings({"router": {"lookupTimeout": "500ms"}}).router.policy == "power-of-two"
    with pytest.raises(ConfigError, match=r"'npusPerReplica'.*whole NPUs"):
        app_settings({"npusPerReplica": 1.5})
    assert app_settings({"npusPerReplica": 0.5}).npus_per_replica == 0.5
    # each NPU slot adds its number to both ports: slot 1's engine port was slot 0's events port
    with pytest.raises(ConfigError, match=r"port \(8100\) and kvEventsPort \(8101\) must be at least 16 apart"):
        app_settings({"engine": {"port": 8100, "kvEventsPort": 8101}})
    with pytest.raises(ConfigError, match=r"port 65530 \+ an NPU slot up to 15 is past port 65535"):
        app_settings({"engine": {"port": 65530}})
    with pytest.raises(ConfigError, match="ASCEND_RT_VISIBLE_DEVICES is set from the NPU slots"):
        app_settings({"engine": {"env": {"ASCEND_RT_VISIBLE_DEVICES": "0,1"}}})
    assert router_config(app_settings(None).router) == {"request_router_class": ROUTER_CLASSES["power-of-two"]}
    with pytest.raises(ConfigError, match=r"'router': .*kvIndexUrl"):
        app_settings({"router": {"policy": "kv-index"}})
    with pytest.raises(ConfigError, match="'replicas'"):
        app_settings({"replicas": 0})
    with pytest.raises(ConfigError, match=r"'engine\.args'.*names \{gpu\}"):
        app_settings({"engine": {"args": ["--port", "{gpu}"]}})
    with pytest.raises(ConfigError, match=r"'engine\.args'.*literal brace"):
        app_settings({"engine": {"args": ["--json={bad"]}})
    with pytest.raises(ConfigError, match=r"'router\.policy'"):
        app_settings({"router": {"policy": "random"}})
    with pytest.raises(ConfigError, match="'replcas'"):
        app_settings({"replcas": 2})
    assert app_settings({"engine": {"port": 9000}}).engine.command_args("0.0.0.0", 9001, 5558)[:4] == [
        "--host", "0.0.0.0", "--port", "9001"]


def test_an_engine_outlives_the_thread_that_started_it_but_not_its_process() -> None:
    """fuyao.ray_serve.child: PR_SET_PDEATHSIG fires when the forking *thread* ends, so a child forked directly from
    a short-lived thread (as a replica's constructor may be) dies with that thread; ``spawn`` forks from one
    long-lived thread, so the child lives as long as the process, and no longer."""
    import os
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    from fuyao.ray_serve import child
    from fuyao.ray_serve.child import spawn

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    started: dict[str, subprocess.Popen[bytes]] = {}

    def from_a_thread(direct: bool) -> subprocess.Popen[bytes]:
        def run() -> None:
            if direct:  # the child's own death-signal request, forked by this short-lived thread itself
                started["p"] = subprocess.Popen([sys.executable, "-I", child.__file__, str(os.getpid()), *sleeper])
                time.sleep(1.0)  # ends once the child has asked for it (else the signal follows the next thread)
            else:
                started["p"] = spawn(sleeper, os.environ)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        time.sleep(1.0)
        return started.pop("p")

    direct, spawned = from_a_thread(direct=True), from_a_thread(direct=False)
    try:
        assert direct.poll() is not None  # the kernel's rule this module works around
        assert spawned.poll() is None
        # the death-signal helper exec'd the engine in place: the pid Popen holds is the engine's
        assert Path(f"/proc/{spawned.pid}/cmdline").read_bytes().split(b"\0")[:2] == [sys.executable.encode(), b"-c"]
    finally:
        for proc in (direct, spawned):
            proc.kill()
            proc.wait()
    # and when the process that spawned it exits, the child gets SIGTERM
    parent = subprocess.run([sys.executable, "-c", "import os, sys; from fuyao.ray_serve.child import spawn; "
                             "print(spawn([sys.executable, '-c', 'import time; time.sleep(60)'], os.environ).pid)"],
                            capture_output=True, text=True, check=True, timeout=60)
    orphan = int(parent.stdout.strip())
    def alive() -> bool:  # a zombie (reaped by init soon) counts as gone
        try:
            return Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(), "the child outlived its process"


def test_an_engine_port_already_listened_on_is_seen_taken() -> None:
    """Two replicas on one NPU slot (fractional npusPerReplica) or one still stopping: the second sees its port
    taken before it starts an engine (else it would take the other engine's /health for its own)."""
    import socket

    from fuyao.ray_serve.child import port_free as _port_free

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not _port_free("127.0.0.1", port) and not _port_free("0.0.0.0", port)
    assert _port_free("127.0.0.1", port)
