"""A mock model whose next token is computable by hand, run through the real paged KV cache:

    next token = (sum of all tokens of the sequence so far) mod V

Each token's value is stored as its V in the pages; attention with zero queries averages the
sequence's cached values, times the count gives the sum. A paging bug changes the sum, so exact
outputs prove the cache holds each sequence's tokens and nothing else.

On a mesh (tensor parallelism, `mesh=`): one kv head per device, so the KV pages are split over
the "tp" axis as a real model's are, and attention runs per shard (sharding.shard_over_heads);
every head holds the same values, and head 0's answer is the sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import ModelConfig, paged_attention
from sharding import TP_AXIS, shard_over_heads


def next_tokens(prompt: list[int], n: int, vocab: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(sum(seq) % vocab)
    return seq[len(prompt) :]


class SumModel(nnx.Module):
    def __init__(
        self,
        vocab_size: int = 101,
        eos_token_id: int | None = None,
        max_len: int = 4096,
        mesh: Mesh | None = None,
        head_dim: int = 8,
    ):
        heads = 1 if mesh is None else mesh.shape[TP_AXIS]
        self.config = ModelConfig(
            architecture="LlamaForCausalLM",
            vocab_size=vocab_size,
            hidden_size=vocab_size,
            intermediate_size=1,
            num_layers=1,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
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
        self.mesh = mesh
        peak = jnp.asarray(20.0)
        self.peak = nnx.Param(peak if mesh is None else jax.device_put(peak, NamedSharding(mesh, PartitionSpec())))

    def __call__(self, tokens, kv_cache, batch):
        num_tokens, heads = tokens.shape[0], self.config.num_kv_heads
        head_dim = self.config.head_dim
        zeros = jnp.zeros((num_tokens, heads, head_dim), jnp.float32)
        values = jnp.broadcast_to(tokens.astype(jnp.float32)[:, None, None], (num_tokens, heads, head_dim))
        attend = functools.partial(paged_attention, sm_scale=1.0)
        if self.mesh is not None and self.mesh.size > 1:
            attend = shard_over_heads(attend, self.mesh)
        mean, layer = attend(zeros, zeros, values, kv_cache[0], batch)
        total = jnp.round(mean[:, 0, 0] * (batch.positions + 1)).astype(jnp.int32)
        return jax.nn.one_hot(total % self.config.vocab_size, self.config.vocab_size) * self.peak[...], [layer]

    def logits(self, hidden):
        return hidden.astype(jnp.float32)
