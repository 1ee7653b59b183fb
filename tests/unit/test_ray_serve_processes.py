"""The engine replica's process handling without Ray (:mod:`fuyao.ray_serve.child`): the engine is started without
Python code between fork and exec and leads its own session, and stopping it ends everything it started, also a
child that left its process group for a session of its own (as an engine core process may). That it dies with the
replica process and not with the thread that asked for it: tests/unit/test_ray_serve_logic.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from fuyao.ray_serve import child

STAND_IN = textwrap.dedent('''
    import json, os, signal, sys, time
    children = {}
    for name in ("own_session", "same_group"):
        pid = os.fork()
        if pid == 0:
            if name == "own_session":
                os.setsid()  # out of the engine's process group, as an engine core may go
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # and deaf to SIGTERM: only SIGKILL ends it
                open(sys.argv[1] + ".deaf", "w").close()  # ready: the test may signal it now
            time.sleep(600)
            os._exit(0)
        children[name] = pid
    with open(sys.argv[1] + ".tmp", "w") as f:
        json.dump({"children": children, "sid": os.getsid(0), "pgid": os.getpgid(0)}, f)
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    if sys.argv[2:] == ["exit"]:
        sys.exit(3)
    time.sleep(600)
''')


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_file(path: Path, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_stopping_the_engine_ends_its_group_and_a_child_in_its_own_session(tmp_path: Path) -> None:
    # the replica terminated the engine alone: a child of the engine in its own session (or one that ignored the
    # engine's end) lived on, holding its NPU memory and ports
    script, info = tmp_path / "engine.py", tmp_path / "info.json"
    script.write_text(STAND_IN)
    process = child.spawn([sys.executable, str(script), str(info)], dict(os.environ))
    try:
        started = wait_for_file(info)
        own, group = started["children"]["own_session"], started["children"]["same_group"]
        assert started["sid"] == started["pgid"] == process.pid  # the engine leads a session of its own
        deadline = time.monotonic() + 10
        while not Path(f"{info}.deaf").exists() and time.monotonic() < deadline:  # setsid and SIG_IGN done
            time.sleep(0.05)
        assert running(own) and running(group) and os.getsid(own) == own
        began = time.monotonic()
        child.stop(process, grace=1.0)
        took = time.monotonic() - began
        deadline = time.monotonic() + 5
        while (running(own) or running(group)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.returncode is not None
        assert not running(group), "the engine's process group outlived it"
        assert not running(own), "the engine's child in its own session outlived it"
        assert 0.9 < took < 5  # SIGTERM, then SIGKILL after the grace for the one that ignores SIGTERM
    finally:
        for pid in (started["children"].values() if info.exists() else []):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()


def test_stopping_an_engine_that_already_exited_ends_what_it_left_in_its_group(tmp_path: Path) -> None:
    script, info = tmp_path / "engine.py", tmp_path / "info.json"
    script.write_text(STAND_IN)
    process = child.spawn([sys.executable, str(script), str(info), "exit"], dict(os.environ))
    try:
        group = wait_for_file(info)["children"]["same_group"]
        assert process.wait(10) == 3 and running(group)  # the engine is gone, its group is not
        child.stop(process, grace=1.0)
        deadline = time.monotonic() + 5
        while running(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(group)
    finally:
        for pid in (json.loads(info.read_text())["children"].values() if info.exists() else []):
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_no_python_runs_between_fork_and_exec(monkeypatch: pytest.MonkeyPatch) -> None:
    # preexec_fn ran ctypes (dlopen, the loader's lock) in the child of a threaded replica: it may deadlock there
    calls: list[dict[str, Any]] = []
    real = subprocess.Popen

    def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording)
    process = child.spawn(["/bin/true"], {"PATH": "/usr/bin:/bin"})
    assert process.wait(10) == 0
    assert calls and calls[0].get("preexec_fn") is None and calls[0].get("start_new_session") is True


def test_a_child_whose_parent_died_before_it_asked_for_the_death_signal_exits() -> None:
    # pid 1 is not this test's parent process: the child must see that its parent is gone and not exec
    proc = subprocess.run([sys.executable, "-I", child.__file__, "1", "/bin/sleep", "30"], timeout=20)
    assert proc.returncode == 1


def test_the_child_helper_runs_without_the_package_on_the_path(tmp_path: Path) -> None:
    # python -I child.py: no PYTHONPATH, no current directory; the engine still gets the environment it was given
    out = tmp_path / "env"
    process = child.spawn(["/bin/sh", "-c", f'echo "$ENGINE_MARK" > {out}'],
                          {"PATH": "/usr/bin:/bin", "ENGINE_MARK": "kept", "PYTHONPATH": "/nonexistent"})
    assert process.wait(20) == 0 and out.read_text().strip() == "kept"

