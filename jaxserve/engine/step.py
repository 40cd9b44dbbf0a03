"""The compiled step: (model state, KV cache, staged batch) -> (KV cache, logits of chosen rows).

The NNX model is split once into a static graph and plain array leaves; the jitted function
merges them inside the trace, so no per-step NNX flattening happens on the host. The KV cache is
donated: XLA writes this step's K/V into the pages in place.
"""

from __future__ import annotations

import jax
from flax import nnx

from models import LlamaForCausalLM, RaggedBatch


def make_forward(graphdef: nnx.GraphDef):
    """forward(state, kv_cache, tokens [T], batch, logits_rows [R]) -> (kv_cache, logits [R, V] f32)."""

    def forward(state, kv_cache, tokens, batch: RaggedBatch, logits_rows):
        model: LlamaForCausalLM = nnx.merge(graphdef, state)
        hidden, kv_cache = model(tokens, kv_cache, batch)
        return kv_cache, model.logits(hidden[logits_rows])

    return jax.jit(forward, donate_argnames=("kv_cache",))
