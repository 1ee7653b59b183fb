"""Tokenizers the router, the KV index and the engine simulator share, so the token ids they compute for a request are
the ones the engine caches and reports in its KV events:

- :class:`BuiltinTokenizer` — ``fuyao.tokenizer``, the simulator's own deterministic tokenizer (the default);
- :class:`HfTokenizer` — the served model's own: its ``tokenizer.json`` through HF ``tokenizers``, and its chat
  template (``tokenizer_config.json``) rendered as ``transformers``' ``apply_chat_template`` renders it (a sandboxed
  Jinja environment with ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``,
  its ``tojson``, the special tokens as variables) on messages prepared as vLLM prepares them for a template that
  takes string content (text parts joined with a newline).

``load(spec)``: ``None`` or ``"builtin"`` → the builtin one; a model directory or a ``tokenizer.json`` → HF. (The
router's default, ``"engine"``, is no local tokenizer: it asks the engines, see ``fuyao.inference_router.prompts``.)
Completions add the tokenizer's special tokens (BOS) by default, chat requests do not (vLLM's defaults).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from . import tokenizer as builtin


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, or a chat the template refuses; the message says which and why."""


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str: ...

    def output_ids(self) -> Sequence[int]: ...


def chat_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
             add_special_tokens: bool = False) -> list[int]:
    """A chat request's prompt ids as vLLM computes them: the template's text, special tokens only when asked."""
    return tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt), add_special_tokens)


class BuiltinTokenizer:
    name = "builtin"
    vocab_size = builtin.VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return builtin.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return builtin.decode(ids)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        return builtin.render_chat(messages, add_generation_prompt)

    def output_ids(self) -> Sequence[int]:
        return builtin.OUTPUT_IDS


class HfTokenizer:
    """A model's ``tokenizer.json`` (+ ``tokenizer_config.json`` beside it for the chat template and special tokens).
    ``path``: the model directory or the ``tokenizer.json`` itself."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as Rust

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        try:
            self._tok = Rust.from_file(str(file))
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise TokenizerError(f"cannot load the tokenizer {file}: {exc}") from None
        config_file = file.parent / "tokenizer_config.json"
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.exists() else {}
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot read {config_file}: {exc}") from None
        self.name = str(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        """Every token's text (added tokens included) and id."""
        return self._tok.get_vocab(with_added_tokens=True)

    def _special(self, key: str) -> str | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # AddedToken serialised: {"content": "<s>", ...}
            value = value.get("content")
        return value if isinstance(value, str) else None

    @cached_property
    def _template(self) -> Any:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        source = self.config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            raise TokenizerError(f"{self.name}: no chat_template in tokenizer_config.json")

        class Generation(jinja2.ext.Extension):
            """``{% generation %}…{% endgeneration %}`` renders its body (transformers tracks its span)."""

            tags = {"generation"}

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller: Any) -> str:
                return str(caller())

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(source)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"{self.name}: the chat template does not compile: {exc}") from None

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        import jinja2

        builtin.check_chat(messages)
        prepared = [{**m, "content": _text(m.get("content"))} for m in messages]
        specials = {k: v for k in ("bos_token", "eos_token", "unk_token", "pad_token") if (v := self._special(k))}
        try:
            rendered: str = self._template.render(messages=prepared, tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **specials)
            return rendered
        except jinja2.TemplateError as exc:
            raise builtin.ChatFormatError(f"the chat template refused the messages: {exc}") from None

    def output_ids(self) -> Sequence[int]:
        return self._outputs

    @cached_property
    def _outputs(self) -> tuple[int, ...]:
        """Ids the simulator samples from: ordinary word pieces of the vocabulary (a fixed, seeded choice)."""
        special = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        words = sorted(i for t, i in self._tok.get_vocab().items()
                       if t not in special and t.startswith("Ġ") and t[1:].isalpha())
        pool = words or sorted(i for t, i in self._tok.get_vocab().items() if t not in special)
        return tuple(random.Random(20261205).sample(pool, min(512, len(pool))))


def _text(content: Any) -> str | None:
    """Message content as vLLM hands it to a template that takes strings: text parts joined with newlines."""
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, Mapping) and "text" in part)
    return content if content is None or isinstance(content, str) else str(content)


def load(spec: str | None) -> Tokenizer:
    """``None``/``"builtin"``: fuyao's own; anything else: a model directory or ``tokenizer.json`` (HF)."""
    if spec in (None, "", "builtin"):
        return BuiltinTokenizer()
    if spec == "engine":
        raise TokenizerError("'engine' names no local tokenizer: only the router asks the engines' /tokenize")
    return HfTokenizer(spec)
