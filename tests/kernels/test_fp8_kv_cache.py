"""FP8 KV pages (float8_e4m3fn, float8_e5m2) through the writer, the references and the Mosaic GPU
kernel (Pallas GPU interpret mode on the CPU, which fills every output with NaN first, so an element
the kernel forgets to write fails the finiteness check).

Tolerances, by what each comparison measures:
- the kernel against the reference on the same fp8 pages: only q and P rounding differ (the kernel
  widens fp8 exactly), so the bf16 kernel tolerance holds: 1e-2 relative (norm); f32 q 1e-5; a
  config with Q.K^T in fp8 (fp8_qk: FP8_DECODE_CONFIG, picked for decode-shaped batches) adds q's
  rounding to e4m3: 3e-2 (tests/kernels/test_fp8_qk.py measures it);
- the XLA path against the reference: both f32 on the same pages, 1e-5;
- fp8 attention against f32 attention over the unquantized K/V (the format's own cost, standard
  normal K/V): e4m3 (3 mantissa bits, rounding error <= 2^-4 relative) within 4%, e5m2 (2 bits,
  <= 2^-3) within 8%;
- the writer: bit-exact against the XLA scatter (the same quantize rule), saturating, never NaN.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import (
    RaggedPagedAttentionConfig,
    config_for,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_pages,
    write_kv_pages_reference,
)
from pallas_kernels.kv_quant import dequantize, quantize
from pallas_kernels.ragged_paged_attention_config import PREFILL_CONFIG
from pallas_kernels.ragged_paged_attention_xla import ragged_paged_attention_xla
from tests.kernels.test_ragged_paged_attention_kernel import SMALL, SPLIT, SPLIT_DECODE_64, WIDE, rel_err
from tests.kernels.test_ragged_paged_attention_reference import random_batch

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
FORMAT_TOL = {E4M3: 0.04, E5M2: 0.08}  # fp8 attention vs f32 attention on the unquantized K/V
KERNEL_TOL, FP8_QK_TOL = 1e-2, 3e-2  # the kernel against the reference on the same pages


def fp8_batch(seed, fmt, *, q_lens, kv_lens, group, head_dim, page_size, k_scale, v_scale, num_kv_heads=2, **pad):
    """A random ragged batch (padding rows and tokens included) whose pages are quantized to `fmt`;
    also the unquantized f32 pages."""
    rng = np.random.default_rng(seed)
    args, _, _ = random_batch(
        rng,
        q_lens=q_lens,
        kv_lens=kv_lens,
        num_heads=group * num_kv_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        **pad,  # pad_rows, pad_tokens
    )
    exact = dict(args)
    args["k_pages"] = np.asarray(quantize(jnp.asarray(args["k_pages"]), k_scale, fmt))
    args["v_pages"] = np.asarray(quantize(jnp.asarray(args["v_pages"]), v_scale, fmt))
    return args, exact


def test_quantize_scales_saturates_and_round_trips():
    x = jnp.array([0.0, 1.0, -3.0, 1000.0, -1e6, 0.3])
    q = quantize(x, 2.0, E4M3)
    assert q.dtype == E4M3
    np.testing.assert_array_equal(np.asarray(q, np.float32)[:4], [0.0, 0.5, -1.5, 448.0])  # 500 saturates
    assert float(q[4]) == -448.0  # no NaN: e4m3 has no infinity
    assert float(quantize(jnp.array(1e9), 1.0, E5M2)) == 57344.0
    back = np.asarray(dequantize(q, 2.0))
    assert abs(back[5] - 0.3) <= 0.3 * 2**-4  # round to nearest: half of e4m3's 2^-3 step
    assert quantize(x, 1.0, jnp.bfloat16).dtype == jnp.bfloat16  # not fp8: a plain cast


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_writer_quantizes_like_the_scatter(fmt):
    """The Mosaic GPU writer (interpret) and the XLA scatter store the same bytes; padding slots
    (past the cache, negative) write nothing; values past the format's range saturate."""
    rng = np.random.default_rng(3)
    pages, page_size, kv_heads, head_dim, tokens = 6, 16, 2, 64, 24
    shape = (pages, page_size, kv_heads, head_dim)
    k_pages, v_pages = (np.asarray(quantize(jnp.asarray(rng.standard_normal(shape)), 1.0, fmt)) for _ in range(2))
    k_new, v_new = (rng.standard_normal((tokens, kv_heads, head_dim)).astype(ml_dtypes.bfloat16) for _ in range(2))
    k_new[0, 0, 0] = 1e5  # beyond both formats' range at this scale
    slots = rng.permutation(pages * page_size)[:tokens].astype(np.int32)
    slots[1], slots[-1], slots[5] = pages * page_size, pages * page_size + 9, -1
    scales = (jnp.float32(0.5), jnp.float32(0.125))
    out = write_kv_pages(k_pages, v_pages, k_new, v_new, slots, *scales, interpret=True)
    ref = write_kv_pages_reference(k_pages, v_pages, k_new, v_new, slots, *scales)
    for o, r, before in zip(out, ref, (k_pages, v_pages)):
        assert o.dtype == fmt
        o, r = np.asarray(o).view(np.uint8), np.asarray(r).view(np.uint8)
        np.testing.assert_array_equal(o, r)
        assert np.all(np.isfinite(np.asarray(out[0], np.float32)))
        flat = lambda a: a.reshape(pages * page_size, -1)  # noqa: E731
        untouched = np.ones(pages * page_size, bool)
        untouched[slots[(slots >= 0) & (slots < pages * page_size)]] = False
        np.testing.assert_array_equal(flat(o)[untouched], flat(np.asarray(before).view(np.uint8))[untouched])
    page, offset = divmod(int(slots[0]), page_size)
    assert float(out[0][page, offset, 0, 0]) == float(jnp.finfo(fmt).max)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_references_fp8_close_to_float32(fmt):
    """The reference and the XLA path on fp8 pages (scales != 1) against f32 attention over the
    unquantized K/V: the format's cost; and against each other: 1e-5."""
    args, exact = fp8_batch(
        1, fmt, q_lens=[1, 9, 1], kv_lens=[70, 9, 33], group=4, head_dim=64, page_size=16, k_scale=0.5, v_scale=2.0
    )
    scales = dict(k_scale=0.5, v_scale=2.0)
    ref = np.asarray(ragged_paged_attention_reference(**args, sm_scale=0.125, **scales))
    xla = np.asarray(ragged_paged_attention_xla(**args, sm_scale=0.125, **scales))
    f32 = np.asarray(ragged_paged_attention_reference(**exact, sm_scale=0.125))
    total = 11
    assert rel_err(xla[:total], ref[:total]) <= 1e-5
    assert np.all(ref[total:] == 0) and np.all(xla[total:] == 0)
    assert rel_err(ref[:total], f32[:total]) <= FORMAT_TOL[fmt]


