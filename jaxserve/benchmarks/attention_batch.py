"""A random ragged batch for the paged attention kernels, in the shape of Llama-3.1-8B's attention
(N query heads, K kv heads, head_dim H, bf16): what scripts/bench_kernels.py times and
scripts/profile_kernels.py profiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

N, K, H = 32, 8, 128  # Llama-3.1-8B attention heads
DT = jnp.bfloat16


def make_batch(key, q_lens, kv_lens, *, num_heads, num_kv_heads, head_dim, page_size, dtype, pad_rows=1, pad_tokens=0):
    """Random ragged batch on the device; pages of each sequence scattered by a permutation."""
    rows = len(q_lens)
    pps = max(-(-kv // page_size) for kv in kv_lens)
    num_pages = rows * pps
    kq, kk, kv_, kp = jax.random.split(key, 4)
    perm = np.asarray(jax.random.permutation(kp, num_pages)).astype(np.int32)
    page_table = np.zeros((rows + pad_rows, pps), np.int32)
    page_table[:rows] = perm.reshape(rows, pps)
    total = sum(q_lens)
    cu = np.full(rows + pad_rows + 1, total, np.int32)
    cu[: rows + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    lens = np.zeros(rows + pad_rows, np.int32)
    lens[:rows] = kv_lens
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    return dict(
        q=jax.random.normal(kq, (total + pad_tokens, num_heads, head_dim), dtype),
        k_pages=jax.random.normal(kk, shape, dtype),
        v_pages=jax.random.normal(kv_, shape, dtype),
        kv_lens=jnp.asarray(lens),
        page_table=jnp.asarray(page_table),
        cu_q_lens=jnp.asarray(cu),
        num_seqs=jnp.array([rows], jnp.int32),
    )
