"""The ragged paged attention interface every implementation shares, and its semantics in pure jnp:

    check_inputs           shapes and dtypes, each bad one named (ValueError)
    query_rows             each query token's sequence, liveness and cache position
    ragged_paged_attention_reference
                           each token gathers its sequence's pages and attends (f32 softmax)

Arguments as in `ragged_paged_attention` (the Mosaic GPU kernel); `ragged_paged_attention_xla`
is the same semantics in plain XLA for the CPU. Pages may be fp8 (`kv_quant`): they stand for
pages * k_scale (K) and pages * v_scale (V), applied to the scores and to the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv_quant import is_fp8


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


def query_rows(cu_q_lens, kv_lens, num_seqs, num_tokens: int):
    """For each of the T query rows: its sequence, whether it is live (not padding), and its cache
    position kv_lens[r] - q_len[r] + i (the last position it may see)."""
    num_rows = kv_lens.shape[0]
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, token, side="right") - 1, 0, num_rows - 1)
    valid = token < cu_q_lens[num_seqs[0]]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (token - cu_q_lens[seq])
    return seq, valid, q_pos


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
    k_scale: float | jax.Array = 1.0,  # [] f32: the pages hold K / k_scale
    v_scale: float | jax.Array = 1.0,  # [] f32: the pages hold V / v_scale
    tokens_per_chunk: int = 64,
) -> jax.Array:  # [T, N, H]
    """Pure jnp: each query token gathers its sequence's pages and attends (XLA gather, f32 softmax)."""
    check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs = map(
        jnp.asarray, (q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    )
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    group = num_heads // num_kv_heads
    max_kv = pages_per_seq * page_size
    seq, valid, q_pos = query_rows(cu_q_lens, kv_lens, num_seqs, num_tokens)

    def attend_one(args):
        q_t, r, pos = args  # [N, H], [], []
        k = k_pages[page_table[r]].reshape(max_kv, num_kv_heads, head_dim)
        v = v_pages[page_table[r]].reshape(max_kv, num_kv_heads, head_dim)
        if is_fp8(k.dtype):
            k = k.astype(jnp.float32)
        q_t = q_t.reshape(num_kv_heads, group, head_dim)
        s = jnp.einsum("kgh,lkh->kgl", q_t, k, preferred_element_type=jnp.float32) * (sm_scale * k_scale)
        visible = jnp.arange(max_kv) <= pos
        s = jnp.where(visible, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("kgl,lkh->kgh", p, v.astype(jnp.float32)) * v_scale
        return o.reshape(num_heads, head_dim)

    out = jax.lax.map(attend_one, (q, seq, q_pos), batch_size=tokens_per_chunk)
    out = jnp.where(valid[:, None, None], out, 0.0)
    return out.astype(q.dtype)