KERNEL_CASES = [
    # (fmt, q_lens, kv_lens, group, head_dim, page_size, config): decode, prefill from zero, chunked
    # prefill and mixed batches, kv lengths crossing pages and blocks
    (E4M3, [1, 1, 37, 5, 1], [1, 300, 37, 700, 17], 1, 64, 16, SMALL),
    (E5M2, [1, 20, 1, 3], [129, 20, 600, 64], 4, 128, 32, SMALL),
    (E4M3, [1, 1, 70, 3], [900, 5, 70, 130], 8, 128, 128, WIDE),
    # PREFILL_CONFIG (two warpgroups taking turns, persistent programs); then picked by shape: this
    # small bucket (T G <= 128) decodes with FP8_DECODE_CONFIG, Q.K^T in fp8
    (E5M2, [40, 1, 9], [40, 300, 200], 2, 64, 16, PREFILL_CONFIG),
    (E4M3, [40, 1, 9], [40, 300, 200], 2, 64, 16, None),
    (E5M2, [1, 1, 1, 1], [700, 1, 129, 1000], 4, 64, 64, RaggedPagedAttentionConfig(block_kv=64, kv_splits=4)),
    # split_blocks: two warpgroups, each widening its own K and V tiles, alternate blocks, merged;
    # decode with GQA 8, a page per block, no kv split (kv 64: warpgroup 1 has no block); then 3 kv splits
    (E4M3, [1, 1, 1, 1, 1], [64, 1, 449, 130, 300], 8, 128, 64, dataclasses.replace(SPLIT, kv_splits=1)),
    (
        E5M2,
        [1, 1, 1],
        [700, 1, 257],
        2,
        64,
        16,
        RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=2, num_stages=4, split_blocks=True, kv_splits=3),
    ),
]


@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
def test_kernel_fp8_pages_match_reference(case):
    """bf16 q over fp8 pages, scales != 1: the kernel against the reference on the same pages
    (1e-2, the bf16 tolerance; 3e-2 with Q.K^T in fp8), padding tokens zero, nothing left unwritten."""
    fmt, q_lens, kv_lens, group, head_dim, page_size, config = KERNEL_CASES[case]
    scales = dict(k_scale=0.75, v_scale=1.5)
    args, exact = fp8_batch(
        case, fmt, q_lens=q_lens, kv_lens=kv_lens, group=group, head_dim=head_dim, page_size=page_size, **scales
    )
    args["q"] = args["q"].astype(ml_dtypes.bfloat16)
    scale = head_dim**-0.5
    out = np.asarray(ragged_paged_attention(**args, **scales, sm_scale=scale, config=config, interpret=True))
    ref = np.asarray(ragged_paged_attention_reference(**args, **scales, sm_scale=scale), np.float32)
    total = sum(q_lens)
    assert np.all(out[total:] == 0), "padding tokens must output zero"
    picked = config_for(args["q"], args["k_pages"], args["kv_lens"], config)
    assert picked.fp8_qk == (config is None)  # the case list covers both
    tol = FP8_QK_TOL if picked.fp8_qk else KERNEL_TOL
    assert rel_err(out[:total].astype(np.float32), ref[:total]) <= tol


