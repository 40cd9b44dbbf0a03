"""Ragged paged attention: causal attention for a flat batch of sequences whose K/V live in pages.

One call serves decode (q_len = 1), prefill and chunked prefill (q_len > 1), mixed in one batch.

    q          [T, N, H]      the new tokens of all sequences, back to back
    k_pages    [P, S, K, H]   one layer's key pages (v_pages the same); page p holds S consecutive
                              tokens of one sequence
    kv_lens    [R]            tokens of each sequence in the cache, this step's included
    page_table [R, P_max]     page ids of each sequence, in order
    cu_q_lens  [R+1]          sequence r owns q rows cu_q_lens[r] : cu_q_lens[r+1]
    num_seqs   [1]            live sequences; rows r >= num_seqs are padding and skipped
    k_scale    []             f32; pages hold K / k_scale (v_scale the same): 1 unless fp8

Query i of sequence r sits at cache position kv_lens[r] - q_len[r] + i and sees positions <= it.
Rows of q past cu_q_lens[num_seqs] are padding: their output is zero.

The file reads: Mosaic GPU kernel -> `_attention_call` (the pallas call) -> `ragged_paged_attention`
(validated, jitted). Beside it: `ragged_paged_attention_reference` (the input checks and the
semantics, pure jnp), `ragged_paged_attention_config` (the tuning knobs and their choice by
shape) and `ragged_tiles` (the work tiles and the q/output cell layout).

Kernel data flow. The work items are (work tile, kv head[, kv split]); `ragged_tiles` says what a
tile is. With a persistent grid (`num_programs`; prefill's default) one program per SM takes items
round-robin, heaviest tiles first, and keeps its K/V ring and its two q buffers filling across
items, so an item's start costs no pipeline fill; decode's default runs one program per item, which
the hardware schedules as SMs free up. With kv_splits > 1 (flash-decoding; `default_splits` picks it
for small decode batches) item s takes the s-th share of the tile's KV blocks and stores its
normalised output and its base-2 log-sum-exp; the wrapper combines the shares. With
`dynamic_splits` (decode-shaped only) the count is picked on the device from the live tiles
(`split_table`, indexed by live_tiles): outputs hold the most splits (one live tile's), the kernel
takes the picked count as an input, and the wrapper masks the shares past it. Two words of the
kernel's own: a *cell* is a q row's place in the tiled q/out buffers (`ragged_tiles`), a *stage*
one K/V block's place in the shared-memory ring; neither is a (KV cache) slot. Per item:

    q rows of the tile (G query heads x tokens of one sequence; gathered into 8-aligned cells
    by the wrapper) --TMA--> q buffer r % 2 (r: the program's item count), by the memory warpgroup
    memory warpgroup:  for each block of block_kv cache tokens: page ids from page_table,
                       one TMA copy per page --> k/v smem stage (num_stages stages, a ring whose
                       position counts on over items)
    compute warpgroups (64 rows each):  S = q K^T (wgmma) * k_scale -> causal mask on the last blocks ->
                       online softmax (exp2, f32) -> O += P V (wgmma) -> free the stage
                       (with `pingpong`, two warpgroups alternate: one's softmax under the
                       other's matmuls)
    O / l * v_scale --> the item's q buffer --> TMA store of the first 8/16/32/64 rows covering the valid
                       ones, into the tile's own cells; the wrapper gathers rows back. The buffer
                       goes back to the memory warpgroup once that store has read it.

With `split_blocks` (two compute warpgroups; for decode, whose 64-row tile holds only G real rows)
a tile is 64 rows and both warpgroups multiply the same q rows, each over every other KV block of
the item: warpgroup w takes the blocks whose program-wide count c has c % 2 == w. The ring has an
even number of stages, so stage c % num_stages always serves the same warpgroup, which alone waits
on its full barrier (a waiter must observe every phase) and frees it (free barriers count one
arrival). Each keeps its own online softmax (m, l, acc) and, with fp8 pages, its own 16-bit V tile
(and K tile, unless fp8_qk), so the two serial chains (widen -> QK -> softmax -> PV) run side by
side. At the item's end:

    warpgroup 1: m1, l1 --> merge_ml[buf];  acc1 / l1 (16 bits, like a kv split's share) --> the q
                 buffer's second tile (q uses only the first);  arrive `merged`[buf]
    warpgroup 0: wait `merged`[buf];  m = max(m0, m1);  a_i = 2^(m_i - m) (0 where m_i = -inf)
                 l = l0 a0 + l1 a1;  acc = acc0 a0 + (acc1 / l1) l1 a1;  then normalise and store
                 (and, with kv splits, the log-sum-exp m + log2 l) as above

FP8 pages (float8_e4m3fn / float8_e5m2) travel as fp8 from HBM into the ring (half the bytes). wgmma
would multiply fp8 operands, but only K-major ones: K^T (QK's B) is, V (PV's B, [keys, H]) is not,
and 8-bit operands cannot be transposed; q and P would also have to be rounded to fp8. So each
compute warpgroup widens the stage's fp8 tile through registers into its own 16-bit tile buffer
(64 rows at a time: relaid in 8 bits, then converted), frees the ring stage at once, and
multiplies in 16 bits. A compute warpgroup alone (decode) has a tile for V besides K's and widens
V while the tensor cores run Q.K^T. The 16-bit type is f16, whatever q's: Hopper converts a pair of fp8 values
to f16 in one instruction and has none for bf16 (fp8 -> bf16 goes through f32, three more per
pair, and bounded the kernel at a third of copy bandwidth). The wrapper rounds q to f16 (bf16's
range is clipped to f16's; f16 keeps more of the mantissa), the kernel writes the output in the
pages' own units (|x| <= the format's largest value, which f16 holds), and the wrapper applies the
V scale in f32 and casts back to q's dtype. The K scale costs one multiply per score.

With `fp8_qk` (on in the fp8 decode configs, `fp8_decode_config`; off in PREFILL_CONFIG, so
prefill-shaped batches keep 16-bit Q.K^T) the wrapper quantizes q to float8_e4m3fn with one scale
(folded into K's on the scores) and Q.K^T multiplies q's fp8 buffer by the ring's K stage itself
(K^T is K-major: no widening, the stage freed after the wgmma as with 16-bit pages); only V is
widened. The output, and split_blocks' merge, then stage in a 16-bit buffer of their own, where
q's would be.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.kv_quant import is_fp8, quantize_q
from pallas_kernels.ragged_paged_attention_config import (
    RaggedPagedAttentionConfig,
    default_config,
    is_prefill_shaped,
    kv_splits_for,
    num_sms,
    split_table,
)
from pallas_kernels.ragged_paged_attention_reference import check_inputs
from pallas_kernels.ragged_tiles import max_tiles, num_cells, plan_tiles, rows_into_cells, rows_to_tokens

_WG_ROWS = 64  # query rows per compute warpgroup: the M of one wgmma
_RCP_LN2 = 1.4426950408889634  # log2(x) = ln(x) / ln(2)


def _smem_transforms(dtype, head_dim):
    """Swizzled rows of up to 128 bytes, the layout wgmma reads its shared-memory operands in (an fp8
    tile of head_dim 64 has 64-byte rows)."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = min(128, head_dim * itemsize)
    if swizzle < 64 or head_dim % (swizzle // itemsize):
        raise ValueError(f"head_dim {head_dim} must be a multiple of {128 // itemsize} for {jnp.dtype(dtype).name}")
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _widen(src, dst):
    """An fp8 tile in shared memory [block_kv, H] -> the same values in dst's 16-bit dtype, 64 rows
    at a time through registers: loaded in the layout made for 8-bit values (4 bytes a thread),
    relaid to wgmma's while still 8-bit (one shuffle per 4 values), then converted (to f16: one
    instruction per pair; to bf16: through f32)."""
    for r in range(0, src.shape[0], _WG_ROWS):
        rows = pl.ds(r, _WG_ROWS)
        x = plgpu.load(src.at[rows], layout=plgpu.Layout.WGMMA_UPCAST_2X)
        x = plgpu.layout_cast(x, plgpu.Layout.WGMMA)
        if dst.dtype != jnp.float16:
            x = x.astype(jnp.float32)
        dst.at[rows][...] = x.astype(dst.dtype)


def _kernel(
    tile_seq_ref,
    tile_row0_ref,
    tile_row_end_ref,
    tile_base_ref,
    tile_order_ref,
    live_tiles_ref,  # [W] x 5, [1]
    kv_lens_ref,
    page_table_ref,
    cu_q_lens_ref,  # [R], [R, P_max], [R+1]
    k_scale_ref,  # [1] f32 (fp8_qk: times q's scale)
    v_scale_ref,  # [1] f32
    splits_ref,  # [1] int32: the split count, read only with dynamic_splits (else num_splits)
    q_ref,
    k_ref,
    v_ref,  # [K, cells, H], [P, S, K, H], [P, S, K, H]
    *refs,  # out [K, cells, H]; or, split: out [splits, K, cells, H], lse [splits, K, cells]; scratch
    # (q/out, K ring, V ring, P, [lse], [16-bit K/V tile per compute warpgroup: fp8 pages], [merge],
    # [out: fp8_qk]), barriers
    group,
    page_size,
    pages_per_block,
    block_kv,
    num_wgs,
    num_stages,
    num_programs,
    num_kv_heads,
    scale_log2,
    p_from_registers,
    num_splits,
    acc_in_place,
    pingpong,
    split_blocks,
    dynamic_splits,
    fp8_qk,
):
    if num_splits > 1:
        out_ref, lse_ref, q_smem, k_smem, v_smem, p_smem, lse_smem, *refs = refs
    else:
        out_ref, q_smem, k_smem, v_smem, p_smem, *refs = refs
        lse_ref = lse_smem = None
    # fp8 pages: 16-bit tiles the stage's K (and V) are widened into (None: 16-bit pages, multiplied
    # from the ring); v_tile: V's own (one compute warpgroup, or split_blocks), else V shares K's.
    # merge_ml: split_blocks only, warpgroup 1's m and l per q buffer for the merge.
    # o_smem: fp8_qk only, the output (and merge) staging in 16 bits, where the fp8 q buffer can't be.
    kv_tile, v_tile, merge_ml, o_smem, *barriers = refs
    k_full, v_full, q_full, k_free, v_free, q_free, sched, merged = barriers
    out_smem = q_smem if o_smem is None else o_smem
    k_tile = None if fp8_qk else kv_tile  # fp8_qk: K multiplied from the ring; kv_tile, if any, is V's
    dtype = out_ref.dtype  # the 16-bit dtype (f32 interpreting), also q's unless fp8_qk
    head_dim = q_ref.shape[-1]
    row_tiles = 1 if split_blocks else num_wgs  # 64-row q tiles per work tile
    tile_rows = row_tiles * _WG_ROWS
    wg = lax.axis_index("wg")
    program = lax.axis_index("p")

    # Work items (tile, kv head, split), tiles in tile_order (heaviest first), handed out round-robin
    # to the programs, every other round backwards (a snake: heavy and light items even out).
    # dynamic_splits: the count picked on the device for the live tiles, <= num_splits (the outputs'
    # size); programs past the live items do nothing, so fewer splits only leave more of them idle.
    splits = splits_ref[0] if dynamic_splits else num_splits
    items_per_tile = num_kv_heads * splits
    live_items = live_tiles_ref[0] * items_per_tile
    full_rounds = lax.div(live_items, num_programs)

    def round_pos(r):
        return jnp.where(lax.rem(r, 2) == 0, program, num_programs - 1 - program)

    num_items = full_rounds + (round_pos(full_rounds) < live_items - full_rounds * num_programs).astype(jnp.int32)

    def item(r):
        """The r-th item of this program: what both kinds of warpgroup need to know of it."""
        j = r * num_programs + round_pos(r)
        x = lax.div(j, items_per_tile)
        rest = j - x * items_per_tile
        kv_head = lax.div(rest, splits)
        split = rest - kv_head * splits
        w = tile_order_ref[x]
        seq = tile_seq_ref[w]
        row0, row_end = tile_row0_ref[w], tile_row_end_ref[w]
        offset = kv_lens_ref[seq] - cu_q_lens_ref[seq + 1]  # cache position of token t is offset + t
        t_first = lax.div(row0, group)
        t_last = lax.div(jnp.minimum(row0 + tile_rows, row_end) - 1, group)
        kv_stop = offset + t_last + 1  # keys visible to the tile's last row
        num_steps = lax.div(kv_stop + block_kv - 1, block_kv)
        unmasked_steps = jnp.minimum(lax.div(offset + t_first + 1, block_kv), num_steps)
        if num_splits > 1:  # this item's share of the tile's KV blocks; the last shares may be empty
            per_split = lax.div(num_steps + splits - 1, splits)
            first_step = jnp.minimum(split * per_split, num_steps)
            end_step = jnp.minimum(first_step + per_split, num_steps)
        else:
            first_step, end_step = jnp.int32(0), num_steps
        return {
            "kv_head": kv_head,
            "split": split,
            "seq": seq,
            "row0": row0,
            "row_end": row_end,
            "offset": offset,
            "t_last": t_last,
            "kv_stop": kv_stop,
            "unmasked_steps": unmasked_steps,
            "first_step": first_step,
            "end_step": end_step,
            "q_base": tile_base_ref[w],
        }

    # Ring stages count on across items: the c-th K/V block of this program goes to stage c % num_stages.
    # q has two buffers: item r's q (and then its output) in buffer r % 2.
    @pl.when(wg == num_wgs)
    def _memory_warpgroup():
        if acc_in_place and num_wgs > 1:
            plgpu.set_max_registers(40, action="decrease")

        def item_body(r, count):
            it = item(r)
            buf = lax.rem(r, 2)

            @pl.when(r >= 2)
            def _():
                plgpu.barrier_wait(q_free.at[buf])  # item r - 2 is done with this buffer

            for i in range(row_tiles):
                rows = pl.ds(pl.multiple_of(it["q_base"] + i * _WG_ROWS, 8), _WG_ROWS)
                plgpu.copy_gmem_to_smem(q_ref.at[it["kv_head"], rows], q_smem.at[buf, i], q_full.at[buf])
            last_page = lax.div(it["kv_stop"] - 1, page_size)  # pages past it would be masked: reload it instead

            def fetch(src_ref, dst_smem, full, step, stage):
                for i in range(pages_per_block):
                    page = page_table_ref[it["seq"], jnp.minimum(step * pages_per_block + i, last_page)]
                    plgpu.copy_gmem_to_smem(
                        src_ref.at[page, :, it["kv_head"]],
                        dst_smem.at[stage, pl.ds(i * page_size, page_size)],
                        full.at[stage],
                    )

            @pl.loop(it["first_step"], it["end_step"])
            def _step(step):
                c = count + step - it["first_step"]
                stage = lax.rem(c, num_stages)

                @pl.when(c >= num_stages)
                def _():
                    plgpu.barrier_wait(k_free.at[stage])

                fetch(k_ref, k_smem, k_full, step, stage)

                @pl.when(c >= num_stages)
                def _():
                    plgpu.barrier_wait(v_free.at[stage])

                fetch(v_ref, v_smem, v_full, step, stage)

            return count + it["end_step"] - it["first_step"]

        count = lax.fori_loop(0, num_items, item_body, jnp.int32(0))

        @pl.loop(jnp.maximum(count - num_stages, 0), count)
        def _drain(c):  # observe the last frees too: every barrier phase is waited on
            plgpu.barrier_wait(k_free.at[lax.rem(c, num_stages)])
            plgpu.barrier_wait(v_free.at[lax.rem(c, num_stages)])

        @pl.when(num_items >= 2)
        def _():  # and the last q buffer release (the last item's, at its start)
            plgpu.barrier_wait(q_free.at[lax.rem(num_items, 2)])

    def sched_sync():  # ping-pong: the two compute warpgroups take turns on the tensor cores
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < num_wgs)
    def _compute_warpgroup():
        if acc_in_place and num_wgs > 1:
            plgpu.set_max_registers(232, action="increase")
        layout = plgpu.Layout.WGMMA
        score_scale = k_scale_ref[0] * scale_log2  # softmax in base 2; K's scale on the scores
        v_scale = v_scale_ref[0]

        def item_body(r, count):
            it = item(r)
            buf = lax.rem(r, 2)
            rows_of = 0 if split_blocks else wg  # this warpgroup's 64-row q tile (split_blocks: the one tile)
            q_view = q_smem.at[buf, rows_of]  # this warpgroup's q rows
            o_view = out_smem.at[buf, rows_of]  # its output rows (q's buffer unless fp8_qk: q is read no more)
            first_step, end_step, t_last, offset = it["first_step"], it["end_step"], it["t_last"], it["offset"]
            q_row = it["row0"] + rows_of * _WG_ROWS  # logical row: decides the causal mask
            q_cell = pl.multiple_of(it["q_base"] + rows_of * _WG_ROWS, 8)  # where its q and out rows live
            plgpu.barrier_wait(q_full.at[buf])

            @pl.when(r >= 1)
            def _():  # the last item's output has left the other buffer: the memory warpgroup may refill it
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                plgpu.barrier_arrive(q_free.at[1 - buf])

            if pingpong:
                pl.when(wg == 1)(sched_sync)
            m = plgpu.layout_cast(jnp.full((_WG_ROWS,), -jnp.inf, jnp.float32), layout.reduce(1))
            l = plgpu.layout_cast(jnp.full((_WG_ROWS,), 0.0, jnp.float32), layout.reduce(1))
            acc = plgpu.layout_cast(jnp.full((_WG_ROWS, head_dim), 0.0, jnp.float32), layout)

            def operand(ring, full, free, stage, tiles):
                """The stage's K or V tile as a wgmma operand; with fp8 pages, widened into this
                warpgroup's buffer of `tiles` and the stage freed at once. -> (operand, free it
                after use)"""
                plgpu.barrier_wait(full.at[stage])
                if tiles is None:
                    return ring.at[stage], True
                tile = tiles.at[wg]
                _widen(ring.at[stage], tile)
                plgpu.barrier_arrive(free.at[stage])
                plgpu.commit_smem()  # the widened tile, visible to the tensor cores
                return tile, False

            def step_fn(step, carry, *, masked):
                acc, m, l = carry
                stage = lax.rem(count + step - first_step, num_stages)
                k_operand, free_k = operand(k_smem, k_full, k_free, stage, k_tile)
                v_early = []  # fp8 pages, own V tile: V widened while the tensor cores run QK

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_view, k_operand.T)
                    if pingpong:
                        sched_sync()
                    if v_tile is not None:
                        v_early.append(operand(v_smem, v_full, v_free, stage, v_tile))
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((_WG_ROWS, block_kv), jnp.float32))
                if free_k:
                    plgpu.barrier_arrive(k_free.at[stage])
                s = s * score_scale
                if masked:  # rows past the tile's end reuse its last token
                    shape = (_WG_ROWS, block_kv)
                    rows = q_row + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=layout)
                    token = jnp.minimum(lax.div(rows, group), t_last)
                    key = step * block_kv + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=layout)
                    s = jnp.where(key <= offset + token, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                m_use = m_new
                # a kv split, or split_blocks' warpgroup, that has seen only keys past a row's last: all
                # -inf so far; keep it 0/0-free (the first block, seen whole by every row, is not theirs)
                if masked and (num_splits > 1 or split_blocks):
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                if v_early:
                    ((v_operand, free_v),) = v_early
                elif pingpong:  # softmax done: let the other warpgroup's matmuls go, then take ours
                    acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                    plgpu.barrier_arrive(sched)
                    v_operand, free_v = operand(v_smem, v_full, v_free, stage, kv_tile)
                    plgpu.barrier_wait(sched)
                else:
                    v_operand, free_v = operand(v_smem, v_full, v_free, stage, kv_tile)

                if p_from_registers:
                    p_operand = p16
                else:
                    p_operand = p_smem.at[wg]
                    p_operand[...] = p16
                    plgpu.commit_smem()  # make the stores visible to the tensor cores' async proxy

                if acc_in_place:  # compiled path: wgmma accumulates into the registers it is given

                    def pv_into(acc_ref):
                        plgpu.wgmma(acc_ref, p_operand, v_operand)

                    acc = pl.run_state(pv_into)(plgpu.ACC.init(acc))
                else:  # GPU interpret mode lacks run_state: a fresh accumulator plus an add

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p_operand, v_operand)
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((_WG_ROWS, head_dim), jnp.float32))
                if free_v:
                    plgpu.barrier_arrive(v_free.at[stage])
                return acc, m_new, l

            def own_steps(lo, hi, body, carry):
                """body over this warpgroup's steps of lo..hi-1: all of them; with split_blocks those
                whose block count c (stage c % num_stages) has the warpgroup's parity, so that with
                an even ring each stage, and its full barrier's every phase, serves one warpgroup."""
                if not split_blocks:
                    return lax.fori_loop(lo, hi, body, carry)
                start = lo + lax.rem(count - first_step + lo - wg + 2, 2)  # the operand is >= 1
                return lax.fori_loop(0, lax.div(hi - start + 1, 2), lambda i, c: body(start + 2 * i, c), carry)

            carry = (acc, m, l)
            mid = jnp.clip(it["unmasked_steps"], first_step, end_step)
            carry = own_steps(first_step, mid, functools.partial(step_fn, masked=False), carry)
            acc, m, l = own_steps(mid, end_step, functools.partial(step_fn, masked=True), carry)
            if pingpong:
                pl.when(wg == 0)(sched_sync)

            def finish(acc, m, l):
                """Normalise, and store the rows (with kv splits, their log-sum-exp too)."""
                if num_splits > 1:  # an empty share (l = 0) stores 0 with log-sum-exp -inf
                    l_safe = jnp.where(l == 0.0, 1.0, l)
                    lse_smem.at[rows_of][...] = jnp.where(l == 0.0, -jnp.inf, m + jnp.log(l_safe) * _RCP_LN2)
                else:
                    l_safe = l
                acc = acc * lax.broadcast_in_dim(v_scale / l_safe, acc.shape, [0])
                o_view[...] = acc.astype(dtype)
                plgpu.commit_smem()
                out_view = out_ref.at[it["split"]] if num_splits > 1 else out_ref
                # TMA boxes are static: store the smallest of 8/16/32/64 leading rows that covers the
                # valid ones (a decode tile has only G), nothing when the warpgroup has none.
                num_valid = jnp.clip(it["row_end"] - q_row, 0, _WG_ROWS)
                size, lower = _WG_ROWS, _WG_ROWS // 2
                while size >= 8:

                    @pl.when((num_valid > (lower if size > 8 else 0)) & (num_valid <= size))
                    def _store(size=size):
                        plgpu.copy_smem_to_gmem(
                            o_view.at[pl.ds(0, size)], out_view.at[it["kv_head"], pl.ds(q_cell, size)]
                        )
                        if lse_ref is not None:
                            plgpu.copy_smem_to_gmem(
                                lse_smem.at[rows_of, pl.ds(0, size)],
                                lse_ref.at[it["split"], it["kv_head"], pl.ds(q_cell, size)],
                            )

                    size, lower = size // 2, lower // 2

            if not split_blocks:
                finish(acc, m, l)
            else:  # warpgroup 1 hands its (m, l, acc) over shared memory; warpgroup 0 merges and stores
                ml = merge_ml.at[buf]
                half = out_smem.at[buf, 1]  # the output buffer's second tile, unused by q in this mode

                @pl.when(wg == 1)
                def _hand_over():
                    ml.at[0][...] = m
                    ml.at[1][...] = l
                    # acc normalised (an empty half: 0), so that 16 bits hold it as they hold a kv
                    # split's share (fp8 pages: |x| <= the format's largest value, which f16 holds)
                    inv_l = 1.0 / jnp.where(l == 0.0, 1.0, l)
                    half[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
                    plgpu.barrier_arrive(merged.at[buf])  # release: wg 0's loads after its wait see the stores

                @pl.when(wg == 0)
                def _merge():
                    plgpu.barrier_wait(merged.at[buf])
                    m1 = plgpu.load(ml.at[0], layout=layout.reduce(1))
                    l1 = plgpu.load(ml.at[1], layout=layout.reduce(1))
                    o1 = plgpu.load(half, layout=layout).astype(jnp.float32)
                    # both halves on a common max: acc = acc0 2^(m0-m) + (acc1/l1) l1 2^(m1-m); m = -inf
                    # only where neither half saw a key (an empty kv split), whose l stays 0
                    m_new = jnp.maximum(m, m1)
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    a0, a1 = jnp.exp2(m - m_use), jnp.exp2(m1 - m_use)
                    acc_new = acc * lax.broadcast_in_dim(a0, acc.shape, [0])
                    acc_new = acc_new + o1 * lax.broadcast_in_dim(l1 * a1, acc.shape, [0])
                    finish(acc_new, m_new, l * a0 + l1 * a1)

            return count + end_step - first_step

        lax.fori_loop(0, num_items, item_body, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)


def _combine_splits(parts, lse, splits=None):
    """parts [splits, ..., H] (each share's output, normalised over its keys), lse [splits, ...]
    (base 2) -> the attention over all keys, f32. splits (dynamic_splits: a traced count): only
    the first this many shares were written."""
    if splits is not None:  # select, never multiply: the unwritten shares may hold NaN
        written = jnp.arange(lse.shape[0]) < splits
        lse = jnp.where(written.reshape(-1, *[1] * (lse.ndim - 1)), lse, -jnp.inf)
        parts = jnp.where(written.reshape(-1, *[1] * (parts.ndim - 1)), parts, jnp.zeros((), parts.dtype))
    top = lse.max(axis=0)
    weight = jnp.exp2(lse - top)  # shares with lse -inf weigh 0
    num = (weight[..., None] * parts.astype(jnp.float32)).sum(axis=0)
    return num / weight.sum(axis=0)[..., None]


def config_for(q, k_pages, kv_lens, config: RaggedPagedAttentionConfig | None = None) -> RaggedPagedAttentionConfig:
    """The config a call with these arguments runs: `config`, or the one their shapes pick
    (`default_config`). Tests and checks ask it which tolerance a call's rounding earns."""
    if config is not None:
        return config
    return default_config(
        q.shape[0],
        kv_lens.shape[0],
        group=q.shape[1] // k_pages.shape[2],
        page_size=k_pages.shape[1],
        fp8_pages=is_fp8(k_pages.dtype),
    )


def _attention_call(
    q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, k_scale, v_scale, *, sm_scale, config, interpret
):
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_rows = page_table.shape[0]
    out_dtype, out_scale = q.dtype, None
    valid = jnp.arange(num_tokens) < cu_q_lens[num_seqs[0]]  # live tokens; past them, padding
    if is_fp8(k_pages.dtype) and q.dtype.itemsize == 2:  # f16 inside (the module's docstring says why)
        top = float(jnp.finfo(jnp.float16).max)
        q = jnp.clip(q, -top, top).astype(jnp.float16)
        v_scale, out_scale = jnp.float32(1), v_scale
    fp8_qk = config.fp8_qk
    if fp8_qk:  # q's scale joins K's on the scores: (q8 q_scale) . (k8 k_scale)
        q8, q_scale = quantize_q(q, valid)
        k_scale = k_scale * q_scale
    group = num_heads // num_kv_heads
    num_wgs = config.compute_warpgroups
    split_blocks = config.split_blocks
    tile_rows = (1 if split_blocks else num_wgs) * _WG_ROWS  # split_blocks: both warpgroups share 64 rows
    block_kv = max(page_size, config.block_kv)
    if block_kv % page_size:
        raise ValueError(f"block_kv {config.block_kv} must be a multiple of page size {page_size} (or smaller than it)")
    num_tiles = max_tiles(num_tokens, num_rows, group, tile_rows)
    # the shape both split rules see (the static count also bounds the dynamic table's grid)
    split_args = (config, num_tokens, num_rows, num_kv_heads, page_table.shape[1], page_size, num_sms(interpret))
    num_splits = kv_splits_for(*split_args, group=group)
    max_items = num_tiles * num_kv_heads * num_splits
    split_of_live = None  # dynamic_splits: [num_tiles + 1], the split count by live tiles
    if config.dynamic_splits:
        if is_prefill_shaped(num_tokens, num_rows, group=group):
            raise ValueError(f"dynamic_splits is for decode-shaped batches, got T={num_tokens} over R={num_rows} rows")
        # within the grid the static pick launches for a full bucket: a full bucket gets no more programs
        split_of_live = split_table(*split_args, group=group, num_tiles=num_tiles)
        num_splits = int(split_of_live.max())  # one live tile's count: the outputs hold this many shares
        max_items = max(live * num_kv_heads * int(s) for live, s in enumerate(split_of_live))
        if num_splits == 1:  # nothing to pick
            split_of_live = None
    tile_seq, tile_row0, tile_row_end, tile_base, tile_order, live_tiles, cell_src, row_cell = plan_tiles(
        cu_q_lens,
        num_seqs,
        group=group,
        rows_per_tile=tile_rows,
        num_tiles=num_tiles,
        num_tokens=num_tokens,
        # tiles differ in work: hand out the heaviest first
        kv_lens=kv_lens if is_prefill_shaped(num_tokens, num_rows, group=group) else None,
    )
    qg = rows_into_cells(q8 if fp8_qk else q, cell_src, num_kv_heads)
    cells = num_cells(num_tokens, group, num_tiles, tile_rows)

    transforms = _smem_transforms(q.dtype, head_dim)  # the 16-bit buffers (f32 interpreting)
    kv_transforms = _smem_transforms(k_pages.dtype, head_dim)
    num_stages = config.num_stages
    kv_block = (num_stages, block_kv, head_dim)
    pages_per_block = block_kv // page_size
    p_from_registers = config.p_from_registers and not interpret
    num_programs = config.num_programs
    if num_programs is None:  # one resident program per SM: shared memory allows no more at head_dim 128
        num_programs = num_sms(interpret)
    num_programs = min(num_programs, max_items) if num_programs else max_items
    # P's buffer: none when P stays in registers (every allocation takes whole KiB: with H = 128 the
    # decode config's q buffers and ring leave ~3 KiB of the 227).
    p_scratch = None if p_from_registers else plgpu.SMEM((num_wgs, _WG_ROWS, block_kv), q.dtype, transforms=transforms)
    pingpong = config.pingpong and num_wgs == 2
    # fp8 pages: each compute warpgroup widens K, then V, into 16-bit tiles (the wgmma operands).
    # A warpgroup alone (decode) gives V a tile of its own, widened while the QK matmul runs; so
    # does split_blocks (each warpgroup its own chain), whose ring is smaller for the four tiles.
    # Two warpgroups of their own rows share one tile: four would not fit beside the ring.
    widen = is_fp8(k_pages.dtype)
    own_v_tile = widen and (num_wgs == 1 or split_blocks)
    kernel = functools.partial(
        _kernel,
        group=group,
        page_size=page_size,
        pages_per_block=pages_per_block,
        block_kv=block_kv,
        num_wgs=num_wgs,
        num_stages=num_stages,
        num_programs=num_programs,
        num_kv_heads=num_kv_heads,
        scale_log2=sm_scale * math.log2(math.e),
        p_from_registers=p_from_registers,
        num_splits=num_splits,
        acc_in_place=not interpret,
        pingpong=pingpong,
        split_blocks=split_blocks,
        dynamic_splits=split_of_live is not None,
        fp8_qk=fp8_qk,
    )
    out_shape = jax.ShapeDtypeStruct((num_kv_heads, cells, head_dim), q.dtype)
    # q / out buffers: two, so that a program's next item loads under this one; one when every
    # program runs a single item (decode's default), which frees 16 KiB per warpgroup (dynamic_splits:
    # max_items bounds the live items of every live-tile count, so this still holds). With
    # split_blocks a buffer's second tile takes warpgroup 1's partial output for the merge.
    q_buffers = 1 if num_programs == max_items else 2
    out_buffer = plgpu.SMEM((q_buffers, num_wgs, _WG_ROWS, head_dim), q.dtype, transforms=transforms)
    if fp8_qk:  # q in fp8 (its 64-row tiles only); the output and the merge get out_buffer
        q_buffer = plgpu.SMEM(
            (q_buffers, tile_rows // _WG_ROWS, _WG_ROWS, head_dim), q8.dtype, transforms=kv_transforms
        )
    else:  # q's buffer takes the output
        q_buffer, out_buffer = out_buffer, None
    scratch = [
        q_buffer,
        plgpu.SMEM(kv_block, k_pages.dtype, transforms=kv_transforms),
        plgpu.SMEM(kv_block, v_pages.dtype, transforms=kv_transforms),
        p_scratch,
    ]
    consumers = 1 if split_blocks else num_wgs  # compute warpgroups that free each stage
    barriers = [
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),  # k_full
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=num_stages),  # v_full
        plgpu.Barrier(num_arrivals=tile_rows // _WG_ROWS, num_barriers=2),  # q_full: a TMA copy per 64 rows
        plgpu.Barrier(num_arrivals=consumers, num_barriers=num_stages),  # k_free
        plgpu.Barrier(num_arrivals=consumers, num_barriers=num_stages),  # v_free
        plgpu.Barrier(num_arrivals=num_wgs, num_barriers=2),  # q_free
        plgpu.Barrier(num_arrivals=num_wgs),  # sched (ping-pong)
        plgpu.Barrier(num_arrivals=1, num_barriers=2),  # merged (split_blocks): per q buffer, wg 1's state
    ]
    if num_splits > 1:
        out_shape = (
            jax.ShapeDtypeStruct((num_splits, *out_shape.shape), q.dtype),
            jax.ShapeDtypeStruct((num_splits, num_kv_heads, cells), jnp.float32),
        )
        scratch.append(plgpu.SMEM((num_wgs, _WG_ROWS), jnp.float32))
    tile = plgpu.SMEM((num_wgs, block_kv, head_dim), q.dtype, transforms=transforms)
    # K's tile (V's too where V has none); fp8_qk widens no K, so keeps it only for a V without its own
    kv_tile = widen and not (fp8_qk and own_v_tile)  # the kernel's kv_tile
    scratch += [tile if kv_tile else None, tile if own_v_tile else None]
    scratch.append(plgpu.SMEM((q_buffers, 2, _WG_ROWS), jnp.float32) if split_blocks else None)  # merge_ml
    scratch.append(out_buffer)
    call = plgpu.kernel(
        kernel,
        out_type=out_shape,
        scratch_types=scratch + barriers,
        grid=(num_programs,),
        grid_names=("p",),
        num_threads=num_wgs + 1,
        thread_name="wg",
        # Row reductions of the WGMMA layout stay inside a warp: no shared-memory scratch for them.
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    if split_of_live is not None:
        splits = jnp.asarray(split_of_live)[live_tiles[0]][None]  # picked on the device from the live tiles
    else:
        splits = jnp.full((1,), num_splits, jnp.int32)
    out = call(
        tile_seq,
        tile_row0,
        tile_row_end,
        tile_base,
        tile_order,
        live_tiles,
        kv_lens,
        page_table,
        cu_q_lens,
        # two operands, not one stacked: a reshape is free, a stack is a kernel a layer
        k_scale.reshape(1),
        v_scale.reshape(1),
        splits,
        qg,
        k_pages,
        v_pages,
    )
    if num_splits > 1:
        parts, lse = out
        out = _combine_splits(parts[:, :, row_cell], lse[:, :, row_cell], None if split_of_live is None else splits[0])
    else:
        out = out[:, row_cell]
    if out_scale is not None:
        out = out.astype(jnp.float32) * out_scale
    out = rows_to_tokens(out.astype(out_dtype), num_tokens, num_heads)
    return jnp.where(valid[:, None, None], out, jnp.zeros((), out_dtype))  # rows nobody wrote: padding tokens


@functools.partial(jax.jit, static_argnames=("sm_scale", "config", "interpret"))
def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [P, S, K, H]
    v_pages: jax.Array,  # [P, S, K, H]
    kv_lens: jax.Array,  # [R] int32
    page_table: jax.Array,  # [R, P_max] int32
    cu_q_lens: jax.Array,  # [R+1] int32
    num_seqs: jax.Array,  # [1] int32
    k_scale: float | jax.Array = 1.0,  # [] f32: the pages hold K / k_scale
    v_scale: float | jax.Array = 1.0,  # [] f32: the pages hold V / v_scale
    *,
    sm_scale: float,
    config: RaggedPagedAttentionConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H]
    """The Mosaic GPU kernel (Hopper; `interpret=True` runs the same body on the CPU).

    Pages are q's dtype or fp8 (float8_e4m3fn, float8_e5m2). Every page_table entry up to page
    (kv_lens[r] - 1) // S of a live row must be a valid page id; the rest are never read. config
    None picks by shape (`default_config`)."""
    check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    if q.shape[2] % 64 or q.shape[2] > 256:
        raise ValueError(f"head_dim must be a multiple of 64 up to 256, got {q.shape[2]}")
    if q.dtype != k_pages.dtype and not is_fp8(k_pages.dtype):
        raise ValueError(f"k_pages dtype {k_pages.dtype} must be q dtype {q.dtype} or fp8")
    allowed = (jnp.bfloat16, jnp.float16) if not interpret else (jnp.bfloat16, jnp.float16, jnp.float32)
    if q.dtype not in map(jnp.dtype, allowed):
        raise ValueError(
            f"q dtype must be one of {[jnp.dtype(d).name for d in allowed]}, got {q.dtype}"
            + ("" if interpret else " (float32 runs in interpret mode only)")
        )
    page_size = k_pages.shape[1]
    if page_size % 8 or page_size > 256:
        raise ValueError(f"page size (k_pages.shape[1]) must be a multiple of 8 up to 256, got {page_size}")
    config = config_for(q, k_pages, kv_lens, config)
    if config.fp8_qk and not is_fp8(k_pages.dtype):
        raise ValueError(f"config.fp8_qk needs fp8 pages (float8_e4m3fn, float8_e5m2), got {k_pages.dtype}")
    return _attention_call(
        q,
        k_pages,
        v_pages,
        kv_lens,
        page_table,
        cu_q_lens,
        num_seqs,
        jnp.asarray(k_scale, jnp.float32),
        jnp.asarray(v_scale, jnp.float32),
        sm_scale=sm_scale,
        config=config,
        interpret=interpret,
    )
