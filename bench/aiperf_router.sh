#!/usr/bin/env bash
# A third-party client against fuyao-router: NVIDIA AIPerf (PyPI `aiperf`) profiles a router in front of two
# engine simulators. AIPerf's `--tokenizer builtin` downloads tiktoken's o200k_base, which this machine cannot
# reach, so a small local HuggingFace tokenizer (WordLevel) is written first; AIPerf only uses it to size its
# synthetic prompts and count tokens (the engines count their own, so AIPerf warns about the difference).
#
# Usage: bench/aiperf_router.sh [REQUESTS] [CONCURRENCY]   (artifacts in /tmp/fuyao-aiperf)
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS="${1:-40}"; CONCURRENCY="${2:-4}"
VENV="$HOME/.cache/fuyao/bench-venv"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
[ -x "$VENV/bin/aiperf" ] || "$VENV/bin/pip" install -q aiperf
TOKENIZER=/tmp/fuyao-aiperf-tokenizer
"$VENV/bin/python" - "$TOKENIZER" <<'PY'
import sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
words = ["<unk>", "<s>", "</s>", *"the a of and to in is it that river flood basin rainfall gauge levee delta".split()]
tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer.decoder = decoders.WordPiece(prefix="##")
PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                        eos_token="</s>").save_pretrained(sys.argv[1])
PY
PY=.venv/bin/python
# three ports from one process (free_port never hands out the same one twice, nor one from the ephemeral range)
read -r E1 E2 R < <($PY -c 'from tests.support.apiserver import free_port; print(free_port(), free_port(), free_port())')
$PY -m fuyao.engine_sim.cli --port "$E1" --log-level warning & P1=$!
$PY -m fuyao.engine_sim.cli --port "$E2" --log-level warning & P2=$!
$PY -m fuyao.inference_router.cli --listen "127.0.0.1:$R" --backend "http://127.0.0.1:$E1" --backend "http://127.0.0.1:$E2" \
  --log-level warning & P3=$!
trap 'kill $P1 $P2 $P3 2>/dev/null; wait' EXIT
for _ in $(seq 50); do curl -fs "http://127.0.0.1:$R/health" >/dev/null 2>&1 && break; sleep 0.2; done
rm -rf /tmp/fuyao-aiperf
"$VENV/bin/aiperf" profile -m fuyao-sim-7b --url "http://127.0.0.1:$R" --endpoint-type completions --streaming \
  --tokenizer "$TOKENIZER" --request-count "$REQUESTS" --concurrency "$CONCURRENCY" \
  --prompt-input-tokens-mean 200 --prompt-output-tokens-mean 32 --artifact-dir /tmp/fuyao-aiperf --ui-type none \
  >/dev/null 2>&1
grep -E "Time to First Token|Inter Token Latency|Request Latency|Request Throughput" \
  /tmp/fuyao-aiperf/profile_export_console.txt