@pytest.mark.parametrize("config", [SMALL, dataclasses.replace(SPLIT, kv_splits=1)])
def test_kernel_fp8_pages_float32_q_exact(config):
    """f32 q (interpret only): the widened tile is exact, so the kernel matches the reference to 1e-5
    (split_blocks: the merge too)."""
    args, _ = fp8_batch(
        9, E4M3, q_lens=[1, 12, 1], kv_lens=[200, 12, 65], group=4, head_dim=64, page_size=16, k_scale=2.0, v_scale=0.5
    )
    out = np.asarray(
        ragged_paged_attention(**args, k_scale=2.0, v_scale=0.5, sm_scale=0.125, config=config, interpret=True)
    )
    ref = np.asarray(ragged_paged_attention_reference(**args, k_scale=2.0, v_scale=0.5, sm_scale=0.125))
    assert rel_err(out[:14], ref[:14]) <= 1e-5


def test_kernel_rejects_other_page_dtypes():
    args, _ = fp8_batch(0, E4M3, q_lens=[1], kv_lens=[5], group=1, head_dim=64, page_size=16, k_scale=1, v_scale=1)
    args["q"] = args["q"].astype(ml_dtypes.bfloat16)
    args["k_pages"] = args["v_pages"] = args["k_pages"].astype(np.float16)
    with pytest.raises(ValueError, match="must be q dtype"):
        ragged_paged_attention(**args, sm_scale=0.1, interpret=True)


@pytest.mark.parametrize("fmt", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("head_dim,rows", [(128, 4), (128, 64), (64, 64)])
def test_kernel_fp8_lowers_for_hopper(fmt, head_dim, rows):
    """The compiled path with fp8 pages (the 8-bit ring, the widening loads and relayouts, the
    shared-memory budget with the widened tiles) lowers through Mosaic GPU on the CPU; rows 4 is
    prefill-shaped (PREFILL_CONFIG), 64 decode-shaped (DECODE_CONFIG, auto splits)."""
    sd = jax.ShapeDtypeStruct
    t, n, k, pages, s = 64, 32, 8, 64, 16
    args = (
        sd((t, n, head_dim), jnp.bfloat16),
        sd((pages, s, k, head_dim), fmt),
        sd((pages, s, k, head_dim), fmt),
        sd((rows,), jnp.int32),
        sd((rows, 16), jnp.int32),
        sd((rows + 1,), jnp.int32),
        sd((1,), jnp.int32),
    )
    fn = functools.partial(ragged_paged_attention, sm_scale=0.1)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize(
    "config",
    [
        # split_blocks at H = 128, fp8 pages: four 16-bit tiles beside the ring; both just fit
        # 227 KiB with kv splits (block 128 x 2 stages: 226.1 KiB; 64 x 8: 226.3 KiB)
        dataclasses.replace(SPLIT_DECODE_64, block_kv=128, num_stages=2),
        dataclasses.replace(SPLIT_DECODE_64, num_stages=8),
    ],
)
def test_kernel_fp8_split_blocks_lowers_for_hopper(config):
    sd = jax.ShapeDtypeStruct
    rows, fmt = 64, jnp.float8_e4m3fn
    args = (
        sd((rows, 32, 128), jnp.bfloat16),
        sd((64, 16, 8, 128), fmt),
        sd((64, 16, 8, 128), fmt),
        sd((rows,), jnp.int32),
        sd((rows, 16), jnp.int32),
        sd((rows + 1,), jnp.int32),
        sd((1,), jnp.int32),
    )
    fn = functools.partial(ragged_paged_attention, sm_scale=0.1, config=dataclasses.replace(config, kv_splits=4))
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("fmt", [jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_writer_fp8_lowers_for_hopper(fmt):
    """The compiled writer with fp8 pages (bf16 rows quantized, then 1-byte TMA rows) lowers on the CPU."""
    sd = jax.ShapeDtypeStruct
    pages = sd((64, 16, 8, 128), fmt)
    rows = sd((256, 8, 128), jnp.bfloat16)
    scale = sd((), jnp.float32)
    text = (
        jax.jit(write_kv_pages, donate_argnums=(0, 1))
        .trace(pages, pages, rows, rows, sd((256,), jnp.int32), scale, scale)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "mosaic_gpu" in text
