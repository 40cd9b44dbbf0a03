"""A .gguf file as the model: each architecture (llama with llama3 rope_freqs, qwen2 with q/k/v
biases) and quant type gives the logits of the same weights loaded from safetensors.

    HF tensors -> gguf_files.write_gguf (as llama.cpp writes it) -> x.gguf + the dequantized tensors
    x.gguf -> resolve_model (converted once into the cache) -> load_model -> logits  ┐ equal (fp32)
    dequantized tensors + the HF config.json -> load_model -> logits                ┘
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxserve.default_model import resolve_model
from jaxserve.engine.step import make_forward
from jaxserve.testing.fixed_batch import SequenceChunk, stage_batch
from models import ModelConfig
from models.loading import load_model
from models.rope import inverse_frequencies
from tests.conftest import FIXTURES
from tests.models.gguf_files import QUANT_TYPES, byte_vocab, write_gguf
from tests.models.runner import new_cache, relative_error

PROMPTS = [[3, 17, 250, 9, 100, 42, 7], [255, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 200, 201]]
# Same weights on both sides in fp32: what differs is only summation order and the llama3 rope
# parameters read back from rope_freqs (equal frequencies to ~1e-7).
SAME_WEIGHTS = 1e-5
# Measured (2026-11-25): ~5e-7 for llama, 0 for qwen2.
# Against the unquantized weights (the types gguf.quants can quantize): the quantization error
# itself, measured on llama / qwen2 at F16 5.7e-4 / 2.0e-4, BF16 4.1e-3 / 1.5e-3, Q8_0 1.3e-2 /
# 5.2e-3, Q4_0 0.19 / 0.09, Q4_1 0.21 / 0.07; each bound is ~2.5-3.5x the larger figure, while
# weights unrelated to the originals (a misplaced row or block) give ~1.
VS_UNQUANTIZED = {"F16": 2e-3, "BF16": 1.5e-2, "Q8_0": 4e-2, "Q4_0": 0.5, "Q4_1": 0.5}

_FORWARDS = {}


def logits(model) -> np.ndarray:
    """Every position's logits of PROMPTS prefilled together; one compile per distinct graphdef."""
    graphdef, state = nnx.split(model)
    if graphdef not in _FORWARDS:
        _FORWARDS[graphdef] = make_forward(graphdef)
    page_size = 16
    chunks = [SequenceChunk(list(p), 0, [i]) for i, p in enumerate(PROMPTS)]
    total = sum(map(len, PROMPTS))
    tokens, batch, _ = stage_batch(
        chunks, num_tokens=total, num_rows=len(PROMPTS), pages_per_seq=1, page_size=page_size, num_pages=len(PROMPTS)
    )
    cache = new_cache(model, len(PROMPTS), page_size)
    _, out = _FORWARDS[graphdef](state, cache, tokens, batch, np.arange(total, dtype=np.int32))
    return np.asarray(out)


def hf_folder(path, config: dict, tensors: dict):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def small_config(arch: str) -> dict:
    """Wide enough (256) for the K-quants' 256-value blocks."""
    common = dict(
        hidden_act="silu",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        vocab_size=259,
        bos_token_id=256,
        eos_token_id=258,
        dtype="float32",
    )
    if arch == "llama":  # Llama 3.1-style: rope_freqs with four frequencies inside the smoothed band
        rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
        rope["original_max_position_embeddings"] = 256
        return dict(
            common,
            architectures=["LlamaForCausalLM"],
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters=rope,
        )
    return dict(
        common,
        architectures=["Qwen2ForCausalLM"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e6),
    )


