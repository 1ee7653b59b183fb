"""Runs ``fuyao-device-plugin`` as a real process against the fake npu-smi and a kubelet stand-in.

Used by the component tests and by ``bench/deviceplugin_bench.py``. Everything lives in a short temp directory
(unix socket paths are limited to 107 bytes): the fake node's state, a dev root with ``davinciN`` nodes, the
device-plugin directory with the stand-in's ``kubelet.sock``, and the plugin's JSON log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fuyao.contracts import RESOURCE_NPU

from .kubelet import KubeletStandIn

REPO = Path(__file__).resolve().parents[2]
FAKE_NPU_SMI = REPO / "hack" / "fake-npu-smi"
FAKE_HCCN_TOOL = REPO / "hack" / "fake-hccn-tool"


class PluginUnderTest:
    def __init__(self, preset: str = "910b4-8", *, health_interval: str = "0.5s", extra_args: tuple[str, ...] = (),
                 start_kubelet: bool = True):
        self.root = Path(tempfile.mkdtemp(prefix="fdp", dir="/tmp"))
        self.preset = preset
        self.state = self.root / "npu.json"
        self.dev_root = self.root / "dev"
        # the simulated driver makes (and removes) vdavinci<id> under the dev root with each vNPU, as the real one
        # the fake npu-smi's "#!/usr/bin/env python3" finds this interpreter first (not a pyenv shim: a bash
        # script around every call); every health poll, reconcile and vNPU change starts one
        self.env = {**os.environ, "FAKE_NPU_SMI_STATE": str(self.state), "FAKE_NPU_SMI_DEV": str(self.dev_root),
                    "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.plugin_dir = self.root / "dp"
        self.log_path = self.root / "plugin.log"
        self.health_interval = health_interval
        self.extra_args = extra_args
        self.pod_resources = self.root / "pr" / "kubelet.sock"
        self.ledger = self.root / "vnpu-ledger.json"
        self.isolation = self.root / "npu-isolated.json"
        self.kubelet = KubeletStandIn(str(self.plugin_dir), str(self.pod_resources))
        self.start_kubelet = start_kubelet
        self.proc: subprocess.Popen[bytes] | None = None
        self.fake("fake", "init", "--preset", preset)
        self.dev_root.mkdir()
        for name in ("davinci_manager", "devmm_svm", "hisi_hdc"):
            (self.dev_root / name).touch()
        for phy in range(16):
            (self.dev_root / f"davinci{phy}").touch()
        self.plugin_dir.mkdir()

    # The simulated node ----------------------------------------------------------------------------------------------
    def fake(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, str(FAKE_NPU_SMI), *args], env=self.env, capture_output=True,
                              text=True, timeout=30)
        if proc.returncode != 0:
            raise AssertionError(f"fake npu-smi {args}: {proc.stdout}{proc.stderr}")
        return proc.stdout

    # The plugin process ----------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [sys.executable, "-m", "fuyao.deviceplugin.cli", "--npu-smi", str(FAKE_NPU_SMI),
                "--device-plugin-dir", str(self.plugin_dir), "--dev-root", str(self.dev_root),
                "--node-name", "node-a", "--health-interval", self.health_interval,
                "--metrics-address", "127.0.0.1:0", "--npu-smi-timeout", "2s", "--vnpu-ledger", str(self.ledger),
                "--pod-resources-socket", str(self.pod_resources), "--isolation-state", str(self.isolation),
                "--hccn-tool", str(FAKE_HCCN_TOOL), *self.extra_args]

    def start(self) -> PluginUnderTest:
        if self.start_kubelet:
            self.kubelet.start()
        env = {k: v for k, v in self.env.items() if k not in ("KUBERNETES_SERVICE_HOST", "NODE_NAME")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=log, cwd=REPO,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 30.0) -> list:  # type: ignore[type-arg]
        self.kubelet.wait_registered(RESOURCE_NPU, timeout=timeout)
        return self.kubelet.wait_devices(RESOURCE_NPU, timeout=timeout)

    def logs(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"msg": line, "level": "raw"})
        return out

    def wait_log(self, fragment: str, timeout: float = 15.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.logs():
                if fragment in str(entry.get("msg", "")):
                    return entry
            self.assert_running()
            time.sleep(0.05)
        raise AssertionError(f"no log line containing {fragment!r}; log:\n{self.log_path.read_text()[-3000:]}")

    def metrics_url(self) -> str:
        entry = self.wait_log("metrics on http://")
        return str(entry["msg"]).split(" ", 2)[2]

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url(), timeout=5) as response:
            return response.read().decode()

    def assert_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"plugin exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")

    def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds to exit)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # fuyao.daemon: every thread's stack to stderr, our log
            time.sleep(1.0)
            raise AssertionError(f"the plugin did not exit within {timeout}s of SIGTERM; its log, ending with its "
                                 f"threads' stacks:\n{self.log_path.read_text(errors='replace')[-6000:]}") from None
        return code, time.monotonic() - started

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.kubelet.stop()
        shutil.rmtree(self.root, ignore_errors=True)
