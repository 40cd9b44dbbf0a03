"""Greedy decoding of a fixed batch of prompts, one ragged prefill then one token per step.

The simplest driver of the compiled forward: each prompt owns a fixed run of pages, and every
step is staged with `stage_batch`. It keeps two shapes (prefill, decode), so it compiles twice.
The continuous-batching engine replaces it for serving; tests and the offline demo use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.engine.step import make_forward
from jaxserve.testing.fixed_batch import SequenceChunk, stage_batch
from models import LlamaForCausalLM, allocate_kv_cache


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def greedy_generate(
    model: LlamaForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_ids: Sequence[int] = (),
    page_size: int = 16,
    kv_cache_dtype=None,
) -> list[list[int]]:
    """The greedy continuation (new token ids, eos included if reached) of each prompt.
    kv_cache_dtype: the pages' (fp8), None: the model's dtype."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.config
    graphdef, state = nnx.split(model)
    forward = make_forward(graphdef)
    pages_per_seq = math.ceil((max(map(len, prompts)) + max_new_tokens) / page_size)
    num_pages = pages_per_seq * len(prompts)
    dtype = model.dtype
    kv_dtype = kv_cache_dtype or dtype
    kv_cache = allocate_kv_cache(cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
    pages = [list(range(i * pages_per_seq, (i + 1) * pages_per_seq)) for i in range(len(prompts))]
    shape = dict(num_rows=len(prompts), pages_per_seq=pages_per_seq, page_size=page_size, num_pages=num_pages)

    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    chunks = [SequenceChunk(list(p), 0, pages[i]) for i, p in enumerate(prompts)]
    num_tokens = _bucket(sum(map(len, prompts)))
    while active and max_new_tokens > 0:
        tokens, batch, rows = stage_batch(chunks, num_tokens=num_tokens, **shape)
        kv_cache, logits = forward(state, kv_cache, tokens, batch, rows)
        next_ids = np.asarray(jnp.argmax(logits, axis=-1))
        still_active = []
        for row, i in enumerate(active):
            token = int(next_ids[row])
            outputs[i].append(token)
            if token not in eos_token_ids and len(outputs[i]) < max_new_tokens:
                still_active.append(i)
        active = still_active
        chunks = [SequenceChunk([outputs[i][-1]], len(prompts[i]) + len(outputs[i]) - 1, pages[i]) for i in active]
        num_tokens = _bucket(len(prompts))
    return outputs
