"""A GGUF's embedded tokenizer (tokenizer.ggml.*) -> a Hugging Face tokenizer folder, for the
llama-bpe (Llama 3/3.1/3.2) and qwen2 pre-tokenizers; the GGUF metadata -> config.json mapping
(rope_freqs -> llama3 rope scaling, refusals)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from jaxserve.tokenizer import chat_prompt_ids, load_tokenizer
from models.gguf import gguf_metadata, hf_config, hf_tokenizer, llama3_rope_scaling
from tests.models.gguf_files import byte_vocab, llama3_rope_freqs, write_vocab_only

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
MERGES = ["1 2", "12 3", "4 5", "h e", "l l", "he ll", "hell o"]
TEXT = "Hello world 12345!!\n\n  x I'M naïve café 🙂\tdef f(x): return x**2"


def converted(tmp_path, vocab, name="tok"):
    """The vocabulary through a real GGUF file, hf_tokenizer, save_pretrained and jaxserve's loader."""
    write_vocab_only(tmp_path / f"{name}.gguf", vocab)
    meta = gguf_metadata(gguf.GGUFReader(str(tmp_path / f"{name}.gguf")))
    hf_tokenizer(meta, source=tmp_path / f"{name}.gguf").save_pretrained(str(tmp_path / name))
    return load_tokenizer(tmp_path / name)


@pytest.fixture
def llama3(tmp_path):
    specials = LLAMA3_SPECIALS
    vocab = byte_vocab("llama-bpe", MERGES, specials, words=["Ġworld"], chat_template=LLAMA3_TEMPLATE)
    vocab.bos, vocab.eos, vocab.add_bos = vocab.tokens.index(specials[0]), vocab.tokens.index(specials[4]), True
    return converted(tmp_path, vocab, "llama3")


@pytest.fixture
def qwen2(tmp_path):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = byte_vocab("qwen2", MERGES, specials, user_defined=["<tool_call>"], words=["Ġworld"])
    vocab.bos, vocab.eos, vocab.add_bos = vocab.tokens.index(specials[0]), vocab.tokens.index(specials[2]), False
    return converted(tmp_path, vocab, "qwen2")


def chunks(tok, text):
    return [piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_llama_bpe_pre_tokenizer(llama3):
    # Llama 3's split: digits in threes, case-insensitive contractions, newlines kept with punctuation
    assert chunks(llama3, "Hello world 12345!!\n\n  x I'M") == [
        "Hello",
        "Ġworld",
        "Ġ",
        "123",
        "45",
        "!!ĊĊ",
        "Ġ",
        "Ġx",
        "ĠI",
        "'M",
    ]
    assert llama3.tokenize(" world 12345") == ["Ġworld", "Ġ", "123", "45"]  # a whole word in the vocab wins


def test_qwen2_pre_tokenizer(qwen2):
    assert chunks(qwen2, "Hello world 12345!!\n\n  x I'M") == [
        "Hello",
        "Ġworld",
        "Ġ",
        *"12345",
        "!!ĊĊ",
        "Ġ",
        "Ġx",
        "ĠI",
        "'M",
    ]
    assert qwen2.tokenize(" world") == ["Ġ", "w", "o", "r", "l", "d"]  # merges only: "Ġworld" is not made
    assert qwen2.decode(qwen2("cafe\u0301", add_special_tokens=False)["input_ids"]) == "café"  # NFC first


def test_round_trip_bos_and_specials(llama3, qwen2):
    for tok in (llama3, qwen2):
        ids = tok(TEXT, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == TEXT
    bos = llama3.convert_tokens_to_ids("<|begin_of_text|>")
    assert llama3("hello")["input_ids"] == [bos, *llama3("hello", add_special_tokens=False)["input_ids"]]
    assert (llama3.bos_token, llama3.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert qwen2("hello")["input_ids"] == qwen2("hello", add_special_tokens=False)["input_ids"]  # no BOS
    im_end = qwen2.convert_tokens_to_ids("<|im_end|>")
    assert qwen2("a<|im_end|>b", add_special_tokens=False)["input_ids"][1] == im_end
    tool = qwen2.convert_tokens_to_ids("<tool_call>")
    ids = qwen2("x<tool_call>y", add_special_tokens=False)["input_ids"]
    assert tool in ids and qwen2.decode(ids, skip_special_tokens=True) == "x<tool_call>y"  # added, not special


def test_llama3_chat_template_has_one_bos(llama3):
    ids = chat_prompt_ids(llama3, [{"role": "user", "content": "Hi"}])
    assert ids.count(llama3.bos_token_id) == 1 and ids[0] == llama3.bos_token_id
    assert llama3.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_unsupported_pre_tokenizer_is_named(tmp_path):
    with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-llm' is not supported"):
        converted(tmp_path, byte_vocab("deepseek-llm"))


LLAMA31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA32 = dict(LLAMA31, factor=32.0)


@pytest.mark.parametrize("scaling", [LLAMA31, LLAMA32], ids=["llama-3.1", "llama-3.2"])
def test_rope_freqs_give_back_llama3_parameters(scaling):
    rope_freqs = llama3_rope_freqs(128, 500000.0, scaling)
    got = llama3_rope_scaling(rope_freqs, 128, 500000.0, 8192)
    assert got["rope_type"] == "llama3" and got["original_max_position_embeddings"] == 8192
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        assert got[key] == pytest.approx(scaling[key], rel=1e-4)


def test_rope_freqs_edge_cases():
    assert llama3_rope_scaling(np.ones(4), 8, 1e4) is None
    assert llama3_rope_scaling(np.full(4, 2.0), 8, 1e4) == {"rope_type": "linear", "factor": 2.0}
    # no frequency inside the band: any band between the kept and the slowed ones will do
    got = llama3_rope_scaling(np.array([1.0, 1.0, 4.0, 4.0]), 8, 1e4, 64)
    assert got["rope_type"] == "llama3" and got["factor"] == 4.0
    with pytest.raises(ValueError, match="do not follow Llama 3's rope scaling"):
        llama3_rope_scaling(np.array([1.0, 3.0, 1.5, 8.0, 2.0, 8.0]), 12, 1e4)


def small_meta(arch="llama", **extra):
    meta = {
        "general.architecture": arch,
        f"{arch}.block_count": 2,
        f"{arch}.context_length": 512,
        f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 128,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.tokens": ["a", "b", "c"],
        "tokenizer.ggml.eos_token_id": 2,
    }
    return meta | extra


def test_config_refusals_and_eos():
    assert hf_config(small_meta("qwen2", **{"tokenizer.ggml.eot_token_id": 1}), {})["eos_token_id"] == [2, 1]
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
        hf_config(small_meta(**{"llama.rope.scaling.type": "yarn"}), {})
    with pytest.raises(ValueError, match="llama.attention.head_count is missing"):
        hf_config({k: v for k, v in small_meta().items() if "head_count" not in k}, {})
