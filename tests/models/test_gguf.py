"""The embedded default model: GGUF -> Hugging Face folder (config, tokenizer, weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxserve.default_model import bundled_gguf, default_model_folder
from jaxserve.tokenizer import chat_prompt_ids, load_tokenizer
from models import ModelConfig
from models.gguf import hf_tensor_name, unpermute_rows


def test_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, dim = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((heads * head_dim, dim))
    # llama.cpp's converter interleaves the two rotary halves of each head's rows
    permuted = w.reshape(heads, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rows(permuted, heads), w)


def test_tensor_names():
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="no Llama counterpart"):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


def test_default_model_folder(smollm2_folder):
    assert default_model_folder() == smollm2_folder  # converted once, then reused
    cfg = ModelConfig.from_folder(smollm2_folder)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.eos_token_ids == (2,)
    assert json.loads((smollm2_folder / "config.json").read_text())["vocab_size"] == 49152
    assert bundled_gguf().suffix == ".gguf"


def test_tokenizer_round_trip_and_specials(smollm2_folder):
    tok = load_tokenizer(smollm2_folder)
    text = "Héllo wörld! 12345 — naïve café 🙂\n\tdef f(x): return x**2"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]  # SmolLM2 splits digits one by one
    assert tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"][0::2] == [1, 2]
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 1)


def test_chat_template(smollm2_folder):
    tok = load_tokenizer(smollm2_folder)
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_shrunk_gguf_keeps_the_chosen_layers(tmp_path, smollm2_folder):
    from safetensors import safe_open

    from models.gguf import convert_gguf, shrink_gguf

    small = convert_gguf(
        shrink_gguf(bundled_gguf(), tmp_path / "small.gguf", [0, 29]), tmp_path / "small", progress=False
    )
    assert ModelConfig.from_folder(small).num_layers == 2
    assert (small / "tokenizer.json").exists()
    with (
        safe_open(small / "model.safetensors", "np") as got,
        safe_open(smollm2_folder / "model.safetensors", "np") as full,
    ):
        tensors_per_layer = 9  # 2 norms, q k v o, gate up down
        assert len(got.keys()) == len(full.keys()) - (30 - 2) * tensors_per_layer
        for kept, source in (("model.layers.0.", "model.layers.0."), ("model.layers.1.", "model.layers.29.")):
            for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
                np.testing.assert_array_equal(got.get_tensor(kept + name), full.get_tensor(source + name))
        np.testing.assert_array_equal(
            got.get_tensor("model.embed_tokens.weight"), full.get_tensor("model.embed_tokens.weight")
        )
    with pytest.raises(ValueError, match="within the model's 30"):
        shrink_gguf(bundled_gguf(), tmp_path / "bad.gguf", [0, 30])
