"""A local Ray on this host for the Ray Serve tests and the Ray benchmark: ``ray start --head`` from the venv
``hack/build-ray.sh`` makes (``ray[serve]`` and fuyao's dependencies), with ``--resources '{"NPU": N}'`` standing
for a node's NPUs, and fuyao importable by every Ray worker (``PYTHONPATH`` = the checkout). Serve applications are
deployed into it by a driver process (``serve.run``), and stay after the driver exits, as on a long-running
cluster; ``stop()`` ends the whole Ray instance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .apiserver import free_port
from .versions import cached_venv_python

REPO = Path(__file__).resolve().parents[2]


def ray_python() -> str:
    """The Ray venv's python (built once by hack/build-ray.sh, then cached)."""
    return cached_venv_python("build-ray.sh", timeout=1800)


DEPLOY = """
import json, sys
import ray
from ray import serve
ray.init(address="auto", logging_level="WARNING")
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
from fuyao.ray_serve.app import build
serve.run(build(json.loads(sys.argv[1])), name=sys.argv[3], route_prefix="/")
print("deployed", flush=True)
"""


class LocalRay:
    def __init__(self, npus: int = 2, cpus: int = 2):
        self.python = ray_python()
        self.bin = str(Path(self.python).parent)
        self.npus, self.cpus = npus, cpus
        # short: Ray's socket paths live under it and must stay below the kernel's 107-byte limit
        self.temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.gcs_port = free_port()
        self.http_port = free_port()
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}
        self.env.pop("VIRTUAL_ENV", None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> LocalRay:
        done = subprocess.run(
            [f"{self.bin}/ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
             f"--num-cpus={self.cpus}", f"--resources={json.dumps({'NPU': self.npus})}",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={self.temp}",
             "--object-store-memory=100000000"],
            capture_output=True, text=True, timeout=180, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed: {done.stdout[-2000:]}{done.stderr[-3000:]}")
        self.env["RAY_ADDRESS"] = self.address
        return self

    def deploy(self, args: dict[str, Any], name: str = "llm", timeout: float = 300) -> None:
        """``serve.run(fuyao.ray_serve.app.build(args))`` (waits until the replicas are up)."""
        done = subprocess.run([self.python, "-c", DEPLOY, json.dumps(args), str(self.http_port), name],
                              capture_output=True, text=True, timeout=timeout, env=self.env)
        if done.returncode != 0 or "deployed" not in done.stdout:
            raise RuntimeError(f"serve.run failed: {done.stdout[-2000:]}{done.stderr[-4000:]}\n"
                               f"{self.logs()[-4000:]}")

    def run(self, code: str, timeout: float = 120) -> str:
        """A driver script in the Ray venv connected to this Ray; its stdout."""
        done = subprocess.run([self.python, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"driver failed: {done.stderr[-4000:]}")
        return done.stdout

    def logs(self) -> str:
        """The Serve and worker logs (replica errors land there)."""
        out = []
        for path in sorted(Path(self.temp).glob("session_latest/logs/serve/*.log")):
            out.append(f"== {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Stop the cluster and remove its directory (kept with ``FUYAO_KEEP_RAY_LOGS=1``, to read a failure's
        Serve, worker and engine logs under ``<temp>/session_latest/logs``)."""
        subprocess.run([f"{self.bin}/ray", "stop", "--force"], capture_output=True, timeout=120, env=self.env)
        if not os.environ.get("FUYAO_KEEP_RAY_LOGS"):
            shutil.rmtree(self.temp, ignore_errors=True)
