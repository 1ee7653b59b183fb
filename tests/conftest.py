"""Shared fixtures: the sample directory and a fake npu-smi with its own state file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "samples"
FAKE = REPO / "hack" / "fake-npu-smi"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster", choices=("local", "kind"), default="local",
                     help="the cluster the chart end-to-end tests run on: the Docker-free local cluster (default) or "
                          "a kind cluster with fuyao's node image (Docker: DOCKER_HOST, e.g. hack/lib/docker.sh's "
                          "own dockerd); with kind, only the tests marked kind run")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--cluster") != "kind":
        return
    skip = pytest.mark.skip(reason="runs on the local cluster only (not marked kind)")
    for item in items:
        if "kind" not in item.keywords:
            item.add_marker(skip)


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


class FakeNode:
    """A fake npu-smi bound to a temp state file; ``run`` calls it like the real tool."""

    def __init__(self, state: Path):
        self.state = state
        self.path = str(FAKE)

    def env(self) -> dict[str, str]:
        return {**os.environ, "FAKE_NPU_SMI_STATE": str(self.state)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, self.path, *args], env=self.env(), capture_output=True, text=True,
                              timeout=30)
        if check and proc.returncode != 0:
            raise AssertionError(f"fake npu-smi {args} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def init(self, preset: str) -> FakeNode:
        self.run("fake", "init", "--preset", preset)
        return self


@pytest.fixture
def fake_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: ``fake_node("910b4-8")`` → a FakeNode whose state is also exported for in-process clients."""

    def make(preset: str = "910b4-8") -> FakeNode:
        state = tmp_path / f"{preset}.json"
        monkeypatch.setenv("FAKE_NPU_SMI_STATE", str(state))
        return FakeNode(state).init(preset)

    return make
