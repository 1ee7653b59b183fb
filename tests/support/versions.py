"""The pinned versions of ``hack/cluster/versions.env`` (what ``hack/lib/versions.sh`` gives the shell scripts):
an environment variable of the same name wins, as there."""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

VERSIONS_ENV = Path(__file__).resolve().parents[2] / "hack" / "cluster" / "versions.env"


def pinned_versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in VERSIONS_ENV.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key[:1].isupper() and key.replace("_", "").isalnum():
            found[key] = os.environ.get(key) or value.strip()
    return found


def pinned_version(name: str) -> str:
    value = pinned_versions().get(name) or os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set in hack/cluster/versions.env")
    return value


@cache
def cached_venv_python(script: str, timeout: float = 3600) -> str:
    """The python of a cached venv that ``hack/<script>`` builds on first use and prints on its last line
    (``build-vllm.sh``, ``build-ray.sh``)."""
    done = subprocess.run(["bash", str(VERSIONS_ENV.parents[1] / script)], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"hack/{script} failed: {done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]
