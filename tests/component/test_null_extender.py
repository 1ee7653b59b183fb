"""bench/null_extender (the scheduling benchmark's protocol floor) speaks kube-scheduler's extender JSON: built with
Go as the benchmark builds it, asked over a real socket."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.apiserver import free_port

pytestmark = pytest.mark.skipif(shutil.which("go") is None, reason="needs the Go toolchain")


def post(url: str, body: object) -> object:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_null_extender_answers_every_verb_in_upstream_field_names(tmp_path: Path) -> None:
    from bench.scheduling_bench import build_null_extender

    binary = build_null_extender()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
                    "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.crt")], check=True,
                   capture_output=True)
    (tmp_path / "token").write_text("not-a-token\n")
    port, api_port = free_port(), free_port()  # nothing listens on api_port: the binding cannot be made
    proc = subprocess.Popen([str(binary), "--listen", f"127.0.0.1:{port}", "--server", f"https://127.0.0.1:{api_port}",
                             "--ca", str(tmp_path / "ca.crt"), "--token-file", str(tmp_path / "token"),
                             "--shortlist", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{base}/readyz", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the null extender did not start"
                time.sleep(0.1)
        args = {"Pod": {"metadata": {"name": "p"}}, "Nodes": None, "NodeNames": ["a", "b", "c"]}
        assert post(f"{base}/filter", args) == {"Nodes": None, "NodeNames": ["a", "b"], "FailedNodes": {},
                                                "FailedAndUnresolvableNodes": {}, "Error": ""}
        assert post(f"{base}/prioritize", args) == [{"Host": n, "Score": 0} for n in ("a", "b", "c")]
        answer = post(f"{base}/bind", {"PodName": "p", "PodNamespace": "default", "PodUID": "u", "Node": "a"})
        assert isinstance(answer, dict) and "connection refused" in answer["Error"]
        with urllib.request.urlopen(f"{base}/stats", timeout=5) as response:
            assert json.loads(response.read())["api_bind"]["count"] == 1
    finally:
        proc.terminate()
        proc.wait(10)
