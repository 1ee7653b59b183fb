"""docs/architecture.md shows how to add an extender scorer and a routing policy: one new module plus its registration
line. These tests run the documentation's own code (so it cannot rot), each in a fresh interpreter: the new module
is put beside the registered ones, its registration line is executed in the package, and the config file, the
framework and the router then take it like a built-in one."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO

DOC = (REPO / "docs" / "architecture.md").read_text()


def example(title: str) -> tuple[str, str]:
    """The module and the registration line shown under ``### <title>``."""
    section = DOC.split(f"### {title}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, f"expected the module and its registration line under {title!r}"
    return blocks[0], blocks[1].strip()


def run(tmp_path: Path, package: str, module: str, code: str, registration: str, check: str) -> None:
    name = re.search(r"from \.(\w+) import", registration).group(1)  # type: ignore[union-attr]
    (tmp_path / f"{name}.py").write_text(code)
    script = textwrap.dedent(f"""
        import importlib
        package = importlib.import_module({package!r})
        package.__path__.append({str(tmp_path)!r})  # the new module sits beside the registered ones
        exec({registration!r}, package.__dict__)  # its registration line, in the package
    """) + textwrap.dedent(check)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok" in proc.stdout


def test_the_documented_scorer_is_configured_weighted_and_scores(tmp_path: Path) -> None:
    code, registration = example("Worked example: adding a scorer")
    run(tmp_path, "fuyao.scheduler_extender.plugins", "few_pods", code, registration, """
        from fuyao.scheduler_extender.config import build_config
        from fuyao.scheduler_extender.features import NodeTable
        from fuyao.scheduler_extender.framework import Cycle
        from fuyao.scheduler_extender.model import parse_node, parse_pod
        from fuyao.scheduler_extender.service import build_framework
        from tests.support.k8s_objects import node, pod

        config = build_config({"plugins": {"fewPods": {"weight": 1, "saturation": 4}}})
        framework = build_framework(config)
        assert ("few-pods", 1.0) in [(p.name, w) for p, w in framework.plugins], framework.plugins
        assert build_config({}).plugins.few_pods.weight == 0.0  # off unless configured: its args' default
        busy = parse_node(node("busy"), [parse_pod(pod(f"p{i}", node_name="busy", phase="Running",
                                                       requests={"cpu": "100m"})) for i in range(3)])
        idle = parse_node(node("idle"), [])
        view = NodeTable.of([busy, idle], "").view_all()
        scored = framework.score(parse_pod(pod("new", requests={"cpu": "100m"})), view, Cycle())
        part = dict(zip(scored.names, scored.parts["few-pods"].tolist()))
        assert part["idle"] == 1.0 and abs(part["busy"] - 0.25) < 1e-9, part
        print("ok")
    """)


def test_the_documented_policy_is_configured_and_routes(tmp_path: Path) -> None:
    code, registration = example("Worked example: adding a routing policy")
    run(tmp_path, "fuyao.inference_router.policies", "queue_only", code, registration, """
        from fuyao.inference_router.balancing import Candidate, RoundRobin
        from fuyao.inference_router.config import build_config, policy_args
        from fuyao.inference_router.policies import RoutingRequest, decide, make_policy

        config = build_config({"router": {"strategy": "queue-only", "queueOnly": {"scale": 4}}})
        assert config.router.strategy == "queue-only"
        policy = make_policy("queue-only", policy_args(config.router, "queue-only"))
        assert policy.args.scale == 4
        queued, idle = Candidate("http://a", waiting=3), Candidate("http://b", waiting=0)
        decision = decide(policy, [queued, idle], RoutingRequest(), RoundRobin())
        assert decision.url == "http://b" and decision.strategy == "queue-only"
        assert abs(decision.scores["http://a"] - 0.25) < 1e-9, decision.scores
        print("ok")
    """)
