"""fuyao's vLLM KV connector (fuyao.kvcache.connector) without an engine: its scheduler side and worker side driven
step by step as vLLM drives them, on real tensors. The cases run in the cached vLLM venv, where torch and vLLM live
(tests/unit/kv_connector_cases.py, all in one process: vLLM imports once); marker ``vllm`` like the connector's
tests on real engines (tests/vllm/test_kv_connector.py), which hack/test.sh builds the venv for."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support.vllm import REPO, generated_model, vllm_python

pytestmark = pytest.mark.vllm

MARK = "KV-CONNECTOR-CASES "  # kv_connector_cases.MARK (that module imports torch: not importable here)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each case → "" when it passed, else its traceback."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    env.update({"PYTHONPATH": str(REPO), "FUYAO_TINY_MODEL": str(generated_model()), "HF_HUB_OFFLINE": "1",
                "VLLM_NO_USAGE_STATS": "1"})
    done = subprocess.run([vllm_python(), "-m", "tests.unit.kv_connector_cases",
                           str(tmp_path_factory.mktemp("kv-connector"))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    assert lines, f"the connector cases did not run (exit {done.returncode}): {done.stderr[-3000:]}"
    return json.loads(lines[-1][len(MARK):])  # type: ignore[no-any-return]


def check(outcomes: dict[str, str], case: str) -> None:
    assert case in outcomes, f"no case {case} in kv_connector_cases"
    assert not outcomes[case], outcomes[case]


def test_after_a_failed_load_nothing_computed_on_the_bad_block_is_stored(outcomes: dict[str, str]) -> None:
    """A prompt whose block 3 is evicted between the lookup and the load: the blocks the step computes on top of it
    (8 and 9), and those of a request that got block 3 from the engine's prefix cache, are not stored; once vLLM
    rolls them back and recomputes, block 3 and what follows are stored."""
    check(outcomes, "load_error_stores_nothing_computed_on_the_bad_block")


def test_a_request_whose_load_failed_stores_nothing_until_vllm_rolls_it_back(outcomes: dict[str, str]) -> None:
    """With async scheduling the next step runs before vLLM has seen the load error: what it fills is not stored."""
    check(outcomes, "a_spoiled_request_stores_nothing_until_vllm_rolls_it_back")


def test_a_page_that_is_not_contiguous_is_loaded_into_the_cache_not_into_a_copy(outcomes: dict[str, str]) -> None:
    """vLLM's LBNHC layout (the default off CPU): a block stored by one engine is loaded into another's cache, and
    engines with another KV cache layout do not share its files."""
    check(outcomes, "a_non_contiguous_page_is_loaded_into_the_cache")


def test_caches_the_tier_cannot_use_are_refused_when_registered(outcomes: dict[str, str]) -> None:
    check(outcomes, "caches_the_tier_cannot_use_are_refused_at_registration")


def test_a_load_reads_one_block_at_a_time(outcomes: dict[str, str]) -> None:
    check(outcomes, "loads_read_one_block_at_a_time")


def test_the_copies_waiting_for_the_volume_are_capped_in_bytes(outcomes: dict[str, str]) -> None:
    """``write_queue_mb`` (default 256): a store over it is dropped and counted, not copied."""
    check(outcomes, "the_write_queue_holds_at_most_write_queue_mb")


def test_the_namespace_covers_what_changes_the_kv(outcomes: dict[str, str]) -> None:
    """Revision, quantization, hf_overrides, other weights... and the KV cache's layers (from the KV cache config,
    which the scheduler and the worker both have) and layout; not what changes no KV value (max_model_len)."""
    check(outcomes, "the_namespace_covers_what_changes_the_kv")


def test_the_connector_refuses_to_start_unless_load_failures_are_recomputed(outcomes: dict[str, str]) -> None:
    check(outcomes, "the_fail_policy_is_refused_at_start")


def test_a_growing_request_reads_its_tokens_once_not_at_every_block(outcomes: dict[str, str]) -> None:
    check(outcomes, "a_growing_request_reads_each_token_a_bounded_number_of_times")


def test_the_tier_is_a_best_effort_disk_cache_to_vllm(outcomes: dict[str, str]) -> None:
    """``requires_kv_delivery`` False (vLLM's default for kv_both is True), and hits labelled ``disk`` in
    ``vllm:prompt_tokens_cached_by_source`` (not ``external_unspecified``)."""
    check(outcomes, "the_tier_is_a_best_effort_disk_cache_to_vllm")


def test_context_parallelism_keeps_the_connector_off(outcomes: dict[str, str]) -> None:
    """vLLM 0.32's prefill and decode context parallel sizes, like TP and PP: nothing looked up, loaded or stored."""
    check(outcomes, "context_parallelism_keeps_the_connector_off")


def test_the_namespace_names_the_attention_kernel_vllm_picks(outcomes: dict[str, str]) -> None:
    """The CPU attention ISA from vLLM's own ``_get_attn_isa`` (dtype, block size, head size), not the CPU flags."""
    check(outcomes, "the_namespace_names_the_kernel_vllm_picks")
