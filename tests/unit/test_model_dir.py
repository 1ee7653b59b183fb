"""fuyao.engine_sim.model_dir: the tiny model directory a real vLLM serves in the tests is the same on every run, and
its parts agree (the config's vocabulary is the tokenizer's; BOS is prepended; the chat template renders roles)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from fuyao.engine_sim import model_dir


def test_the_model_directory_is_reproducible_and_consistent(tmp_path: Path) -> None:
    first, second = model_dir.write(tmp_path / "a"), model_dir.write(tmp_path / "b")
    for name in model_dir.files():
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    config = json.loads((first / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(first / "tokenizer.json"))
    assert config["vocab_size"] == tokenizer.get_vocab_size() == model_dir.VOCAB_SIZE
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64  # vLLM CPU's minimum
    ids = tokenizer.encode("Context: floods and levees").ids
    assert ids[0] == tokenizer.token_to_id("<s>") == config["bos_token_id"] and len(ids) < 12  # merges learned
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Context: floods and levees"
    assert tokenizer.token_to_id("<|assistant|>") is not None
    template = json.loads((first / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|{{ message['role'] }}|>" in template and "add_generation_prompt" in template


def test_writing_again_leaves_identical_files_untouched(tmp_path: Path) -> None:
    path = model_dir.write(tmp_path / "m")
    stamp = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    model_dir.write(path)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == stamp
