"""A mock model whose next token is computable by hand, run through the real paged KV cache:

    next token = (sum of all tokens of the sequence so far) mod V

Each token's value is stored as its V in the pages; attention with zero queries averages the
sequence's cached values, times the count gives the sum. A paging bug changes the sum, so exact
outputs prove the cache holds each sequence's tokens and nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models import ModelConfig, paged_attention


def next_tokens(prompt: list[int], n: int, vocab: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(sum(seq) % vocab)
    return seq[len(prompt) :]


class SumModel(nnx.Module):
    def __init__(self, vocab_size: int = 101, eos_token_id: int | None = None, max_len: int = 4096):
        self.config = ModelConfig(
            architecture="LlamaForCausalLM",
            vocab_size=vocab_size,
            hidden_size=vocab_size,
            intermediate_size=1,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=8,
            rms_norm_eps=1e-6,
            rope_theta=1.0,
            rope_scaling=None,
            tie_word_embeddings=True,
            qkv_bias=False,
            o_bias=False,
            mlp_bias=False,
            max_position_embeddings=max_len,
            sliding_window=None,
            bos_token_id=None,
            eos_token_ids=() if eos_token_id is None else (eos_token_id,),
            dtype="float32",
        )
        self.dtype = jnp.float32
        self.peak = nnx.Param(jnp.asarray(20.0))

    def __call__(self, tokens, kv_cache, batch):
        num_tokens = tokens.shape[0]
        zeros = jnp.zeros((num_tokens, 1, 8), jnp.float32)
        values = jnp.broadcast_to(tokens.astype(jnp.float32)[:, None, None], (num_tokens, 1, 8))
        mean, layer = paged_attention(zeros, zeros, values, kv_cache[0], batch, sm_scale=1.0)
        total = jnp.round(mean[:, 0, 0] * (batch.positions + 1)).astype(jnp.int32)
        return jax.nn.one_hot(total % self.config.vocab_size, self.config.vocab_size) * self.peak[...], [layer]

    def logits(self, hidden):
        return hidden.astype(jnp.float32)
