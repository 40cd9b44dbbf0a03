"""Ragged paged attention in plain XLA: no Pallas, runs on any backend (the CPU path).

Same signature and semantics as `ragged_paged_attention_reference`, but memory and work follow
the batch's real context instead of P_max: a while loop walks page index p = 0, 1, ... up to the
longest live sequence's last page, and each query token keeps an online softmax

    m [T, K, G]  running max      l [T, K, G]  running sum      acc [T, K, G, H]  running output

updated with that token's own page p (gathered [T, S, K, H]). Tokens past their own length mask
the page out. Padding tokens (past cu_q_lens[num_seqs]) output zero. fp8 pages: k_scale multiplies
the scores, v_scale the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention_reference import check_inputs, query_rows


def ragged_paged_attention_xla(
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale: float, k_scale=1.0, v_scale=1.0
):
    check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs = map(
        jnp.asarray, (q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    )
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_heads // num_kv_heads

    seq, valid, q_pos = query_rows(cu_q_lens, kv_lens, num_seqs, num_tokens)
    q_pos = jnp.where(valid, q_pos, -1)  # padding sees nothing
    num_pages = jnp.max(q_pos) // page_size + 1

    qf = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * (sm_scale * k_scale)
    tables = page_table[seq]  # [T, P_max]

    def visit_page(p, carry):
        m, l, acc = carry
        page = tables[:, p]
        k = k_pages[page].astype(jnp.float32)  # [T, S, K, H]
        v = v_pages[page].astype(jnp.float32)
        s = jnp.einsum("tkgh,tskh->tkgs", qf, k)
        visible = (p * page_size + jnp.arange(page_size))[None, :] <= q_pos[:, None]  # [T, S]
        s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        shift = jnp.where(jnp.isinf(m_new), 0.0, m_new)  # a row with nothing visible yet stays at zero
        probs = jnp.exp(s - shift[..., None])
        alpha = jnp.exp(m - shift)
        return m_new, alpha * l + probs.sum(-1), alpha[..., None] * acc + jnp.einsum("tkgs,tskh->tkgh", probs, v)

    init = (
        jnp.full((num_tokens, num_kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, num_pages, visit_page, init)
    out = acc * (v_scale / jnp.where(l == 0, 1.0, l))[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
