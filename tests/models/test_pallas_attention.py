"""The models give the same greedy tokens with attention_impl "reference" and "pallas" (the Mosaic
GPU kernel, run in Pallas GPU interpret mode on the CPU): a small random-weight fp32 Llama with
head_dim 64 (the kernel's smallest) and GQA 4."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.testing.greedy import greedy_generate
from models.config import ModelConfig
from models.llama import create_model


def small_config() -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = dict(
        architecture="LlamaForCausalLM",
        vocab_size=128,
        hidden_size=256,
        intermediate_size=256,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        tie_word_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        mlp_bias=False,
        max_position_embeddings=1024,
        sliding_window=None,
        bos_token_id=None,
        eos_token_ids=(),
        dtype="float32",
    )
    return ModelConfig(**{k: v for k, v in cfg.items() if k in fields})


@pytest.mark.parametrize("kv_cache_dtype", [None, jnp.float8_e4m3fn])
def test_same_greedy_tokens_reference_and_pallas(kv_cache_dtype):
    """fp8 pages too: the Mosaic GPU writer and kernel against the XLA scatter and the reference,
    through the model (the same quantized pages; the kernel widens them exactly for fp32 q)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, n).tolist() for n in (3, 40)]
    tokens = {
        impl: greedy_generate(
            create_model(small_config(), attention_impl=impl, seed=0), prompts, 4, kv_cache_dtype=kv_cache_dtype
        )
        for impl in ("reference", "pallas")
    }
    assert tokens["pallas"] == tokens["reference"]
