"""The shared tokenizer, block-hash chain and KV event wire format (fuyao.tokenizer, fuyao.kv_blocks)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuyao import kv_blocks, tokenizer
from fuyao.kv_blocks import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, EventDecodeError


def test_tokenizer_is_deterministic_prefix_stable_and_round_trips() -> None:
    text = "The quick brown fox, aged 12, jumps over the lazy dog.\n\nAgain!"
    ids = tokenizer.encode(text)
    assert ids == tokenizer.encode(text) and all(tokenizer.FIRST_ID <= i < tokenizer.VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text + " More words")[: len(ids)] == ids  # a prefix ending at a piece boundary
    assert tokenizer.encode("hi", add_special_tokens=True) == [tokenizer.BOS_ID, *tokenizer.encode("hi")]
    assert 3 < len(text) / len(ids) < 6  # a few characters per token, like real tokenizers
    chat = tokenizer.render_chat([{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert chat == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


@given(st.lists(st.integers(0, 31999), max_size=200), st.integers(1, 32))
def test_block_hash_chain_properties(tokens: list[int], block_size: int) -> None:
    hashes = kv_blocks.block_hashes(tokens, block_size)
    assert len(hashes) == len(tokens) // block_size  # the partial block has no hash
    assert all(0 <= h < 2**63 for h in hashes)
    half = len(hashes) // 2
    assert kv_blocks.block_hashes(tokens[: half * block_size], block_size) == hashes[:half]  # prefix of a prefix
    if half:  # continuing from a parent gives the rest of the chain
        assert kv_blocks.block_hashes(tokens[half * block_size:], block_size, parent=hashes[half - 1]) == \
            hashes[half:]
    if hashes:
        assert kv_blocks.block_hashes(tokens, block_size, seed=1) != hashes  # the seed matters


BATCH = EventBatch(12.5, [BlockStored([11, 12], 10, list(range(32)), 16, None, "GPU", None),
                          BlockRemoved([11], "GPU"), AllBlocksCleared()], 0)


def test_release_encoding_as_vllm_router_decodes_it() -> None:
    # decoded with plain msgpack, not our decoder: [ts, events, rank], events as maps tagged by "type"
    raw = msgpack.unpackb(kv_blocks.encode_batch(BATCH, "release"), raw=False)
    assert raw[0] == 12.5 and raw[2] == 0
    assert raw[1][0] == {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": 10,
                         "token_ids": list(range(32)), "block_size": 16, "lora_id": None, "medium": "GPU",
                         "lora_name": None}
    assert raw[1][1] == {"type": "BlockRemoved", "block_hashes": [11], "medium": "GPU"}
    assert raw[1][2] == {"type": "AllBlocksCleared"}


def test_main_and_array_encodings() -> None:
    main = msgpack.unpackb(kv_blocks.encode_batch(BATCH, "main"), raw=False)
    assert main["ts"] == 12.5 and main["data_parallel_rank"] == 0 and main["events"][1]["type"] == "BlockRemoved"
    array = msgpack.unpackb(kv_blocks.encode_batch(BATCH, "array"), raw=False)
    # msgspec array_like + tag: the tag first, then the fields in declaration order
    assert array[1][0] == ["BlockStored", [11, 12], 10, list(range(32)), 16, None, "GPU", None]
    assert array[1][2] == ["AllBlocksCleared"]
    for fmt in ("release", "main", "array"):
        assert kv_blocks.decode_batch(kv_blocks.encode_batch(BATCH, fmt)) == BATCH  # type: ignore[arg-type]


def test_decoder_skips_unknown_events_and_names_what_is_wrong() -> None:
    newer = msgpack.packb([1.0, [{"type": "BlockStoredV9", "x": 1}, {"type": "BlockRemoved", "block_hashes": [5],
                                                                     "medium": "CPU"}]])
    assert kv_blocks.decode_batch(newer).events == [BlockRemoved([5], "CPU")]
    for payload, fragment in ((b"\xc1garbage", "not msgpack"), (msgpack.packb("x"), "event batch must be"),
                              (msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": 3}]]), "block_hashes"),
                              (msgpack.packb(["soon", []]), "ts must be a number")):
        with pytest.raises(EventDecodeError, match=fragment):
            kv_blocks.decode_batch(payload)