def random_tensors(config: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    N, K = config["num_attention_heads"], config["num_key_value_heads"]
    H = config.get("head_dim") or D // N

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": rng.standard_normal((V, D)).astype(np.float32), "model.norm.weight": norm(D)}
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = mat(V, D)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": norm(D), p + "post_attention_layernorm.weight": norm(D)}
        t |= {p + "self_attn.q_proj.weight": mat(N * H, D), p + "self_attn.k_proj.weight": mat(K * H, D)}
        t |= {p + "self_attn.v_proj.weight": mat(K * H, D), p + "self_attn.o_proj.weight": mat(D, N * H)}
        t |= {p + "mlp.gate_proj.weight": mat(F, D), p + "mlp.up_proj.weight": mat(F, D)}
        t[p + "mlp.down_proj.weight"] = mat(D, F)
        if config["architectures"] == ["Qwen2ForCausalLM"]:
            for proj, n in (("q", N), ("k", K), ("v", K)):
                t[p + f"self_attn.{proj}_proj.bias"] = (0.5 * rng.standard_normal(n * H)).astype(np.float32)
    return t


def vocab_for(arch: str):
    if arch == "llama":
        return byte_vocab("llama-bpe", specials=LLAMA_SPECIALS, bos=256, eos=258, add_bos=True)
    return byte_vocab("qwen2", specials=QWEN2_SPECIALS, bos=256, eos=258, add_bos=False)


@pytest.fixture(scope="module")
def originals():
    """Per architecture: the config, the unquantized tensors and the model loaded from them."""
    return {arch: (small_config(arch), random_tensors(small_config(arch), seed=1)) for arch in ("llama", "qwen2")}


@pytest.mark.parametrize("qtype", QUANT_TYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_logits_equal_the_same_weights_from_safetensors(tmp_path, originals, arch, qtype):
    config, tensors = originals[arch]
    held = write_gguf(tmp_path / f"tiny-{qtype}.gguf", arch, config, tensors, qtype, vocab_for(arch), seed=2)
    reference = load_model(hf_folder(tmp_path / "reference", config, held), progress=False)
    folder = resolve_model(str(tmp_path / f"tiny-{qtype}.gguf"), cache_dir=tmp_path / "cache")
    ours = load_model(folder, progress=False)

    cfg = ModelConfig.from_folder(folder)
    assert (cfg.architecture, cfg.qkv_bias, cfg.tie_word_embeddings) == (
        config["architectures"][0],
        arch == "qwen2",
        config["tie_word_embeddings"],
    )
    expected = logits(reference)
    assert relative_error(logits(ours), expected) < SAME_WEIGHTS
    if qtype in VS_UNQUANTIZED:
        unquantized = load_model(hf_folder(tmp_path / "unquantized", config, tensors), progress=False)
        assert relative_error(expected, logits(unquantized)) < VS_UNQUANTIZED[qtype]


@pytest.mark.parametrize(
    "name", ["llama_gqa_llama3rope", "llama_tied_headdim_linearrope", "llama_mqa_biases", "qwen2_qkvbias_tied"]
)
def test_tiny_checkpoints_round_trip_through_f32_gguf(tmp_path, name):
    """The HF fixtures (llama3 rope with one frequency in the smoothed band, linear rope with a
    head_dim of its own, biases everywhere, qwen2), written as F32 GGUFs, come back as the same
    model: the same config (rope as the same frequencies) and bit-equal parameters, hence the same
    logits (checked per quant type above; here without compiling four more programs)."""
    folder = FIXTURES / "tiny" / name
    config = json.loads((folder / "config.json").read_text())
    arch = "qwen2" if config["architectures"] == ["Qwen2ForCausalLM"] else "llama"
    vocab = byte_vocab("qwen2" if arch == "qwen2" else "llama-bpe", bos=0, eos=1)
    write_gguf(tmp_path / "x.gguf", arch, config, load_file(folder / "model.safetensors"), "F32", vocab)
    converted = resolve_model(tmp_path / "x.gguf", cache_dir=tmp_path)

    ours, theirs = ModelConfig.from_folder(converted), ModelConfig.from_folder(folder)
    assert dataclasses.replace(ours, rope_scaling=None, rms_norm_eps=0) == dataclasses.replace(
        theirs, rope_scaling=None, rms_norm_eps=0
    )
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-7)  # stored as float32
    np.testing.assert_allclose(
        inverse_frequencies(ours.head_dim, ours.rope_theta, ours.rope_scaling),
        inverse_frequencies(theirs.head_dim, theirs.rope_theta, theirs.rope_scaling),
        rtol=1e-6,
    )
    got = dict(nnx.to_flat_state(nnx.state(load_model(converted, progress=False))))
    want = dict(nnx.to_flat_state(nnx.state(load_model(folder, progress=False))))
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(want[path][...]), err_msg=str(path))


def test_converted_once_and_again_when_the_file_changes(tmp_path, originals):
    config, tensors = originals["qwen2"]
    path = tmp_path / "m.gguf"
    write_gguf(path, "qwen2", config, tensors, "Q8_0", vocab_for("qwen2"))
    first = resolve_model(path, cache_dir=tmp_path)
    marker = os.path.join(first, ".converted")
    assert resolve_model(str(path), cache_dir=tmp_path) == first and os.path.isfile(marker)
    os.utime(path, ns=(1, 1))  # an edited file: a new key
    assert resolve_model(path, cache_dir=tmp_path) != first


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ValueError, match="no such GGUF file"):
        resolve_model(tmp_path / "absent.gguf", cache_dir=tmp_path)


def test_engine_start_up_takes_a_gguf_path(tmp_path, originals):
    """`--model x.gguf` / LLM("x.gguf"): start-up resolves the file to its converted folder and
    loads the model and the GGUF's own tokenizer (no warm-up here; the engine tests cover that)."""
    from jaxserve.config import EngineConfig
    from jaxserve.engine.startup import build_model_and_tokenizer

    config, tensors = originals["llama"]
    write_gguf(tmp_path / "m.gguf", "llama", config, tensors, "Q6_K", vocab_for("llama"))
    engine_config = EngineConfig(model=str(tmp_path / "m.gguf"), cache_dir=str(tmp_path), dtype="float32")
    model, tokenizer = build_model_and_tokenizer(engine_config, progress=False, log=lambda *_: None)
    assert model.config.architecture == "LlamaForCausalLM" and model.config.rope_scaling.rope_type == "llama3"
    assert tokenizer("hi")["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>") == 256


def test_load_model_names_a_gguf_file(tmp_path):
    with pytest.raises(ValueError, match="a GGUF file, not a folder"):
        load_model(tmp_path / "x.gguf")


def test_large_models_are_written_in_shards(tmp_path, originals, monkeypatch):
    import models.gguf

    config, tensors = originals["qwen2"]
    write_gguf(tmp_path / "m.gguf", "qwen2", config, tensors, "Q8_0", vocab_for("qwen2"))
    whole = models.gguf.convert_gguf(tmp_path / "m.gguf", tmp_path / "whole", progress=False)
    monkeypatch.setattr(models.gguf, "_SHARD_BYTES", 1 << 20)  # the 256 x 512 fp32 matrices are 0.5 MiB
    sharded = models.gguf.convert_gguf(tmp_path / "m.gguf", tmp_path / "sharded", progress=False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2 and not (sharded / "model.safetensors").exists()
    got = dict(nnx.to_flat_state(nnx.state(load_model(sharded, progress=False))))
    want = dict(nnx.to_flat_state(nnx.state(load_model(whole, progress=False))))
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(want[path][...]), err_msg=str(path))
