"""The Mosaic GPU ragged paged attention kernel against the jnp reference, in Pallas GPU interpret
mode on the CPU (the same kernel body that compiles for Hopper; interpret mode allocates every
buffer, outputs included, filled with NaN, so an element the kernel forgets to write fails).

Random ragged batches: decode and prefill rows mixed, kv lengths 1..2048 crossing page
boundaries, pages scattered, GQA 1/4/8, head_dim 64/128, page sizes 16..128, padding rows and
padding tokens; split-KV (shares combined by log-sum-exp, empty shares included); two compute
warpgroups splitting one tile's KV blocks (split_blocks). fp32 within 1e-5 relative, bf16 within
1e-2."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import RaggedPagedAttentionConfig, ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_config import DECODE_CONFIG, default_splits, kv_splits_for, split_table
from pallas_kernels.ragged_tiles import max_tiles, plan_tiles
from tests.kernels.test_ragged_paged_attention_reference import random_batch

SMALL = RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=1, num_stages=2)
WIDE = RaggedPagedAttentionConfig(block_kv=128, compute_warpgroups=2, num_stages=2)
# two compute warpgroups on the same 64 q rows, alternate KV blocks each, merged at the item's end
SPLIT = RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=2, num_stages=2, split_blocks=True)


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "non-finite output: an element was not written"
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def run_case(seed, q_lens, kv_lens, group, head_dim, page_size, config, dtype=np.float32, num_kv_heads=2):
    rng = np.random.default_rng(seed)
    args, _, _ = random_batch(
        rng,
        q_lens=q_lens,
        kv_lens=kv_lens,
        num_heads=group * num_kv_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
    )
    args = {k: (v.astype(dtype) if v.dtype == np.float32 else v) for k, v in args.items()}
    scale = head_dim**-0.5
    out = np.asarray(ragged_paged_attention(**args, sm_scale=scale, config=config, interpret=True))
    f32 = {k: (v.astype(np.float32) if v.dtype == dtype else v) for k, v in args.items()}
    ref = np.asarray(ragged_paged_attention_reference(**f32, sm_scale=scale))
    total = sum(q_lens)
    assert np.all(out[total:] == 0), "padding tokens must output zero"
    return rel_err(out[:total].astype(np.float32), ref[:total])


CASES = [  # (q_lens, kv_lens): decode, prefill from zero, chunked prefill, page crossings
    ([1, 1, 37, 5, 1], [1, 300, 37, 2048, 17]),
    ([1, 20, 1, 3], [129, 20, 2048, 64]),
]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_float32_matches_reference(group, case):
    q_lens, kv_lens = CASES[case]
    page_size = (16, 32)[case]
    assert run_case(group * 10 + case, q_lens, kv_lens, group, 64, page_size, SMALL) <= 1e-5


@pytest.mark.parametrize(
    "head_dim,page_size,config",
    [
        (128, 128, WIDE),
        (64, 16, WIDE),
        (128, 64, SMALL),
        (128, 32, RaggedPagedAttentionConfig(block_kv=128, num_stages=2, split_blocks=True, kv_splits=2)),
    ],
)
def test_bfloat16_matches_reference(head_dim, page_size, config):
    err = run_case(7, [1, 1, 70, 3], [2000, 5, 70, 130], 4, head_dim, page_size, config, dtype=ml_dtypes.bfloat16)
    assert err <= 1e-2


@pytest.mark.parametrize(
    "q_lens,kv_lens,group,config",
    [
        # decode rows only, 4 splits: long rows spread over all, a 1-key row leaves 3 shares empty
        (
            [1, 1, 1, 1],
            [700, 1, 129, 2048],
            8,
            RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=1, num_stages=2, kv_splits=4),
        ),
        # prefill rows too, 3 splits of a 128-row tile: early rows see no key in the later shares
        (
            [1, 90, 5, 1],
            [300, 400, 5, 64],
            4,
            RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=2, num_stages=3, kv_splits=3),
        ),
    ],
)
def test_split_kv_matches_reference(q_lens, kv_lens, group, config):
    assert run_case(11, q_lens, kv_lens, group, 64, 16, config) <= 1e-5


@pytest.mark.parametrize(
    "config",
    [
        # persistent: 3 programs walk all items, the K/V ring and the two q buffers carry over items
        RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=1, num_stages=3, num_programs=3),
        # two warpgroups taking turns (ping-pong), 2 programs, a 2-deep ring reused across items
        RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=2, num_stages=2, num_programs=2, pingpong=True),
        # persistent and split: empty shares are items too
        RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=1, num_stages=2, num_programs=5, kv_splits=3),
        # no persistence: one program per item
        RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=2, num_stages=2, num_programs=0, pingpong=True),
    ],
)
def test_persistent_programs_match_reference(config):
    assert run_case(5, [1, 40, 1, 7, 1], [300, 40, 1, 200, 65], 4, 64, 16, config) <= 1e-5


@pytest.mark.parametrize(
    "q_lens,kv_lens,group,head_dim,config",
    [
        # decode rows, no kv split: kv 1 and 64 leave warpgroup 1 no block (its half is empty), 65
        # gives it one key; 300 and 777 cross pages and blocks, their last blocks masked
        ([1, 1, 1, 1, 1], [1, 64, 65, 300, 777], 8, 64, dataclasses.replace(SPLIT, kv_splits=1)),
        # decode, 3 kv splits of a 4-deep ring: shares of odd block counts, empty shares (kv 1, 70)
        (
            [1, 1, 1, 1],
            [70, 1, 449, 200],
            1,
            128,
            RaggedPagedAttentionConfig(block_kv=64, compute_warpgroups=2, num_stages=4, split_blocks=True, kv_splits=3),
        ),
        # any tile, not only decode: chunked prefill (40 queries at positions 60..99) whose first
        # rows see no key of block 1, warpgroup 1's first; 3 persistent programs (items of odd
        # block counts: a program's next item starts on the other warpgroup; two q buffers and
        # their merge states in turn); GQA 3 straddles 64-row tiles
        (
            [1, 40, 1, 7, 1],
            [300, 100, 1, 200, 65],
            3,
            64,
            dataclasses.replace(SPLIT, num_programs=3, kv_splits=1),
        ),
    ],
)
def test_split_blocks_matches_reference(q_lens, kv_lens, group, head_dim, config):
    assert run_case(13, q_lens, kv_lens, group, head_dim, 16, config) <= 1e-5


def test_default_splits():
    assert default_splits(1, 1, 8, max_kv_blocks=64, group=4) == 16  # one long sequence: fill the SMs
    assert default_splits(8, 8, 8, max_kv_blocks=4, group=4) == 2  # at least two KV blocks per split
    assert default_splits(8, 8, 8, max_kv_blocks=64, group=4) == 2  # 64 items -> 128 fill 97% of 132 programs
    assert default_splits(4, 4, 8, max_kv_blocks=64, group=4) == 4  # 32 items -> 128
    assert default_splits(64, 64, 8, max_kv_blocks=64, group=4) == 1  # 512 programs already
    assert default_splits(2048, 1, 8, max_kv_blocks=64, group=4) == 1  # prefill-shaped: no split
    # the engine's decode at batch 1 (T padded to 16): decode-shaped at GQA 4, split to fill the SMs
    assert default_splits(16, 1, 8, max_kv_blocks=64, group=4) == 16
    assert default_splits(64, 1, 8, max_kv_blocks=64, group=4) == 1  # 256 q rows: prefill-shaped


def test_default_config_by_bucket_shape():
    """T > 2 R with more q rows than a prefill tile holds (T * G > 128) is prefill-shaped; a small
    bucket is not, whatever its rows (the engine pads batch-1 decode to T = 16)."""
    from pallas_kernels.ragged_paged_attention_config import (
        FP8_DECODE_CONFIG,
        FP8_DECODE_CONFIG_LARGE_PAGES,
        PREFILL_CONFIG,
        default_config,
    )

    assert default_config(16, 1, group=4, page_size=16) is DECODE_CONFIG
    assert default_config(16, 1, group=4, page_size=16, fp8_pages=True) is FP8_DECODE_CONFIG
    assert default_config(16, 1, group=4, page_size=64, fp8_pages=True) is FP8_DECODE_CONFIG  # a block a page
    assert default_config(16, 1, group=4, page_size=128, fp8_pages=True) is FP8_DECODE_CONFIG_LARGE_PAGES
    assert default_config(16, 1, group=16, page_size=16) is PREFILL_CONFIG  # 256 rows
    assert default_config(64, 64, group=4, page_size=16) is DECODE_CONFIG  # a token a sequence
    assert default_config(2048, 8, group=4, page_size=16, fp8_pages=True) is PREFILL_CONFIG


def test_group_not_a_power_of_two():
    # SmolLM2-135M has 9 query heads over 3 kv heads: a token's rows straddle 64-row chunks.
    assert run_case(3, [1, 30, 1], [77, 30, 500], 3, 64, 16, WIDE, num_kv_heads=1) <= 1e-5


def test_plan_maps_rows_to_cells_and_back():
    cu = np.array([0, 5, 75, 275, 276, 276, 276], np.int32)  # the last two rows are padding
    for group, rows_per_tile in ((4, 128), (1, 64), (8, 64)):
        tokens = 280
        tiles = max_tiles(tokens, 6, group, rows_per_tile)
        kv_lens = np.array([9, 75, 1000, 1, 0, 0], np.int32)
        for lens in (None, kv_lens):
            seq, row0, row_end, base, order, live, src, row_cell = map(
                np.asarray,
                plan_tiles(
                    cu,
                    np.array([4], np.int32),
                    group=group,
                    rows_per_tile=rows_per_tile,
                    num_tiles=tiles,
                    num_tokens=tokens,
                    kv_lens=lens,
                ),
            )
            rows = 276 * group
            np.testing.assert_array_equal(src[row_cell[:rows]], np.arange(rows))
            assert np.all(base % 8 == 0) and live[0] <= tiles
            assert np.all(np.diff(base[: live[0]]) >= 8)
            n = live[0]
            assert sorted(order[:n]) == list(range(n))  # every live tile once
            if lens is not None:  # heaviest first: keys seen by each tile's last row, descending
                last = np.minimum(row0 + rows_per_tile, row_end)
                work = kv_lens[seq] - (row_end - last) // group
                assert np.all(np.diff(work[order[:n]]) <= 0)


def test_bad_inputs_are_named():
    rng = np.random.default_rng(0)
    args, _, _ = random_batch(rng, q_lens=[3], kv_lens=[3], num_heads=4, num_kv_heads=2, head_dim=64, page_size=16)
    with pytest.raises(ValueError, match="q must be"):
        ragged_paged_attention(**{**args, "q": args["q"][0]}, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="float32 runs in interpret mode only"):
        ragged_paged_attention(**args, sm_scale=1.0)
    with pytest.raises(ValueError, match="q dtype"):
        ragged_paged_attention(**{**args, "q": args["q"].astype(ml_dtypes.bfloat16)}, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="page_table"):
        ragged_paged_attention(**{**args, "page_table": args["page_table"][0]}, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="head_dim"):
        q = np.zeros((4, 4, 48), np.float32)
        k = np.zeros((4, 16, 2, 48), np.float32)
        ragged_paged_attention(**{**args, "q": q, "k_pages": k, "v_pages": k}, sm_scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="block_kv"):
        RaggedPagedAttentionConfig(block_kv=96)
    with pytest.raises(ValueError, match="split_blocks needs compute_warpgroups=2"):
        RaggedPagedAttentionConfig(compute_warpgroups=1, split_blocks=True)
    with pytest.raises(ValueError, match="even num_stages"):
        RaggedPagedAttentionConfig(num_stages=3, split_blocks=True)
    with pytest.raises(ValueError, match="excludes pingpong"):
        RaggedPagedAttentionConfig(pingpong=True, split_blocks=True)


SPLIT_DECODE_64 = dataclasses.replace(DECODE_CONFIG, block_kv=64, num_stages=6, compute_warpgroups=2, split_blocks=True)


@pytest.mark.parametrize(
    "config,rows",
    [
        (None, 4),
        (WIDE, 4),
        (SMALL, 4),
        (RaggedPagedAttentionConfig(kv_splits=4), 4),
        (RaggedPagedAttentionConfig(pingpong=True), 4),
        # decode-shaped: DECODE_CONFIG, whose q buffers and 3-deep ring fill the 227 KiB at head_dim 128
        (None, 64),
        (dataclasses.replace(DECODE_CONFIG, kv_splits=4), 64),
        # split_blocks, H = 128: the merge's loads, 6 stages of 64 (226 KiB with the kv splits' lse)
        (SPLIT_DECODE_64, 64),
        (dataclasses.replace(SPLIT_DECODE_64, kv_splits=1), 64),
    ],
)
def test_lowers_for_hopper(config, rows):
    """The compiled path's Mosaic GPU lowering (layout inference, shared-memory budget) runs on the
    CPU: lower for the cuda platform without compiling; p_from_registers, the in-place accumulator
    (run_state) and the register split are only taken here. None: picked by shape, auto splits."""
    import functools

    import jax
    import jax.numpy as jnp

    sd = jax.ShapeDtypeStruct
    t, n, k, h, pages, s = 64, 32, 8, 128, 64, 16
    args = (
        sd((t, n, h), jnp.bfloat16),
        sd((pages, s, k, h), jnp.bfloat16),
        sd((pages, s, k, h), jnp.bfloat16),
        sd((rows,), jnp.int32),
        sd((rows, 16), jnp.int32),
        sd((rows + 1,), jnp.int32),
        sd((1,), jnp.int32),
    )
    fn = functools.partial(ragged_paged_attention, sm_scale=0.1, config=config)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("group,head_dim,page_size", [(1, 64, 32), (2, 128, 128), (1, 128, 16)])
def test_lowers_for_hopper_with_any_token_count(kv_dtype, group, head_dim, page_size):
    """T * G rows that are not a multiple of 4 (here T = 9): the [K, cells, H] buffers stay a
    multiple of the TMA's 8-row tiling (130 cells failed to lower on an H200 before)."""
    import functools

    import jax
    import jax.numpy as jnp

    sd = jax.ShapeDtypeStruct
    rows, k = 4, 4
    args = (
        sd((9, group * k, head_dim), jnp.bfloat16),
        sd((64, page_size, k, head_dim), kv_dtype),
        sd((64, page_size, k, head_dim), kv_dtype),
        sd((rows,), jnp.int32),
        sd((rows, 2048 // page_size), jnp.int32),
        sd((rows + 1,), jnp.int32),
        sd((1,), jnp.int32),
    )
    fn = functools.partial(ragged_paged_attention, sm_scale=0.1)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


# dynamic_splits: a 16-row decode bucket (num_tiles 17) of page table width 1008 tokens (16 blocks
# of 64): one live row takes 8 splits, 9 take 6, a full bucket 4 (the static pick)
DYNAMIC = RaggedPagedAttentionConfig(
    block_kv=64, compute_warpgroups=1, num_stages=2, num_programs=0, dynamic_splits=True
)
DYNAMIC_ROWS = 16


def dynamic_table():
    """The wrapper's table for the bucket the reference tests run (2 kv heads, G 2, 63 pages of 16)
    and its static count (kv_splits_for)."""
    shape = (DYNAMIC, DYNAMIC_ROWS, DYNAMIC_ROWS, 2, 63, 16, 132)
    tiles = max_tiles(DYNAMIC_ROWS, DYNAMIC_ROWS, 2, 64)
    return split_table(*shape, group=2, num_tiles=tiles), kv_splits_for(*shape, group=2)


def test_split_table_picks_more_splits_for_fewer_live_rows():
    table, static = dynamic_table()
    assert table[0] == 1 and table[1] == table.max() == 8
    assert table[9] == 6 and table[DYNAMIC_ROWS] == static == 4  # a full bucket: the static pick
    assert np.all(np.diff(table[1:]) <= 0)  # here monotone (not in general: see split_table)
    # the grid: no more programs for any live count than the static pick launches for a full bucket
    lives = np.arange(len(table))
    assert (lives * 2 * table).max() <= (len(table) - 1) * 2 * static
    # a full 64-row bucket at kv 1088 (9 blocks of 128), 8 kv heads: the fill rule alone would pick
    # 3 splits at 20 live rows (480 programs) and 1 at 12; the grid cap keeps every count within the full bucket's 544 (68 tiles x 8 kv heads)
    tiles = max_tiles(64, 64, 4, 64)
    table = split_table(DECODE_CONFIG, 64, 64, 8, 1088 // 16, 16, 132, group=4, num_tiles=tiles)
    assert table[1] == 3 and table[64] == 1 and (np.arange(tiles + 1) * 8 * table).max() <= tiles * 8


@pytest.mark.parametrize(
    "kv_lens",
    [
        [1000],  # 1 live row of 16: 8 splits of 2 blocks
        [1000, 1, 130],  # 3: still 8; kv 1 leaves 7 shares empty
        [1000, 70, 1, 300, 129, 64, 999, 17, 640],  # 9: 6 splits of 3 blocks
        [1000, 5, 300, 64, 65, 777, 1, 2, 512, 128, 129, 900, 33, 48, 700, 1008],  # 16: 4, the full bucket
    ],
)
def test_dynamic_splits_matches_reference(kv_lens):
    """Padded decode buckets (the rows past num_seqs are padding): the split count is read on the
    device from the live tiles, the outputs hold the most splits, the unwritten shares are masked."""
    live = len(kv_lens)
    rng = np.random.default_rng(live)
    args, _, _ = random_batch(
        rng,
        q_lens=[1] * live,
        kv_lens=kv_lens,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        page_size=16,
        pad_rows=DYNAMIC_ROWS - live,
        pad_tokens=DYNAMIC_ROWS - live,  # T = 16, the bucket's tokens
    )
    assert args["page_table"].shape == (DYNAMIC_ROWS, 63)  # 16 blocks of 64
    scale = 64**-0.5
    out = np.asarray(ragged_paged_attention(**args, sm_scale=scale, config=DYNAMIC, interpret=True))
    ref = np.asarray(ragged_paged_attention_reference(**args, sm_scale=scale))
    assert np.all(out[live:] == 0), "padding tokens must output zero"
    assert rel_err(out[:live], ref[:live]) <= 1e-5


def test_dynamic_splits_config_is_checked():
    with pytest.raises(ValueError, match="kv_splits must be None"):
        RaggedPagedAttentionConfig(dynamic_splits=True, kv_splits=2)
    rng = np.random.default_rng(0)
    args, _, _ = random_batch(rng, q_lens=[40], kv_lens=[40], num_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
    with pytest.raises(ValueError, match="decode-shaped"):  # 43 tokens x 4 heads over 3 rows: prefill-shaped
        ragged_paged_attention(**args, sm_scale=1.0, config=DYNAMIC, interpret=True)


@pytest.mark.parametrize(
    "config",
    [
        dataclasses.replace(DECODE_CONFIG, dynamic_splits=True),
        dataclasses.replace(SPLIT_DECODE_64, dynamic_splits=True),
        dataclasses.replace(DECODE_CONFIG, dynamic_splits=True, num_programs=8),  # persistent: two q buffers
    ],
)
def test_dynamic_splits_lower_for_hopper(config):
    """The device-picked split count (a loaded int32 dividing the item index) lowers for Hopper: a
    16-row decode bucket, 8 kv heads, H = 128, a page table of 2048 tokens (1 live row: 8 splits)."""
    import functools

    import jax
    import jax.numpy as jnp

    sd = jax.ShapeDtypeStruct
    rows, n, k, h, s = 16, 32, 8, 128, 16
    args = (
        sd((rows, n, h), jnp.bfloat16),
        sd((256, s, k, h), jnp.bfloat16),
        sd((256, s, k, h), jnp.bfloat16),
        sd((rows,), jnp.int32),
        sd((rows, 2048 // s), jnp.int32),
        sd((rows + 1,), jnp.int32),
        sd((1,), jnp.int32),
    )
    fn = functools.partial(ragged_paged_attention, sm_scale=0.1, config=config)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
