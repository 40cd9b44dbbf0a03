"""The pure-jnp references against a naive numpy attention over contiguous K/V, on random ragged
batches: decode and prefill rows mixed, pages scattered, GQA, padding rows and tokens."""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention_reference, write_kv_pages_reference
from pallas_kernels.kv_cache_update import check_inputs as check_update_inputs


def naive_attention(q, k, v, sm_scale):
    """q [Lq, N, H] at the last Lq of Lk positions; k, v [Lk, K, H]."""
    lq, n, _ = q.shape
    lk, kh, _ = k.shape
    k = np.repeat(k, n // kh, axis=1)
    v = np.repeat(v, n // kh, axis=1)
    s = np.einsum("qnh,lnh->nql", q, k) * sm_scale
    visible = np.arange(lk)[None, :] <= (lk - lq + np.arange(lq))[:, None]
    s = np.where(visible[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nql,lnh->qnh", p, v)


def random_batch(rng, *, q_lens, kv_lens, num_heads, num_kv_heads, head_dim, page_size, pad_rows=2, pad_tokens=3):
    rows = len(q_lens)
    pages_per_seq = max(-(-kv // page_size) for kv in kv_lens)
    num_pages = rows * pages_per_seq + 3
    perm = rng.permutation(num_pages)
    page_table = np.zeros((rows + pad_rows, pages_per_seq), np.int32)
    k_seqs, v_seqs = [], []
    k_pages = rng.standard_normal((num_pages, page_size, num_kv_heads, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal(k_pages.shape).astype(np.float32)
    for r, kv in enumerate(kv_lens):
        page_table[r] = perm[r * pages_per_seq : (r + 1) * pages_per_seq]
        k_seqs.append(k_pages[page_table[r]].reshape(-1, num_kv_heads, head_dim)[:kv])
        v_seqs.append(v_pages[page_table[r]].reshape(-1, num_kv_heads, head_dim)[:kv])
    total = sum(q_lens)
    cu = np.full(rows + pad_rows + 1, total, np.int32)
    cu[: rows + 1] = np.concatenate([[0], np.cumsum(q_lens)])
    q = rng.standard_normal((total + pad_tokens, num_heads, head_dim)).astype(np.float32)
    kv_arr = np.zeros(rows + pad_rows, np.int32)
    kv_arr[:rows] = kv_lens
    return (
        dict(
            q=q,
            k_pages=k_pages,
            v_pages=v_pages,
            kv_lens=kv_arr,
            page_table=page_table,
            cu_q_lens=cu,
            num_seqs=np.array([rows], np.int32),
        ),
        k_seqs,
        v_seqs,
    )


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("page_size", [16, 32])
def test_reference_matches_naive(group, page_size):
    rng = np.random.default_rng(group * 100 + page_size)
    q_lens = [1, 1, 37, 5, 1, 128]
    kv_lens = [1, 300, 37, 2048, 17, 640]  # decode, prefill from zero, chunked prefill, page crossings
    num_kv_heads, head_dim = 2, 64
    args, k_seqs, v_seqs = random_batch(
        rng,
        q_lens=q_lens,
        kv_lens=kv_lens,
        num_heads=group * num_kv_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
    )
    out = np.asarray(ragged_paged_attention_reference(**args, sm_scale=head_dim**-0.5))
    cu = args["cu_q_lens"]
    for r in range(len(q_lens)):
        expected = naive_attention(args["q"][cu[r] : cu[r + 1]], k_seqs[r], v_seqs[r], head_dim**-0.5)
        np.testing.assert_allclose(out[cu[r] : cu[r + 1]], expected, rtol=1e-5, atol=1e-5)
    assert np.all(out[cu[len(q_lens)] :] == 0)  # padding tokens


def test_bfloat16_close_to_float32():
    import ml_dtypes

    rng = np.random.default_rng(0)
    args, _, _ = random_batch(
        rng, q_lens=[1, 20], kv_lens=[100, 20], num_heads=8, num_kv_heads=2, head_dim=128, page_size=16
    )
    full = np.asarray(ragged_paged_attention_reference(**args, sm_scale=0.1))
    half = {k: (v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v) for k, v in args.items()}
    low = np.asarray(ragged_paged_attention_reference(**half, sm_scale=0.1)).astype(np.float32)
    assert low.dtype == np.float32 and np.max(np.abs(low - full)) / np.max(np.abs(full)) < 1e-2


def test_write_kv_pages_scatters_and_drops_padding():
    rng = np.random.default_rng(0)
    pages = np.zeros((4, 8, 2, 16), np.float32)
    new = rng.standard_normal((5, 2, 16)).astype(np.float32)
    slots = np.array([0, 9, 31, 17, 4 * 8], np.int32)  # the last is padding: out of range
    k, v = write_kv_pages_reference(pages, pages, new, -new, slots)
    k = np.asarray(k).reshape(32, 2, 16)
    for t, slot in enumerate(slots[:4]):
        np.testing.assert_array_equal(k[slot], new[t])
    untouched = np.setdiff1d(np.arange(32), slots[:4])
    assert np.all(k[untouched] == 0)
    np.testing.assert_array_equal(np.asarray(v).reshape(32, 2, 16)[9], -new[1])


def test_bad_inputs_are_named():
    rng = np.random.default_rng(0)
    args, _, _ = random_batch(rng, q_lens=[3], kv_lens=[3], num_heads=4, num_kv_heads=2, head_dim=64, page_size=16)
    with pytest.raises(ValueError, match="q must be"):
        ragged_paged_attention_reference(**{**args, "q": args["q"][0]}, sm_scale=1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        ragged_paged_attention_reference(**{**args, "q": args["q"][:, :3]}, sm_scale=1.0)
    with pytest.raises(ValueError, match="kv_lens must be int32"):
        ragged_paged_attention_reference(**{**args, "kv_lens": args["kv_lens"].astype(np.int64)}, sm_scale=1.0)
    with pytest.raises(ValueError, match="cu_q_lens"):
        ragged_paged_attention_reference(**{**args, "cu_q_lens": args["cu_q_lens"][:-1]}, sm_scale=1.0)
    with pytest.raises(ValueError, match="slot_mapping"):
        check_update_inputs(
            args["k_pages"], args["v_pages"], args["k_pages"][0, :3], args["k_pages"][0, :3], np.zeros(2, np.int32)
        )
