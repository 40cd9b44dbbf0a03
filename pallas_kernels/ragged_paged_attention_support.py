"""What the ragged paged attention kernel (and its K/V page writer) can run: dtype, head_dim, page
size and device, asked before anything is built.

    unmet_requirements(dtype, head_dim, page_size, interpret=..., compute_capability=..., kv_dtype=...)
        -> []                       the kernel runs these, with the configs it picks by shape
        -> ["needs ...", ...]       each requirement these miss, named

Compiled (Mosaic GPU) the kernel needs:
    a Hopper GPU            compute capability 9.x: wgmma and TMA (Ampere has neither; Blackwell
                            has TMA but no wgmma)
    bfloat16 or float16     wgmma's 16-bit operands (float32 runs in interpret mode only); the pages
                            that dtype or fp8 (float8_e4m3fn, float8_e5m2: widened to it in the kernel)
    head_dim                a multiple of 64 (one 128-byte swizzled row) up to 256
    page size               a multiple of 8 up to 256 whose K/V block max(S, block_kv) is a whole
                            number of pages and a multiple of 64 (the PV wgmma's K): S in
                            8, 16, 32, 64, 128 or 192, 256
    shared memory           the config's q buffers and K/V ring fit Hopper's 227 KiB: at 16 bits
                            head_dim 64 with any page size above, head_dim 128 with S <= 128;
                            head_dim 192 and 256 never fit with DECODE_CONFIG / PREFILL_CONFIG;
                            fp8 pages halve the ring and add 16-bit tiles per compute
                            warpgroup: V (decode: FP8_DECODE_CONFIG, two warpgroups
                            splitting the blocks, Q.K^T in fp8), one for both (prefill);
                            head_dim 128 with S <= 128 fits
Interpret mode (any backend; tests) needs only the dtype (float32 too), head_dim and page size.
`ragged_paged_attention` itself checks the dtype, head_dim and page size when called; the shared
memory it finds too big only when Mosaic GPU lowers it (tests/engine/test_attention_choice.py
holds this file to both).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.kv_quant import is_fp8
from pallas_kernels.ragged_paged_attention_config import (
    DECODE_CONFIG,
    PREFILL_CONFIG,
    RaggedPagedAttentionConfig,
    fp8_decode_config,
)

COMPILED_DTYPES = ("bfloat16", "float16")
INTERPRET_DTYPES = ("bfloat16", "float16", "float32")
HOPPER_SMEM_BYTES = 227 * 1024  # shared memory one thread block may use on sm_90
MAX_HEAD_DIM = 256
MAX_PAGE_SIZE = 256
_WG_ROWS = 64  # query rows per compute warpgroup (ragged_paged_attention._WG_ROWS)


def _configs(page_size: int, fp8_pages: bool) -> tuple[RaggedPagedAttentionConfig, ...]:
    """What `default_config` picks from for these pages."""
    return (fp8_decode_config(page_size) if fp8_pages else DECODE_CONFIG, PREFILL_CONFIG)


def shared_memory_bytes(
    config: RaggedPagedAttentionConfig, head_dim: int, page_size: int, itemsize: int, kv_itemsize: int | None = None
) -> int:
    """Shared memory the compiled kernel allocates for one program, as `_attention_call` lays it out:
    the q/out buffers of each compute warpgroup (one with a program per item, else two), the K and
    V rings (of kv_itemsize; default itemsize), P's buffer (unless P stays in registers), the split
    log-sum-exp rows (counted always: splits are picked per batch), with 8-bit pages the widened
    16-bit tiles (K and V per warpgroup, or one per warpgroup for both when two warpgroups share
    q-row tiles), split_blocks' merge rows, and the barriers (8 bytes each). fp8_qk: q's buffers in
    8 bits (its 64-row tiles only) beside 16-bit output buffers, and no K tile of its own. Each
    buffer takes whole KiB (Pallas rounds every scratch allocation up to 1024 bytes)."""
    kv_itemsize = kv_itemsize or itemsize
    wgs, stages = config.compute_warpgroups, config.num_stages
    block_kv = max(page_size, config.block_kv)
    q_buffers = 1 if config.num_programs == 0 else 2
    fp8_qk = config.fp8_qk and kv_itemsize == 1
    row_tiles = 1 if config.split_blocks else wgs
    buffers = [
        q_buffers * wgs * _WG_ROWS * head_dim * itemsize,  # q / out (fp8_qk: out)
        q_buffers * row_tiles * _WG_ROWS * head_dim if fp8_qk else 0,  # fp8_qk: q in 8 bits
        stages * block_kv * head_dim * kv_itemsize,  # K ring
        stages * block_kv * head_dim * kv_itemsize,  # V ring
        0 if config.p_from_registers else wgs * _WG_ROWS * block_kv * itemsize,  # P
        wgs * _WG_ROWS * 4,  # the kv splits' log-sum-exp rows
    ]
    if kv_itemsize == 1:  # widened 16-bit tiles: K's, and V's own where a warpgroup has its own chain
        tile = wgs * block_kv * head_dim * itemsize
        own_v = wgs == 1 or config.split_blocks
        buffers += [0 if fp8_qk and own_v else tile, tile if own_v else 0]
    if config.split_blocks:
        buffers.append(q_buffers * 2 * _WG_ROWS * 4)  # merge rows (m, l)
    barriers = 8 * (4 * stages + 7)  # k/v full and free per stage; q full and free, merged x 2; sched
    return sum(-(-b // 1024) * 1024 for b in buffers) + barriers


def _blocks_fit(page_size: int) -> bool:
    """The K/V block of max(S, block_kv) tokens is a whole number of pages and a multiple of 64 (the
    PV wgmma's K, one swizzled row of 16-bit values), for each config picked by shape."""
    configs = _configs(page_size, fp8_pages=False) + _configs(page_size, fp8_pages=True)
    return all(max(page_size, c.block_kv) % page_size == 0 and max(page_size, c.block_kv) % 64 == 0 for c in configs)


def unmet_requirements(
    dtype,
    head_dim: int,
    page_size: int,
    *,
    interpret: bool = False,
    compute_capability: str | None = None,
    kv_dtype=None,
) -> list[str]:
    """Each thing the kernel needs that these lack, as "needs ..." phrases; [] when it runs them.
    compute_capability: the CUDA GPU's ("9.0"), None where there is none; ignored when interpreting.
    kv_dtype: the pages' (None: dtype)."""
    name = jnp.dtype(dtype).name
    kv_name = jnp.dtype(kv_dtype if kv_dtype is not None else dtype).name
    unmet = []
    if kv_name != name and not is_fp8(kv_name):
        unmet.append(f"needs KV pages of the model's dtype ({name}) or fp8; got {kv_name}")
    if not interpret:
        major = compute_capability.split(".")[0] if compute_capability else None
        if major != "9":
            got = f"sm_{compute_capability.replace('.', '')}" if compute_capability else "no CUDA GPU"
            unmet.append(f"needs a Hopper GPU (compute capability 9.x, sm_90: H100, H200); got {got}")
    allowed = INTERPRET_DTYPES if interpret else COMPILED_DTYPES
    if name not in allowed:
        note = "" if interpret else "; float32 runs in interpret mode only"
        unmet.append(f"needs dtype {' or '.join(allowed)}; got {name}{note}")
    head_ok = head_dim % 64 == 0 and 0 < head_dim <= MAX_HEAD_DIM
    if not head_ok:
        unmet.append(f"needs head_dim a multiple of 64 up to {MAX_HEAD_DIM}; got {head_dim}")
    page_ok = page_size % 8 == 0 and 0 < page_size <= MAX_PAGE_SIZE
    if not page_ok:
        unmet.append(f"needs page size a multiple of 8 up to {MAX_PAGE_SIZE}; got {page_size}")
    elif not _blocks_fit(page_size):
        page_ok = False
        sizes = ", ".join(str(s) for s in range(8, MAX_PAGE_SIZE + 1, 8) if _blocks_fit(s))
        unmet.append(
            f"needs a page size whose K/V blocks are whole pages and multiples of 64 ({sizes}); got {page_size}"
        )
    if not interpret and head_ok and page_ok:
        itemsize = jnp.dtype(name if name in COMPILED_DTYPES else COMPILED_DTYPES[0]).itemsize
        kv_itemsize = 1 if is_fp8(kv_name) else itemsize
        configs = _configs(page_size, is_fp8(kv_name))
        need = max(shared_memory_bytes(c, head_dim, page_size, itemsize, kv_itemsize) for c in configs)
        if need > HOPPER_SMEM_BYTES:
            unmet.append(
                f"needs its q buffers and K/V ring within {HOPPER_SMEM_BYTES // 1024} KiB of shared memory "
                f"(a smaller page size or head_dim); head_dim {head_dim} with page size {page_size} takes "
                f"{-(-need // 1024)} KiB"
            )
    return unmet
