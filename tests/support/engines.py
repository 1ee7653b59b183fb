"""Engine simulators and the KV-cache service as real processes on free loopback ports, for component tests, the
router's tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from .apiserver import free_port


def http_json(url: str, body: Any = None, timeout: float = 10) -> Any:
    """GET ``url`` (POST ``body`` as JSON when given) and parse the JSON answer; HTTP errors raise."""
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def metric_total(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` (with these label values) in a Prometheus text page; 0 when absent.
    ``name`` may carry a selector, as written in the page: ``kv_cache_hits{layer="tier"}``."""
    from prometheus_client.parser import text_string_to_metric_families

    name, _, selector = name.partition("{")
    labels = {**dict(re.findall(r'(\w+)="([^"]*)"', selector)), **labels}
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def scrape(url: str, name: str, **labels: str) -> float:
    """:func:`metric_total` of ``url``'s ``/metrics`` page (an engine, router or index by its base URL)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        return metric_total(response.read().decode(), name, **labels)


class Daemon:
    """A ``python -m <module>`` process with an HTTP port; ``start()`` waits until ``health_path`` answers. Its
    output goes to a log file (``log_text()``): a pipe nobody reads would stop a chatty process once full."""

    def __init__(self, module: str, args: list[str], port: int, health_path: str, *, python: str = sys.executable,
                 env: dict[str, str] | None = None, log_args: tuple[str, ...] = ("--log-format", "text"),
                 group: bool = False, host: str = "127.0.0.1"):
        """``group``: the daemon forks workers of its own (vLLM's engine core): it gets a process group, and
        ``close()`` kills all of it. ``host``: the address it listens on (its ``url``)."""
        self.module, self.args, self.port, self.health_path = module, args, port, health_path
        self.host = host
        self.python, self.env, self.log_args, self.group = python, env, log_args, group
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def start(self, timeout: float = 20.0) -> Daemon:
        return self.launch().wait_ready(timeout)

    def launch(self) -> Daemon:
        """Start the process without waiting for it (:meth:`wait_ready`; :func:`start_all` for several)."""
        with tempfile.NamedTemporaryFile(prefix=f"{self.module}-", suffix=".log", delete=False) as log:
            self.log_path = log.name
            self.proc = subprocess.Popen([self.python, "-m", self.module, *self.args, *self.log_args],
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=self.group)
        return self

    def wait_ready(self, timeout: float = 20.0) -> Daemon:
        """Wait until ``health_path`` answers (the process launched)."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.module} exited {self.proc.returncode}: {self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        raise AssertionError(f"{self.module} did not answer {self.health_path} within {timeout}s: "
                             f"{self.log_text()[-3000:]}")

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        status, raw = self.request("POST", path, body)
        return status, json.loads(raw) if raw else None

    def get(self, path: str) -> tuple[int, str]:
        status, raw = self.request("GET", path)
        return status, raw.decode()

    def metric(self, name: str) -> float:
        """The sum of a metric's samples on /metrics (0 when absent)."""
        return metric_total(self.get("/metrics")[1], name)

    def stop(self, timeout: float = 5.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds to exit)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return code, time.monotonic() - started

    def close(self) -> None:
        """Kill it (if running; its whole group with ``group``) and remove its log."""
        if self.proc is not None and self.group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)


def start_all(daemons: list[Daemon], timeout: float = 20.0) -> list[Daemon]:
    """Launch every daemon, then wait for each: slow starters (a vLLM engine takes ~40 s, much of it waiting on
    imports and its own worker) start side by side instead of one after the other."""
    for daemon in daemons:
        daemon.launch()
    deadline = time.monotonic() + timeout
    for daemon in daemons:
        daemon.wait_ready(max(1.0, deadline - time.monotonic()))
    return daemons


def engine(*extra: str, events: bool = False, replay: bool = False, time_scale: float = 20.0) -> Daemon:
    """An engine simulator (fast clock); with ``events`` its KV events on a free port (``daemon.events``)."""
    port = free_port()
    args = ["--port", str(port), "--time-scale", str(time_scale), *extra]
    daemon = Daemon("fuyao.engine_sim.cli", args, port, "/health")
    daemon.events = daemon.replay = None  # type: ignore[attr-defined]
    if events:
        events_port = free_port()
        args += ["--kv-events-endpoint", f"tcp://*:{events_port}"]
        daemon.events = f"tcp://127.0.0.1:{events_port}"  # type: ignore[attr-defined]
    if replay:
        replay_port = free_port()
        args += ["--kv-events-replay-endpoint", f"tcp://*:{replay_port}"]
        daemon.replay = f"tcp://127.0.0.1:{replay_port}"  # type: ignore[attr-defined]
    return daemon


def router(*args: str) -> Daemon:
    """``fuyao-router`` on a free loopback port (ready when its /health answers: at least one healthy backend)."""
    port = free_port()
    return Daemon("fuyao.inference_router.cli", ["--listen", f"127.0.0.1:{port}", *args], port, "/health")


def kvcache(*extra: str) -> Daemon:
    port = free_port()
    return Daemon("fuyao.kvcache.cli", ["--listen", f"127.0.0.1:{port}", *extra], port, "/healthz")
