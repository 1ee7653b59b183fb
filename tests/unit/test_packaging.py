"""The distribution: the kernel imports no component, `pip install .` gives every console script, each --help
works, components not built yet say so and exit 2, built ones reject a bad config with exit 2."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

COMPONENTS = {"deviceplugin", "scheduler_extender", "vnpu", "qos", "inference_router", "kvcache", "engine_sim"}
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
NAMESPACE = {p.name: p for p in (REPO / "fuyao").iterdir() if p.is_symlink()}
"""The components installed under ``fuyao.``: each a symlink ``fuyao/<name>`` to its folder at the repo's top."""


def _absolute_imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module or "")
    return names


def test_every_component_folder_is_in_the_namespace() -> None:
    assert set(NAMESPACE) >= COMPONENTS | {"npu_sim", "npu_operator", "kubeletapi", "ray_serve"}
    for name, link in NAMESPACE.items():
        assert link.resolve() == REPO / name and (REPO / name / "__init__.py").is_file(), name


def test_kernel_imports_no_component() -> None:
    for path in (REPO / "fuyao").rglob("*.py"):  # rglob does not follow the component symlinks: the kernel only
        for name in _absolute_imports(path):
            parts = name.split(".")
            assert not (parts[0] == "fuyao" and len(parts) > 1 and parts[1] in NAMESPACE), f"{path} imports {name}"


def test_nothing_imports_a_component_outside_the_namespace() -> None:
    """``import deviceplugin`` works from a checkout's root and would load a second copy of the module beside
    ``fuyao.deviceplugin`` (two registries, two metric sets): every import goes through ``fuyao.``."""
    roots = [*(REPO / name for name in NAMESPACE), REPO / "fuyao", REPO / "tests", REPO / "bench", REPO / "hack"]
    for root in roots:
        for path in root.rglob("*.py"):
            for name in _absolute_imports(path):
                assert name.split(".")[0] not in NAMESPACE, f"{path.relative_to(REPO)} imports {name}"


def test_every_component_has_a_script() -> None:
    targets = {v.split(":")[0].split(".")[1] for v in SCRIPTS.values() if v.startswith("fuyao.")}
    assert targets >= COMPONENTS
    assert all(v.startswith("fuyao.") for v in SCRIPTS.values())


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("prefix")
    before = importlib.metadata.distribution("fuyao").files
    # --ignore-installed: without it pip uninstalls the developer's (editable) fuyao from the running venv.
    # Build from a copy: setuptools writes build/ and *.egg-info into the source tree, and two test runs at once
    # (or a developer's editable install) must not trip over each other.
    source = tmp_path_factory.mktemp("src") / "fuyao"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache",
        ".hypothesis"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--ignore-installed", "--prefix", str(prefix), str(source)],
                          cwd=tmp_path_factory.mktemp("cwd"), timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    assert importlib.metadata.distribution("fuyao").files == before, "the test venv's fuyao was changed"
    return prefix


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_installed_script_help(installed: Path, script: str) -> None:
    exe = installed / "bin" / script
    assert exe.exists(), f"{script} not installed"
    site = next(installed.glob("lib/python3*/site-packages"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, timeout=60,
                          cwd=installed)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in (proc.stdout + proc.stderr).lower()
    target_pkg = SCRIPTS[script].split(":")[0].split(".")[1]
    if target_pkg in COMPONENTS and "component_placeholder" in (REPO / target_pkg / "cli.py").read_text():
        run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60, cwd=installed)
        assert run.returncode == 2 and "not implemented yet" in run.stderr
    elif target_pkg in COMPONENTS:  # a built daemon: a bad config file is a clear exit 2, not a traceback
        run = subprocess.run([str(exe), "--config", str(installed / "missing.yaml")], capture_output=True, text=True,
                             env=env, timeout=60, cwd=installed)
        assert run.returncode == 2 and "missing.yaml" in run.stderr and "Traceback" not in run.stderr
    if script == "fuyao-fake-npu-smi":
        proc = subprocess.run([str(exe), "info"], capture_output=True, text=True, env=env, timeout=60,
                              cwd=installed)
        assert "910B4" in proc.stdout  # presets ship as package data


def test_hack_bench_runs_every_benchmark_by_name() -> None:
    """``hack/bench.sh NAME`` is the one-liner for each benchmark: every name it lists resolves to a script in
    ``bench/`` that answers --help, every benchmark script in ``bench/`` has a name, and an unknown name is refused."""
    script = REPO / "hack" / "bench.sh"
    names = next(line.split("=", 1)[1].strip('"').split() for line in script.read_text().splitlines()
                 if line.startswith("NAMES="))
    scripts = {p.name for p in (REPO / "bench").glob("*.py")} - {"report.py", "plots.py", "volcano_load.py",
                                                                  "__init__.py"}
    named = set()
    for name in names:
        path = {"qos-wakeup-probe": "qos_wakeup_probe.py", "extender-scale": "extender_scale.py"}.get(
            name, f"{name.replace('-', '_')}_bench.py")
        assert (REPO / "bench" / path).is_file(), name
        named.add(path)
    assert scripts == named  # a new benchmark gets its name in hack/bench.sh
    unknown = subprocess.run(["bash", str(script), "no-such-bench"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown benchmark 'no-such-bench'" in unknown.stderr
    listed = subprocess.run(["bash", str(script), "--list"], capture_output=True, text=True)
    assert listed.returncode == 0 and "colocation" in listed.stdout
    helped = subprocess.run(["bash", str(script), "kvcache", "--help"], capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "usage:" in helped.stdout
