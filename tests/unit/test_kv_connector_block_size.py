"""The chart's ``kvCache.blockSize`` (ai-inference-optimization): it must equal the engines' ``--block-size`` (the
index, the router and the tier manager's publication all key blocks by it), so its default is one the engines the
chart fronts run with, and its schema refuses sizes no engine takes. Checked with the committed values.schema.json
(what Helm checks on lint, template and install), without helm."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.charts import CHARTS

CHART = CHARTS / "ai-inference-optimization"
CPU_KERNEL_MULTIPLE = 32
"""vLLM 0.32's CPU attention backend: ``get_supported_kernel_block_sizes`` is ``[MultipleOf(32)]``
(v1/attention/backends/cpu_attn.py; "No common block size for 16" when started with 16: vllm-cpu-observed.md)."""
ASCEND_BLOCK_SIZE = 128
"""vLLM-Ascend's ``NPUPlatform.check_and_update_config``: 128 unless given (and with prefix caching)."""


def values(**kv_cache: Any) -> dict[str, Any]:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    defaults["kvCache"].update(kv_cache)
    return defaults  # type: ignore[no-any-return]


def errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return ["/".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(document)]


def test_the_default_block_size_is_one_the_charts_engines_run_with() -> None:
    block_size = values()["kvCache"]["blockSize"]
    assert block_size % CPU_KERNEL_MULTIPLE == 0, f"vLLM on CPU refuses --block-size {block_size}"
    assert block_size == ASCEND_BLOCK_SIZE, f"vLLM-Ascend runs {ASCEND_BLOCK_SIZE}-token blocks, not {block_size}"
    assert errors(values()) == []


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
def test_block_sizes_an_engine_takes_are_accepted(size: int) -> None:
    """16 is the engine simulator's default (and vLLM's on GPU); vLLM on CPU takes multiples of 32."""
    assert errors(values(blockSize=size)) == []


@pytest.mark.parametrize("size", [0, 1, 8, 10, 24, 100, 8192, "128"])
def test_block_sizes_no_engine_takes_are_refused_naming_the_key(size: object) -> None:
    found = errors(values(blockSize=size))
    assert found and all(e.startswith("kvCache/blockSize") for e in found), found
