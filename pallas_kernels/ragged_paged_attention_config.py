"""Tuning knobs of the ragged paged attention kernel, and their choice by a batch's static shape.

RaggedPagedAttentionConfig (frozen; validated) <- default_config(T, R, G, fp8_pages, S): DECODE_CONFIG,
fp8_decode_config(S) or PREFILL_CONFIG;  kv_splits None <- default_splits(...): flash-decoding splits that fill the SMs
(`fill_splits`; kv_splits_for: the count a config runs a shape with); dynamic_splits <- split_table(...): the same rule
per live-tile count, looked up on the device
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class RaggedPagedAttentionConfig:
    """Tuning knobs of the Mosaic GPU kernel."""

    block_kv: int = 128  # cache tokens per pipeline step; rounded up to a whole number of pages
    compute_warpgroups: int = 2  # a work tile is 64 * this query rows sharing each K/V block
    num_stages: int = 2  # K/V blocks in flight (stages of the shared-memory ring)
    # The PV wgmma reads P from registers (True) or from shared memory (False). GPU interpret mode
    # only simulates shared-memory operands, so interpret runs always take the shared-memory path.
    p_from_registers: bool = True
    # Split each tile's KV range over this many programs (flash-decoding): each writes a partial
    # output and its log-sum-exp, and the wrapper combines them. None picks by shape
    # (`default_splits`): small decode batches otherwise leave most SMs idle.
    kv_splits: int | None = None
    # Persistent grid: this many programs (None: one per SM) walk the work items, each keeping its
    # K/V ring and its q buffers filled across items. 0: one program per item (no persistence).
    num_programs: int | None = None
    # With two compute warpgroups: they take turns on the tensor cores (FA3's ping-pong), one's
    # softmax under the other's matmuls.
    pingpong: bool = False
    # With two compute warpgroups: both take the same 64 q rows and split each item's KV blocks
    # between them (alternate blocks), merging their softmax states at the item's end. For decode,
    # where a 64-row tile holds only G real rows, this runs two serial block chains (fp8: widen ->
    # QK -> softmax -> PV) per SM instead of one, where a second 64-row tile would have no rows.
    # Stage s of the ring always holds blocks of warpgroup s % 2, so num_stages must be even.
    split_blocks: bool = False
    # Decode-shaped batches only, kv_splits None: pick the split count on the device from the live
    # tiles (`split_table`), so a padded bucket (1 live row of 16) splits as its live rows need
    # rather than as its R rows would. Outputs are sized for the most splits (one live row).
    dynamic_splits: bool = False
    # fp8 pages only: q is quantized to float8_e4m3fn (one scale per call) and Q.K^T runs in fp8
    # straight from the ring (K^T is K-major, as 8-bit wgmma operands must be), so only V is widened.
    # A ValueError with 16-bit pages.
    fp8_qk: bool = False

    def __post_init__(self):
        if self.block_kv % 64 or self.block_kv <= 0:
            raise ValueError(f"block_kv must be a positive multiple of 64, got {self.block_kv}")
        if self.compute_warpgroups not in (1, 2):
            raise ValueError(f"compute_warpgroups must be 1 or 2, got {self.compute_warpgroups}")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be at least 2, got {self.num_stages}")
        if self.kv_splits is not None and not 1 <= self.kv_splits <= 64:
            raise ValueError(f"kv_splits must be None or 1..64, got {self.kv_splits}")
        if self.dynamic_splits and self.kv_splits is not None:
            raise ValueError(f"dynamic_splits picks the split count: kv_splits must be None, got {self.kv_splits}")
        if self.num_programs is not None and self.num_programs < 0:
            raise ValueError(f"num_programs must be None or >= 0, got {self.num_programs}")
        if self.split_blocks:
            if self.compute_warpgroups != 2:
                raise ValueError(f"split_blocks needs compute_warpgroups=2, got {self.compute_warpgroups}")
            if self.pingpong:
                raise ValueError("split_blocks excludes pingpong (ping-pong pairs the two warpgroups' steps)")
            if self.num_stages % 2:
                # a barrier's waiter must observe all its phases: a stage (its full barrier) serves one warpgroup
                raise ValueError(
                    f"split_blocks needs an even num_stages (a stage per warpgroup), got {self.num_stages}"
                )


# Picked by the batch's static shape when no config is given (measured on an H200, docs/benchmarks.md):
# decode-shaped batches run best with one compute warpgroup and a deeper ring, prefill with two
# warpgroups sharing each K/V block and taking turns. Shared memory (H = 128): ring 2 x 32 KiB per
# stage and block of 128, plus two q buffers of 16 KiB per compute warpgroup. Decode runs one
# program per item (the hardware's block scheduler balances them; the persistent grid measured no
# better there), prefill the persistent grid (heaviest tiles first: 8 x 512 ran 10-30% faster).
DECODE_CONFIG = RaggedPagedAttentionConfig(block_kv=128, compute_warpgroups=1, num_stages=3, num_programs=0)
# fp8 pages, decode: the widening and the softmax, not the bytes, bound a warpgroup's chain of
# blocks. So two compute warpgroups split each item's blocks, Q.K^T runs in fp8 (q rounded to e4m3
# with one scale per call; vLLM's FlashAttention 3 path also rounds q for an fp8 cache, with a fixed
# scale of 1.0; only V is widened), and blocks of 64 tokens keep 8 in flight. At 64 and 256 x 2048
# on an H100 (2026-12-07, e4m3 pages) this ran 12-13% faster than the same two warpgroups with
# 16-bit Q.K^T and 2 blocks of 128.
# Shared memory (H = 128): a q buffer in 8 and one in 16 bits, the 8-bit ring (2 x 8 KiB per
# stage) and two 16-bit V tiles of 16 KiB: 202 KiB of the 227.
FP8_DECODE_CONFIG = RaggedPagedAttentionConfig(
    block_kv=64, compute_warpgroups=2, num_stages=8, num_programs=0, split_blocks=True, fp8_qk=True
)
# Pages of more than 64 tokens make a block one page: 2 stages keep the ring within shared memory.
FP8_DECODE_CONFIG_LARGE_PAGES = dataclasses.replace(FP8_DECODE_CONFIG, block_kv=128, num_stages=2)
PREFILL_CONFIG = RaggedPagedAttentionConfig(block_kv=128, compute_warpgroups=2, num_stages=2, pingpong=True)


_NUM_SMS = 132  # H100 / H200 SXM
MAX_AUTO_SPLITS = 16


def num_sms(interpret: bool) -> int:
    """SMs of the device the kernel runs on (the H100/H200 count when interpreting)."""
    device = jax.devices()[0]
    return device.core_count if device.platform == "gpu" and not interpret else _NUM_SMS


PREFILL_TILE_ROWS = 64 * PREFILL_CONFIG.compute_warpgroups  # q rows of a PREFILL_CONFIG tile


def is_prefill_shaped(num_tokens: int, num_rows: int, *, group: int) -> bool:
    """More than two tokens a sequence, and room for a sequence of more q rows (T * G) than one
    prefill tile holds: tiles differ in work, and each sees many queries. A small bucket is
    decode-shaped whatever its rows: the engine pads decode at batch 1-7 to T = 16 (its smallest
    token bucket), where the prefill config's few items (one per kv head, no KV splits) would walk
    the whole KV serially, and the decode config handles a short chunk as well."""
    return num_tokens > 2 * num_rows and num_tokens * group > PREFILL_TILE_ROWS


def fp8_decode_config(page_size: int) -> RaggedPagedAttentionConfig:
    """The decode config for fp8 pages of page_size tokens."""
    return FP8_DECODE_CONFIG if page_size <= FP8_DECODE_CONFIG.block_kv else FP8_DECODE_CONFIG_LARGE_PAGES


def default_config(
    num_tokens: int, num_rows: int, *, group: int, page_size: int, fp8_pages: bool = False
) -> RaggedPagedAttentionConfig:
    if is_prefill_shaped(num_tokens, num_rows, group=group):
        return PREFILL_CONFIG
    return fp8_decode_config(page_size) if fp8_pages else DECODE_CONFIG


def default_splits(
    num_tokens: int,
    num_rows: int,
    num_kv_heads: int,
    max_kv_blocks: int,
    num_programs: int = _NUM_SMS,
    *,
    group: int,
) -> int:
    """KV splits for a batch shape. Prefill-shaped batches: none. Decode-shaped ones (one tile per
    sequence): `fill_splits` of its (row, kv head) items, as if every row were live."""
    if is_prefill_shaped(num_tokens, num_rows, group=group):
        return 1
    return fill_splits(num_rows * num_kv_heads, max_kv_blocks, num_programs)


def fill_splits(items: int, max_kv_blocks: int, num_programs: int = _NUM_SMS, max_programs: int | None = None) -> int:
    """The fewest splits (at most 16, at least two KV blocks each, of the longest sequence the page
    table can hold) whose (item, split) programs fill >= 90% of the rounds of num_programs SMs (one
    resident program each), else the best filling: 64 items on 132 SMs leave half of them idle,
    128 fill 97%. max_programs: only splits with items * splits <= it (dynamic_splits: a full
    bucket's grid). No items: 1."""
    if items <= 0:
        return 1

    def fill(splits):
        return items * splits / (-(-items * splits // num_programs) * num_programs)

    best = 1
    for splits in range(1, max(1, min(MAX_AUTO_SPLITS, max_kv_blocks // 2)) + 1):
        if max_programs is not None and items * splits > max_programs:
            break
        per_split = -(-max_kv_blocks // splits)
        if -(-max_kv_blocks // per_split) != splits:  # some shares would be empty
            continue
        if fill(splits) >= 0.9:
            return splits
        if fill(splits) > fill(best):
            best = splits
    return best


def _kv_blocks(config: RaggedPagedAttentionConfig, table_pages: int, page_size: int) -> int:
    """KV blocks (block_kv rounded up to a page) of the longest sequence a page table `table_pages` wide holds."""
    return -(-table_pages * page_size // max(page_size, config.block_kv))


def kv_splits_for(
    config: RaggedPagedAttentionConfig,
    num_tokens: int,
    num_rows: int,
    num_kv_heads: int,
    table_pages: int,
    page_size: int,
    num_programs: int = _NUM_SMS,
    *,
    group: int,
) -> int:
    """The KV splits the kernel runs a batch shape with: config.kv_splits, or if None
    `default_splits` over the KV blocks a page table `table_pages` wide can hold. dynamic_splits:
    the count for a full bucket, whose grid bounds `split_table`."""
    if config.kv_splits is not None:
        return config.kv_splits
    max_kv_blocks = _kv_blocks(config, table_pages, page_size)
    return default_splits(num_tokens, num_rows, num_kv_heads, max_kv_blocks, num_programs, group=group)


def split_table(
    config: RaggedPagedAttentionConfig,
    num_tokens: int,
    num_rows: int,
    num_kv_heads: int,
    table_pages: int,
    page_size: int,
    num_programs: int = _NUM_SMS,
    *,
    group: int,
    num_tiles: int,
) -> np.ndarray:
    """dynamic_splits: [num_tiles + 1] int32, the splits for L = 0..num_tiles live tiles (decode:
    a tile per live row): `fill_splits` of L * num_kv_heads items over the KV blocks `kv_splits_for`
    sees, within the grid its count launches for the full bucket's num_tiles (the fill rule is not
    monotone in L, e.g. 9 blocks, 8 kv heads: 12 rows pick 1 split, 20 rows 3, and a grid sized for
    the most programs of any L would launch 1416 programs, mostly idle, where a full 64-row bucket
    launches 544: `max_tiles` 68 x 8 kv heads x 1 split). Entry 1 (one live tile) is the most splits:
    it sizes the kernel's outputs. The wrapper indexes it by live_tiles on the device."""
    full = kv_splits_for(config, num_tokens, num_rows, num_kv_heads, table_pages, page_size, num_programs, group=group)
    max_kv_blocks = _kv_blocks(config, table_pages, page_size)
    max_programs = num_tiles * num_kv_heads * full
    return np.array(
        [fill_splits(live * num_kv_heads, max_kv_blocks, num_programs, max_programs) for live in range(num_tiles + 1)],
        np.int32,
    )
