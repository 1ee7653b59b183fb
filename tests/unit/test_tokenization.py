"""fuyao.tokenization: the builtin tokenizer behind the shared interface is fuyao.tokenizer; a model's HF tokenizer
encodes as HF tokenizers does and renders its chat template as transformers does (sandboxed Jinja, trim_blocks,
text parts joined with newlines as vLLM prepares them); bad settings and refused chats are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from fuyao import tokenization, tokenizer
from fuyao.config_files import check_tokenizer_path
from fuyao.engine_sim import model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_dir.write(tmp_path_factory.mktemp("model"))


def test_the_builtin_tokenizer_is_fuyaos() -> None:
    builtin = tokenization.load(None)
    messages = [{"role": "user", "content": "Hi there"}]
    assert builtin.encode("Hello world", True) == tokenizer.encode("Hello world", True)
    assert tokenization.chat_ids(builtin, messages) == tokenizer.encode(tokenizer.render_chat(messages))
    assert builtin.output_ids() == tokenizer.OUTPUT_IDS and tokenization.load("builtin").name == "builtin"


def test_a_models_tokenizer_encodes_as_hf_tokenizers_and_renders_its_template(model: Path) -> None:
    hf = tokenization.load(str(model))
    raw = Tokenizer.from_file(str(model / "tokenizer.json"))
    assert hf.encode("Context: floods", True) == raw.encode("Context: floods").ids
    assert hf.encode("Context: floods", False) == raw.encode("Context: floods", add_special_tokens=False).ids
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "image_url"},
                                             {"type": "text", "text": "two"}]}]
    assert hf.render_chat(messages) == "<|system|>\nBe brief.\n<|user|>\none\ntwo\n<|assistant|>\n"
    assert hf.render_chat(messages, add_generation_prompt=False).endswith("two\n")
    ids = tokenization.chat_ids(hf, messages)
    assert ids[0] != raw.token_to_id("<s>") and ids == raw.encode(hf.render_chat(messages),
                                                                  add_special_tokens=False).ids
    assert hf.vocab_size == model_dir.VOCAB_SIZE
    outputs = hf.output_ids()
    assert len(set(outputs)) == len(outputs) >= 50 and all(hf.decode([i]).strip() for i in outputs)
    with pytest.raises(tokenizer.ChatFormatError, match="role must be a string"):
        hf.render_chat([{"role": ["x"], "content": "y"}])
    for chat in (hf, tokenization.load(None)):  # a message that is not an object (found by the fuzzer)
        with pytest.raises(tokenizer.ChatFormatError, match=r"messages\[1\] must be an object"):
            chat.render_chat([{"role": "user", "content": "y"}, None])  # type: ignore[list-item]


def test_a_template_that_raises_is_a_chat_format_error(tmp_path: Path, model: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((model / "tokenizer.json").read_bytes())
    template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
                "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    hf = tokenization.load(str(tmp_path))
    assert hf.render_chat([{"role": "user", "content": "é"}]) == '"é"'  # tojson without ASCII escapes
    with pytest.raises(tokenizer.ChatFormatError, match="no tools here"):
        hf.render_chat([{"role": "tool", "content": "x"}])


def test_bad_tokenizer_settings_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        check_tokenizer_path(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert check_tokenizer_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(tokenization.TokenizerError, match="cannot load the tokenizer"):
        tokenization.load(str(tmp_path))
    assert check_tokenizer_path("builtin") == "builtin" and check_tokenizer_path(None) is None
    assert check_tokenizer_path("engine") == "engine"
    with pytest.raises(tokenization.TokenizerError, match="names no local tokenizer"):
        tokenization.load("engine")
