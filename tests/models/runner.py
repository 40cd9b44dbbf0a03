"""Test helper: run a model over prompts packed as one ragged batch and return every position's logits."""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

from jaxserve.engine.step import make_forward
from jaxserve.testing.fixed_batch import SequenceChunk, stage_batch
from models import allocate_kv_cache


def new_cache(model, num_pages: int, page_size: int):
    cfg = model.config
    dtype = model.dtype
    return allocate_kv_cache(cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim, dtype)


def packed_logits(model, prompts, *, page_size: int = 16, num_tokens: int | None = None, page_order=None):
    """Logits [sum(len), V] of all prompts prefilled together in one step. `page_order` permutes
    the page ids so that sequences own scattered, non-contiguous pages."""
    pages_per_seq = max(math.ceil(len(p) / page_size) for p in prompts)
    ids = np.arange(pages_per_seq * len(prompts)) if page_order is None else np.asarray(page_order)
    num_pages = len(ids)
    assert num_pages >= pages_per_seq * len(prompts)
    chunks = [
        SequenceChunk(list(p), 0, ids[i * pages_per_seq : (i + 1) * pages_per_seq].tolist())
        for i, p in enumerate(prompts)
    ]
    total = sum(len(p) for p in prompts)
    num_tokens = num_tokens or total
    tokens, batch, _ = stage_batch(
        chunks,
        num_tokens=num_tokens,
        num_rows=len(prompts),
        pages_per_seq=pages_per_seq,
        page_size=page_size,
        num_pages=num_pages,
    )
    graphdef, state = nnx.split(model)
    _, logits = make_forward(graphdef)(
        state, new_cache(model, num_pages, page_size), tokens, batch, np.arange(total, dtype=np.int32)
    )
    return np.asarray(logits)


def relative_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))
