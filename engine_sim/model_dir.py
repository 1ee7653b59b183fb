"""A tiny Llama model directory made here, with no hub: what a real vLLM serves in the tests (with
``--load-format dummy``: random weights, real shapes) and what the simulator loads to tokenize as that engine does.

- ``tokenizer.json``: a byte-level BPE trained with HF ``tokenizers`` on a fixed text (so every run makes the same
  vocabulary), ``<s>`` prepended by its post-processor (as Llama tokenizers do), chat role markers as special tokens;
- ``tokenizer_config.json``: ``PreTrainedTokenizerFast`` with a ``chat_template`` (each message as
  ``<|role|>\\n{content}\\n``, then ``<|assistant|>\\n`` for a generation prompt);
- ``config.json``: ``LlamaForCausalLM``, ``vocab_size`` = the tokenizer's, heads of 64 (vLLM's CPU attention rejects
  smaller head dims), 2 KV heads, in one of two sizes (``SHAPES``): ``tiny`` (hidden 256, 4 heads, 2 layers: the
  tests' model, ~1 M parameters, whose prefill costs less per token than reading its KV back) and ``small``
  (hidden 768, 12 heads, 6 layers, ~50 M parameters: about 100 MFLOP per token against 3 KB of KV, so its prefill
  costs far more than loading the KV, as a real model's does; what the KV-tier benchmark measures with).

``python -m fuyao.engine_sim.model_dir DIR [--size tiny|small]`` writes it (idempotent: an existing directory with
the same content is kept).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

VOCAB_SIZE = 4096
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 64, "num_hidden_layers": 2},
    "small": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_key_value_heads": 2,
              "head_dim": 64, "num_hidden_layers": 6},
}
SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


_WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
          "word but not what all were we when your can said there use an each which she do how their if will up "
          "other about out many then them these so some her would make like him into time has look two more write "
          "go see number no way could people my than first water been call who oil its now find long down day did "
          "get come made may part river flood levee rain storm model token cache block engine router prefix "
          "context question answer assistant user system hydrology department careful rivers floods")


def _corpus(seed: int = 20261205) -> list[str]:
    """A fixed English-like text: common words, digits and punctuation in seeded random sentences."""
    words = _WORDS.split()
    rng = random.Random(seed)
    lines = []
    for _ in range(4000):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))
        lines.append(sentence.capitalize() + rng.choice([".", "?", "!", ",", ";"]) + f" {rng.randint(0, 9999)}")
    return lines


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    return tokenizer.to_str(pretty=False)


def files(size: str = "tiny") -> dict[str, Any]:
    raw = tokenizer_json()
    vocab = len(json.loads(raw)["model"]["vocab"])
    return {
        "tokenizer.json": raw,
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "model_max_length": 4096, "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        "config.json": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPES[size], "vocab_size": vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": SPECIAL.index("<s>"), "eos_token_id": SPECIAL.index("</s>")},
        "generation_config.json": {"bos_token_id": SPECIAL.index("<s>"), "eos_token_id": SPECIAL.index("</s>")},
    }


def write(directory: str | Path, size: str = "tiny") -> Path:
    """Write the model directory; files whose content is already there are left untouched."""
    if size not in SHAPES:
        raise ValueError(f"model size {size!r}: one of {', '.join(SHAPES)}")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name, content in files(size).items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2, sort_keys=True) + "\n"
        target = path / name
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fuyao.engine_sim.model_dir", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="where to write the model (created)")
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    args = parser.parse_args(argv)
    print(write(args.directory, args.size))


if __name__ == "__main__":
    main()
