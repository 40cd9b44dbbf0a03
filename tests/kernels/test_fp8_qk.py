"""fp8_qk: q quantized to float8_e4m3fn (one scale per call) and Q.K^T multiplied in fp8 straight from
the K ring, only V widened. Pallas GPU interpret mode on the CPU (every output NaN-filled first), and
the Mosaic GPU lowering for sm_90 (where 8-bit wgmma's layout and transpose rules apply).

Each case is held to the reference on the same fp8 pages (scales != 1, bf16 q), relative errors:
- against the reference fed the kernel's own dequantized q (q8 * q_scale), over the batch: only P's
  and the output's rounding differ, so the bf16 kernel tolerance, 1e-2; measured 2.1e-4..1.5e-3
  (this is what catches the kernel's mistakes);
- against the reference fed q itself: fp8 q's cost on top. e4m3 rounds q by 2.6% relative (norm),
  which the scores inherit, and the probabilities with them (score std ~1 here: standard normal q,
  K, V at sm_scale H^-1/2). One token's error measured 2.4e-2..3.3e-2 at most per case, held to
  4e-2; over the batch 3.0e-3..2.0e-2, held to 3e-2 (a 1-key row is exact and weighs most in the
  norm, so decode batches read lower). The reference on q quantized with a scale per (token, head)
  measured the same (2.8e-3..1.9e-2): the error is the format's, not the one scale's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import RaggedPagedAttentionConfig, ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.kv_quant import quantize, quantize_q
from pallas_kernels.ragged_paged_attention_config import DECODE_CONFIG, FP8_DECODE_CONFIG, PREFILL_CONFIG
from pallas_kernels.ragged_paged_attention_support import shared_memory_bytes
from tests.kernels.test_fp8_kv_cache import E4M3, E5M2, fp8_batch
from tests.kernels.test_ragged_paged_attention_kernel import DYNAMIC, DYNAMIC_ROWS, SMALL, SPLIT, rel_err

Config = RaggedPagedAttentionConfig
SCALES = dict(k_scale=0.75, v_scale=1.5)

CASES = [
    # (fmt, q_lens, kv_lens, group, head_dim, page_size, config), fp8_qk added by the test
    # decode, split_blocks (FP8_DECODE_CONFIG's kind), a page per block, no kv split: kv 64 leaves
    # warpgroup 1 no block, 449 and 300 end in masked blocks
    (E4M3, [1] * 5, [64, 1, 449, 130, 300], 8, 128, 64, dataclasses.replace(SPLIT, kv_splits=1)),
    # decode, split_blocks, 3 kv splits of a 4-deep ring (empty shares: kv 1); e5m2 K against e4m3 q
    (
        E5M2,
        [1, 1, 1],
        [700, 1, 257],
        4,
        64,
        16,
        Config(block_kv=64, compute_warpgroups=2, num_stages=4, split_blocks=True, kv_splits=3),
    ),
    # decode, one compute warpgroup (DECODE_CONFIG's kind), 4 kv splits
    (E5M2, [1, 1, 1, 1], [700, 1, 129, 1000], 8, 128, 16, Config(block_kv=64, compute_warpgroups=1, kv_splits=4)),
    # mixed: decode, prefill from zero, chunked prefill; one warpgroup
    (E4M3, [1, 1, 37, 5, 1], [1, 300, 37, 700, 17], 4, 128, 64, SMALL),
    # mixed, two warpgroups of their own rows taking turns (PREFILL_CONFIG's kind): V widened into
    # the tile K no longer uses; 2 persistent programs, so two q and two output buffers in turn
    (E5M2, [40, 1, 9], [40, 300, 200], 4, 64, 16, Config(block_kv=64, pingpong=True, num_programs=2)),
    # mixed, split_blocks on 3 persistent programs with 2 kv splits: warpgroup 1's share merged
    # through each output buffer's second tile
    (
        E4M3,
        [1, 40, 1, 7, 1],
        [300, 100, 1, 200, 65],
        8,
        64,
        64,
        dataclasses.replace(SPLIT, num_programs=3, kv_splits=2),
    ),
    # decode, 9 live rows of a 16-row bucket, the split count picked on the device from the live rows
    # (dynamic_splits: 6 splits where the outputs hold 8, so the combine masks shares)
    (E4M3, [1] * 9, [1000, 70, 1, 300, 129, 64, 999, 17, 640], 2, 64, 16, DYNAMIC),
]
PADDED = {len(CASES) - 1: DYNAMIC_ROWS}  # case -> bucket rows and tokens (else random_batch's padding)


def run_fp8_qk(case, fmt, q_lens, kv_lens, group, head_dim, page_size, config, head_gain=None):
    """The kernel's errors (relative, norm over the batch's tokens): against the reference on its own
    dequantized q (own_q) and on q itself (plain_q); the largest of one token's against the latter
    (token_max); and, for comparison, the reference's own on q quantized with a scale per (token, head)
    (per_row_scales)."""
    bucket = PADDED.get(case)
    pad = {} if bucket is None else dict(pad_rows=bucket - len(q_lens), pad_tokens=bucket - sum(q_lens))
    args, _ = fp8_batch(
        case, fmt, q_lens=q_lens, kv_lens=kv_lens, group=group, head_dim=head_dim, page_size=page_size, **SCALES, **pad
    )
    q = args["q"] if head_gain is None else args["q"] * head_gain[:, None]
    q = np.array(q)
    q[sum(q_lens) :] = 6e4  # padding tokens' q: were it in q's scale, the live q would fall to e4m3's subnormals
    args["q"] = q.astype(ml_dtypes.bfloat16)
    scale = head_dim**-0.5
    config = dataclasses.replace(config, fp8_qk=True)
    out = np.asarray(ragged_paged_attention(**args, **SCALES, sm_scale=scale, config=config, interpret=True))
    total = sum(q_lens)
    assert np.all(out[total:] == 0), "padding tokens must output zero"
    q16 = jnp.asarray(args["q"]).astype(jnp.float16)
    q8, q_scale = quantize_q(q16, jnp.arange(q16.shape[0]) < total)  # as the wrapper does
    row_scale = jnp.maximum(jnp.abs(q16.astype(jnp.float32)).max(-1, keepdims=True), 1e-30) / 448
    q8_rows = quantize(q16, row_scale, jnp.float8_e4m3fn)

    def reference(q):
        out = ragged_paged_attention_reference(**dict(args, q=np.asarray(q)), **SCALES, sm_scale=scale)
        return np.asarray(out, np.float64)[:total]

    own, plain = reference(q8.astype(jnp.float32) * q_scale), reference(args["q"])
    out = out[:total].astype(np.float64)
    per_token = np.linalg.norm((out - plain).reshape(total, -1), axis=1) / np.linalg.norm(
        plain.reshape(total, -1), axis=1
    )
    return dict(
        own_q=rel_err(out, own),
        plain_q=rel_err(out, plain),
        token_max=float(per_token.max()),
        per_row_scales=rel_err(reference(q8_rows.astype(jnp.float32) * row_scale), plain),
    )


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp8_qk_matches_reference(case):
    err = run_fp8_qk(case, *CASES[case])
    assert err["own_q"] <= 1e-2
    assert err["plain_q"] <= 3e-2
    assert err["token_max"] <= 4e-2


def test_fp8_qk_heads_of_unlike_magnitude():
    """One scale for all of q, heads 1/64..4 times the others' size: fp8 has an exponent, so small
    heads keep their relative precision and the error is the format's, no worse than with a scale per
    (token, head) (measured 2.8e-2 against 3.3e-2; the 4x heads' sharper softmax costs the most)."""
    gain = np.exp2(np.linspace(-6, 2, 8)).astype(np.float32)
    err = run_fp8_qk(3, E4M3, [1, 1, 5], [300, 33, 80], 4, 64, 16, SMALL, head_gain=gain)
    assert err["own_q"] <= 1e-2
    assert err["plain_q"] <= 1.25 * err["per_row_scales"]


def test_fp8_qk_needs_fp8_pages():
    args, _ = fp8_batch(0, E4M3, q_lens=[1], kv_lens=[5], group=1, head_dim=64, page_size=16, k_scale=1, v_scale=1)
    args["q"] = args["q"].astype(ml_dtypes.bfloat16)
    args["k_pages"] = args["v_pages"] = args["k_pages"].astype(ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="fp8_qk needs fp8 pages"):
        ragged_paged_attention(**args, sm_scale=0.1, config=dataclasses.replace(SMALL, fp8_qk=True), interpret=True)


def lowered(config, fmt, head_dim, rows):
    """The kernel lowered for sm_90 on the CPU (Llama-3.1-8B-like heads: 32 q, 8 kv)."""
    sd = jax.ShapeDtypeStruct
    args = (
        sd((64, 32, head_dim), jnp.bfloat16),
        sd((64, 16, 8, head_dim), fmt),
        sd((64, 16, 8, head_dim), fmt),
        sd((rows,), jnp.int32),
        sd((rows, 16), jnp.int32),
        sd((rows + 1,), jnp.int32),
        sd((1,), jnp.int32),
    )
    fn = functools.partial(ragged_paged_attention, sm_scale=0.1, config=config)
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("fmt", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize(
    "config,rows",
    [
        (dataclasses.replace(FP8_DECODE_CONFIG, kv_splits=4), 64),  # split_blocks, kv splits
        (dataclasses.replace(FP8_DECODE_CONFIG, kv_splits=1), 64),
        (dataclasses.replace(DECODE_CONFIG, kv_splits=4), 64),  # one compute warpgroup
        (PREFILL_CONFIG, 4),  # ping-pong, persistent
        (dataclasses.replace(FP8_DECODE_CONFIG, dynamic_splits=True), 64),  # the split count picked on the device
    ],
)
def test_fp8_qk_lowers_for_hopper(config, rows, head_dim, fmt):
    """The QK wgmma takes q's fp8 buffer and the ring's fp8 K^T (K-major, no transpose): e4m3 x e4m3
    or e4m3 x e5m2, k32; PV stays f16. Within 227 KiB of shared memory (lowering checks it)."""
    text = lowered(dataclasses.replace(config, fp8_qk=True), fmt, head_dim, rows)
    b_type = "e4m3" if fmt == jnp.float8_e4m3fn else "e5m2"
    assert f"wgmma.mma_async.sync.aligned.m64n{config.block_kv}k32.f32.e4m3.{b_type}" in text
    assert f"wgmma.mma_async.sync.aligned.m64n{head_dim}k16.f32.f16.f16" in text


@pytest.mark.parametrize("config", [FP8_DECODE_CONFIG, DECODE_CONFIG])
@pytest.mark.parametrize("fp8_qk", [False, True])
def test_shared_memory_bytes_is_what_mosaic_allocates(config, fp8_qk):
    """`shared_memory_bytes` against the lowering's own count at head_dim 128 (Mosaic reports it when
    over a limit; the limit 0 makes it always). fp8_qk frees K's 16-bit tiles and adds an 8-bit q
    buffer beside the 16-bit output one: FP8_DECODE_CONFIG (blocks of 64 x 8) 226.3 -> 202.3 KiB,
    DECODE_CONFIG on fp8 pages 177.1 -> 153.1 KiB."""
    from jax.experimental.mosaic.gpu import core as mosaic_core

    config = dataclasses.replace(config, kv_splits=4, fp8_qk=fp8_qk)
    with mosaic_core.artificial_shared_memory_limit(0), pytest.raises(ValueError, match="smem_bytes") as error:
        lowered(config, jnp.float8_e4m3fn, 128, 64)
    allocated = int(str(error.value).split("smem_bytes=")[1].split()[0])
    assert allocated == shared_memory_bytes(config, 128, 16, 2, 1)
