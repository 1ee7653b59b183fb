"""``fuyao.contracts`` is the one home of every Kubernetes key fuyao reads or writes: a key spelled anywhere else in
the product's code (the kernel, every component) fails here, with the file and line. Documentation (docstrings and
attribute docstrings) may name keys; code, help texts and messages take them from the contracts."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

VENDOR = re.compile(r"(?:^|[^\w.-])(?:[a-z0-9-]+\.)*(?:openfuyao\.com/|volcano\.sh/|koordinator\.sh/|npu\.huawei\.com/|"
                    r"nvidia\.com/|llm-d\.ai/|business\.workload/)|kubernetes\.io/batch-")
"""fuyao's own domains and the vendors' whose keys fuyao shares, anywhere in a string."""
WELL_KNOWN = re.compile(r"^(?:[a-z0-9-]+\.)+[a-z]{2,}/[A-Za-z0-9][A-Za-z0-9._-]*$")
"""A string that is a whole ``prefix/name`` key (``topology.kubernetes.io/zone``)."""
API_VERSION = re.compile(r"/v\d+((alpha|beta)\d+)?$")
"""``rbac.authorization.k8s.io/v1`` and the like are API versions, not keys."""


def product_sources() -> list[Path]:
    """The kernel and the components (the ``fuyao`` namespace and the folders its symlinks lead to), without the
    contracts and the generated protobuf stubs."""
    homes = [REPO / "fuyao", *(p.resolve() for p in (REPO / "fuyao").iterdir() if p.is_symlink())]
    return [path for home in homes for path in sorted(home.rglob("*.py"))
            if "contracts" not in path.relative_to(REPO).parts and not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def key_literals(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every string constant in ``source`` that spells a key, outside documentation."""
    tree = ast.parse(source)
    documentation = {id(node.value) for node in ast.walk(tree)
                     if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in documentation:
            continue
        text = node.value
        if VENDOR.search(text) or (WELL_KNOWN.match(text) and not API_VERSION.search(text)):
            found.append((node.lineno, node.col_offset, text))
    return [(line, text) for line, _, text in sorted(found)]


def test_no_component_spells_a_key() -> None:
    offenders = [f"{path.relative_to(REPO)}:{line}: {text!r}" for path in product_sources()
                 for line, text in key_literals(path.read_text())]
    assert not offenders, "keys belong in fuyao/contracts/ (import the constant):\n" + "\n".join(offenders)


def test_the_scan_sees_every_component() -> None:
    parts = {path.relative_to(REPO).parts[0] for path in product_sources()}
    assert {"fuyao", "deviceplugin", "scheduler_extender", "vnpu", "qos", "inference_router", "kvcache",
            "engine_sim", "npu_operator", "ray_serve"} <= parts


def test_the_detector_finds_what_it_must_and_spares_documentation() -> None:
    source = '''
"""Module docs name npu.openfuyao.com/topology freely."""
X = "inference.openfuyao.com/pd-group"
"""Attribute docs too: volcano.sh/qos."""
def f():
    """And function docs: koordinator.sh/qosClass."""
    a = {"topology.kubernetes.io/zone": 1}
    b = f"held without npu.openfuyao.com/assigned: {a}"
    c = "rbac.authorization.k8s.io/v1"
    d = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    e = "npu.huawei.com/"
    g = "kubernetes.io/batch-cpu"
'''
    found = [text for _, text in key_literals(source)]
    assert found == ["inference.openfuyao.com/pd-group", "topology.kubernetes.io/zone",
                     "held without npu.openfuyao.com/assigned: ", "npu.huawei.com/", "kubernetes.io/batch-cpu"]
