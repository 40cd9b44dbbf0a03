"""Ragged paged attention: causal attention for a flat batch of sequences whose K/V live in pages.

One call serves decode (q_len = 1), prefill and chunked prefill (q_len > 1), mixed in one batch.

    q          [T, N, H]      the new tokens of all sequences, back to back
    k_pages    [P, S, K, H]   one layer's key pages (v_pages the same); page p holds S consecutive
                              tokens of one sequence
    kv_lens    [R]            tokens of each sequence in the cache, this step's included
    page_table [R, P_max]     page ids of each sequence, in order
    cu_q_lens  [R+1]          sequence r owns q rows cu_q_lens[r] : cu_q_lens[r+1]
    num_seqs   [1]            live sequences; rows r >= num_seqs are padding and skipped

Query i of sequence r sits at cache position kv_lens[r] - q_len[r] + i and sees positions <= it.
Rows of q past cu_q_lens[num_seqs] are padding: their output is zero.

This file holds the pure-jnp reference; the Pallas GPU kernel plugs in beside it with the same
signature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs) -> None:
    """Raises ValueError naming the first argument whose shape or dtype does not fit."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [P, S, K, H], got {k_pages.shape} and {v_pages.shape}")
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_pages.shape[2]
    if k_pages.shape[3] != head_dim:
        raise ValueError(f"head_dim differs: q has {head_dim}, k_pages {k_pages.shape[3]}")
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages dtype {k_pages.dtype} differs from v_pages dtype {v_pages.dtype}")
    num_rows = kv_lens.shape[0] if kv_lens.ndim == 1 else None
    if num_rows is None or page_table.ndim != 2 or page_table.shape[0] != num_rows:
        raise ValueError(f"kv_lens must be [R] and page_table [R, P_max], got {kv_lens.shape} and {page_table.shape}")
    if cu_q_lens.shape != (num_rows + 1,):
        raise ValueError(f"cu_q_lens must be [R+1] = [{num_rows + 1}], got {cu_q_lens.shape}")
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs must be [1], got {num_seqs.shape}")
    for name, a in (("kv_lens", kv_lens), ("page_table", page_table), ("cu_q_lens", cu_q_lens), ("num_seqs", num_seqs)):
        if a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {a.dtype}")


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, S, K, H]
    v_pages: jax.Array,  # [P, S, K, H]
    kv_lens: jax.Array,  # [R] int32
    page_table: jax.Array,  # [R, P_max] int32
    cu_q_lens: jax.Array,  # [R+1] int32
    num_seqs: jax.Array,  # [1] int32
    *,
    sm_scale: float,
    tokens_per_chunk: int = 64,
) -> jax.Array:  # [T, N, H]
    """Pure jnp: each query token gathers its sequence's pages and attends (XLA gather, f32 softmax)."""
    check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs = map(
        jnp.asarray, (q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    )
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_rows, pages_per_seq = page_table.shape
    group = num_heads // num_kv_heads
    max_kv = pages_per_seq * page_size

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, token, side="right") - 1, 0, num_rows - 1)
    valid = token < cu_q_lens[num_seqs[0]]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (token - cu_q_lens[seq])  # cache position of each query token

    def attend_one(args):
        q_t, r, pos = args  # [N, H], [], []
        k = k_pages[page_table[r]].reshape(max_kv, num_kv_heads, head_dim)
        v = v_pages[page_table[r]].reshape(max_kv, num_kv_heads, head_dim)
        q_t = q_t.reshape(num_kv_heads, group, head_dim)
        s = jnp.einsum("kgh,lkh->kgl", q_t, k, preferred_element_type=jnp.float32) * sm_scale
        visible = jnp.arange(max_kv) <= pos
        s = jnp.where(visible, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("kgl,lkh->kgh", p, v.astype(jnp.float32))
        return o.reshape(num_heads, head_dim)

    out = jax.lax.map(attend_one, (q, seq, q_pos), batch_size=tokens_per_chunk)
    out = jnp.where(valid[:, None, None], out, 0.0)
    return out.astype(q.dtype)
