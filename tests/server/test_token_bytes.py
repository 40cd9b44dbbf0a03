"""Logprob tokens named by their own bytes (jaxserve.api.token_bytes), not by decoding each token
alone (which spells every piece of a multi-byte character as U+FFFD, bytes EF BF BD)."""

from __future__ import annotations

import pytest

from jaxserve.api.responses import ChatBuilder, CompletionBuilder
from jaxserve.api.token_bytes import TokenBytes, token_name
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.tokenizer import load_tokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    tokenizer = load_tokenizer(smollm2_folder)
    return tokenizer, TokenBytes(tokenizer)


def spelled(name: str) -> bytes:
    """The bytes a token string claims: its UTF-8, or the escapes after "bytes:"."""
    if name.startswith("bytes:"):
        return bytes.fromhex(name.removeprefix("bytes:").replace("\\x", ""))
    return name.encode()


@pytest.mark.parametrize("text", ["👩👩", "你好世界", " Paris", "a👩b", "<|im_end|>"])
def test_byte_level_pieces_give_back_the_text_bytes(smollm2, text):
    tokenizer, vocab = smollm2
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(vocab.bytes_of(i) for i in ids) == text.encode()
    for i in ids:
        assert spelled(vocab.name(i)) == vocab.bytes_of(i)


def test_names_of_partial_characters():
    assert token_name(b"\xf0\x9f") == "bytes:\\xf0\\x9f"
    assert token_name(b" Paris") == " Paris"
    assert token_name("👩".encode()) == "👩"


def test_ids_the_tokenizer_does_not_know(smollm2):
    _, vocab = smollm2
    assert vocab.bytes_of(10**6) is None and vocab.bytes_of(-1) is None


def test_sentencepiece_byte_fallback():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<0xE2>": 1, "<0x80>": 2, "<0x99>": 3, "▁": 4, "h": 5, "i": 6}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=t)
    ids = tokenizer("hi’", add_special_tokens=False)["input_ids"]
    names = TokenBytes(tokenizer)
    assert [names.bytes_of(i) for i in ids] == [b" ", b"h", b"i", b"\xe2", b"\x80", b"\x99"]
    assert [names.name(i) for i in ids][3:] == ["bytes:\\xe2", "bytes:\\x80", "bytes:\\x99"]


def _reply(ids: list[int], text: str, alternative: int) -> RequestOutput:
    """What the engine sends: each token decoded alone, so a piece of a character is U+FFFD."""
    logprobs = [
        {t: Logprob(-0.1, 1, REPLACEMENT), alternative: Logprob(-2.5, 2, REPLACEMENT)} for t in ids
    ]  # the chosen token first, then an alternative
    return RequestOutput("r", None, [1], None, [CompletionOutput(0, text, ids, -1.0, logprobs, "stop")], True)


def test_chat_logprobs_of_an_emoji_reply_carry_its_bytes(smollm2):
    tokenizer, vocab = smollm2
    ids = tokenizer("👩👩", add_special_tokens=False)["input_ids"]
    out = _reply(ids, "👩👩", ids[1])
    content = ChatBuilder("c", "m", 1, top_logprobs=1, vocab=vocab).response(out).choices[0].logprobs.content
    assert b"".join(bytes(c.bytes) for c in content) == "👩👩".encode()
    assert all(spelled(c.token) == bytes(c.bytes) != REPLACEMENT.encode() for c in content)
    assert content[0].top_logprobs[0].bytes == list(vocab.bytes_of(ids[0]))
    assert content[0].top_logprobs[0].token == vocab.name(ids[0])


def test_completion_logprobs_offsets_count_whole_characters(smollm2):
    tokenizer, vocab = smollm2
    text = "a👩b"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # "a", 3 pieces of the emoji, "b"
    lp = CompletionBuilder("c", "m", 1, 1, logprobs=1, vocab=vocab).response([_reply(ids, text, 5)])
    lp = lp.choices[0].logprobs
    assert b"".join(spelled(t) for t in lp.tokens) == text.encode()
    # each token starts at its character's offset; the emoji's pieces all at its own (1)
    assert lp.text_offset == [0] + [1] * (len(ids) - 2) + [2]
    assert all(set(map(spelled, top)) <= {vocab.bytes_of(i) for i in (*ids, 5)} for top in lp.top_logprobs)
