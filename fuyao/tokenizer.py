"""The deterministic tokenizer every fuyao component shares (engine simulator, router, KV-cache index), so that the
token ids a router computes for a prompt are the ones the engine caches and reports in its KV events.

Not a real model's tokenizer — we run no models — but with the properties routing depends on: deterministic
across processes and machines, prefix-stable (a text's tokens start with its prefix's tokens when the prefix ends
at a piece boundary), about 4 characters per token on English text.

Rules (documented contract):

- Text is split into pieces by :data:`PIECE`: a run of letters with one optional leading space, one digit with an
  optional leading space, one other non-space character with an optional leading space, or a run of whitespace.
- A piece's id is ``FIRST_ID + xxh32(piece as UTF-8, seed 0) mod (VOCAB_SIZE - FIRST_ID)``.
- Ids below ``FIRST_ID`` are special: ``BOS_ID`` 1, ``EOS_ID`` 2 (``add_special_tokens`` prepends BOS).
- Chat messages render as ``<|role|>\\n{content}\\n`` each, then ``<|assistant|>\\n`` when a generation prompt is
  added (vLLM's default), and that text is tokenized.
- Decoding joins the pieces of ids this process has seen (tokenized or generated); others render as ``<id>``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import xxhash

VOCAB_SIZE = 32000
MAX_TOKEN_ID = 2**32 - 1
"""The largest id any tokenizer's vocabulary can have here (ids are unsigned 32-bit): what a router that does not
know the served model's vocabulary can still check."""
FIRST_ID = 256
BOS_ID, EOS_ID = 1, 2
PIECE = re.compile(r" ?[^\W\d_]+| ?\d| ?[^\s\w]| ?_|\s+(?!\S)|\s+")
"""Letters, digits, other characters, whitespace — GPT-2's pre-tokenizer shape."""

_pieces: dict[int, str] = {}


@lru_cache(maxsize=200_000)
def piece_id(piece: str) -> int:
    token = FIRST_ID + xxhash.xxh32_intdigest(piece.encode("utf-8")) % (VOCAB_SIZE - FIRST_ID)
    _pieces.setdefault(token, piece)
    return token


def encode(text: str, add_special_tokens: bool = False) -> list[int]:
    ids = [piece_id(p) for p in PIECE.findall(text)]
    return [BOS_ID, *ids] if add_special_tokens else ids


def decode(ids: Iterable[int]) -> str:
    return "".join(_pieces.get(i, "" if i in (BOS_ID, EOS_ID) else f"<{i}>") for i in ids)


class TokenIdError(ValueError):
    """A prompt given as token ids holds a value that is not a token id; the message names it."""


class ChatFormatError(ValueError):
    """A chat message that the template cannot render (a role or content of the wrong type); the message names
    the message and the field."""


def check_token_ids(ids: Sequence[object], vocab_size: int = MAX_TOKEN_ID + 1) -> None:
    """Every element of ``ids`` is an integer token id below ``vocab_size``, else :class:`TokenIdError` with vLLM's
    wording ("Token id N is out of vocabulary")."""
    checked: list[int] = []
    for token in ids:
        if type(token) is not int:
            raise TokenIdError(f"token ids must be integers, got {type(token).__name__}")
        checked.append(token)
    if checked:
        low, high = min(checked), max(checked)
        if low < 0:
            raise TokenIdError(f"Token id {low} is out of vocabulary")
        if high >= vocab_size:
            raise TokenIdError(f"Token id {high} is out of vocabulary")


def _message(number: int, message: Mapping[str, object]) -> tuple[str, str]:
    """A chat message's role and text, or :class:`ChatFormatError` naming what is off (as the OpenAI schema has it:
    the role a string; the content a string, null, or a list of part objects whose ``text`` is a string)."""
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"messages[{number}] must be an object, got {type(message).__name__}")
    role = message.get("role", "user")
    if not isinstance(role, str):
        raise ChatFormatError(f"messages[{number}].role must be a string, got {type(role).__name__}")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return role, content or ""
    if not isinstance(content, list):
        raise ChatFormatError(f"messages[{number}].content must be a string, an array of parts or null, got "
                              f"{type(content).__name__}")
    texts = []
    for part in content:
        if not isinstance(part, Mapping):
            raise ChatFormatError(f"messages[{number}].content: each part must be an object")
        text = part.get("text", "")
        if not isinstance(text, str):
            raise ChatFormatError(f"messages[{number}].content: a part's text must be a string")
        texts.append(text)
    return role, "".join(texts)


def check_chat(messages: object) -> None:
    """``messages`` is a non-empty array of chat messages the template can render, else :class:`ChatFormatError`."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty array of message objects")
    for number, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"messages[{number}] must be an object")
        _message(number, message)


def render_chat(messages: Sequence[Mapping[str, object]], add_generation_prompt: bool = True) -> str:
    """The chat template: each message as ``<|role|>\\n{content}\\n``; content given as a list of parts keeps the
    text parts. A message the template cannot render is a :class:`ChatFormatError`."""
    out = [f"<|{role}|>\n{text}\n" for role, text in (_message(n, m) for n, m in enumerate(messages))]
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


def _output_words(count: int = 512, seed: int = 20261130) -> list[str]:
    """A fixed vocabulary of pronounceable words the engine simulator generates from."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    words: list[str] = []
    seen = set()
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
        if word not in seen:
            seen.add(word)
            words.append(" " + word)
    return words


OUTPUT_PIECES = tuple(_output_words())
OUTPUT_IDS = tuple(piece_id(p) for p in OUTPUT_PIECES)
